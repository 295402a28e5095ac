"""Tiled attention in FlashAttention-2 order: forward, backward by recomputation, the autograd wrapper.

Plain, readable PyTorch loops over tiles; the same loop as a GPU kernel is in
:mod:`labsupport.flash.triton`. The conventions (bottom-right causal mask,
fully masked rows, low precision) are those of :mod:`labsupport.flash.reference`;
the logsumexp is always float32 (or float64 for float64 inputs).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from labsupport.flash.reference import _require_scale, online_softmax_update
from labsupport.harness.numerics import accumulation_dtype
from labsupport.harness.validation import require_float_tensor, require_positive_int, require_qkv

__all__ = [
    "FlashAttentionFunction",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_forward",
]


def _block_ranges(lq: int, lk: int, block_q: int, block_k: int, causal: bool) -> Iterator[tuple[int, int, list[tuple[int, int, bool]]]]:
    """Yield ``(q0, q1, [(k0, k1, needs_mask), ...])`` for the tiles that hold any visible key.

    With ``causal``, key blocks entirely above the (bottom-right) diagonal are skipped,
    and only blocks that cross the diagonal need a mask. The tile loops of this
    package (forward, backward, the widget's trace, the IO count) all walk this schedule.
    """
    offset = lk - lq
    for q0 in range(0, lq, block_q):
        q1 = min(q0 + block_q, lq)
        tiles = []
        for k0 in range(0, lk, block_k):
            k1 = min(k0 + block_k, lk)
            if causal:
                if k0 > (q1 - 1) + offset:  # every key of the block is in the future of every query
                    break
                needs_mask = (k1 - 1) > q0 + offset
            else:
                needs_mask = False
            tiles.append((k0, k1, needs_mask))
        yield q0, q1, tiles


def _tiled_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled attention forward, FlashAttention-2 style; never forms the full score matrix.

    For each block of ``block_q`` queries, walk over blocks of ``block_k`` keys,
    keeping a running maximum ``m``, running sum ``l`` and an unnormalised output
    ``acc``; divide by ``l`` once at the end.

    Returns:
        ``(out, lse)``: ``out`` like ``q`` (with v's head dimension), and the row
        logsumexp ``lse = m + log l`` of shape ``(..., Lq)`` that the backward pass needs.
    """
    q, k, v = require_qkv(q, k, v, ndim=None, same_value_dim=False)
    block_q = require_positive_int("block_q", block_q)
    block_k = require_positive_int("block_k", block_k)
    s = _require_scale(q, scale)
    cdt = accumulation_dtype(q.dtype)
    lq = q.shape[-2]
    batch = q.shape[:-2]
    out = torch.zeros(*batch, lq, v.shape[-1], dtype=cdt, device=q.device)
    lse = torch.full((*batch, lq), float("-inf"), dtype=cdt, device=q.device)
    for q0, q1, tiles in _block_ranges(lq, k.shape[-2], block_q, block_k, causal):
        qi = q[..., q0:q1, :].to(cdt)
        m = torch.full((*batch, q1 - q0), float("-inf"), dtype=cdt, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(*batch, q1 - q0, v.shape[-1], dtype=cdt, device=q.device)
        for k0, k1, needs_mask in tiles:
            scores = (qi @ k[..., k0:k1, :].to(cdt).transpose(-1, -2)) * s
            if needs_mask:
                rows = torch.arange(q0, q1, device=q.device)[:, None]
                cols = torch.arange(k0, k1, device=q.device)[None, :]
                scores = scores.masked_fill(cols > rows + (k.shape[-2] - lq), float("-inf"))
            m, l, acc = online_softmax_update(m, l, acc, scores, v[..., k0:k1, :].to(cdt))
        seen = l > 0
        out[..., q0:q1, :] = acc / torch.where(seen, l, torch.ones_like(l))[..., None]
        lse[..., q0:q1] = torch.where(seen, m + torch.log(torch.where(seen, l, torch.ones_like(l))), m)
    return out.to(q.dtype), lse


def _tiled_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass by recomputation: rebuild each probability tile from ``lse``.

    With ``D = rowsum(dO ⊙ O)``, for every tile ``P = exp(S - lse)``,
    ``dV += Pᵀ dO``, ``dP = dO Vᵀ``, ``dS = P ⊙ (dP - D)``,
    ``dQ += dS K · scale``, ``dK += dSᵀ Q · scale``.

    Returns ``(dq, dk, dv)`` in the dtypes of ``q, k, v``.
    """
    q, k, v = require_qkv(q, k, v, ndim=None, same_value_dim=False)
    require_float_tensor("out", out)
    require_float_tensor("lse", lse)
    require_float_tensor("dout", dout)
    if out.shape != (*q.shape[:-1], v.shape[-1]) or dout.shape != out.shape:
        raise ValueError(
            f"out and dout must have shape {(*q.shape[:-1], v.shape[-1])}, got "
            f"{tuple(out.shape)} and {tuple(dout.shape)}"
        )
    if lse.shape != q.shape[:-1]:
        raise ValueError(f"lse must have shape {tuple(q.shape[:-1])}, got {tuple(lse.shape)}")
    block_q = require_positive_int("block_q", block_q)
    block_k = require_positive_int("block_k", block_k)
    s = _require_scale(q, scale)
    cdt = accumulation_dtype(q.dtype)
    lq, lk = q.shape[-2], k.shape[-2]
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    do = dout.to(cdt)
    d_rows = (do * out.to(cdt)).sum(dim=-1)  # D = rowsum(dO ⊙ O), (..., Lq)
    # Fully masked rows have lse = -inf; +inf makes exp(S - lse) = 0 there.
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).to(cdt)
    dq = torch.zeros_like(qc)
    dk = torch.zeros_like(kc)
    dv = torch.zeros_like(vc)
    for q0, q1, tiles in _block_ranges(lq, lk, block_q, block_k, causal):
        qi, doi = qc[..., q0:q1, :], do[..., q0:q1, :]
        li, di = lse_safe[..., q0:q1, None], d_rows[..., q0:q1, None]
        for k0, k1, needs_mask in tiles:
            kj, vj = kc[..., k0:k1, :], vc[..., k0:k1, :]
            scores = (qi @ kj.transpose(-1, -2)) * s
            if needs_mask:
                rows = torch.arange(q0, q1, device=q.device)[:, None]
                cols = torch.arange(k0, k1, device=q.device)[None, :]
                scores = scores.masked_fill(cols > rows + (lk - lq), float("-inf"))
            p = torch.exp(scores - li)  # the probabilities, recomputed
            dv[..., k0:k1, :] += p.transpose(-1, -2) @ doi
            dp = doi @ vj.transpose(-1, -2)
            ds = p * (dp - di)
            dq[..., q0:q1, :] += (ds @ kj) * s
            dk[..., k0:k1, :] += (ds.transpose(-1, -2) @ qi) * s
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)



def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled attention forward, FlashAttention-2 style: ``(out, lse)``; never forms the full score matrix.

    The library's version of chapter 01's exercise 2 (whose checker refuses it);
    see the implementation, :func:`_tiled_forward`, for the arguments.
    """
    return _tiled_forward(q, k, v, causal=causal, scale=scale, block_q=block_q, block_k=block_k)


def flash_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass by recomputation: ``(dq, dk, dv)``, rebuilding each probability tile from ``lse``.

    The library's version of chapter 01's exercise 3 (whose checker refuses it);
    see the implementation, :func:`_tiled_backward`, for the details.
    """
    return _tiled_backward(q, k, v, out, lse, dout, causal=causal, scale=scale, block_q=block_q, block_k=block_k)


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: tiled forward, saves only ``q, k, v, out, lse``; tiled backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_q, block_k):  # type: ignore[override]
        out, lse = flash_attention_forward(
            q, k, v, causal=causal, scale=scale, block_q=block_q, block_k=block_k
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (causal, scale, block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, block_q, block_k = ctx.settings
        dq, dk, dv = flash_attention_backward(
            q, k, v, out, lse, dout,
            causal=causal, scale=scale, block_q=block_q, block_k=block_k,
        )
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """Differentiable tiled attention (:class:`FlashAttentionFunction`); returns the output only."""
    require_qkv(q, k, v, ndim=None, same_value_dim=False)
    block_q = require_positive_int("block_q", block_q)
    block_k = require_positive_int("block_k", block_k)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), scale, block_q, block_k)
