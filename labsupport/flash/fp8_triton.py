"""Chapter 01: an FP8 attention forward for Hopper, with per-block scales (the recipe of :mod:`labsupport.flash.fp8`).

Both matrix products run on ``float8_e4m3fn`` operands and accumulate in fp32:

* ``S = Q8 · K8ᵀ``, then multiplied by ``scale_Q(block) · scale_K(block) · sm_scale · log2 e``: one
  multiply per score, as in the fp16 kernel, because the kernel's tiles *are* the quantisation blocks
  (``BLOCK_M`` query rows share one scale, ``BLOCK_N`` key rows another);
* ``P`` (``exp2`` of the score minus the row max, plus 8: values in ``[0, 256]``) is cast to e4m3 and
  multiplied by ``V8``; ``V``'s per-channel scales and the ``2**8`` are divided out once at the end.

``V`` is stored transposed, ``(B, H, D, Lk)``, by the quantisation pass: Hopper's FP8 tensor-core
instruction wants both operands of ``P·V`` with the summed dimension (the keys) contiguous, which a
row-major ``V`` is not (FlashAttention-3 transposes ``V`` in shared memory instead). With
``fp8_dot=False`` the same kernel upcasts the FP8 tiles to fp32 before each product: the
numerics of the quantisation without FP8 tensor cores, for machines or interpreters without them.

Under Triton's CPU interpreter (seen with Triton 3.9) the fp32 → e4m3 cast is wrong when rounding
carries into the next power of two (124.7 becomes 64, not 128), so there the kernel first rounds ``P``
to e4m3's 3 mantissa bits with integer arithmetic; the cast then has nothing left to round. On a GPU
the hardware conversion is used as is.

The causal split and ``exp2`` of :mod:`labsupport.flash.hopper` steps (b)-(c) are kept. Quantising
costs a pass over ``Q``, ``K``, ``V`` (:func:`quantize_for_kernel`, PyTorch), timed apart by the benchmark: a
producer of the inputs could write them in FP8 directly.

Not imported by ``labsupport.flash``: ``from labsupport.flash import fp8_triton``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from labsupport.flash import fp8
from labsupport.flash import triton as base
from labsupport.flash.hopper import KernelConfig

triton, tl = base.triton, base.tl

__all__ = ["FP8_CONFIGS", "FP8_SWEEP", "Fp8Inputs", "fp8_config", "fp8_flash_forward", "fp8_forward_quantized",
           "fp8_sweep_candidates", "quantize_for_kernel"]

#: Head dimensions the FP8 kernel takes (Hopper's FP8 products need at least 32 along the summed axis).
FP8_HEAD_DIMS = (32, 64, 128, 256)
#: Tiles per head dimension on a GPU: FP8 tiles take half the shared memory of fp16 ones, so 128 keys fit.
FP8_CONFIGS: dict[int, KernelConfig] = {
    32: KernelConfig(128, 128, 4, 3),
    64: KernelConfig(128, 128, 8, 3),
    128: KernelConfig(128, 128, 8, 2),
    256: KernelConfig(64, 64, 4, 2),
}


#: Alternatives the benchmark times once per head dimension before choosing the FP8 kernel's configuration.
FP8_SWEEP: dict[int, tuple[KernelConfig, ...]] = {
    64: (KernelConfig(128, 128, 8, 3), KernelConfig(128, 64, 8, 4), KernelConfig(128, 128, 8, 4)),
    128: (KernelConfig(128, 128, 8, 2), KernelConfig(128, 64, 8, 3), KernelConfig(128, 128, 8, 3)),
}


def fp8_sweep_candidates(head_dim: int) -> tuple[KernelConfig, ...]:
    """Configurations worth timing once for ``head_dim`` (the default :func:`fp8_config` first)."""
    return FP8_SWEEP.get(head_dim, (fp8_config(head_dim),))


def fp8_config(head_dim: int) -> KernelConfig:
    """The FP8 kernel's GPU configuration for ``head_dim``."""
    if head_dim not in FP8_CONFIGS:
        raise ValueError(f"head dimension must be one of {', '.join(map(str, FP8_CONFIGS))}, got {head_dim}")
    return FP8_CONFIGS[head_dim]


@dataclass(frozen=True)
class Fp8Inputs:
    """Quantised operands for :func:`fp8_forward_quantized`.

    ``q8 (B, H, Lq, D)`` with ``q_scales (B, H, ceil(Lq/block_m))``; ``k8 (B, H, Lk, D)`` with
    ``k_scales (B, H, ceil(Lk/block_n))``; ``vt8 (B, H, D, Lk)`` (V transposed) with ``v_scales (B, H, D)``;
    ``out_dtype``: the dtype the output is written in.
    """

    q8: torch.Tensor
    q_scales: torch.Tensor
    k8: torch.Tensor
    k_scales: torch.Tensor
    vt8: torch.Tensor
    v_scales: torch.Tensor
    block_m: int
    block_n: int
    out_dtype: torch.dtype


def quantize_for_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int,
                        block_n: int) -> Fp8Inputs:
    """Quantise ``q`` per ``block_m`` rows, ``k`` per ``block_n`` rows and ``v`` per channel, ``v`` transposed."""
    q, k, v = base._require_kernel_inputs(q, k, v)
    q8, qs = fp8.quantize_rows(q, block_m)
    k8, ks = fp8.quantize_rows(k, block_n)
    v8, vs = fp8.quantize_channels(v)
    return Fp8Inputs(q8.contiguous(), qs.contiguous(), k8.contiguous(), ks.contiguous(),
                     v8.transpose(-1, -2).contiguous(), vs.contiguous(), block_m, block_n, q.dtype)


if triton is not None:

    @triton.jit
    def _fp8_fold(
        acc, m_i, l_i, q, k_ptrs, vt_ptrs, ks_ptr, stride_kn, stride_vtn,
        start, stop, offs_m, offs_n, offset, n_keys, q_factor,
        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, FP8_DOT: tl.constexpr,
        ROUND_FIRST: tl.constexpr,
    ):
        """Fold key blocks ``[start, stop)``; ``m_i`` in log2 units, ``l_i`` and ``acc`` carry a factor 2**8."""
        k_ptrs += start * stride_kn
        vt_ptrs += start * stride_vtn
        for start_n in range(start, stop, BLOCK_N):
            cols = start_n + offs_n
            if MASKED:
                k = tl.load(k_ptrs, mask=cols[:, None] < n_keys, other=0.0)
                vt = tl.load(vt_ptrs, mask=cols[None, :] < n_keys, other=0.0)
            else:
                k = tl.load(k_ptrs)
                vt = tl.load(vt_ptrs)
            k_scale = tl.load(ks_ptr + start_n // BLOCK_N)
            if FP8_DOT:
                qk = tl.dot(q, tl.trans(k))
            else:
                qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
            qk = qk * (q_factor * k_scale)  # dequantise, scale and log2(e) in one multiply
            if MASKED:
                visible = cols[None, :] < n_keys
                if CAUSAL:
                    visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
                qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            if MASKED:
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_ref = m_new
            p = tl.math.exp2(qk - (m_ref[:, None] - 8.0))  # P · 2**8: in [0, 256], clear of e4m3's subnormals
            alpha = tl.math.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if ROUND_FIRST:  # the interpreter's cast mis-rounds carries: round to 3 mantissa bits (RNE) first
                bits = p.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
                p = bits.to(tl.float32, bitcast=True)
            p8 = p.to(tl.float8e4nv)
            if FP8_DOT:
                acc = tl.dot(p8, tl.trans(vt), acc)
            else:
                acc = tl.dot(p8.to(tl.float32), tl.trans(vt.to(tl.float32)), acc)
            m_i = m_new
            k_ptrs += BLOCK_N * stride_kn
            vt_ptrs += BLOCK_N * stride_vtn
        return acc, m_i, l_i

    @triton.jit
    def _fp8_fwd_kernel(
        Q8, QS, K8, KS, VT8, VS, O, LSE,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vd, stride_vn,
        stride_ob, stride_oh, stride_om, stride_od,
        n_heads, n_queries, n_keys, sm_scale_log2, n_q_blocks, n_k_blocks,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        FP8_DOT: tl.constexpr, ROUND_FIRST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // n_heads
        h = bh % n_heads
        first_row = pid_m * BLOCK_M
        offs_m = first_row + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q8 + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=offs_m[:, None] < n_queries, other=0.0)
        q_factor = tl.load(QS + bh * n_q_blocks + pid_m) * sm_scale_log2
        k_ptrs = K8 + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        vt_ptrs = VT8 + b * stride_vb + h * stride_vh + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vn
        ks_ptr = KS + bh * n_k_blocks
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        offset = n_keys - n_queries
        last_full = (n_keys // BLOCK_N) * BLOCK_N
        if CAUSAL:
            n_visible_to_all = tl.maximum(first_row + offset + 1, 0)
            unmasked_stop = tl.minimum((n_visible_to_all // BLOCK_N) * BLOCK_N, last_full)
            masked_stop = tl.minimum(tl.maximum(first_row + BLOCK_M + offset, 0), n_keys)
        else:
            unmasked_stop = last_full
            masked_stop = n_keys
        acc, m_i, l_i = _fp8_fold(acc, m_i, l_i, q, k_ptrs, vt_ptrs, ks_ptr, stride_kn, stride_vn,
                                  0, unmasked_stop, offs_m, offs_n, offset, n_keys, q_factor,
                                  BLOCK_N, False, CAUSAL, FP8_DOT, ROUND_FIRST)
        acc, m_i, l_i = _fp8_fold(acc, m_i, l_i, q, k_ptrs, vt_ptrs, ks_ptr, stride_kn, stride_vn,
                                  unmasked_stop, masked_stop, offs_m, offs_n, offset, n_keys, q_factor,
                                  BLOCK_N, True, CAUSAL, FP8_DOT, ROUND_FIRST)

        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        v_scale = tl.load(VS + bh * HEAD_DIM + offs_d)
        out = acc * (v_scale[None, :] / l_safe[:, None])  # the 2**8 of acc and l cancel here
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe) - 8.0) * 0.6931471805599453, float("-inf"))
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=offs_m[:, None] < n_queries)
        tl.store(LSE + bh * n_queries + offs_m, lse, mask=offs_m < n_queries)


def fp8_forward_quantized(x: Fp8Inputs, *, causal: bool = False, scale: float | None = None,
                          num_warps: int | None = None, num_stages: int | None = None,
                          fp8_dot: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 kernel on inputs already quantised by :func:`quantize_for_kernel`; returns ``(out, lse)``.

    The kernel's tiles are ``x.block_m × x.block_n`` (the quantisation blocks). Warps and stages
    default to :func:`fp8_config`'s on a GPU.
    """
    if triton is None:
        raise RuntimeError(f"fp8_forward_quantized needs Triton, which could not be imported ({base._TRITON_ERROR})")
    if not isinstance(x, Fp8Inputs):
        raise TypeError(f"x must be Fp8Inputs (from quantize_for_kernel), got {type(x).__name__}")
    on_cpu = x.q8.device.type == "cpu"
    if on_cpu and not base.interpreter_enabled():
        raise RuntimeError("tensors on the CPU need TRITON_INTERPRET=1 set before triton is first imported")
    batch, heads, n_q, d = x.q8.shape
    n_k = x.k8.shape[2]
    if d not in FP8_HEAD_DIMS:
        raise ValueError(f"head dimension must be one of {', '.join(map(str, FP8_HEAD_DIMS))}, got {d}")
    bm = base._require_block("block_m", x.block_m)
    bn = base._require_block("block_n", x.block_n)
    default = fp8_config(d) if not on_cpu else KernelConfig(bm, bn, 4, 1)
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty((batch, heads, n_q, d), device=x.q8.device, dtype=x.out_dtype)
    lse = torch.empty((batch, heads, n_q), device=x.q8.device, dtype=torch.float32)
    n_q_blocks, n_k_blocks = triton.cdiv(n_q, bm), triton.cdiv(n_k, bn)
    if x.q_scales.shape[-1] != n_q_blocks or x.k_scales.shape[-1] != n_k_blocks:
        raise ValueError("the scales do not match the block sizes: quantise with quantize_for_kernel")
    _fp8_fwd_kernel[(n_q_blocks, batch * heads)](
        x.q8, x.q_scales, x.k8, x.k_scales, x.vt8, x.v_scales, out, lse,
        *x.q8.stride(), *x.k8.stride(), *x.vt8.stride(), *out.stride(),
        heads, n_q, n_k, sm_scale * base._LOG2E, n_q_blocks, n_k_blocks,
        HEAD_DIM=d, CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn, FP8_DOT=bool(fp8_dot), ROUND_FIRST=on_cpu,
        num_warps=num_warps or default.num_warps, num_stages=num_stages or default.num_stages,
    )
    return out, lse


def fp8_flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                      scale: float | None = None, config: KernelConfig | None = None,
                      fp8_dot: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise (:func:`quantize_for_kernel`) then run the FP8 kernel; ``(out, lse)``, ``out`` in the input dtype.

    ``config`` defaults to :func:`fp8_config` on a GPU and 16 × 32 tiles under the CPU interpreter.
    """
    if triton is None:
        raise RuntimeError(f"fp8_flash_forward needs Triton, which could not be imported ({base._TRITON_ERROR})")
    q, k, v = base._require_kernel_inputs(q, k, v)
    if config is None:
        config = KernelConfig(16, 32, 4, 1) if q.device.type == "cpu" else fp8_config(q.shape[-1])
    x = quantize_for_kernel(q, k, v, block_m=config.block_m, block_n=config.block_n)
    return fp8_forward_quantized(x, causal=causal, scale=scale, num_warps=config.num_warps,
                                 num_stages=config.num_stages, fp8_dot=fp8_dot)
