"""The data behind chapter 01's tile-by-tile explorer: a recorded run of the tiled forward on one head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from labsupport.flash.reference import _require_scale, naive_attention, online_softmax_update
from labsupport.flash.tiled import _block_ranges
from labsupport.harness.validation import require_positive_int, require_qkv

__all__ = ["TileStep", "tile_trace"]


@dataclass
class TileStep:
    """The state of one query block after one key block has been folded in (one head)."""

    q_range: tuple[int, int]
    k_range: tuple[int, int]
    masked: bool
    m: torch.Tensor  # (rows,) running max
    l: torch.Tensor  # (rows,) running sum
    partial_out: torch.Tensor  # (rows, Dv) = acc / l so far
    exact_out: torch.Tensor  # (rows, Dv) the final answer for these rows
    error: float  # max |partial_out - exact_out|
    skipped: list[tuple[int, int]] = field(default_factory=list)  # key blocks never loaded


def tile_trace(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    block_q: int = 16,
    block_k: int = 16,
    scale: float | None = None,
) -> list[TileStep]:
    """Run the tiled forward on one head ``(L, D)`` and record every step.

    Used by the chapter's widget: which tiles are resident, ``m`` and ``l`` as they
    evolve, and the partial output approaching the exact one.
    """
    q, k, v = require_qkv(q, k, v, ndim=None, same_value_dim=False)
    if q.dim() != 2:
        raise ValueError(f"tile_trace takes one head: q, k, v of shape (L, D), got {tuple(q.shape)}")
    block_q = require_positive_int("block_q", block_q)
    block_k = require_positive_int("block_k", block_k)
    s = _require_scale(q, scale)
    q64, k64, v64 = q.double(), k.double(), v.double()
    exact = naive_attention(q64, k64, v64, causal=causal, scale=s)
    lq, lk = q.shape[0], k.shape[0]
    steps: list[TileStep] = []
    for q0, q1, tiles in _block_ranges(lq, lk, block_q, block_k, causal):
        m = torch.full((q1 - q0,), float("-inf"), dtype=torch.float64)
        l = torch.zeros(q1 - q0, dtype=torch.float64)
        acc = torch.zeros(q1 - q0, v.shape[-1], dtype=torch.float64)
        loaded = {k0 for k0, _, _ in tiles}
        skipped = [(k0, min(k0 + block_k, lk)) for k0 in range(0, lk, block_k) if k0 not in loaded]
        for k0, k1, needs_mask in tiles:
            scores = (q64[q0:q1] @ k64[k0:k1].T) * s
            if needs_mask:
                rows = torch.arange(q0, q1)[:, None]
                cols = torch.arange(k0, k1)[None, :]
                scores = scores.masked_fill(cols > rows + (lk - lq), float("-inf"))
            m, l, acc = online_softmax_update(m, l, acc, scores, v64[k0:k1])
            partial = acc / torch.where(l > 0, l, torch.ones_like(l))[:, None]
            steps.append(
                TileStep(
                    q_range=(q0, q1),
                    k_range=(k0, k1),
                    masked=needs_mask,
                    m=m.clone(),
                    l=l.clone(),
                    partial_out=partial,
                    exact_out=exact[q0:q1],
                    error=float((partial - exact[q0:q1]).abs().max()),
                    skipped=skipped,
                )
            )
    return steps
