"""The readable reference math of chapter 01: masks, a safe softmax, dense attention, the online softmax.

Conventions (shared by the whole :mod:`labsupport.flash` package):

* Tensors are ``(B, H, L, D)``: batch, heads, length, head dimension (any
  leading dimensions work; one head is ``(L, D)``).
* ``scale`` defaults to ``1 / sqrt(D)``.
* ``causal=True`` aligns the mask to the *bottom right*, as FlashAttention-2
  does: query ``i`` of ``Lq`` may look at key ``j`` of ``Lk`` when
  ``j <= i + (Lk - Lq)``. With ``Lq == Lk`` this is the usual lower-triangular
  mask (and what ``scaled_dot_product_attention(is_causal=True)`` does). With
  ``Lq > Lk`` the first ``Lq - Lk`` queries see no key at all: such a *fully
  masked row* gives an output of zeros and a logsumexp of ``-inf``, never NaN.
* Low-precision inputs (fp16, bf16) are computed in float32 and the output is
  cast back to the input dtype (:func:`labsupport.harness.numerics.accumulation_dtype`).
"""

from __future__ import annotations

import math

import torch

from labsupport.harness.numerics import accumulation_dtype
from labsupport.harness.validation import (
    require_float,
    require_float_tensor,
    require_positive_int,
    require_qkv,
)

__all__ = [
    "causal_mask",
    "naive_attention",
    "online_softmax_row",
    "online_softmax_update",
    "stable_softmax",
]


def _require_scale(q: torch.Tensor, scale: float | None) -> float:
    """The softmax temperature: ``1 / sqrt(D)`` when ``scale`` is ``None``, else ``scale`` as a finite float."""
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    return require_float("scale", scale)


def causal_mask(lq: int, lk: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``(lq, lk)`` mask, ``True`` where query ``i`` may see key ``j``.

    Bottom-right aligned: ``j <= i + (lk - lq)``.
    """
    lq = require_positive_int("lq", lq)
    lk = require_positive_int("lk", lk)
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def stable_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax that subtracts the maximum first, so ``exp`` never overflows.

    A slice that is entirely ``-inf`` gives zeros (not NaN).
    """
    require_float_tensor("x", x)
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    e = torch.exp(x - m)
    total = e.sum(dim=dim, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention that materialises the full ``(Lq, Lk)`` score matrix.

    ``softmax(q kᵀ · scale) v``, computed in float32 (float64 for float64
    inputs) and returned in the input dtype. Differentiable; fully masked rows
    give zeros.
    """
    q, k, v = require_qkv(q, k, v, ndim=None, same_value_dim=False)
    s = _require_scale(q, scale)
    cdt = accumulation_dtype(q.dtype)
    scores = (q.to(cdt) @ k.to(cdt).transpose(-1, -2)) * s  # (..., Lq, Lk)
    if causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    p = stable_softmax(scores, dim=-1)
    return (p @ v.to(cdt)).to(q.dtype)


def online_softmax_row(x: torch.Tensor, block: int) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Softmax of a 1-D tensor read ``block`` entries at a time (running max and sum).

    Returns the softmax and the list of ``(running max, running sum)`` after each block,
    so a notebook can show how the two statistics evolve. Leading ``-inf`` entries (masked
    keys) are fine; a row of nothing but ``-inf`` gives zeros, as everywhere in the course.
    """
    require_float_tensor("x", x, ndim=1)
    block = require_positive_int("block", block)
    m = torch.tensor(float("-inf"), dtype=x.dtype)
    l = torch.tensor(0.0, dtype=x.dtype)
    history: list[tuple[float, float]] = []
    for start in range(0, x.numel(), block):
        chunk = x[start : start + block]
        m_new = torch.maximum(m, chunk.max())
        # A block of nothing but -inf keeps m = -inf: measure from 0 then, so exp(-inf - 0) = 0, not NaN.
        m_ref = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
        # rescale the old sum to the new maximum, then add this block's terms
        l = l * torch.exp(m - m_ref) + torch.exp(chunk - m_ref).sum()
        m = m_new
        history.append((float(m), float(l)))
    m_ref = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    return torch.exp(x - m_ref) / torch.where(l > 0, l, torch.ones_like(l)), history


def _online_update(
    m: torch.Tensor,
    l: torch.Tensor,
    acc: torch.Tensor,
    scores: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the online softmax over a block of keys.

    Args:
        m: running row maximum, ``(..., R)`` (``-inf`` before the first block).
        l: running row sum of ``exp(score - m)``, ``(..., R)``.
        acc: unnormalised output ``Σ exp(score - m) v``, ``(..., R, Dv)``.
        scores: this block's (scaled, masked) scores, ``(..., R, C)``; ``-inf`` = masked.
        v: this block's values, ``(..., C, Dv)``.

    Returns:
        ``(m_new, l_new, acc_new)``. Rows whose scores are all ``-inf`` so far stay
        at ``m = -inf, l = 0, acc = 0`` (no NaN).
    """
    m_new = torch.maximum(m, scores.amax(dim=-1))
    # A row that has seen only -inf keeps m_new = -inf; use 0 as its reference
    # point so that exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
    m_ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m - m_ref)  # how much the old statistics shrink
    p = torch.exp(scores - m_ref[..., None])
    l_new = alpha * l + p.sum(dim=-1)
    acc_new = alpha[..., None] * acc + p @ v
    return m_new, l_new, acc_new


def online_softmax_update(
    m: torch.Tensor,
    l: torch.Tensor,
    acc: torch.Tensor,
    scores: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the online softmax over a block of keys: ``(m_new, l_new, acc_new)``.

    The library's version of chapter 01's exercise 1 (whose checker refuses it; it
    is not re-exported by :mod:`labsupport.flash`); see :func:`_online_update`.
    """
    return _online_update(m, l, acc, scores, v)
