"""Chapter 09: efficient multimodal models — pixels are expensive tokens.

=================  ===============================================================================================
module             holds
=================  ===============================================================================================
``images``         the shipped 8×8 digits (``load_digits``), the generated segment task (``segment_task``),
                   ``patchify`` / ``unpatchify``, ``patch_grid`` and ``PatchEmbedding`` (row + column positions)
``scans``          2-D scan orders as permutations (row, column, snake, Vim's bidirectional, VMamba's cross-scan),
                   ``inverse_permutation``, ``seen_mask``, ``neighbour_distance``, the selective
                   ``GatedRecurrence`` and ``ScanMixer`` / ``scan_mixer`` (any ``lm`` mixer factory along an order)
``models``         ``PatchClassifier`` (``lm`` blocks over patch tokens), ``train_classifier``, ``accuracy``
``merging``        ToMe: ``bipartite_matches``, ``merge_tokens`` (size-weighted), ``tome_merge``, ``merge_sources``
``vit``            ``SizedAttention`` (proportional attention), ``ToMeViT``, ``TinyVLM`` with FastV pruning,
                   ``fastv_keep``
``routing``        Mixture-of-Depths: ``mod_route`` (top-``capacity`` tokens through a block, router-weighted),
                   ``kept_count``, ``MoDBlock``, ``MoDViT``
``widget``         the scan-order explorer and the ToMe merge view
``exercises``      the exercise checkers ``check_*``
=================  ===============================================================================================

The package imports only ``labsupport.harness`` and ``labsupport.lm``. Other families' mixers will reach it
through chapter 07's registry: ``scan_mixer(order, h, w, inner=<a registry factory>)``.
"""

from labsupport.multimodal.images import (
    Digits,
    PatchEmbedding,
    load_digits,
    patch_grid,
    patchify,
    segment_task,
    unpatchify,
)
from labsupport.multimodal.merging import bipartite_matches, merge_sources, merge_tokens, tome_merge
from labsupport.multimodal.models import PatchClassifier, accuracy, init_encoder, seeded, train_classifier
from labsupport.multimodal.routing import MoDBlock, MoDViT, kept_count, mod_route
from labsupport.multimodal.scans import (
    SCAN_ORDERS,
    GatedRecurrence,
    ScanMixer,
    diagonal_recurrence,
    gated_recurrence_mixer,
    inverse_permutation,
    neighbour_distance,
    scan_mixer,
    scan_permutations,
    seen_mask,
)
from labsupport.multimodal.vit import MergeTrace, SizedAttention, TinyVLM, ToMeViT, fastv_keep

__all__ = [
    "SCAN_ORDERS",
    "Digits",
    "GatedRecurrence",
    "MergeTrace",
    "MoDBlock",
    "MoDViT",
    "PatchClassifier",
    "PatchEmbedding",
    "ScanMixer",
    "SizedAttention",
    "TinyVLM",
    "ToMeViT",
    "accuracy",
    "bipartite_matches",
    "diagonal_recurrence",
    "fastv_keep",
    "gated_recurrence_mixer",
    "init_encoder",
    "inverse_permutation",
    "kept_count",
    "load_digits",
    "merge_sources",
    "merge_tokens",
    "mod_route",
    "neighbour_distance",
    "patch_grid",
    "patchify",
    "scan_mixer",
    "scan_permutations",
    "seeded",
    "seen_mask",
    "segment_task",
    "tome_merge",
    "train_classifier",
    "unpatchify",
]
