"""Chapter 07: hybrids and the recall–cost frontier. The one package (with the capstone) that imports families.

==============  ===============================================================================================
module          holds
==============  ===============================================================================================
``registry``    THE registry of every sequence mixer of the course: ``MixerSpec`` rows (name, family, factory
                ``(d_model, layer_index)``, decodes or not, state numbers against context), ``register`` (one
                call for a reader's own mixer), ``get``, ``names``, ``specs``, ``families``, ``held_bytes``
``stacks``      ``pattern_factory`` (a layer pattern such as ``"MMMA"`` + a legend → a ``TinyLM`` factory),
                ``PRESETS`` (Jamba, Qwen3-Next, Kimi Linear, Gemma 3, gpt-oss, MiniMax-01 ratios),
                ``HeadSplitMixer`` (Hymba's intra-layer split), ``stack_state_numbers``, ``stack_bytes_per_token``
``tasks``       the frontier's quality suite: ``SUITE`` (MQAR, fuzzy / noisy recall, selective copy,
                memorisation, compression, needle) as probe tasks, ``decode_recall`` (recall when decoding
                token by token)
``results``     reading the grid's rows: ``summaries`` (the winning rate, every seed), ``mad_average``,
                ``stack_state_numbers`` (the attention-fraction stacks)
``widget``      ``frontier_points`` (JSONL rows → points), ``pareto_mask``, ``frontier_figure``
``exercises``   ``check_pattern_builder``, ``check_hybrid_bytes_per_token``, ``check_pareto_front``,
                ``check_register_gqa``
==============  ===============================================================================================

Chapters 09 and 10 reach other families' mixers only through :mod:`labsupport.hybrid.registry`.
"""

from labsupport.hybrid import registry
from labsupport.hybrid.registry import MixerSpec, families, get, held_bytes, names, register, specs, unregister
from labsupport.hybrid.stacks import (
    PRESETS,
    HeadSplitMixer,
    HybridPreset,
    head_split_factory,
    layer_names,
    pattern_factory,
    stack_bytes_per_token,
    stack_state_numbers,
)

__all__ = [
    "PRESETS",
    "HeadSplitMixer",
    "HybridPreset",
    "head_split_factory",
    "layer_names",
    "pattern_factory",
    "stack_bytes_per_token",
    "stack_state_numbers",
    "MixerSpec",
    "families",
    "get",
    "held_bytes",
    "names",
    "register",
    "registry",
    "specs",
    "unregister",
]
