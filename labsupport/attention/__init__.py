"""Chapter 00 — where the time goes: attention from its definition, and the chapter's exercises.

================  ==========================================================================================
module            holds
================  ==========================================================================================
``reference``     ``causal_attention``, ``attention_decode_step``, and the exercises' reference formulas
                  ``kv_cache_bytes_reference`` and ``decode_intensity_reference``
``exercises``     the checkers ``check_causal_attention``, ``check_attention_decode_step``,
                  ``check_kv_cache_bytes``, ``check_decode_intensity`` and the cases they grade on
================  ==========================================================================================

The chapter's cost model (``TransformerShape``, ``KV_PRESETS``, ``MODEL_PRESETS``,
``kv_cache_bytes``) lives in :mod:`labsupport.harness.costs`. Usage::

    from labsupport import attention as ref
    ref.causal_attention(q, k, v)
    ref.check_attention_decode_step(my_decode_step)
"""

from labsupport.attention.exercises import (
    check_attention_decode_step,
    check_causal_attention,
    check_decode_intensity,
    check_kv_cache_bytes,
)
from labsupport.attention.reference import (
    attention_decode_step,
    causal_attention,
    decode_intensity_reference,
    kv_cache_bytes_reference,
)

__all__ = [
    "attention_decode_step",
    "causal_attention",
    "check_attention_decode_step",
    "check_causal_attention",
    "check_decode_intensity",
    "check_kv_cache_bytes",
    "decode_intensity_reference",
    "kv_cache_bytes_reference",
]
