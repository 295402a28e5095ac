"""Chapter 00's reference solutions, for the checkers only (kept out of the modules a notebook imports).

A learner who types ``ref.<name>??`` in the chapter should not find the answer of
the exercise they are doing, so these live here, imported as a module by
:mod:`labsupport.attention.exercises` and :mod:`labsupport.attention.exercises_core`:

* :func:`decode_step_answer` — exercise 1, one new query against a KV cache.
* :func:`largest_batch_answer` — exercise 2, the largest batch that fits beside the weights.
* :func:`decode_intensity_answer` — exercise 3, FLOPs per byte of one decode step.
* :func:`kv_cache_bytes_answer` — the KV-cache count (first edition's exercise), positional form of
  :func:`labsupport.harness.costs.kv_cache_bytes`.

The cost answers are written out from the shape's fields, like a learner's, so that
they pass their own checkers, which refuse
:class:`~labsupport.harness.costs.TransformerShape`'s ``max_batch`` and
``decode_step`` (see :mod:`labsupport.attention.exercises`); tests hold them equal.
"""

from __future__ import annotations

import math

import torch

from labsupport.harness.costs import TransformerShape, kv_cache_bytes
from labsupport.harness.numerics import accumulation_dtype
from labsupport.harness.validation import require_qkv

__all__ = ["decode_intensity_answer", "decode_step_answer", "kv_cache_bytes_answer", "largest_batch_answer"]


def decode_step_answer(q_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One decoding step: the newest query ``(B, H, 1, D)`` attends to every cached key and value.

    The cache ``(B, H, T, D)`` already holds the new token's own key and value,
    so no mask is needed: every cached position lies in the past (or is now).
    """
    q_new, k_cache, v_cache = require_qkv(q_new, k_cache, v_cache)
    if q_new.shape[-2] != 1:
        raise ValueError(f"q_new must hold one position, shape (B, H, 1, D); got {tuple(q_new.shape)}")
    cdt = accumulation_dtype(q_new.dtype)  # fp16/bf16: scores and softmax in float32
    scores = q_new.to(cdt) @ k_cache.to(cdt).transpose(-1, -2) / math.sqrt(q_new.shape[-1])  # (B, H, 1, T)
    return (scores.softmax(dim=-1) @ v_cache.to(cdt)).to(q_new.dtype)


def _require_shape(shape: object) -> TransformerShape:
    if not isinstance(shape, TransformerShape):
        raise TypeError(f"shape must be a TransformerShape, got {type(shape).__name__}")
    return shape


def largest_batch_answer(shape: TransformerShape, memory_bytes: int, context: int) -> int:
    """The most sequences of ``context`` tokens whose KV caches fit in ``memory_bytes`` beside the weights.

    Written out (equal to :meth:`TransformerShape.max_batch`, which the checker refuses to a learner).
    """
    spare = memory_bytes - _require_shape(shape).weight_bytes
    return 0 if spare <= 0 else int(spare // (context * shape.kv_bytes_per_token()))


def decode_intensity_answer(shape: TransformerShape, context: int, batch: int) -> float:
    """FLOPs per byte moved of one decode step of ``batch`` sequences at ``context``.

    Written out (equal to :meth:`TransformerShape.decode_step`'s ratio, which the checker refuses to a learner).
    """
    shape = _require_shape(shape)
    flops = batch * (2 * shape.params + 4 * shape.layers * shape.q_heads * shape.head_dim * context)
    moved = shape.params * shape.bytes_per_element + batch * context * shape.kv_bytes_per_token()
    return flops / moved


def kv_cache_bytes_answer(layers: int, kv_heads: int, head_dim: int, context: int, bytes_per_element: int) -> int:
    """Bytes of keys and values cached for one sequence: ``2 · layers · kv_heads · head_dim · context · bytes``."""
    return kv_cache_bytes(layers=layers, kv_heads=kv_heads, head_dim=head_dim, context=context,
                          bytes_per_element=bytes_per_element)
