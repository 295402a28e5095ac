"""Chapter 01: tiled attention as Triton kernels (the forward pass, and a backward pass).

One program instance owns a block of ``BLOCK_M`` queries of one (batch, head).
It keeps the query block, the running maximum ``m``, the running sum ``l`` and
the unnormalised output ``acc`` on chip, streams blocks of ``BLOCK_N`` keys and
values past them, and writes the output and the logsumexp once at the end:
exactly :func:`labsupport.flash.tiled.flash_attention_forward`, written for a GPU.

Three details that matter for speed, each worth a comment in the kernel:

* ``exp2`` instead of ``exp``: the score scale and ``log2(e)`` are folded into one
  multiplier, so each score costs one fused multiply-add and one ``exp2``.
* With ``causal``, key blocks come in two kinds: *off-diagonal* blocks, visible
  to every query of the block, run without any mask; only the few *diagonal*
  blocks that cross the mask's edge pay for it. Blocks entirely in the future are
  never visited.
* Block sizes, warps and pipeline depth are autotuned on the GPU, among a few candidates
  per head dimension (:func:`candidate_configs`), once per *bucket* of lengths (the next
  power of two, :func:`length_bucket`): a new length in a tuned bucket costs nothing.

The same kernel runs on a CPU under Triton's interpreter (set
``TRITON_INTERPRET=1`` before ``triton`` is first imported): slowly, but exactly,
which is how the chapter tests it without a GPU.

The backward pass (:func:`triton_flash_backward`, and :func:`triton_flash_attention`
for autograd) follows at the end of the module: one kernel per key block for dK and
dV, one per query block for dQ, both rebuilding probabilities from the saved
logsumexp, as :func:`labsupport.flash.tiled.flash_attention_backward` does.

This module imports without Triton installed; calling any of its kernels then
raises a clear error. ``import labsupport.flash`` does not import it (nor
Triton): import it yourself, after setting ``TRITON_INTERPRET`` if needed::

    from labsupport.flash import triton as flash_triton
"""

from __future__ import annotations

import math

import torch

from labsupport.harness.settings import triton_interpreter_enabled as interpreter_enabled
from labsupport.harness.validation import require_int, require_qkv, require_tensor

try:  # Triton is optional: the chapter runs without it
    import triton
    import triton.language as tl

    _TRITON_ERROR: Exception | None = None
except Exception as error:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERROR = error

__all__ = [
    "triton_available",
    "interpreter_enabled",
    "triton_flash_forward",
    "triton_flash_backward",
    "triton_flash_attention",
    "TritonFlashAttention",
    "best_config",
    "length_bucket",
    "candidate_configs",
]

_LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e))
_LN2 = 0.6931471805599453


def triton_available() -> bool:
    """True when Triton imported successfully."""
    return triton is not None


def length_bucket(n: int) -> int:
    """The autotuner's key for a length: the next power of two (at least 16).

    Tuning once per bucket instead of once per exact length: a batch of 3,000 tokens reuses
    the configuration measured for 4,096 instead of compiling and timing every candidate again.
    """
    n = require_int("n", n, minimum=1)
    return max(16, 1 << (n - 1).bit_length())


# Autotuning candidates per head dimension, (outer block, inner block, warps, stages). The
# register file bounds what pays off: the accumulator is BLOCK_M × D fp32 values spread over
# the warps, so D = 128 wants 8 warps for 128-row blocks, and D = 256 small tiles and shallow
# pipelines (each stage holds a K and a V tile in shared memory).
_FWD_CANDIDATES: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    16: ((64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 2)),
    32: ((64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 2)),
    64: ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 128, 4, 2)),
    128: ((128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 4, 3)),
    256: ((64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 1), (128, 64, 8, 1)),
}
# backward, (outer, inner, warps, stages): outer = keys (dK/dV kernel) or queries (dQ kernel). Long outer and
# short inner blocks (128 × 32) keep a program's resident tiles large and its streamed ones small.
_BWD_CANDIDATES: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    16: ((64, 32, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2)),
    32: ((64, 32, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2)),
    64: ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2), (128, 32, 4, 3), (128, 32, 4, 5)),
    128: ((64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)),
    256: ((64, 32, 4, 1), (32, 32, 4, 1), (64, 32, 8, 2)),
}


def candidate_configs(head_dim: int, *, backward: bool = False) -> tuple[tuple[int, int, int, int], ...]:
    """The (outer block, inner block, warps, stages) the autotuner tries for ``head_dim``."""
    table = _BWD_CANDIDATES if backward else _FWD_CANDIDATES
    if head_dim not in table:
        raise ValueError(f"head dimension must be one of {', '.join(map(str, table))}, got {head_dim}")
    return table[head_dim]


if triton is not None:

    def _all_configs(table: dict, outer: str, inner: str) -> list:
        """Every candidate of every head dimension, once; the pruner keeps one head dimension's."""
        seen = sorted({c for cands in table.values() for c in cands})
        return [triton.Config({outer: o, inner: i}, num_warps=w, num_stages=st) for o, i, w, st in seen]

    def _pruner(table: dict, outer: str, inner: str, bucket_arg: str):
        """An ``early_config_prune``: one head dimension's candidates, no outer block longer than the bucket."""
        def prune(configs, named_args, **kwargs):
            head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
            bucket = kwargs.get(bucket_arg, named_args.get(bucket_arg, 1 << 30))
            wanted = set(table.get(head_dim, table[64]))
            kept = [c for c in configs
                    if (c.kwargs[outer], c.kwargs[inner], c.num_warps, c.num_stages) in wanted]
            short = [c for c in kept if c.kwargs[outer] <= bucket]  # no 128-row blocks for 40 queries
            return short or kept or configs
        return prune

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
        q_bucket, k_bucket,  # unused in the body: the autotuner's key (next powers of two of the lengths)
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

    _flash_fwd_autotuned = triton.autotune(
        configs=_all_configs(_FWD_CANDIDATES, "BLOCK_M", "BLOCK_N"),
        key=["q_bucket", "k_bucket", "HEAD_DIM", "CAUSAL"],  # tensor dtypes are added by Triton
        prune_configs_by={"early_config_prune": _pruner(_FWD_CANDIDATES, "BLOCK_M", "BLOCK_N", "q_bucket")},
    )(_flash_fwd_kernel)


#: The dtypes and head dimensions the kernels are written for.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_DIMS = (16, 32, 64, 128, 256)


def _require_kernel_inputs(q: object, k: object, v: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q (B, H, Lq, D)``, ``k, v (B, H, Lk, D)`` in fp16/bf16/fp32, with a head dimension the kernels support."""
    q, k, v = require_qkv(q, k, v, ndim=4, dtypes=_KERNEL_DTYPES)
    d = q.shape[-1]
    if d not in _HEAD_DIMS:
        raise ValueError(f"head dimension must be one of {', '.join(map(str, _HEAD_DIMS))}, got {d}")
    return q, k, v


def _require_block(name: str, value: object) -> int:
    """A kernel block size: a power of two of at least 16."""
    value = require_int(name, value, minimum=16)
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return value


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

    Same contract as :func:`labsupport.flash.tiled.flash_attention_forward` (bottom-right
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
    q, k, v = _require_kernel_inputs(q, k, v)
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
        heads, n_q, n_k, sm_scale * _LOG2E, length_bucket(n_q), length_bucket(n_k),
    )
    autotune = not on_cpu and block_m is None and block_n is None
    if autotune:
        grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _flash_fwd_autotuned[grid](*args, HEAD_DIM=d, CAUSAL=bool(causal))
    else:
        bm = _require_block("block_m", block_m or (16 if on_cpu else 128))
        bn = _require_block("block_n", block_n or (16 if on_cpu else 64))
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


# --------------------------------------------------------------------------- backward (stretch)
#
# Two kernels, as in FlashAttention-2. Both rebuild probability tiles from the saved
# logsumexp (P = exp2(S·scale·log2e − lse·log2e)) and use D = rowsum(dO ⊙ O), which the
# wrapper computes with one PyTorch line before launching them.
#   * _flash_bwd_dkdv_kernel: one program per block of keys; it keeps K_j, V_j, dK_j, dV_j
#     on chip and streams the query blocks that can see them.
#   * _flash_bwd_dq_kernel: one program per block of queries; it keeps Q_i, dO_i, dQ_i on
#     chip and streams the key blocks, exactly like the forward pass.
# Fully masked rows arrive with lse = +inf (the wrapper swaps -inf for +inf), so their P is 0.

if triton is not None:

    @triton.jit
    def _dkdv_over_query_blocks(
        dk, dv, k, v,
        q_ptrs, do_ptrs, lse_ptr, d_ptr, stride_qm, stride_dom,
        start, stop, offs_n, offs_m, offset, n_queries, qk_scale,
        BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    ):
        """Add the contributions of query blocks ``[start, stop)`` to one key block's dK, dV."""
        q_ptrs += start * stride_qm
        do_ptrs += start * stride_dom
        for start_m in range(start, stop, BLOCK_M):
            rows = start_m + offs_m
            if MASKED:
                row_ok = rows < n_queries
                q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
                do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
                lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
                d_i = tl.load(d_ptr + rows, mask=row_ok, other=0.0)
            else:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
                lse = tl.load(lse_ptr + rows)
                d_i = tl.load(d_ptr + rows)
            # work with transposed tiles (keys x queries) so no operand needs a transpose twice
            p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
            if MASKED and CAUSAL:
                p_t = tl.where(offs_n[:, None] <= rows[None, :] + offset, p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv)  # dV += Pᵀ dO
            dp_t = tl.dot(v, tl.trans(do))  # (dO Vᵀ)ᵀ
            ds_t = p_t * (dp_t - d_i[None, :])  # dSᵀ = Pᵀ ⊙ (dPᵀ − D)
            dk = tl.dot(ds_t.to(q.dtype), q, dk)  # dK += dSᵀ Q   (scaled at the end)
            q_ptrs += BLOCK_M * stride_qm
            do_ptrs += BLOCK_M * stride_dom
        return dk, dv

    @triton.jit
    def _flash_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        n_heads, n_queries, n_keys, qk_scale, sm_scale,
        q_bucket, k_bucket,  # the autotuner's key only
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        key_ok = offs_n[:, None] < n_keys
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=key_ok, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
        lse_ptr = LSE + pid_bh * n_queries
        d_ptr = DELTA + pid_bh * n_queries

        offset = n_keys - n_queries
        last_full = (n_queries // BLOCK_M) * BLOCK_M
        if CAUSAL:
            first_key = pid_n * BLOCK_N
            # query rows before first_key - offset see none of these keys; rows from
            # first_key + BLOCK_N - 1 - offset on see all of them
            lo = (tl.maximum(first_key - offset, 0) // BLOCK_M) * BLOCK_M
            sees_all = tl.maximum(first_key + BLOCK_N - 1 - offset, 0)
            mid = tl.minimum(((sees_all + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, last_full)
            mid = tl.maximum(mid, lo)  # if the diagonal runs into the ragged tail, the tail loop takes over
        else:
            lo = 0
            mid = 0
        dk, dv = _dkdv_over_query_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, d_ptr, stride_qm, stride_dom,
                                         lo, mid, offs_n, offs_m, offset, n_queries, qk_scale, BLOCK_M, True, CAUSAL)
        dk, dv = _dkdv_over_query_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, d_ptr, stride_qm, stride_dom,
                                         mid, last_full, offs_n, offs_m, offset, n_queries, qk_scale, BLOCK_M, False, CAUSAL)
        dk, dv = _dkdv_over_query_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, d_ptr, stride_qm, stride_dom,
                                         tl.maximum(last_full, mid), n_queries, offs_n, offs_m, offset, n_queries,
                                         qk_scale, BLOCK_M, True, CAUSAL)
        out_offs = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
        tl.store(DK + out_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok)
        tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=key_ok)

    @triton.jit
    def _dq_over_key_blocks(
        dq, q, do, lse, d_i,
        k_ptrs, v_ptrs, stride_kn, stride_vn,
        start, stop, offs_m, offs_n, offset, n_keys, qk_scale,
        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    ):
        """Add the contributions of key blocks ``[start, stop)`` to one query block's dQ."""
        k_ptrs += start * stride_kn
        v_ptrs += start * stride_vn
        for start_n in range(start, stop, BLOCK_N):
            if MASKED:
                cols = start_n + offs_n
                k = tl.load(k_ptrs, mask=cols[:, None] < n_keys, other=0.0)
                v = tl.load(v_ptrs, mask=cols[:, None] < n_keys, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
            if MASKED:
                visible = cols[None, :] < n_keys
                if CAUSAL:
                    visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
                p = tl.where(visible, p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - d_i[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq)  # dQ += dS K   (scaled at the end)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
        return dq

    @triton.jit
    def _flash_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
        n_heads, n_queries, n_keys, qk_scale, sm_scale,
        q_bucket, k_bucket,  # the autotuner's key only
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < n_queries
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + pid_bh * n_queries + offs_m, mask=row_ok, other=float("inf"))
        d_i = tl.load(DELTA + pid_bh * n_queries + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

        # the same split of key blocks as the forward pass
        offset = n_keys - n_queries
        last_full = (n_keys // BLOCK_N) * BLOCK_N
        if CAUSAL:
            first_row = pid_m * BLOCK_M
            n_visible_to_all = tl.maximum(first_row + offset + 1, 0)
            unmasked_stop = tl.minimum((n_visible_to_all // BLOCK_N) * BLOCK_N, last_full)
            masked_stop = tl.minimum(tl.maximum(first_row + BLOCK_M + offset, 0), n_keys)
        else:
            unmasked_stop = last_full
            masked_stop = n_keys
        dq = _dq_over_key_blocks(dq, q, do, lse, d_i, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                 0, unmasked_stop, offs_m, offs_n, offset, n_keys, qk_scale, BLOCK_N, False, CAUSAL)
        dq = _dq_over_key_blocks(dq, q, do, lse, d_i, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                 unmasked_stop, masked_stop, offs_m, offs_n, offset, n_keys, qk_scale,
                                 BLOCK_N, True, CAUSAL)
        tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])

    _bwd_key = ["q_bucket", "k_bucket", "HEAD_DIM", "CAUSAL"]
    _flash_bwd_dkdv_autotuned = triton.autotune(
        configs=_all_configs(_BWD_CANDIDATES, "BLOCK_N", "BLOCK_M"), key=_bwd_key,
        prune_configs_by={"early_config_prune": _pruner(_BWD_CANDIDATES, "BLOCK_N", "BLOCK_M", "k_bucket")},
    )(_flash_bwd_dkdv_kernel)
    _flash_bwd_dq_autotuned = triton.autotune(
        configs=_all_configs(_BWD_CANDIDATES, "BLOCK_M", "BLOCK_N"), key=_bwd_key,
        prune_configs_by={"early_config_prune": _pruner(_BWD_CANDIDATES, "BLOCK_M", "BLOCK_N", "q_bucket")},
    )(_flash_bwd_dq_kernel)


def triton_flash_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass with two Triton kernels (dK/dV per key block, dQ per query block).

    Takes what :func:`triton_flash_forward` returned (``out``, ``lse``) and the upstream
    gradient ``dout``; returns ``(dq, dk, dv)`` in the input dtype. Autotuned on a GPU;
    under the CPU interpreter, or with both block sizes given, one configuration runs.
    """
    if triton is None:
        raise RuntimeError(
            "triton_flash_backward needs Triton, which could not be imported "
            f"({type(_TRITON_ERROR).__name__}: {_TRITON_ERROR}). Install it with `pip install triton`."
        )
    q, k, v = _require_kernel_inputs(q, k, v)
    for name, tensor in (("out", out), ("lse", lse), ("dout", dout)):
        require_tensor(name, tensor)
    if out.shape != q.shape or dout.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(
            f"expected out and dout of shape {tuple(q.shape)} and lse of shape {tuple(q.shape[:3])}, got "
            f"{tuple(out.shape)}, {tuple(dout.shape)}, {tuple(lse.shape)}"
        )
    on_cpu = q.device.type == "cpu"
    if on_cpu and not interpreter_enabled():
        raise RuntimeError("tensors on the CPU need TRITON_INTERPRET=1 set before triton is first imported")
    if on_cpu and q.dtype == torch.bfloat16:  # see triton_flash_forward: the interpreter's bf16 dot is broken
        grads = triton_flash_backward(q.float(), k.float(), v.float(), out.float(), lse, dout.float(),
                                      causal=causal, scale=scale, block_m=block_m, block_n=block_n)
        return tuple(g.to(torch.bfloat16) for g in grads)  # type: ignore[return-value]
    batch, heads, n_q, d = q.shape
    n_k = k.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    delta = (dout.float() * out.float()).sum(dim=-1).contiguous()  # D = rowsum(dO ⊙ O), (B, H, Lq)
    # in log2 units, with +inf for rows that saw no key so that their P is exactly 0
    lse2 = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse * _LOG2E).float().contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
    )
    scalars = (heads, n_q, n_k, sm_scale * _LOG2E, sm_scale, length_bucket(n_q), length_bucket(n_k))
    dkdv_args = (q, k, v, dout, lse2, delta, dk, dv, *common, *dk.stride(), *scalars)
    dq_args = (q, k, v, dout, lse2, delta, dq, *common, *dq.stride(), *scalars)
    if dk.stride() != dv.stride():
        raise ValueError("k and v must have the same memory layout (strides)")
    if not on_cpu and block_m is None and block_n is None:
        _flash_bwd_dkdv_autotuned[lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), batch * heads)](
            *dkdv_args, HEAD_DIM=d, CAUSAL=bool(causal))
        _flash_bwd_dq_autotuned[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)](
            *dq_args, HEAD_DIM=d, CAUSAL=bool(causal))
    else:
        bm = _require_block("block_m", block_m or (16 if on_cpu else 64))
        bn = _require_block("block_n", block_n or (16 if on_cpu else 64))
        _flash_bwd_dkdv_kernel[(triton.cdiv(n_k, bn), batch * heads)](
            *dkdv_args, HEAD_DIM=d, CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn)
        _flash_bwd_dq_kernel[(triton.cdiv(n_q, bm), batch * heads)](
            *dq_args, HEAD_DIM=d, CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn)
    return dq, dk, dv


class TritonFlashAttention(torch.autograd.Function):
    """Autograd wrapper around the Triton forward and backward kernels."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):  # type: ignore[override]
        out, lse = triton_flash_forward(q, k, v, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = triton_flash_backward(q, k, v, out, lse, dout, causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None


def triton_flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Differentiable attention through the Triton kernels (forward and backward)."""
    _require_kernel_inputs(q, k, v)
    return TritonFlashAttention.apply(q, k, v, bool(causal), scale)
