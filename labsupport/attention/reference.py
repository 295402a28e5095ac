"""Chapter 00 reference solutions: attention from its definition, and the exercises' formulas.

* :func:`causal_attention` — softmax attention written out from its definition.
* :func:`attention_decode_step` — one new query against a KV cache.
* :func:`kv_cache_bytes_reference` — the KV-cache exercise's answer, positional form of
  :func:`labsupport.harness.costs.kv_cache_bytes`.
* :func:`decode_intensity_reference` — FLOPs per byte of one decode step of a
  :class:`labsupport.harness.costs.TransformerShape`.
"""

from __future__ import annotations

import math

import torch

from labsupport.harness.costs import TransformerShape, kv_cache_bytes
from labsupport.harness.numerics import accumulation_dtype
from labsupport.harness.validation import require_qkv

__all__ = [
    "attention_decode_step",
    "causal_attention",
    "decode_intensity_reference",
    "kv_cache_bytes_reference",
]

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention, ``(B, H, L, D)`` each → ``(B, H, L, D)``.

    ``softmax(q kᵀ / √D + mask) v`` where the mask is −∞ above the diagonal,
    so position ``t`` reads only positions ``0..t``. Queries, keys and values
    cover the same ``L`` positions. fp16/bf16 inputs are computed in float32
    and the output is returned in their dtype.
    """
    q, k, v = require_qkv(q, k, v)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal_attention needs q, k, v over the same positions (Lq == Lk); got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}. For a query against a cache use "
                         "attention_decode_step.")
    length = q.shape[-2]
    cdt = accumulation_dtype(q.dtype)
    scores = q.to(cdt) @ k.to(cdt).transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return (scores.softmax(dim=-1) @ v.to(cdt)).to(q.dtype)


def attention_decode_step(q_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
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


def kv_cache_bytes_reference(layers: int, kv_heads: int, head_dim: int, context: int,
                             bytes_per_element: int) -> int:
    """Bytes of keys and values cached for one sequence: ``2 · layers · kv_heads · head_dim · context · bytes``.

    The positional form of :func:`labsupport.harness.costs.kv_cache_bytes`, with
    the signature of the chapter's exercise.
    """
    return kv_cache_bytes(layers=layers, kv_heads=kv_heads, head_dim=head_dim, context=context,
                          bytes_per_element=bytes_per_element)


def decode_intensity_reference(shape: TransformerShape, context: int, batch: int) -> float:
    """FLOPs per byte moved of one decode step (see :meth:`TransformerShape.decode_step`)."""
    if not isinstance(shape, TransformerShape):
        raise TypeError(f"shape must be a TransformerShape, got {type(shape).__name__}")
    flops, moved = shape.decode_step(context, batch)
    return flops / moved
