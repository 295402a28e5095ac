"""Dynamic sparse prefill: MInference's vertical-slash pattern, estimated from the prompt's last queries.

MInference (Jiang et al., arXiv:2407.02490) observes that many heads' prefill attention concentrates on a
few *vertical* lines (keys every query reads: the first token, delimiters, a fact the prompt keeps using) and
a few *slash* lines (fixed distances ``p − j``: the local window, a period). It estimates both from the last
``last_q`` queries only — an ``last_q × L`` slice of the score matrix instead of ``L × L`` — and then runs
attention over the union, which a block-sparse kernel executes.

* :func:`vertical_slash_mask` — the pattern for one ``(q, k)`` of shape ``(..., L, D)``;
* :func:`vertical_slash_selection` — run a model with each sparse layer's prefill under its own pattern,
  estimated per sequence and per head from that layer's queries and keys.

What is built: the estimate and the pattern, checked for the attention mass it keeps. What is not: MInference's
offline search for each head's pattern type (A-shape, vertical-slash, block-sparse) and its fused kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from labsupport.harness.validation import require_float_tensor, require_positive_int
from labsupport.sparse.mixers import SparseAttention

__all__ = ["vertical_slash_mask", "vertical_slash_selection"]


def vertical_slash_mask(q: torch.Tensor, k: torch.Tensor, *, vertical: int, slash: int, last_q: int = 16) -> torch.Tensor:
    """MInference's vertical-slash pattern: a causal bool ``(..., L, L)`` from ``q, k (..., L, D)`` (RoPE applied).

    The last ``last_q`` queries' causal attention is summed per key (the *vertical* score) and per distance
    ``p − j`` (the *slash* score); the mask keeps the ``vertical`` best keys for every query that may see them
    and the ``slash`` best distances for every query. Distance 0 (the query itself) is always kept, so no row
    is empty.
    """
    q = require_float_tensor("q", q)
    k = require_float_tensor("k", k)
    if q.shape != k.shape or q.dim() < 2:
        raise ValueError(f"q and k must share a shape (..., L, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    vertical = require_positive_int("vertical", vertical)
    slash = require_positive_int("slash", slash)
    last_q = require_positive_int("last_q", last_q)
    length = q.shape[-2]
    rows = torch.arange(max(0, length - last_q), length, device=q.device)
    cols = torch.arange(length, device=q.device)
    scores = (q[..., rows, :] @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (..., last_q, L)
    visible = cols[None, :] <= rows[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    column_score = probs.sum(dim=-2)  # (..., L)
    distance = (rows[:, None] - cols[None, :]).clamp(min=0)  # (last_q, L), 0 where not visible (zero prob)
    slash_score = torch.zeros(*probs.shape[:-2], length, dtype=probs.dtype, device=q.device)
    slash_score = slash_score.scatter_add(-1, distance.expand_as(probs).flatten(-2), probs.flatten(-2))
    slash_score[..., 0] = float("inf")  # the diagonal: every query reads itself
    top_cols = column_score.topk(min(vertical, length), dim=-1).indices
    top_dist = slash_score.topk(min(slash, length), dim=-1).indices
    keep_col = torch.zeros_like(column_score, dtype=torch.bool).scatter_(-1, top_cols, True)  # (..., L)
    keep_dist = torch.zeros_like(slash_score, dtype=torch.bool).scatter_(-1, top_dist, True)
    all_rows = torch.arange(length, device=q.device)
    offsets = all_rows[:, None] - cols[None, :]  # (L, L)
    causal = offsets >= 0
    on_slash = keep_dist[..., None, :].expand(*keep_dist.shape[:-1], length, length).gather(
        -1, offsets.clamp(min=0).expand(*keep_dist.shape[:-1], length, length))
    return (keep_col[..., None, :] | on_slash) & causal


@contextmanager
def vertical_slash_selection(model: nn.Module, *, vertical: int, slash: int, last_q: int = 16,
                             densities: list[float] | None = None) -> Iterator[None]:
    """Inside the block, every sparse layer of ``model`` prefills under its own vertical-slash pattern.

    A forward pre-hook estimates the pattern from the layer's own (rotated) queries and keys, per sequence and
    head, and sets it as the layer's ``(B, H, L, L)`` static mask. ``densities``, when given, receives each
    pattern's share of the causal pairs. Hooks and masks are removed on exit.
    """
    layers = [m for m in model.modules() if isinstance(m, SparseAttention)]
    handles = []

    def hook(module: SparseAttention, inputs: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            q, k, _ = module._split(inputs[0])
            positions = torch.arange(q.shape[-2], device=q.device)
            mask = vertical_slash_mask(module._rotate(q, positions), module._rotate(k, positions),
                                       vertical=vertical, slash=slash, last_q=last_q)
            module.static_mask = mask
            if densities is not None:
                length = q.shape[-2]
                densities.append(float(mask.float().sum(dim=(-2, -1)).mean()) / (length * (length + 1) / 2))

    try:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            layer.static_mask = None
