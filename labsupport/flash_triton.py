"""Chapter 01: the tiled attention forward pass as a Triton kernel.

One program instance owns a block of ``BLOCK_M`` queries of one (batch, head).
It keeps the query block, the running maximum ``m``, the running sum ``l`` and
the unnormalised output ``acc`` on chip, streams blocks of ``BLOCK_N`` keys and
values past them, and writes the output and the logsumexp once at the end:
exactly :func:`labsupport.flash.flash_attention_forward`, written for a GPU.

Three details that matter for speed, each worth a comment in the kernel:

* ``exp2`` instead of ``exp``: the score scale and ``log2(e)`` are folded into one
  multiplier, so each score costs one fused multiply-add and one ``exp2``.
* With ``causal``, key blocks come in two kinds: *off-diagonal* blocks, visible
  to every query of the block, run without any mask; only the few *diagonal*
  blocks that cross the mask's edge pay for it. Blocks entirely in the future are
  never visited.
* Block sizes, warps and pipeline depth are autotuned on the GPU.

The same kernel runs on a CPU under Triton's interpreter (set
``TRITON_INTERPRET=1`` before ``triton`` is first imported): slowly, but exactly,
which is how the chapter tests it without a GPU.

This module imports without Triton installed; calling :func:`triton_flash_forward`
then raises a clear error.
"""

from __future__ import annotations

import math
import os

import torch

try:  # Triton is optional: the chapter runs without it
    import triton
    import triton.language as tl

    _TRITON_ERROR: Exception | None = None
except Exception as error:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERROR = error

__all__ = ["triton_available", "interpreter_enabled", "triton_flash_forward", "best_config"]

_LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e))
_LN2 = 0.6931471805599453


def triton_available() -> bool:
    """True when Triton imported successfully."""
    return triton is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` was set (kernels then run on the CPU, in Python)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def _fold_key_blocks(
        acc, m_i, l_i, q,
        k_ptrs, v_ptrs, stride_kn, stride_vn,
        start, stop, offs_m, offs_n, offset, n_keys, qk_scale,
        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    ):
        """Fold key blocks ``[start, stop)`` into the running ``(acc, m_i, l_i)``.

        ``MASKED`` is a compile-time switch: the unmasked copy of this loop has no
        comparisons or ``where`` at all.
        """
        k_ptrs += start * stride_kn
        v_ptrs += start * stride_vn
        for start_n in range(start, stop, BLOCK_N):
            if MASKED:
                cols = start_n + offs_n
                in_range = cols[None, :] < n_keys
                k = tl.load(k_ptrs, mask=cols[:, None] < n_keys, other=0.0)
                v = tl.load(v_ptrs, mask=cols[:, None] < n_keys, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) raw scores, fp32
            if MASKED:
                visible = in_range
                if CAUSAL:  # bottom-right aligned: key j is visible to query i if j <= i + offset
                    visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
                qk = tl.where(visible, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                # a row that has seen no key yet keeps m = -inf; use 0 there to avoid inf - inf
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                m_ref = m_new
            # scale and log2(e) folded into qk_scale: one FMA, then exp2
            p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)  # shrink what was accumulated so far
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
        return acc, m_i, l_i

    @triton.jit
    def _flash_fwd_kernel(
        Q, K, V, O, LSE,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        n_heads, n_queries, n_keys, qk_scale,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)  # which block of queries
        pid_bh = tl.program_id(1)  # which (batch, head)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        q = tl.load(q_ptrs, mask=offs_m[:, None] < n_queries, other=0.0)  # stays on chip

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # Which key blocks to visit. Full blocks visible to every query of this block run
        # unmasked; the rest (the diagonal when causal, a ragged tail otherwise) run masked.
        offset = n_keys - n_queries
        last_full = (n_keys // BLOCK_N) * BLOCK_N
        if CAUSAL:
            first_row = pid_m * BLOCK_M
            # keys j <= first_row + offset are visible to every row of the block
            n_visible_to_all = tl.maximum(first_row + offset + 1, 0)
            unmasked_stop = tl.minimum((n_visible_to_all // BLOCK_N) * BLOCK_N, last_full)
            masked_stop = tl.minimum(tl.maximum(first_row + BLOCK_M + offset, 0), n_keys)
        else:
            unmasked_stop = last_full
            masked_stop = n_keys

        acc, m_i, l_i = _fold_key_blocks(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
            0, unmasked_stop, offs_m, offs_n, offset, n_keys, qk_scale,
            BLOCK_N, False, CAUSAL,
        )
        acc, m_i, l_i = _fold_key_blocks(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
            unmasked_stop, masked_stop, offs_m, offs_n, offset, n_keys, qk_scale,
            BLOCK_N, True, CAUSAL,
        )

        # Divide once at the end. A row that saw no key (l = 0) gets zeros and lse = -inf.
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))

        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < n_queries)
        tl.store(LSE + pid_bh * n_queries + offs_m, lse, mask=offs_m < n_queries)

    def _configs() -> list:
        configs = []
        for block_m in (64, 128):
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        if block_m == 64 and warps == 8:
                            continue
                        configs.append(
                            triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                                          num_warps=warps, num_stages=stages)
                        )
        return configs

    def _prune(configs, named_args, **kwargs):
        # a head dimension of 128 with 128x128 tiles needs too many registers to pay off
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
        kept = [c for c in configs if not (head_dim >= 128 and c.kwargs["BLOCK_N"] == 128 and c.num_stages > 2)]
        return kept or configs

    _flash_fwd_autotuned = triton.autotune(
        configs=_configs(),
        key=["n_queries", "n_keys", "HEAD_DIM", "CAUSAL"],
        prune_configs_by={"early_config_prune": _prune},
    )(_flash_fwd_kernel)


def _check_inputs(q: object, k: object, v: object) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, H, L, D), got shape {tuple(x.shape)}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "expected q (B, H, Lq, D) and k, v (B, H, Lk, D); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dimension must be one of 16, 32, 64, 128, 256, got {d}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError("q and k must hold at least one position each")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def triton_flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled attention forward with the Triton kernel; returns ``(out, lse)``.

    Same contract as :func:`labsupport.flash.flash_attention_forward` (bottom-right
    causal mask, zeros and ``lse = -inf`` for rows that see no key), for
    ``(B, H, L, D)`` tensors in fp16, bf16 or fp32 with ``D`` in {16, 32, 64, 128, 256}.

    On a GPU, leave ``block_m`` and ``block_n`` as ``None`` to autotune (the first call
    for a new shape then takes a few seconds). Under the CPU interpreter, or when
    both are given, one fixed configuration runs (default 16 × 16 on CPU).
    """
    if triton is None:
        raise RuntimeError(
            "triton_flash_forward needs Triton, which could not be imported "
            f"({type(_TRITON_ERROR).__name__}: {_TRITON_ERROR}). Install it with `pip install triton`."
        )
    _check_inputs(q, k, v)
    on_cpu = q.device.type == "cpu"
    if on_cpu and not interpreter_enabled():
        raise RuntimeError(
            "the tensors are on the CPU but Triton's interpreter is off: set the environment "
            "variable TRITON_INTERPRET=1 before triton is first imported (or move the tensors to a GPU)."
        )
    if on_cpu and q.dtype == torch.bfloat16:
        # Triton's CPU interpreter (seen with 3.9) returns garbage from tl.dot on bf16
        # operands; run the interpreted kernel in fp32 and round the output to bf16.
        out, lse = triton_flash_forward(
            q.float(), k.float(), v.float(), causal=causal, scale=scale,
            block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
        )
        return out.to(torch.bfloat16), lse
    batch, heads, n_q, d = q.shape
    n_k = k.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    args = (
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, n_q, n_k, sm_scale * _LOG2E,
    )
    autotune = not on_cpu and block_m is None and block_n is None
    if autotune:
        grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _flash_fwd_autotuned[grid](*args, HEAD_DIM=d, CAUSAL=bool(causal))
    else:
        bm = block_m or (16 if on_cpu else 128)
        bn = block_n or (16 if on_cpu else 64)
        for name, value in (("block_m", bm), ("block_n", bn)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        grid = (triton.cdiv(n_q, bm), batch * heads)
        _flash_fwd_kernel[grid](
            *args, HEAD_DIM=d, CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out, lse


def best_config() -> dict[str, object] | None:
    """The configurations the autotuner picked so far (GPU only), keyed by shape."""
    if triton is None:
        return None
    cache = getattr(_flash_fwd_autotuned, "cache", {})
    return {str(key): str(cfg) for key, cfg in cache.items()}
