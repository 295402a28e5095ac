"""Chapter 05: a block-sparse attention forward in Triton — chapter 01's kernel with a block layout.

One program owns a block of ``BLOCK_M`` queries of one (batch, head), exactly as in
:mod:`labsupport.flash.triton`, but instead of walking every key block it walks two short lists that the
:class:`~labsupport.sparse.masks.WindowPattern`'s block layout gives for its query block (FlexAttention's
``BlockMask`` has the same two lists):

* the **full** key blocks: visible to every query of the block, folded in without any mask;
* the **partial** key blocks: the mask rule (sinks + causal window, evaluated from indices, never stored)
  is applied to their scores.

**Forward only.** There is no backward kernel: this module is for inference and for timing against
FlexAttention's forward (which, unlike it, also has a backward). Inputs that require gradients are refused
with an error rather than silently cut from the graph; to train with the same mask, use FlexAttention
(``torch.nn.attention.flex_attention`` with the same block mask) or dense attention with the pattern's mask.

Empty blocks appear in neither list: the kernel never loads them. Rows that see no key get zeros and a
logsumexp of ``−inf``. The same kernel runs on a CPU under ``TRITON_INTERPRET=1`` (set before ``triton`` is
first imported), slowly, which is how the chapter tests it without a GPU. This module imports without Triton;
``import labsupport.sparse`` never imports it::

    from labsupport.sparse import triton as sparse_triton
"""

from __future__ import annotations

import math

import torch

from labsupport.harness.settings import triton_interpreter_enabled as interpreter_enabled
from labsupport.harness.validation import require_int, require_qkv
from labsupport.sparse.masks import FULL, PARTIAL, BlockLayout, WindowPattern

try:  # Triton is optional
    import triton
    import triton.language as tl

    _TRITON_ERROR: Exception | None = None
except Exception as error:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERROR = error

__all__ = ["block_lists", "interpreter_enabled", "triton_available", "triton_block_sparse_forward"]

_LOG2E = 1.4426950408889634


def triton_available() -> bool:
    """True when Triton imported successfully."""
    return triton is not None


def block_lists(layout: BlockLayout, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The layout as padded per-row lists: ``full_idx, full_cnt, part_idx, part_cnt`` (int32)."""
    out = {}
    for name, kind in (("full", FULL), ("part", PARTIAL)):
        hit = layout.kinds == kind
        counts = hit.sum(dim=1)
        width = max(1, int(counts.max()))
        order = torch.sort((~hit).to(torch.int8), dim=1, stable=True).indices[:, :width]
        out[f"{name}_idx"] = order.to(torch.int32).contiguous().to(device)
        out[f"{name}_cnt"] = counts.to(torch.int32).contiguous().to(device)
    return out


if triton is not None:

    @triton.jit
    def _fold(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, IDX, CNT, pid_m, width,
              offs_m, offs_n, offs_d, offset, n_keys, qk_scale, window, sinks,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
        count = tl.load(CNT + pid_m)
        for i in range(0, count):
            block = tl.load(IDX + pid_m * width + i)
            cols = block * BLOCK_N + offs_n
            k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :], mask=cols[:, None] < n_keys, other=0.0)
            v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=cols[:, None] < n_keys, other=0.0)
            qk = tl.dot(q, tl.trans(k))
            if MASKED:  # the rule, from indices: 0 <= p - j and (p - j < window or j < sinks)
                d = offs_m[:, None] + offset - cols[None, :]
                visible = (d >= 0) & ((d < window) | (cols[None, :] < sinks)) & (cols[None, :] < n_keys)
                qk = tl.where(visible, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                m_ref = m_new
            p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _block_sparse_fwd_kernel(
        Q, K, V, O, LSE, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        n_heads, n_queries, n_keys, qk_scale, window, sinks, full_width, part_width,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=offs_m[:, None] < n_queries, other=0.0)
        Kbh = K + b * stride_kb + h * stride_kh
        Vbh = V + b * stride_vb + h * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        offset = n_keys - n_queries
        acc, m_i, l_i = _fold(acc, m_i, l_i, q, Kbh, Vbh, stride_kn, stride_vn, FULL_IDX, FULL_CNT, pid_m,
                              full_width, offs_m, offs_n, offs_d, offset, n_keys, qk_scale, window, sinks,
                              BLOCK_N, False)
        acc, m_i, l_i = _fold(acc, m_i, l_i, q, Kbh, Vbh, stride_kn, stride_vn, PART_IDX, PART_CNT, pid_m,
                              part_width, offs_m, offs_n, offs_d, offset, n_keys, qk_scale, window, sinks,
                              BLOCK_N, True)
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=offs_m[:, None] < n_queries)
        tl.store(LSE + pid_bh * n_queries + offs_m, lse, mask=offs_m < n_queries)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_block_sparse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: WindowPattern,
    *,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    lists: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention under ``pattern`` (sinks + causal window) with the Triton kernel: ``(out, lse)``.

    Forward only: tensors that require gradients are refused (see the module's docstring).

    ``q, k, v`` are ``(B, H, L, D)`` in fp16/bf16/fp32 with ``D`` in {16, 32, 64, 128}. Tiles default to 64 × 64
    on a GPU, 16 × 16 under the interpreter. ``lists`` (from :func:`block_lists` of the same layout) may be passed
    to keep the layout's cost out of a timing loop.
    """
    if triton is None:
        raise RuntimeError(f"triton_block_sparse_forward needs Triton, which could not be imported "
                           f"({type(_TRITON_ERROR).__name__}: {_TRITON_ERROR})")
    q, k, v = require_qkv(q, k, v, ndim=4, dtypes=_DTYPES)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("triton_block_sparse_forward is forward-only (no backward kernel): call it under "
                           "torch.no_grad() or on detached tensors; for gradients use FlexAttention with the same "
                           "block mask, or dense attention with pattern.mask(...)")
    if not isinstance(pattern, WindowPattern):
        raise TypeError(f"pattern must be a WindowPattern, got {type(pattern).__name__}")
    d = q.shape[-1]
    if d not in (16, 32, 64, 128):
        raise ValueError(f"head dimension must be 16, 32, 64 or 128, got {d}")
    on_cpu = q.device.type == "cpu"
    if on_cpu and not interpreter_enabled():
        raise RuntimeError("the tensors are on the CPU but TRITON_INTERPRET=1 was not set before triton was imported")
    if on_cpu and q.dtype == torch.bfloat16:  # the interpreter's tl.dot mishandles bf16 (see labsupport.flash.triton)
        out, lse = triton_block_sparse_forward(q.float(), k.float(), v.float(), pattern, scale=scale,
                                               block_m=block_m, block_n=block_n)
        return out.to(torch.bfloat16), lse
    bm = require_int("block_m", block_m or (16 if on_cpu else 64), minimum=16)
    bn = require_int("block_n", block_n or (16 if on_cpu else 64), minimum=16)
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if lists is None:
        lists = block_lists(pattern.layout(n_q, n_k, bm, bn), q.device)
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    grid = (triton.cdiv(n_q, bm), batch * heads)
    _block_sparse_fwd_kernel[grid](
        q, k, v, out, lse, lists["full_idx"], lists["full_cnt"], lists["part_idx"], lists["part_cnt"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, n_q, n_k, sm_scale * _LOG2E, pattern.window, pattern.sinks,
        lists["full_idx"].shape[1], lists["part_idx"].shape[1],
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
