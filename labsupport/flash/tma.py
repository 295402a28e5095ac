"""Chapter 01, "the last 20% on Hopper": the forward kernel with TMA tensor descriptors.

The same algorithm as :mod:`labsupport.flash.triton` (online softmax, ``exp2`` with the
scale folded in, off-diagonal key blocks without a mask and only the diagonal masked when
causal), with one change in how tiles reach the chip: instead of a ``BLOCK × D`` grid of
pointers per load, each program asks Hopper's Tensor Memory Accelerator for a whole tile by
its coordinates ``(batch·head, row, 0)``. The copy engine then moves the tile into shared
memory on its own (no address arithmetic in registers, no per-element bounds checks: rows
past a sequence's end arrive as zeros), which frees registers and issue slots for the two
matrix products and the softmax.

Optionally (``warp_specialize=True``) the key loop is compiled with Triton's automatic warp
specialisation: producer warps issue the copies while consumer warps compute, the idea of
FlashAttention-3. Whether a given Triton release supports it on Hopper is measured, not
assumed (``benchmarks/flash_attention_gpu.py``).

Needs contiguous ``(B, H, L, D)`` inputs. Runs under ``TRITON_INTERPRET=1`` on the CPU too
(slowly), which is how it is tested without a GPU.
"""

from __future__ import annotations

import math

import torch

from labsupport.flash import triton as base

triton, tl = base.triton, base.tl

__all__ = ["tma_flash_forward", "tma_available"]

if triton is not None:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except Exception:  # pragma: no cover - older Triton
        TensorDescriptor = None
else:  # pragma: no cover
    TensorDescriptor = None


def tma_available() -> bool:
    """True when this Triton has host-side tensor descriptors (Triton >= 3.4)."""
    return TensorDescriptor is not None


if TensorDescriptor is not None:

    @triton.jit
    def _fold_tma(
        acc, m_i, l_i, q, desc_k, desc_v, bh,
        start, stop, offs_m, offs_n, offset, n_keys, qk_scale,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
        WARP_SPEC: tl.constexpr,
    ):
        """Fold key blocks ``[start, stop)`` into ``(acc, m_i, l_i)``; tiles come by descriptor."""
        for start_n in tl.range(start, stop, BLOCK_N, warp_specialize=WARP_SPEC):
            k = desc_k.load([bh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            v = desc_v.load([bh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            qk = tl.dot(q, tl.trans(k))
            if MASKED:  # rows past the end came as zeros: their scores must still be hidden
                cols = start_n + offs_n
                visible = cols[None, :] < n_keys
                if CAUSAL:
                    visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
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
    def _flash_fwd_tma_kernel(
        desc_q, desc_k, desc_v, desc_o, LSE,
        n_queries, n_keys, qk_scale, q_bucket, k_bucket,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WARP_SPEC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        first_row = pid_m * BLOCK_M
        offs_m = first_row + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        q = desc_q.load([bh, first_row, 0]).reshape(BLOCK_M, HEAD_DIM)
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
        acc, m_i, l_i = _fold_tma(acc, m_i, l_i, q, desc_k, desc_v, bh, 0, unmasked_stop, offs_m, offs_n,
                                  offset, n_keys, qk_scale, BLOCK_N, HEAD_DIM, False, CAUSAL, WARP_SPEC)
        acc, m_i, l_i = _fold_tma(acc, m_i, l_i, q, desc_k, desc_v, bh, unmasked_stop, masked_stop, offs_m,
                                  offs_n, offset, n_keys, qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL, False)
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        desc_o.store([bh, first_row, 0], out.to(desc_o.dtype).reshape(1, BLOCK_M, HEAD_DIM))
        tl.store(LSE + bh * n_queries + offs_m, lse, mask=offs_m < n_queries)

    def _set_blocks(nargs):
        """Each configuration's tile shapes, written into the descriptors before a launch."""
        bm, bn, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
        for name, rows in (("desc_q", bm), ("desc_o", bm), ("desc_k", bn), ("desc_v", bn)):
            nargs[name].block_shape = [1, rows, d]

    def _tma_configs() -> list:
        seen = sorted({c for cands in base._FWD_CANDIDATES.values() for c in cands})
        return [triton.Config({"BLOCK_M": o, "BLOCK_N": i}, num_warps=w, num_stages=st, pre_hook=_set_blocks)
                for o, i, w, st in seen]

    _flash_fwd_tma_autotuned = triton.autotune(
        configs=_tma_configs(),
        key=["q_bucket", "k_bucket", "HEAD_DIM", "CAUSAL", "WARP_SPEC"],
        prune_configs_by={"early_config_prune": base._pruner(base._FWD_CANDIDATES, "BLOCK_M", "BLOCK_N",
                                                             "q_bucket")},
    )(_flash_fwd_tma_kernel)


def tma_flash_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
    warp_specialize: bool = False, block_m: int | None = None, block_n: int | None = None,
    num_warps: int = 4, num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`labsupport.flash.triton.triton_flash_forward`'s contract, tiles loaded through TMA descriptors.

    ``q, k, v`` must be contiguous. Autotuned (per head dimension, per length bucket) on a GPU
    when no block sizes are given; one fixed configuration under the CPU interpreter.
    """
    if not tma_available():
        raise RuntimeError("tma_flash_forward needs Triton >= 3.4 (triton.tools.tensor_descriptor)")
    q, k, v = base._require_kernel_inputs(q, k, v)
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("tma_flash_forward needs contiguous q, k, v; use triton_flash_forward for strided inputs")
    on_cpu = q.device.type == "cpu"
    if on_cpu and not base.interpreter_enabled():
        raise RuntimeError("tensors on the CPU need TRITON_INTERPRET=1 set before triton is first imported")
    if on_cpu and q.dtype == torch.bfloat16:  # the interpreter's bf16 dot is broken (see labsupport.flash.triton)
        out, lse = tma_flash_forward(q.float(), k.float(), v.float(), causal=causal, scale=scale,
                                     block_m=block_m, block_n=block_n)
        return out.to(torch.bfloat16), lse
    batch, heads, n_q, d = q.shape
    n_k = k.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    views = [t.view(batch * heads, t.shape[2], d) for t in (q, k, v, out)]
    descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 16, d]) for t in views]
    scalars = (n_q, n_k, sm_scale * base._LOG2E, base.length_bucket(n_q), base.length_bucket(n_k))
    if not on_cpu and block_m is None and block_n is None:
        grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _flash_fwd_tma_autotuned[grid](*descs, lse, *scalars, HEAD_DIM=d, CAUSAL=bool(causal),
                                       WARP_SPEC=bool(warp_specialize))
    else:
        bm = base._require_block("block_m", block_m or (16 if on_cpu else 128))
        bn = base._require_block("block_n", block_n or (16 if on_cpu else 64))
        nargs = {"desc_q": descs[0], "desc_k": descs[1], "desc_v": descs[2], "desc_o": descs[3],
                 "BLOCK_M": bm, "BLOCK_N": bn, "HEAD_DIM": d}
        _set_blocks(nargs)
        _flash_fwd_tma_kernel[(triton.cdiv(n_q, bm), batch * heads)](
            *descs, lse, *scalars, HEAD_DIM=d, CAUSAL=bool(causal), WARP_SPEC=bool(warp_specialize),
            BLOCK_M=bm, BLOCK_N=bn, num_warps=num_warps, num_stages=num_stages)
    return out, lse
