"""Chapter 00's readable math: causal softmax attention from its definition.

* :func:`causal_attention` — softmax attention written out from its definition.

The exercises' answers (the decode step, the largest batch, the decode step's
intensity) are not here: they live in the private ``_solutions`` module that only
the checkers import, so the chapter's namespace does not hand them out.
"""

from __future__ import annotations

import math

import torch

from labsupport.harness.numerics import accumulation_dtype
from labsupport.harness.validation import require_qkv

__all__ = ["causal_attention"]


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
                         f"{tuple(q.shape)} and k {tuple(k.shape)}. For one query against a cache, attend to "
                         "every cached key (no mask): that is the chapter's exercise 1.")
    length = q.shape[-2]
    cdt = accumulation_dtype(q.dtype)
    scores = q.to(cdt) @ k.to(cdt).transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return (scores.softmax(dim=-1) @ v.to(cdt)).to(q.dtype)
