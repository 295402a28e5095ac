"""Chapter 05: sparse attention — static masks, block-sparse execution, sinks, dynamic selection, KV eviction.

=================  ===============================================================================================
module             holds
=================  ===============================================================================================
``masks``          static patterns as boolean masks (sliding window, sinks + window, dilated, global, random
                   blocks, BigBird) and ``BlockLayout`` / ``block_layout``: tiles sorted into empty, partial, full
``reference``      ``masked_attention`` (dense, the yardstick) and ``online_softmax_step``
``blocksparse``    ``block_sparse_forward`` (the readable tile loop that skips empty tiles) and
                   ``block_sparse_attention`` (the same skip with gathered key blocks, the CPU fast path)
``selection``      Quest's ``page_bounds`` / ``page_upper_bound`` / ``quest_token_mask``; NSA's ``nsa_decode``
                   and ``nsa_token_counts``; MoBA-style ``block_select_mask``
``policies``       decode-time KV policies: ``CachePolicy``, ``PolicyKVCache`` (full, window, sinks, H2O, TOVA,
                   Quest, SnapKV), the eviction choices ``h2o_victim``, ``tova_victim``
``mixers``         ``SparseAttention`` (RoPE, static masks, policy caches) and ``sparse_mixer`` for ``TinyLM``;
                   ``decode_logits``, ``policy_recall``, ``streaming_perplexity``
``prefill``        dynamic sparse prefill: MInference's ``vertical_slash_mask`` and ``vertical_slash_selection``
``indexer``        DeepSeek Sparse Attention's ``LightningIndexer``, ``indexer_kl``, ``topk_mask``, ``train_indexer``
``checkpoints``    the shipped trained models (``load_checkpoint``)
``widget``         the attention-sparsity explorer's data and figure
``exercises``      the exercise solutions and their checkers ``check_*``
``triton``         a block-sparse Triton forward kernel; optional, not imported here:
                   ``from labsupport.sparse import triton as sparse_triton``
=================  ===============================================================================================

The notebook imports the package as ``sparse``: ``from labsupport import sparse``. Byte and token formulas of
decode policies live in :mod:`labsupport.harness.costs`.
"""

from labsupport.sparse.exercises import (
    check_block_select,
    check_block_sparse_loop,
    check_h2o_evict,
    check_page_upper_bound,
    check_sink_window_mask,
    check_streaming_step,
    check_tova_evict,
)
from labsupport.sparse.blocksparse import block_sparse_attention, block_sparse_forward, gathered_block_indices
from labsupport.sparse.indexer import LightningIndexer, indexer_kl, indexer_selection, topk_mask, train_indexer
from labsupport.sparse.masks import (
    EMPTY,
    FULL,
    PARTIAL,
    BlockLayout,
    WindowPattern,
    bigbird_mask,
    block_layout,
    causal_mask,
    dilated_mask,
    global_token_mask,
    mask_density,
    random_block_mask,
    sink_window_mask,
    sliding_window_mask,
)
from labsupport.sparse.mixers import (
    SparseAttention,
    decode_logits,
    policy_recall,
    rotate_half_rope,
    set_policy,
    set_static_mask,
    sparse_mixer,
    streaming_perplexity,
)
from labsupport.sparse.policies import POLICIES, CachePolicy, PolicyKVCache, h2o_victim, tova_victim
from labsupport.sparse.prefill import vertical_slash_mask, vertical_slash_selection
from labsupport.sparse.reference import masked_attention, online_softmax_step
from labsupport.sparse.widget import EXPLORER_PATTERNS, ExplorerData, explorer_data, explorer_figure
from labsupport.sparse.selection import (
    NSAResult,
    block_select_mask,
    nsa_decode,
    nsa_token_counts,
    page_bounds,
    page_upper_bound,
    quest_token_mask,
)

__all__ = [
    "EMPTY",
    "EXPLORER_PATTERNS",
    "ExplorerData",
    "FULL",
    "LightningIndexer",
    "PARTIAL",
    "POLICIES",
    "BlockLayout",
    "CachePolicy",
    "NSAResult",
    "PolicyKVCache",
    "SparseAttention",
    "WindowPattern",
    "bigbird_mask",
    "block_select_mask",
    "block_layout",
    "block_sparse_attention",
    "block_sparse_forward",
    "causal_mask",
    "check_block_select",
    "check_block_sparse_loop",
    "check_h2o_evict",
    "check_page_upper_bound",
    "check_sink_window_mask",
    "check_streaming_step",
    "check_tova_evict",
    "decode_logits",
    "dilated_mask",
    "explorer_data",
    "explorer_figure",
    "gathered_block_indices",
    "global_token_mask",
    "h2o_victim",
    "indexer_kl",
    "indexer_selection",
    "mask_density",
    "masked_attention",
    "nsa_decode",
    "nsa_token_counts",
    "online_softmax_step",
    "page_bounds",
    "page_upper_bound",
    "policy_recall",
    "quest_token_mask",
    "random_block_mask",
    "rotate_half_rope",
    "set_policy",
    "set_static_mask",
    "sink_window_mask",
    "sliding_window_mask",
    "sparse_mixer",
    "streaming_perplexity",
    "topk_mask",
    "tova_victim",
    "train_indexer",
    "vertical_slash_mask",
    "vertical_slash_selection",
]
