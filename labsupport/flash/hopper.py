"""Chapter 01, "the last 20% on Hopper": one forward kernel, seven steps, each a compile-time switch.

:mod:`labsupport.flash.triton` is the chapter's tuned kernel. This module takes it apart into a
*ladder*: step (a) is a plain FlashAttention-2 forward, and each later step adds one change, so a
benchmark can time every step and credit each change with its own gain
(``benchmarks/flash_attention_steps_gpu.py``). The steps (:data:`LADDER`):

====  ==================  ========================================================================
step  switch              what changes
====  ==================  ========================================================================
a     (baseline)          pointer loads, ``exp``, every visited key block masked, one generic tile
                          configuration (64 × 64, 4 warps, 2 stages) for every head dimension
b     ``EXP2``            ``exp2`` with ``log2(e)`` folded into the score scale: one multiply fewer
                          per score
c     ``SPLIT``           only the key blocks that need a mask (the diagonal when causal, the ragged
                          tail) pay for one; the rest of the loop has no compare and no select
d     tuned tiles         tile sizes, warps and pipeline depth chosen per head dimension (the
                          register budget: a 128 × D fp32 accumulator spread over the warps)
e     ``TMA``             tiles arrive through Hopper's tensor-memory accelerator (host-built
                          descriptors) instead of a grid of pointers
f     ``PERSISTENT``      a fixed grid (two programs per SM) loops over the tiles, the heaviest
                          causal tiles of a head first, instead of one program per tile
g     ``LAZY``            the accumulator is rescaled only when some row's maximum grew by more
                          than ``2**8``; exact, because the final division uses the same stale
                          maximum (FlashAttention-4's conditional rescaling, per block here)
h     ``WS``              off the ladder: step (e) with Triton's automatic warp specialisation of
                          the key loop (producer warps copy, consumer warps compute), timed where
                          the installed Triton compiles it for Hopper
i     ``FMA_EXP2``        off the ladder: step (d) with each unmasked key block split in two halves,
                          the second half's exponentials computed by a cubic on the FMA units
                          (:func:`_exp2_fma`), so the special-function units carry half the load
====  ==================  ========================================================================

With ``TMA``, lengths that are multiples of the tiles use flat ``(B·H·L, D)`` descriptors; other
lengths use ``(B·H, L, D)`` ones, so a tile that runs past a head's end reads zeros rather than the
next head's rows (and a store past it is clipped).

Every step computes the same function as :func:`labsupport.flash.tiled.flash_attention_forward`:
bottom-right causal mask, ``lse`` returned, zeros and ``lse = -inf`` for a row that sees no key.
Under ``TRITON_INTERPRET=1`` every step runs on the CPU (slowly), which is how they are tested.
The FP8 forward with per-block scales lives in :mod:`labsupport.flash.fp8_triton`.

Not imported by ``labsupport.flash`` (it imports Triton): ``from labsupport.flash import hopper``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from labsupport.flash import triton as base
from labsupport.harness.validation import require_choice, require_positive_int

triton, tl = base.triton, base.tl

try:  # host-side TMA descriptors: Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - older or missing Triton
    TensorDescriptor = None

__all__ = [
    "EXTRAS",
    "LADDER",
    "GENERIC_CONFIG",
    "KernelConfig",
    "LadderStep",
    "RESCALE_THRESHOLD_LOG2",
    "ladder_forward",
    "ladder_step",
    "sweep_candidates",
    "tuned_config",
]

#: Step (g) rescales only when a row's running maximum grew by more than this (log2 units): the
#: probabilities fed to the P·V product are then at most 2**8 = 256, far inside fp16's range.
RESCALE_THRESHOLD_LOG2 = 8.0


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: query rows per program, keys per step, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def label(self) -> str:
        """``"128x64 w8 s3"``: how tables print it."""
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


#: Steps (a)-(c): one configuration for every head dimension, the kind a first kernel ships with.
GENERIC_CONFIG = KernelConfig(64, 64, 4, 2)

# Step (d) on: a configuration per head dimension. The accumulator is block_m × D fp32 values and the
# score tile block_m × block_n: with 8 warps (256 threads) a 128 × 128 accumulator costs 64 registers
# per thread, the scores as many again, which is why D = 128 wants 8 warps for 128-row tiles and
# D = 256 smaller tiles. Each pipeline stage holds a K and a V tile in shared memory (228 KB per SM).
_TUNED: dict[int, KernelConfig] = {
    16: KernelConfig(128, 64, 4, 3),
    32: KernelConfig(128, 64, 4, 3),
    64: KernelConfig(128, 64, 8, 4),
    128: KernelConfig(128, 64, 8, 3),
    256: KernelConfig(64, 64, 4, 2),
}
# A few alternatives per head dimension that the benchmark may time once to pick step (d)'s config.
# First H100 sweep (triton 3.6, fp16, N = 4096, not causal; ms): D = 64: 128x64 w8 s4 0.627, w4 s3 0.689,
# 128x128 w4 s2 0.747, w8 s3 0.791; D = 128: 128x64 w8 s3 1.115, 128x128 w8 s2 1.324, 128x64 w8 s2 1.439,
# 128x32 w8 s3 1.474. The losers gave way to deeper pipelines and 256-row tiles over 16 warps.
_SWEEP: dict[int, tuple[KernelConfig, ...]] = {
    64: (KernelConfig(128, 64, 8, 4), KernelConfig(128, 64, 4, 3), KernelConfig(128, 64, 8, 5),
         KernelConfig(256, 64, 16, 3)),
    128: (KernelConfig(128, 64, 8, 3), KernelConfig(128, 64, 8, 4), KernelConfig(128, 128, 8, 2),
          KernelConfig(256, 64, 16, 2)),
}


def tuned_config(head_dim: int) -> KernelConfig:
    """Step (d)'s configuration for ``head_dim`` (one of 16, 32, 64, 128, 256)."""
    head_dim = require_choice("head_dim", head_dim, tuple(_TUNED))
    return _TUNED[head_dim]


def sweep_candidates(head_dim: int) -> tuple[KernelConfig, ...]:
    """Configurations worth timing once for ``head_dim`` before the ladder runs (step (d)'s choice)."""
    head_dim = require_choice("head_dim", head_dim, tuple(_TUNED))
    return _SWEEP.get(head_dim, (_TUNED[head_dim],))


@dataclass(frozen=True)
class LadderStep:
    """One rung of the ladder: the compile-time switches of the kernel, and what this rung adds."""

    key: str
    name: str
    change: str
    exp2: bool
    split: bool
    tuned: bool
    tma: bool
    persistent: bool
    lazy: bool
    warp_specialize: bool = False
    fma_exp2: bool = False


LADDER: tuple[LadderStep, ...] = (
    LadderStep("a", "baseline", "pointer loads, exp, every key block masked, one generic tile config",
               False, False, False, False, False, False),
    LadderStep("b", "exp2", "exp2 with log2(e) folded into the score scale",
               True, False, False, False, False, False),
    LadderStep("c", "mask split", "masks only on the diagonal (causal) and ragged key blocks",
               True, True, False, False, False, False),
    LadderStep("d", "tiles per D", "tile sizes, warps and stages chosen per head dimension",
               True, True, True, False, False, False),
    LadderStep("e", "TMA", "tiles loaded through TMA tensor descriptors",
               True, True, True, True, False, False),
    LadderStep("f", "persistent", "two programs per SM looping over tiles, heavy causal tiles first",
               True, True, True, True, True, False),
    LadderStep("g", "lazy rescale", "rescale the accumulator only when a row max grows by > 2^8",
               True, True, True, True, True, True),
)
#: Variants off the ladder, timed beside it: (h) is step (e) with Triton's automatic warp specialisation
#: of the unmasked key loop (producer warps issue the TMA copies, consumer warps compute), where the
#: installed Triton compiles it for Hopper.
#: (i) is step (d) with half of each unmasked key block's exponentials computed on the FMA units
#: (:func:`_exp2_fma`) instead of the special-function units, which at d = 64 do as much work per score as
#: the tensor cores.
EXTRAS: tuple[LadderStep, ...] = (
    LadderStep("h", "e + warp spec.", "step (e) with Triton's automatic warp specialisation of the key loop",
               True, True, True, True, False, False, True),
    LadderStep("i", "d + FMA exp2", "step (d) with half the exponentials as a cubic on the FMA units",
               True, True, True, False, False, False, False, True),
)
_BY_KEY = {s.key: s for s in LADDER + EXTRAS}


def ladder_step(step: str | LadderStep) -> LadderStep:
    """A step by its letter (``"a"`` … ``"g"``, or the extra ``"h"``) or the step itself."""
    if isinstance(step, LadderStep):
        return step
    return _BY_KEY[require_choice("step", step, tuple(_BY_KEY))]


if triton is not None:

    @triton.jit
    def _exp2_fma(x):
        """``2**x`` for ``x <= 0`` with FMA-unit arithmetic only (relative error below 1e-4).

        Write ``x = j + f`` with ``j`` an integer and ``|f| <= 1/2``. ``2**f`` is a cubic (coefficients fitted
        to minimise the relative error on that interval) and the factor ``2**j`` is ``j`` added to the exponent
        bits. Adding 1.5·2**23 rounds ``x`` to ``j`` and leaves ``j`` in the low bits of the sum, so no
        float-to-int conversion (a slow instruction too) is needed: shifted left by 23, those bits are ``j``'s
        exponent increment. Below 2**-126 the result is not exact, but it is far under fp16's smallest number.
        """
        x = tl.maximum(x, -126.0)
        t = x + 12582912.0
        f = x - (t - 12582912.0)
        p = 0.05516919 * f + 0.24260498
        p = p * f + 0.69326085
        p = p * f + 0.99992848
        bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _ladder_fold_halves(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, start, stop, qk_scale,
                            HALF: tl.constexpr):
        """Unmasked key blocks ``[start, stop)`` as two halves of ``HALF`` keys each (``k_ptrs``: a half tile).

        The first half's exponentials go to the special-function units (``exp2``), the second half's to the
        FMA units (:func:`_exp2_fma`), so the two units share the softmax instead of one waiting for the other.
        """
        k_ptrs += start * stride_kn
        v_ptrs += start * stride_vn
        for start_n in range(start, stop, 2 * HALF):
            k0 = tl.load(k_ptrs)
            k1 = tl.load(k_ptrs + HALF * stride_kn)
            qk0 = tl.dot(q, tl.trans(k0))
            qk1 = tl.dot(q, tl.trans(k1))
            m_new = tl.maximum(m_i, tl.maximum(tl.max(qk0, 1), tl.max(qk1, 1)) * qk_scale)
            p0 = tl.math.exp2(qk0 * qk_scale - m_new[:, None])
            p1 = _exp2_fma(qk1 * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p0, 1) + tl.sum(p1, 1)
            acc = acc * alpha[:, None]
            v0 = tl.load(v_ptrs)
            v1 = tl.load(v_ptrs + HALF * stride_vn)
            acc = tl.dot(p0.to(v0.dtype), v0, acc)
            acc = tl.dot(p1.to(v1.dtype), v1, acc)
            m_i = m_new
            k_ptrs += 2 * HALF * stride_kn
            v_ptrs += 2 * HALF * stride_vn
        return acc, m_i, l_i

    @triton.jit
    def _ladder_fold(
        acc, m_i, l_i, q, k_ptrs, v_ptrs, desc_k, desc_v, stride_kn, stride_vn, bh,
        start, stop, offs_m, offs_n, offset, n_keys, qk_scale, tau,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
        EXP2: tl.constexpr, TMA: tl.constexpr, LAZY: tl.constexpr, WS: tl.constexpr,
    ):
        """Fold key blocks ``[start, stop)`` into the running ``(acc, m_i, l_i)``.

        ``m_i`` is in the units of the exponent: log2 units with ``EXP2`` (``qk_scale`` then holds
        ``scale·log2 e``), natural units without (``qk_scale`` is the plain scale). ``TMA``: 0 pointer
        loads, 1 descriptors over ``(B·H, L, D)``, 2 descriptors over ``(B·H·L, D)`` (lengths that are
        multiples of the tiles). ``WS``: Triton's automatic warp specialisation of this loop.
        """
        k_ptrs += start * stride_kn
        v_ptrs += start * stride_vn
        for start_n in tl.range(start, stop, BLOCK_N, warp_specialize=WS):
            cols = start_n + offs_n
            if TMA == 2:  # one 2-D tile per load; the wrapper made sure no tile crosses into the next head
                k = desc_k.load([bh * n_keys + start_n, 0])
                v = desc_v.load([bh * n_keys + start_n, 0])
            elif TMA == 1:  # rows past the end arrive as zeros; the mask below still hides their scores
                k = desc_k.load([bh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
                v = desc_v.load([bh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            elif MASKED:
                k = tl.load(k_ptrs, mask=cols[:, None] < n_keys, other=0.0)
                v = tl.load(v_ptrs, mask=cols[:, None] < n_keys, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            qk = tl.dot(q, tl.trans(k))
            if MASKED:
                visible = cols[None, :] < n_keys
                if CAUSAL:  # bottom-right aligned: key j is visible to query i when j <= i + offset
                    visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
                qk = tl.where(visible, qk, float("-inf"))
            m_tile = tl.max(qk, 1) * qk_scale
            if LAZY:
                # keep the old maximum unless some row's grew by more than tau (then move every row)
                # (-inf + tau = -inf: a row's first visible key always counts as growth, a row that
                # still sees nothing never does)
                grew = (m_tile > m_i + tau).to(tl.int32)
                if tl.max(grew, 0) > 0:
                    m_new = tl.maximum(m_i, m_tile)
                    alpha = tl.math.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
                    acc = acc * alpha[:, None]
                    l_i = l_i * alpha
                    m_i = m_new
                m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
                p = tl.math.exp2(qk * qk_scale - m_ref[:, None])  # at most 2**tau
                l_i = l_i + tl.sum(p, 1)
            else:
                m_new = tl.maximum(m_i, m_tile)
                if MASKED:  # a row that has seen no key keeps m = -inf; use 0 to avoid inf - inf
                    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                else:
                    m_ref = m_new
                if EXP2:
                    p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
                    alpha = tl.math.exp2(m_i - m_ref)
                else:
                    p = tl.exp(qk * qk_scale - m_ref[:, None])
                    alpha = tl.exp(m_i - m_ref)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]
                m_i = m_new
            acc = tl.dot(p.to(v.dtype), v, acc)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
        return acc, m_i, l_i

    @triton.jit
    def _ladder_tile(
        Q, K, V, O, LSE, desc_q, desc_k, desc_v, desc_o,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        pid_m, bh, n_heads, n_queries, n_keys, qk_scale, tau,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        EXP2: tl.constexpr, SPLIT: tl.constexpr, TMA: tl.constexpr, LAZY: tl.constexpr, WS: tl.constexpr,
        FMA_EXP2: tl.constexpr,
    ):
        """One block of ``BLOCK_M`` queries of one (batch, head): load Q, fold the key blocks, store O and lse."""
        b = bh // n_heads
        h = bh % n_heads
        first_row = pid_m * BLOCK_M
        offs_m = first_row + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        if TMA == 2:
            q = desc_q.load([bh * n_queries + first_row, 0])
        elif TMA == 1:
            q = desc_q.load([bh, first_row, 0]).reshape(BLOCK_M, HEAD_DIM)
        else:
            q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
            q = tl.load(q_ptrs, mask=offs_m[:, None] < n_queries, other=0.0)
        k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        offset = n_keys - n_queries
        if CAUSAL:  # key blocks wholly in this block's future are never visited
            masked_stop = tl.minimum(tl.maximum(first_row + BLOCK_M + offset, 0), n_keys)
        else:
            masked_stop = n_keys
        if SPLIT:  # full blocks visible to every row of the block run without a mask
            last_full = (n_keys // BLOCK_N) * BLOCK_N
            if CAUSAL:
                n_visible_to_all = tl.maximum(first_row + offset + 1, 0)
                unmasked_stop = tl.minimum((n_visible_to_all // BLOCK_N) * BLOCK_N, last_full)
            else:
                unmasked_stop = last_full
            if FMA_EXP2:  # pointer loads of half tiles
                offs_half = tl.arange(0, BLOCK_N // 2)
                kh_ptrs = (K + b * stride_kb + h * stride_kh + offs_half[:, None] * stride_kn
                           + offs_d[None, :] * stride_kd)
                vh_ptrs = (V + b * stride_vb + h * stride_vh + offs_half[:, None] * stride_vn
                           + offs_d[None, :] * stride_vd)
                acc, m_i, l_i = _ladder_fold_halves(acc, m_i, l_i, q, kh_ptrs, vh_ptrs, stride_kn, stride_vn,
                                                    0, unmasked_stop, qk_scale, BLOCK_N // 2)
            else:
                acc, m_i, l_i = _ladder_fold(
                    acc, m_i, l_i, q, k_ptrs, v_ptrs, desc_k, desc_v, stride_kn, stride_vn, bh,
                    0, unmasked_stop, offs_m, offs_n, offset, n_keys, qk_scale, tau,
                    BLOCK_N, HEAD_DIM, False, CAUSAL, EXP2, TMA, LAZY, WS)
        else:
            unmasked_stop = 0
        acc, m_i, l_i = _ladder_fold(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, desc_k, desc_v, stride_kn, stride_vn, bh,
            unmasked_stop, masked_stop, offs_m, offs_n, offset, n_keys, qk_scale, tau,
            BLOCK_N, HEAD_DIM, True, CAUSAL, EXP2, TMA, LAZY, False)

        # divide once; a row that saw no key (l = 0) gets zeros and lse = -inf
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        out = acc / l_safe[:, None]
        if EXP2:
            lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        else:
            lse = tl.where(seen, m_i + tl.log(l_safe), float("-inf"))
        if TMA == 2:
            desc_o.store([bh * n_queries + first_row, 0], out.to(desc_o.dtype))
        elif TMA == 1:  # rows past the end are clipped by the descriptor
            desc_o.store([bh, first_row, 0], out.to(desc_o.dtype).reshape(1, BLOCK_M, HEAD_DIM))
        else:
            o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < n_queries)
        tl.store(LSE + bh * n_queries + offs_m, lse, mask=offs_m < n_queries)

    @triton.jit
    def _ladder_kernel(
        Q, K, V, O, LSE, desc_q, desc_k, desc_v, desc_o,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        n_heads, n_queries, n_keys, qk_scale, tau, n_m_blocks, n_tiles,
        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        EXP2: tl.constexpr, SPLIT: tl.constexpr, TMA: tl.constexpr, PERSISTENT: tl.constexpr,
        LAZY: tl.constexpr, WS: tl.constexpr, FMA_EXP2: tl.constexpr,
    ):
        if PERSISTENT:
            # tiles in (head, query block) order, so programs running together share a head's K and V
            # in L2; with a causal mask each head's last (heaviest) query blocks come first
            for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
                bh = tile // n_m_blocks
                pid_m = tile % n_m_blocks
                if CAUSAL:
                    pid_m = n_m_blocks - 1 - pid_m
                _ladder_tile(Q, K, V, O, LSE, desc_q, desc_k, desc_v, desc_o,
                             stride_qb, stride_qh, stride_qm, stride_qd,
                             stride_kb, stride_kh, stride_kn, stride_kd,
                             stride_vb, stride_vh, stride_vn, stride_vd,
                             stride_ob, stride_oh, stride_om, stride_od,
                             pid_m, bh, n_heads, n_queries, n_keys, qk_scale, tau,
                             HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, EXP2, SPLIT, TMA, LAZY, WS, FMA_EXP2)
        else:
            _ladder_tile(Q, K, V, O, LSE, desc_q, desc_k, desc_v, desc_o,
                         stride_qb, stride_qh, stride_qm, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd,
                         stride_ob, stride_oh, stride_om, stride_od,
                         tl.program_id(0), tl.program_id(1), n_heads, n_queries, n_keys, qk_scale, tau,
                         HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, EXP2, SPLIT, TMA, LAZY, WS, FMA_EXP2)


#: A persistent launch starts this many programs per SM. Two, because the first H100 run with one per SM was
#: 0.65-0.72x as fast at d = 64: the one-tile-per-program grid fits two programs on an SM there, and while
#: one waits for its exponentials the other's matrix products run; one program per SM gave that up.
PROGRAMS_PER_SM = 2


def _programs(device: torch.device, n_tiles: int, num_programs: int | None) -> int:
    """How many programs a persistent launch starts: :data:`PROGRAMS_PER_SM` per SM (or ``num_programs``),
    never more than there are tiles."""
    if num_programs is None:
        num_programs = (PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 3)
    return max(1, min(require_positive_int("num_programs", num_programs), n_tiles))


def ladder_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    step: str | LadderStep = "g",
    *,
    causal: bool = False,
    scale: float | None = None,
    config: KernelConfig | None = None,
    num_programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward with ladder step ``step`` (``"a"`` … ``"g"``); returns ``(out, lse)``.

    Same contract as :func:`labsupport.flash.triton.triton_flash_forward` for ``(B, H, L, D)`` fp16,
    bf16 or fp32 tensors. ``config`` overrides the step's configuration (steps (a)-(c):
    :data:`GENERIC_CONFIG`; from (d): :func:`tuned_config`); under the CPU interpreter the default is
    16 × 16 tiles. TMA steps copy non-contiguous inputs to contiguous ones first. ``num_programs``
    sets a persistent step's grid (default: :data:`PROGRAMS_PER_SM` per SM; 3 on the CPU, so tests loop).
    """
    if triton is None:
        raise RuntimeError("ladder_forward needs Triton, which could not be imported "
                           f"({base._TRITON_ERROR}). Install it with `pip install triton`.")
    s = ladder_step(step)
    q, k, v = base._require_kernel_inputs(q, k, v)
    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    on_cpu = q.device.type == "cpu"
    if on_cpu and not base.interpreter_enabled():
        raise RuntimeError("tensors on the CPU need TRITON_INTERPRET=1 set before triton is first imported")
    if s.lazy and not s.exp2:
        raise ValueError(f"step ({s.key}): lazy rescaling is written in log2 units and needs exp2=True")
    if s.fma_exp2 and not (s.exp2 and s.split) or s.fma_exp2 and (s.tma or s.lazy):
        raise ValueError(f"step ({s.key}): the FMA exp2 needs exp2 and split, with pointer loads and no lazy rescale")
    if s.tma and TensorDescriptor is None:
        raise RuntimeError(f"step ({s.key}) needs TMA descriptors (Triton >= 3.4, triton.tools.tensor_descriptor)")
    if on_cpu and q.dtype == torch.bfloat16:  # the interpreter's bf16 dot is broken (see labsupport.flash.triton)
        out, lse = ladder_forward(q.float(), k.float(), v.float(), s, causal=causal, scale=scale, config=config,
                                  num_programs=num_programs)
        return out.to(torch.bfloat16), lse
    d = q.shape[-1]
    if config is None:
        config = (KernelConfig(16, 32 if s.fma_exp2 else 16, 4, 1) if on_cpu
                  else tuned_config(d) if s.tuned else GENERIC_CONFIG)
    bm = base._require_block("block_m", config.block_m)
    bn = base._require_block("block_n", config.block_n)
    if s.fma_exp2 and bn < 32:
        raise ValueError(f"step ({s.key}) splits each key block in two halves of at least 16: block_n >= 32, got {bn}")
    if s.tma:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    tma_mode = 0
    descs: list = [None] * 4
    if s.tma and n_q % bm == 0 and n_k % bn == 0:  # no tile crosses a head: flat 2-D descriptors
        tma_mode = 2
        views = [t.view(batch * heads * t.shape[2], d) for t in (q, k, v, out)]
        descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, d])
                 for t, rows in zip(views, (bm, bn, bn, bm))]
    elif s.tma:  # ragged lengths: 3-D descriptors, so a tile past a head's end reads zeros, not the next head
        tma_mode = 1
        views = [t.view(batch * heads, t.shape[2], d) for t in (q, k, v, out)]
        descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, d])
                 for t, rows in zip(views, (bm, bn, bn, bm))]
    n_m_blocks = triton.cdiv(n_q, bm)
    n_tiles = n_m_blocks * batch * heads
    grid = (_programs(q.device, n_tiles, num_programs),) if s.persistent else (n_m_blocks, batch * heads)
    _ladder_kernel[grid](
        q, k, v, out, lse, *descs,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, n_q, n_k, sm_scale * (base._LOG2E if s.exp2 else 1.0), RESCALE_THRESHOLD_LOG2, n_m_blocks, n_tiles,
        HEAD_DIM=d, CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn,
        EXP2=s.exp2, SPLIT=s.split, TMA=tma_mode, PERSISTENT=s.persistent, LAZY=s.lazy, WS=s.warp_specialize,
        FMA_EXP2=s.fma_exp2,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse
