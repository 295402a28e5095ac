"""The readable reference of chapter 05: dense attention under a boolean mask, and one online-softmax step.

Conventions (shared by the whole :mod:`labsupport.sparse` package, and the course's):

* tensors are ``(B, H, L, D)`` (any leading dimensions work); ``scale`` defaults to ``1/sqrt(D)``;
* a mask is a boolean ``(Lq, Lk)`` tensor (or broadcastable to ``(..., Lq, Lk)``), ``True`` = visible;
* a query row that sees no key returns **zeros**, and its logsumexp is ``−inf`` (never NaN);
* fp16/bf16 inputs are computed in float32 and the output is cast back; the logsumexp stays float32
  (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch

from labsupport.harness.numerics import accumulation_dtype
from labsupport.harness.validation import require_float, require_qkv, require_tensor

__all__ = ["masked_attention", "online_softmax_step", "require_mask"]


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else require_float("scale", scale)


def require_mask(mask: object, lq: int, lk: int) -> torch.Tensor:
    """A boolean mask whose last two dimensions are ``(lq, lk)``."""
    mask = require_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = visible), got {mask.dtype}")
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (lq, lk):
        raise ValueError(f"mask must end in (Lq, Lk) = ({lq}, {lk}), got shape {tuple(mask.shape)}")
    return mask


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with a boolean mask; the full ``(Lq, Lk)`` score matrix is formed.

    Returns:
        ``(out, lse)``: ``out`` like ``q`` (with v's head dimension), zeros on rows that see no key;
        ``lse`` the row logsumexp of the visible scaled scores, ``−inf`` on those rows.
    """
    q, k, v = require_qkv(q, k, v, ndim=None, same_value_dim=False)
    mask = require_mask(mask, q.shape[-2], k.shape[-2]).to(q.device)
    cdt = accumulation_dtype(q.dtype)
    scores = (q.to(cdt) @ k.to(cdt).transpose(-1, -2)) * _scale(q, scale)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # −inf on empty rows
    seen = torch.isfinite(lse)
    p = torch.exp(scores - torch.where(seen, lse, torch.zeros_like(lse))[..., None])  # 0 on empty rows
    return (p @ v.to(cdt)).to(q.dtype), lse


def online_softmax_step(
    m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, scores: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one tile of (scaled, masked: ``−inf`` = hidden) scores into the running ``(m, l, acc)``.

    The online softmax of chapter 01: ``m' = max(m, rowmax S)``, ``P = exp(S − m')``,
    ``l' = e^{m − m'} l + rowsum P``, ``acc' = e^{m − m'} acc + P V``. A row that has seen only
    hidden keys keeps ``m = −inf, l = 0, acc = 0``.
    """
    m_new = torch.maximum(m, scores.amax(dim=-1))
    m_ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # avoids −inf − (−inf)
    alpha = torch.exp(m - m_ref)
    p = torch.exp(scores - m_ref[..., None])
    return m_new, alpha * l + p.sum(dim=-1), alpha[..., None] * acc + p @ v
