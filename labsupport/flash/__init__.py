"""Chapter 01: online softmax, tiled (FlashAttention-2 style) attention, IO counting, a Triton kernel.

=================  ===============================================================================
module             holds
=================  ===============================================================================
``reference``      the readable math: ``causal_mask``, ``stable_softmax``, ``naive_attention``,
                   ``online_softmax_row``, and the online-softmax update the tiled loops use (exercise 1's
                   answer, so not re-exported here); the conventions of the chapter
``tiled``          ``flash_attention_forward`` / ``flash_attention_backward`` (tile loops in PyTorch),
                   ``FlashAttentionFunction`` and ``flash_attention`` (autograd)
``io``             the two-level memory model: ``TwoLevelMemory``, ``IOReport``,
                   ``standard_attention_io``, ``flash_attention_io``, ``flash_block_sizes``
``widget``         ``TileStep``, ``tile_trace``: the recorded tile walk behind the chapter's explorer
``exercises``      the checkers ``check_online_softmax_update``, ``check_flash_forward``,
                   ``check_flash_backward`` and their seeded cases
``triton``         the Triton forward and backward kernels (``triton_flash_forward``, ...); optional,
                   not imported here: ``from labsupport.flash import triton as flash_triton``
``tma``            ``tma_flash_forward``: the forward with Hopper TMA tensor descriptors (optional, not
                   imported here, like ``triton``)
``hopper``         "the last 20% on Hopper": ``ladder_forward``, one kernel whose compile-time switches add
                   one optimisation per step (``LADDER``, ``EXTRAS``); imports Triton, not imported here
``fp8``            FP8 (e4m3) with per-block scales in PyTorch: ``quantize_rows``, ``quantize_channels``,
                   ``fp8_attention_emulated``, ``precision_error_table`` (no Triton; not re-exported)
``fp8_triton``     ``fp8_flash_forward``: the FP8 forward kernel with per-block scales (imports Triton)
``gpu_results``    the stored GPU run of the ladder: ``find_stored_results``, ``step_table``, ``step_gains``
=================  ===============================================================================

Everything but ``triton``, ``tma``, ``hopper``, ``fp8``, ``fp8_triton``, ``gpu_results`` and the exercises'
answers is re-exported here, e.g. ``from labsupport import flash as ref;
ref.flash_attention_forward(q, k, v, causal=True)``. The package never imports Triton itself, so
it imports on machines without it, and ``TRITON_INTERPRET`` can still be set before the first
``from labsupport.flash import triton``.
"""

from labsupport.flash.exercises import check_flash_backward, check_flash_forward, check_online_softmax_update
from labsupport.flash.io import (
    IOReport,
    TwoLevelMemory,
    flash_attention_io,
    flash_block_sizes,
    standard_attention_io,
)
from labsupport.flash.reference import (
    causal_mask,
    naive_attention,
    online_softmax_row,
    stable_softmax,
)
from labsupport.flash.tiled import (
    FlashAttentionFunction,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
)
from labsupport.flash.widget import TileStep, tile_trace

__all__ = [
    "FlashAttentionFunction",
    "IOReport",
    "TileStep",
    "TwoLevelMemory",
    "causal_mask",
    "check_flash_backward",
    "check_flash_forward",
    "check_online_softmax_update",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_forward",
    "flash_attention_io",
    "flash_block_sizes",
    "naive_attention",
    "online_softmax_row",
    "stable_softmax",
    "standard_attention_io",
    "tile_trace",
]
