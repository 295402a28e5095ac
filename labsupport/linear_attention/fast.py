"""The fast path of chapter 03: chunkwise linear attention arranged for a CPU.

:func:`linear_attention_chunkwise_fast` computes what
:func:`~labsupport.linear_attention.reference.linear_attention_chunkwise` computes
without decay or normaliser; :func:`_exclusive_prefix_sum` is its blocked prefix
sum of chunk states (``benchmarks/linear_attention_cpu.py`` times it on its own).
"""

from __future__ import annotations

import math

import torch

from labsupport.harness.numerics import accumulation_dtype
from labsupport.harness.validation import require_positive_int
from labsupport.linear_attention.reference import _pad_to_chunks, _require_qkv

__all__ = ["linear_attention_chunkwise_fast"]


def _exclusive_prefix_sum(w: torch.Tensor) -> torch.Tensor:
    """``out[:, i] = Σ_{j<i} w[:, j]`` over dim 1 of ``(X, N, Y)``, in about 2·√N in-place adds.

    Blocked in two levels (a running sum inside groups of ``g ≈ √N`` chunks,
    then the group totals carried across groups); on CPU this is about three
    times faster than ``torch.cumsum`` along a middle dimension.
    """
    _, n, _ = w.shape
    g = max(1, math.isqrt(n))
    while n % g:
        g -= 1
    groups = n // g
    out = torch.empty_like(w)
    w4 = w.view(w.shape[0], groups, g, w.shape[2])
    o4 = out.view_as(w4)
    o4[:, :, 0].zero_()
    for j in range(1, g):
        torch.add(o4[:, :, j - 1], w4[:, :, j - 1], out=o4[:, :, j])
    totals = o4[:, :, -1] + w4[:, :, -1]  # (X, groups, Y)
    for j in range(1, groups):
        totals[:, j] += totals[:, j - 1]
    o4[:, 1:] += totals[:, :-1, None]
    return out


def linear_attention_chunkwise_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                    chunk_size: int = 64) -> torch.Tensor:
    """:func:`~.reference.linear_attention_chunkwise` without decay or normaliser, written for speed.

    The same algorithm, with the work arranged for a CPU: every chunk of every
    head in one batched matmul, the causal mask applied in place (``tril_``),
    the chunk states from a blocked prefix sum, and ``Q S`` added into the
    intra-chunk output by ``baddbmm_`` instead of a separate sum. Used by
    ``benchmarks/linear_attention_cpu.py``; the tests prove it equals the
    reference forms. It is forward-only (its in-place steps cannot be differentiated):
    for gradients use :func:`~.reference.linear_attention_chunkwise`. fp16/bf16 inputs
    are computed in float32 and returned in their dtype.
    """
    q, k, v = _require_qkv(q, k, v)
    chunk = require_positive_int("chunk_size", chunk_size)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "linear_attention_chunkwise_fast is forward-only (it works in place, which autograd cannot follow); "
            "use linear_attention_chunkwise for gradients, or call this one under torch.no_grad()"
        )
    dtype = q.dtype
    q, k, v = (t.to(accumulation_dtype(dtype)) for t in (q, k, v))
    b, h, length, dk = k.shape
    dv = v.shape[-1]
    n = -(-length // chunk)
    if n * chunk != length:
        q, k, v = (_pad_to_chunks(t, chunk) for t in (q, k, v))
    qc = q.reshape(b * h * n, chunk, dk)
    kc = k.reshape(b * h * n, chunk, dk)
    vc = v.reshape(b * h * n, chunk, dv)
    scores = torch.matmul(qc, kc.mT).tril_()
    writes = torch.matmul(kc.mT, vc).view(b * h, n, dk * dv)
    before = _exclusive_prefix_sum(writes).view(b * h * n, dk, dv)
    out = torch.matmul(scores, vc).baddbmm_(qc, before)
    return out.view(b, h, n * chunk, dv)[:, :, :length].to(dtype)
