"""Chapter 01: what attention in FP8 (``float8_e4m3fn``) with per-block scales costs in accuracy.

An e4m3 number has 3 mantissa bits and a range of ±448: every value lands within about 6% of
itself, and anything larger than 448 saturates. Hopper's tensor cores multiply such numbers at twice
the fp16 rate, so FlashAttention-3 (arXiv:2407.08608) runs both matrix products of the forward pass in
FP8. To keep the range, each tensor is divided by a *scale* before the cast and multiplied back
after the product:

* ``Q`` and ``K``: one fp32 scale per block of rows (the rows one program of the kernel holds), so a
  block of small values keeps its precision even when another block holds outliers;
* ``V``: one scale per channel (per column of the head dimension), which factors out of ``P·V``;
* ``P``: its entries lie in ``[0, 1]`` after the max is subtracted; they are multiplied by ``2**8``
  before the cast (free: it is ``+8`` in the ``exp2``) so that small probabilities stay out of e4m3's
  subnormal range, and the sum ``l`` carries the same factor, so it cancels at the end.

:func:`fp8_attention_emulated` does exactly these roundings in PyTorch (quantise, then dequantise
through real ``torch.float8_e4m3fn`` casts, products in float64), so it runs on any CPU and shows
the cost against fp16 (:func:`precision_error_table`). :mod:`labsupport.flash.fp8_triton` holds the
Hopper kernel that does the products in FP8; its output matches this emulation.

Optionally (``rotate=True``) ``Q`` and ``K`` are first multiplied by the same random orthogonal
(Hadamard) matrix, which leaves ``Q Kᵀ`` unchanged but spreads a few large channels over all of them,
FlashAttention-3's "incoherent processing".
"""

from __future__ import annotations

import math

import torch

from labsupport.flash.reference import causal_mask
from labsupport.harness.validation import require_choice, require_positive_int, require_qkv

__all__ = [
    "FP8_MAX",
    "P_SCALE_LOG2",
    "dequantize_rows",
    "fp8_attention_emulated",
    "hadamard_rotation",
    "outlier_qkv",
    "precision_error_table",
    "quantize_channels",
    "quantize_rows",
    "rounded_attention",
]

#: The largest finite ``float8_e4m3fn`` value.
FP8_MAX = 448.0
#: ``P`` is multiplied by ``2**P_SCALE_LOG2`` before its cast to FP8 (and ``l`` carries the same factor).
P_SCALE_LOG2 = 8
_ANY_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fp8_dtype() -> torch.dtype:
    if not hasattr(torch, "float8_e4m3fn"):  # pragma: no cover - torch < 2.1
        raise RuntimeError("this torch has no float8_e4m3fn dtype (torch >= 2.1 needed)")
    return torch.float8_e4m3fn


def quantize_rows(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (..., L, D)`` to FP8 with one scale per block of ``block`` rows: ``(x8, scales (..., ceil(L/block)))``.

    ``scale = amax(|block|) / 448`` (1 for an all-zero block), ``x8 = x / scale`` cast to e4m3
    (round to nearest even). The last block may be shorter. Scales are float32.
    """
    block = require_positive_int("block", block)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (..., L, D), got {type(x).__name__}")
    length = x.shape[-2]
    n_blocks = -(-length // block)
    pad = n_blocks * block - length
    xf = x.float()
    padded = torch.nn.functional.pad(xf, (0, 0, 0, pad)) if pad else xf
    amax = padded.reshape(*x.shape[:-2], n_blocks, block, x.shape[-1]).abs().amax(dim=(-1, -2))
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    per_row = scales.repeat_interleave(block, dim=-1)[..., :length, None]
    return (xf / per_row).to(_fp8_dtype()), scales


def dequantize_rows(x8: torch.Tensor, scales: torch.Tensor, block: int,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The inverse of :func:`quantize_rows`: ``x8 · scale`` of its block, in ``dtype``."""
    block = require_positive_int("block", block)
    if not isinstance(x8, torch.Tensor) or not isinstance(scales, torch.Tensor):
        raise TypeError("x8 and scales must be tensors (from quantize_rows)")
    if scales.shape[-1] != -(-x8.shape[-2] // block) or scales.shape[:-1] != x8.shape[:-2]:
        raise ValueError(f"scales {tuple(scales.shape)} do not match x8 {tuple(x8.shape)} in blocks of {block}")
    per_row = scales.to(dtype).repeat_interleave(block, dim=-1)[..., : x8.shape[-2], None]
    return x8.to(dtype) * per_row


def quantize_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (..., L, D)`` to FP8 with one scale per channel (column): ``(x8, scales (..., D))``."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (..., L, D), got {type(x).__name__}")
    amax = x.float().abs().amax(dim=-2)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.float() / scales[..., None, :]).to(_fp8_dtype()), scales


def hadamard_rotation(d: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random orthogonal ``(d, d)`` matrix ``diag(±1) · H_d / sqrt(d)``, ``H_d`` Sylvester's Hadamard matrix.

    ``d`` must be a power of two.
    """
    d = require_positive_int("d", d)
    if d & (d - 1):
        raise ValueError(f"d must be a power of two, got {d}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(seed)).to(dtype) * 2 - 1
    return signs[:, None] * h / math.sqrt(d)


def rounded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
    round_p=None, p_factor: float = 1.0,
) -> torch.Tensor:
    """Attention in float64 on given (already rounded) operands, with ``P`` rounded by ``round_p``.

    ``P = exp(S − rowmax) · p_factor`` is rounded by ``round_p`` (a function of a float64 tensor) before
    ``P·V``; the normaliser ``l`` is summed from the unrounded ``P``, as a kernel sums it in fp32.
    A row that sees no key gives zeros. Returns float64.
    """
    q, k, v = require_qkv(q, k, v, ndim=None, dtypes=_ANY_FLOAT)
    if round_p is not None and not callable(round_p):
        raise TypeError(f"round_p must be a function of a tensor or None, got {type(round_p).__name__}")
    q, k, v = (t.double() for t in (q, k, v))
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = (q @ k.transpose(-1, -2)) * sm_scale
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], device=q.device), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m) * p_factor
    l = p.sum(dim=-1, keepdim=True)
    p_used = round_p(p) if round_p is not None else p
    return torch.where(l > 0, (p_used @ v) / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(l))


def fp8_attention_emulated(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
    block_q: int = 128, block_k: int = 128, granularity: str = "block", rotate: bool = False, seed: int = 0,
) -> torch.Tensor:
    """Attention as an FP8 kernel computes it, emulated in PyTorch; returns float64 ``(B, H, Lq, D)``.

    ``granularity="block"``: ``Q`` per ``block_q`` rows and ``K`` per ``block_k`` rows, ``V`` per
    channel (FlashAttention-3's recipe); ``"tensor"``: one scale per (batch, head) for each of ``Q``,
    ``K``, ``V`` (the naive recipe, for comparison). In both, the keys are visited in blocks of
    ``block_k`` with a running maximum, as a kernel does, and each block's ``P`` is scaled by ``2**8``
    and cast to e4m3. ``rotate`` multiplies ``Q`` and ``K`` by :func:`hadamard_rotation` first. The output is
    *not* rounded to fp16 (:func:`precision_error_table` does that, as a kernel's store would).
    """
    q, k, v = require_qkv(q, k, v, ndim=4, dtypes=_ANY_FLOAT)
    granularity = require_choice("granularity", granularity, ("block", "tensor"))
    d = q.shape[-1]
    if rotate:
        r = hadamard_rotation(d, seed=seed).to(q.device)
        q, k = q.double() @ r, k.double() @ r
    if granularity == "block":
        q8, qs = quantize_rows(q, block_q)
        k8, ks = quantize_rows(k, block_k)
        qh, kh = dequantize_rows(q8, qs, block_q), dequantize_rows(k8, ks, block_k)
        v8, vs = quantize_channels(v)
        vh = v8.double() * vs.double()[..., None, :]
    else:
        qh, kh, vh = (dequantize_rows(*quantize_rows(t, t.shape[-2]), t.shape[-2]) for t in (q, k, v))
    return _online_fp8(qh, kh, vh, causal=causal, scale=scale, block_k=block_k)


def _online_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None,
                block_k: int) -> torch.Tensor:
    """The kernel's loop in float64: per key block, ``P = 2**8 · exp(S − running max)`` rounded to e4m3.

    Each block's ``P`` is rounded against the running maximum *at that block*, as the kernel does, so
    the result matches the kernel's, not only its error statistics.
    """
    fp8 = _fp8_dtype()
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    n_q, n_k = q.shape[-2], k.shape[-2]
    visible = causal_mask(n_q, n_k, device=q.device) if causal else None
    m = torch.full((*q.shape[:-1], 1), float("-inf"), dtype=torch.float64, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64, device=q.device)
    for start in range(0, n_k, block_k):
        s = (q @ k[..., start:start + block_k, :].transpose(-1, -2)) * sm_scale
        if visible is not None:
            s = s.masked_fill(~visible[:, start:start + block_k], float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        m_ref = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_ref) * 2.0 ** P_SCALE_LOG2
        alpha = torch.exp(m - m_ref)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + p.to(fp8).double() @ v[..., start:start + block_k, :]
        m = m_new
    return torch.where(l > 0, acc / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(acc))


def outlier_qkv(batch: int, heads: int, length: int, d: int, *, seed: int = 0,
                kind: str = "normal") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 test inputs: ``"normal"`` (unit Gaussians) or ``"outliers"``.

    ``"outliers"`` is modelled on FlashAttention-3's accuracy test: unit Gaussians with one entry in a
    thousand (of each of ``Q``, ``K``, ``V``) ten times larger.
    """
    kind = require_choice("kind", kind, ("normal", "outliers"))
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, d, generator=gen, dtype=torch.float64) for _ in range(3))
    if kind == "outliers":
        for t in (q, k, v):
            hit = torch.rand(t.shape, generator=gen, dtype=torch.float64) < 1e-3
            t[hit] *= 10.0
    return q, k, v


def precision_error_table(
    *, length: int = 512, d: int = 64, heads: int = 4, causal: bool = True, seed: int = 0,
    block_q: int = 128, block_k: int = 128,
) -> list[dict[str, object]]:
    """Output error against float64 attention for fp16, bf16 and FP8 recipes, on normal and outlier inputs.

    Each row: ``inputs``, ``recipe``, ``max_abs``, ``mean_abs`` and ``rel`` (Frobenius norm of the error
    over the norm of the output). Inputs and outputs pass through the format a kernel reads and writes:
    fp16 operands, ``P`` rounded to fp16 (bf16) before ``P·V``, fp16 output; the FP8 recipes quantise
    fp16 inputs and write an fp16 output.
    """
    for name, value in (("length", length), ("d", d), ("heads", heads), ("block_q", block_q), ("block_k", block_k)):
        require_positive_int(name, value)
    rows: list[dict[str, object]] = []
    for kind in ("normal", "outliers"):
        q, k, v = outlier_qkv(1, heads, length, d, seed=seed, kind=kind)
        exact = rounded_attention(q, k, v, causal=causal)
        q16, k16, v16 = (t.half() for t in (q, k, v))
        recipes = {
            "fp16": lambda: rounded_attention(q16, k16, v16, causal=causal,
                                              round_p=lambda p: p.half().double()).half(),
            "bf16": lambda: rounded_attention(*(t.bfloat16() for t in (q, k, v)), causal=causal,
                                              round_p=lambda p: p.bfloat16().double()).bfloat16(),
            "fp8 per-tensor": lambda: fp8_attention_emulated(q16, k16, v16, causal=causal,
                                                             granularity="tensor").half(),
            "fp8 per-block": lambda: fp8_attention_emulated(q16, k16, v16, causal=causal, block_q=block_q,
                                                            block_k=block_k).half(),
            "fp8 per-block + Hadamard": lambda: fp8_attention_emulated(q16, k16, v16, causal=causal,
                                                                       block_q=block_q, block_k=block_k,
                                                                       rotate=True, seed=seed).half(),
        }
        for name, run in recipes.items():
            err = (run().double() - exact).abs()
            rows.append({"inputs": kind, "recipe": name, "max_abs": float(err.max()),
                         "mean_abs": float(err.mean()), "rel": float(err.norm() / exact.norm())})
    return rows
