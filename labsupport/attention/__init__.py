"""Chapter 00 — where the time goes: attention from its definition, and the chapter's checkers.

================  ==========================================================================================
module            holds
================  ==========================================================================================
``reference``     ``causal_attention``
``exercises``     the checkers ``check_causal_attention``, ``check_attention_decode_step``,
                  ``check_kv_cache_bytes``, ``check_decode_intensity``, the cases they grade on, and the
                  library calls each refuses (``harness.guards.LibraryCallRefused``)
``exercises_core``  ``check_largest_batch``
``timesplit``     ``time_split``: a forward pass's time, split into attention, weight matmuls and the rest
================  ==========================================================================================

The exercises' answers are kept out of this namespace (the checkers read them from a private
module). The chapter's cost model (``TransformerShape``, ``KV_PRESETS``, ``MODEL_PRESETS``,
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
from labsupport.attention.reference import causal_attention

__all__ = [
    "causal_attention",
    "check_attention_decode_step",
    "check_causal_attention",
    "check_decode_intensity",
    "check_kv_cache_bytes",
]
