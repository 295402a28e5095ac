"""Chapter 06 on a GPU: the routed expert MLPs as grouped GEMMs whose loads gather and whose stores scatter.

:func:`~labsupport.moe.dispatch.moe_grouped` sorts the ``T·k`` slots by expert, *copies* every token into its
slots (``x[order // k]``, a ``(T·k, d)`` tensor), runs torch's grouped matmuls, *permutes* the answers back
to slot order and sums them. The copies are memory traffic a dense FFN does not have. Here, after the idea of
ScatterMoE (Tan et al., 2024, arXiv:2403.08245) and the block-aligned expert groups of MegaBlocks (Gale et
al., 2022, arXiv:2211.15841), the copies are never written: the index is read inside the GEMMs. All code here
is this course's own.

Layout. The slots are sorted by expert (``order``: sorted position → slot ``t·k + j``; its token is
``order // k``). Each expert's run of sorted rows is cut into tiles of ``BLOCK_M`` rows; a tile never holds
two experts (an expert's last tile is partly masked). The tile table (expert, first row, end row) is built
on the device with a fixed upper bound of ``ceil(T·k / BLOCK_M) + E`` tiles, unused tiles marked ``-1``:
no host synchronisation, no padding rows in memory.

Forward, three kernels::

    up     pre[s] = x[order[s] // k] @ W_up[e] + b_up[e]        gather fused into the A-operand load;
           hid[s] = gelu(pre[s])                                 both stored in sorted order (N, h)
    down   z[order[s]] = hid[s] @ W_down[e] + b_down[e]          scatter fused into the store: z in slot order
    combine  y[t] = Σ_j weight[t, j] · z[t·k + j]                 k rows per token, no atomics

``z`` is kept unweighted (the routing weights' gradient needs it) and read back by the combine: the one
``(T·k, d)`` tensor this path adds to a dense FFN's traffic, with ``dx_slot`` in the backward.

Backward (one :class:`torch.autograd.Function`), given ``dy (T, d)``::

    dpre[s]   = weight[slot] · (dy[token] @ W_down[e]ᵀ) ⊙ gelu'(pre[s])   gather in the load, both factors in
                                                                         the epilogue
    dW_down[e] = Σ_{s∈e} hid[s]ᵀ (weight[slot] · dy[token])               a grouped "transpose" GEMM over the
    db_down[e] = Σ_{s∈e} weight[slot] · dy[token]                          rows of expert e (same kernel)
    dW_up[e]  = Σ_{s∈e} x[token]ᵀ dpre[s],  db_up[e] = Σ_{s∈e} dpre[s]   gather in the load
    dx_slot[order[s]] = dpre[s] @ W_up[e]ᵀ;  dx[t] = Σ_j dx_slot[t·k+j]   scatter in the store, then a sum
    dweight[t, j] = <z[t·k + j], dy[t]>                                   a batched dot (torch.bmm)

GELU's derivative is applied in the epilogue of the ``dpre`` GEMM, so the gradient of the hidden activations
is never stored. The weight-gradient kernel runs one program per (expert, tile of the weight) and loops over
that expert's sorted rows ``BLOCK_K`` at a time, masking the rows past the expert's end, so expert boundaries
never mix; one more row of programs sums the bias gradients. Every sum is taken by one program in a fixed
order: no atomics, and two runs give identical bits. Only the gradients asked for are computed.

As in ``moe_grouped``, an inactive slot is sent to expert 0 with weight 0 and computed (dropless top-k has
none). On a GPU the kernels are autotuned over a short list keyed on the widths ``d`` and ``h`` (never on
``T``), with ``BLOCK_M = 128`` sorted rows per tile; ``benchmarks/moe_triton_resources.py`` compiles every
configuration for sm_90 without a GPU and prints its registers and spills, and the lists keep only those that
do not spill. Not done: TMA loads of the weights, a persistent grid, warp specialisation.

Inputs are read in their dtype (fp16, bf16, fp32; fp32 with ``input_precision="ieee"`` dots) and accumulated
in float32; ``pre``, ``hid``, ``z`` are stored in the input dtype, as torch's own layers store them. The same
kernels run on a CPU under ``TRITON_INTERPRET=1`` (set before ``triton`` is imported), slowly, which is how
the tests check them (bf16 there runs in float32 and is rounded: the interpreter misreads bf16 tensors).
This module imports without Triton::

    from labsupport.moe.triton_dispatch import moe_scatter
    y = moe_scatter(x, routing, w_up, b_up, w_down, b_down)   # or moe_grouped(..., kernel="triton")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labsupport.harness.settings import triton_interpreter_enabled as interpreter_enabled
from labsupport.harness.validation import require_float_tensor, require_int
from labsupport.moe.routing import Routing

try:  # Triton is optional
    import triton
    import triton.language as tl

    _TRITON_ERROR: Exception | None = None
except Exception as error:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERROR = error

__all__ = ["Blocks", "interpreter_enabled", "moe_scatter", "slot_tiles", "triton_available"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """True when Triton imported successfully."""
    return triton is not None


@dataclass(frozen=True)
class Blocks:
    """Fixed tile sizes for every kernel (the interpreter's tests use small ones; GPUs autotune by default).

    ``block_m`` is the rows of sorted slots per tile (the tile table's unit), ``block_n`` the output columns
    per program, ``block_k`` the reduction step; the weight-gradient kernel tiles its weight ``block_m ×
    block_n`` and steps over sorted rows ``block_k`` at a time.
    """

    block_m: int = 16
    block_n: int = 16
    block_k: int = 16
    num_warps: int = 4
    num_stages: int = 2


#: The sorted-row tile used on a GPU (every autotuned configuration shares it: the tile table depends on it).
GPU_BLOCK_M = 128


def slot_tiles(expert_sorted: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor, torch.Tensor]:
    """The tile table of sorted slots, on the device, without host synchronisation.

    ``expert_sorted (N,)`` is the expert of each sorted slot (non-decreasing). Returns ``(tile_expert,
    tile_start, tile_end, expert_bounds)``: for each of ``ceil(N / block_m) + E`` tiles, its expert (``-1`` for
    an unused tile; int32) and its rows ``[start, end)`` of the sorted slots (int32; ``end - start <= block_m``,
    all rows of one expert); and ``expert_bounds (E + 1,)`` (int32), expert ``e`` owning rows
    ``[bounds[e], bounds[e+1])``.
    """
    if not isinstance(expert_sorted, torch.Tensor) or expert_sorted.ndim != 1 or expert_sorted.dtype != torch.long:
        raise TypeError(f"expert_sorted must be a 1-D int64 tensor, got {expert_sorted!r:.80}")
    n_experts = require_int("n_experts", n_experts, minimum=1)
    block_m = require_int("block_m", block_m, minimum=1)
    n = expert_sorted.numel()
    device = expert_sorted.device
    counts = torch.zeros(n_experts, dtype=torch.long, device=device).index_add_(
        0, expert_sorted, torch.ones_like(expert_sorted))
    ends = counts.cumsum(0)
    starts = ends - counts
    tiles_per = torch.div(counts + block_m - 1, block_m, rounding_mode="floor")
    tile_cum = tiles_per.cumsum(0)
    n_tiles = -(-n // block_m) + n_experts  # an upper bound known without reading the counts
    tile = torch.arange(n_tiles, device=device)
    expert = torch.searchsorted(tile_cum, tile, right=True)
    used = expert < n_experts
    e = expert.clamp(max=n_experts - 1)
    start = starts[e] + (tile - (tile_cum[e] - tiles_per[e])) * block_m
    end = torch.minimum(start + block_m, ends[e])
    bounds = torch.cat([starts.new_zeros(1), ends])
    return (torch.where(used, expert, -1).to(torch.int32), torch.where(used, start, 0).to(torch.int32),
            torch.where(used, end, 0).to(torch.int32), bounds.to(torch.int32))


if triton is not None:

    @triton.jit
    def _gelu(x):
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(x):
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        return cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)

    @triton.jit(do_not_specialize=["n_tiles"])  # a new token count needs no new compile
    def _rows_kernel(
        A, B, BIAS, OUT, OUT2, PRE, ORDER, SCALE, TILE_EXPERT, TILE_START, TILE_END,
        n_tiles, n_cols, k_dim, top_k,
        stride_am, stride_be, stride_bk, stride_bn, stride_om,
        A_GATHER: tl.constexpr, OUT_SCATTER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
        EPILOGUE: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """One tile of sorted rows (one expert) times that expert's ``B[e]``: ``OUT[rows] = A[rows'] @ B[e]``.

        ``rows'`` are the tokens ``ORDER[s] // top_k`` (``A_GATHER``) or the sorted rows ``s``; the output row
        is the slot ``ORDER[s]`` (``OUT_SCATTER``) or ``s``. Epilogue 0: ``+ BIAS[e]`` if any, store. Epilogue
        1: also ``OUT2 = gelu(OUT)``. Epilogue 2: ``· SCALE[ORDER[s]] · gelu'(PRE[s])``.
        """
        pid = tl.program_id(0)
        n_pid_n = tl.cdiv(n_cols, BLOCK_N)
        per_group = GROUP_M * n_pid_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(n_tiles - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        expert = tl.load(TILE_EXPERT + pid_m)
        if expert >= 0:
            row_start = tl.load(TILE_START + pid_m)
            row_end = tl.load(TILE_END + pid_m)
            rows = row_start + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            slot = tl.load(ORDER + rows, mask=row_ok, other=0)
            if A_GATHER:
                a_rows = slot // top_k
            else:
                a_rows = rows
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < n_cols
            offs_k = tl.arange(0, BLOCK_K)
            a_ptr = A + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
            b_ptr = B + expert.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, k_dim, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptr, mask=row_ok[:, None], other=0.0)
                    b = tl.load(b_ptr, mask=col_ok[None, :], other=0.0)
                else:
                    k_ok = (k0 + offs_k) < k_dim
                    a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(b_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PREC)
                a_ptr += BLOCK_K
                b_ptr += BLOCK_K * stride_bk
            if HAS_BIAS:
                bias = tl.load(BIAS + expert * n_cols + cols, mask=col_ok, other=0.0)
                acc += bias.to(tl.float32)[None, :]
            if OUT_SCATTER:
                o_rows = slot
            else:
                o_rows = rows
            mask = row_ok[:, None] & col_ok[None, :]
            o_off = o_rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
            if EPILOGUE == 2:
                if HAS_SCALE:
                    scale = tl.load(SCALE + slot, mask=row_ok, other=0.0).to(tl.float32)
                    acc = acc * scale[:, None]
                pre = tl.load(PRE + o_off, mask=mask, other=0.0).to(tl.float32)
                acc = acc * _gelu_grad(pre)
            tl.store(OUT + o_off, acc.to(OUT.dtype.element_ty), mask=mask)
            if EPILOGUE == 1:
                tl.store(OUT2 + o_off, _gelu(acc).to(OUT2.dtype.element_ty), mask=mask)

    @triton.jit
    def _sorted_rows(ORDER, s, s_ok, top_k, GATHER: tl.constexpr):
        """Rows of the sorted slots ``s``: their tokens ``ORDER[s] // top_k`` (``GATHER``) or ``s`` itself."""
        if GATHER:
            return tl.load(ORDER + s, mask=s_ok, other=0) // top_k
        else:
            return s

    @triton.jit
    def _scaled_rows(B, ORDER, SCALE, s, s_ok, c, c_ok, top_k, stride_bm,
                     B_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr):
        """``SCALE[ORDER[s]] · B[rows(s), c]`` (or unscaled) as a ``(len(s), len(c))`` tile in ``B``'s dtype."""
        b_rows = _sorted_rows(ORDER, s, s_ok, top_k, B_GATHER)
        b = tl.load(B + b_rows.to(tl.int64)[:, None] * stride_bm + c[None, :],
                    mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        if HAS_SCALE:
            scale = tl.load(SCALE + tl.load(ORDER + s, mask=s_ok, other=0), mask=s_ok, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * scale[:, None]).to(B.dtype.element_ty)
        return b

    @triton.jit
    def _weight_grad_kernel(
        A, B, OUT, BIAS_OUT, ORDER, SCALE, BOUNDS,
        n_rows_w, n_cols_w, top_k, stride_am, stride_bm,
        A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr,
        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """``OUT[e] = Σ_{s ∈ e} A[s']ᵀ (SCALE · B[s''])``: one ``BLOCK_M × BLOCK_N`` tile of ``OUT[e]``.

        Loops over the expert's sorted rows ``[BOUNDS[e], BOUNDS[e+1])`` ``BLOCK_K`` at a time; ``s'`` / ``s''``
        are tokens (``*_GATHER``) or the sorted rows. Programs past the last row tile (launched when a bias's
        gradient is wanted) store the column sums of the scaled ``B`` rows in ``BIAS_OUT`` and do no product.
        """
        pid_w = tl.program_id(0)
        expert = tl.program_id(1)
        n_pid_n = tl.cdiv(n_cols_w, BLOCK_N)
        pid_m = pid_w // n_pid_n
        pid_n = pid_w % n_pid_n
        start = tl.load(BOUNDS + expert)
        end = tl.load(BOUNDS + expert + 1)
        c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = c < n_cols_w
        offs = tl.arange(0, BLOCK_K)
        if pid_m * BLOCK_M >= n_rows_w:  # the bias programs
            col_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for s0 in range(start, end, BLOCK_K):
                s = s0 + offs
                s_ok = s < end
                b = _scaled_rows(B, ORDER, SCALE, s, s_ok, c, c_ok, top_k, stride_bm, B_GATHER, HAS_SCALE)
                col_sum += tl.sum(b.to(tl.float32), axis=0)
            tl.store(BIAS_OUT + expert * n_cols_w + c, col_sum.to(BIAS_OUT.dtype.element_ty), mask=c_ok)
        else:
            r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            r_ok = r < n_rows_w
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s0 in range(start, end, BLOCK_K):
                s = s0 + offs
                s_ok = s < end
                a_rows = _sorted_rows(ORDER, s, s_ok, top_k, A_GATHER)
                a = tl.load(A + a_rows.to(tl.int64)[None, :] * stride_am + r[:, None],
                            mask=s_ok[None, :] & r_ok[:, None], other=0.0)
                b = _scaled_rows(B, ORDER, SCALE, s, s_ok, c, c_ok, top_k, stride_bm, B_GATHER, HAS_SCALE)
                acc = tl.dot(a, b, acc, input_precision=PREC)
            w_off = expert.to(tl.int64) * n_rows_w * n_cols_w + r[:, None] * n_cols_w + c[None, :]
            tl.store(OUT + w_off, acc.to(OUT.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])

    @triton.jit(do_not_specialize=["n_tokens"])
    def _combine_kernel(Z, W, OUT, n_tokens, n_cols, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        """``OUT[t] = Σ_j W[t, j] · Z[t·k + j]`` for a block of tokens and columns, in float32, in slot order."""
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        t_ok = t < n_tokens
        mask = t_ok[:, None] & (c < n_cols)[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            w = tl.load(W + t * TOP_K + j, mask=t_ok, other=0.0).to(tl.float32)
            z = tl.load(Z + (t.to(tl.int64) * TOP_K + j)[:, None] * n_cols + c[None, :], mask=mask, other=0.0)
            acc += w[:, None] * z.to(tl.float32)
        tl.store(OUT + t.to(tl.int64)[:, None] * n_cols + c[None, :], acc.to(OUT.dtype.element_ty), mask=mask)

    def _even_k(args: dict) -> bool:
        return args["k_dim"] % args["BLOCK_K"] == 0

    _rows_fixed = triton.heuristics({"EVEN_K": _even_k})(_rows_kernel)

    # Autotuned on a GPU, keyed on the layer's widths only (not on T: no re-tune when the token count
    # changes). BLOCK_M is fixed (the tile table is built for it). Compiled ahead of time for sm_90 with
    # triton 3.9 (bf16, contiguous weights; benchmarks/moe_triton_resources.py), down and dx fit everywhere
    # (116-237 registers); up (GELU, two stores) and dpre (gelu') fit at 8 warps and BLOCK_N = 128 (171 and
    # 255 registers) and spill otherwise, in the epilogue only (none of the spill instructions is inside the
    # main loop). Pruned per epilogue: dpre keeps the configurations that do not spill; up also keeps
    # BLOCK_N = 256 at 8 warps (320 bytes of stack, once per tile) for the autotuner to time.
    _ROWS_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=w, num_stages=s)
                     for bn, w, s in ((128, 8, 3), (128, 8, 4), (128, 4, 4), (256, 8, 3), (256, 8, 4))]

    def _prune_rows(configs, named_args, **kwargs):  # noqa: ANN001, ANN202 - triton's callback
        epilogue = kwargs.get("EPILOGUE", named_args.get("EPILOGUE", 0))
        if epilogue == 0:
            return configs
        if epilogue == 1:
            return [c for c in configs if c.num_warps == 8 and (c.kwargs["BLOCK_N"] == 128 or c.num_stages == 3)]
        return [c for c in configs if c.kwargs["BLOCK_N"] == 128 and c.num_warps == 8]

    _rows_tuned = triton.autotune(_ROWS_CONFIGS, key=["n_cols", "k_dim", "A_GATHER", "OUT_SCATTER", "EPILOGUE"],
                                  prune_configs_by={"early_config_prune": _prune_rows})(_rows_fixed)
    # None of these spills (sm_90 ahead of time: 116-118 registers at 8 warps, 167-214 at 4 or BLOCK_N = 256).
    _WGRAD_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                      for bm, bn, bk, w, s in ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                                               (128, 128, 64, 4, 4), (128, 128, 32, 4, 4))]
    _wgrad_tuned = triton.autotune(_WGRAD_CONFIGS, key=["n_rows_w", "n_cols_w", "A_GATHER", "B_GATHER"])(
        _weight_grad_kernel)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_rows(a: torch.Tensor, b: torch.Tensor, b_strides: tuple[int, int, int], bias: torch.Tensor | None,
                 out: torch.Tensor, tiles: tuple[torch.Tensor, ...], order: torch.Tensor, top_k: int,
                 blocks: Blocks | None, *, a_gather: bool, out_scatter: bool, epilogue: int,
                 out2: torch.Tensor | None = None, pre: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> None:
    tile_expert, tile_start, tile_end = tiles[:3]
    n_tiles = tile_expert.numel()
    n_cols, k_dim = out.shape[1], a.shape[1]
    dummy = out
    args = (a, b, dummy if bias is None else bias, out, dummy if out2 is None else out2, dummy if pre is None else pre,
            order, dummy if scale is None else scale, tile_expert, tile_start, tile_end,
            n_tiles, n_cols, k_dim, top_k, a.stride(0), *b_strides, out.stride(0))
    flags = {"A_GATHER": a_gather, "OUT_SCATTER": out_scatter, "HAS_BIAS": bias is not None,
             "HAS_SCALE": scale is not None, "EPILOGUE": epilogue, "PREC": _prec(a.dtype)}
    if blocks is None:
        _rows_tuned[lambda meta: (n_tiles * triton.cdiv(n_cols, meta["BLOCK_N"]),)](*args, BLOCK_M=GPU_BLOCK_M,
                                                                                    **flags)
    else:
        _rows_fixed[(n_tiles * triton.cdiv(n_cols, blocks.block_n),)](
            *args, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, GROUP_M=4,
            num_warps=blocks.num_warps, num_stages=blocks.num_stages, **flags)


def _launch_wgrad(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias_out: torch.Tensor | None,
                  order: torch.Tensor, scale: torch.Tensor | None, bounds: torch.Tensor, top_k: int,
                  blocks: Blocks | None, *, a_gather: bool, b_gather: bool) -> None:
    n_experts, n_rows_w, n_cols_w = out.shape
    args = (a, b, out, out if bias_out is None else bias_out, order, out if scale is None else scale, bounds,
            n_rows_w, n_cols_w, top_k, a.stride(0), b.stride(0))
    flags = {"A_GATHER": a_gather, "B_GATHER": b_gather, "HAS_SCALE": scale is not None, "PREC": _prec(a.dtype)}
    extra = int(bias_out is not None)  # one more row of programs for the bias
    if blocks is None:
        _wgrad_tuned[lambda meta: ((triton.cdiv(n_rows_w, meta["BLOCK_M"]) + extra)
                                   * triton.cdiv(n_cols_w, meta["BLOCK_N"]), n_experts)](*args, **flags)
    else:
        grid = ((triton.cdiv(n_rows_w, blocks.block_m) + extra) * triton.cdiv(n_cols_w, blocks.block_n), n_experts)
        _weight_grad_kernel[grid](*args, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
                                  num_warps=blocks.num_warps, num_stages=blocks.num_stages, **flags)


def _combine(z: torch.Tensor, weight: torch.Tensor, n_tokens: int, top_k: int) -> torch.Tensor:
    out = z.new_empty(n_tokens, z.shape[1])
    block_t, block_n = 16, min(256, max(16, triton.next_power_of_2(z.shape[1])))
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(z.shape[1], block_n))
    _combine_kernel[grid](z, weight, out, n_tokens, z.shape[1], TOP_K=top_k, BLOCK_T=block_t, BLOCK_N=block_n)
    return out


class _ScatterMoE(torch.autograd.Function):
    """The fused layer on prepared indices; see the module docstring for what each pass computes."""

    @staticmethod
    def forward(ctx, x, slot_weight, w_up, b_up, w_down, b_down, order, tiles, top_k, blocks):  # type: ignore[override]
        n_tokens, d = x.shape
        h = w_up.shape[2]
        n_slots = order.numel()
        pre = x.new_empty(n_slots, h)
        hid = x.new_empty(n_slots, h)
        _launch_rows(x, w_up, (w_up.stride(0), w_up.stride(1), w_up.stride(2)), b_up, pre, tiles, order, top_k,
                     blocks, a_gather=True, out_scatter=False, epilogue=1, out2=hid)
        z = x.new_empty(n_slots, d)  # slot order
        _launch_rows(hid, w_down, (w_down.stride(0), w_down.stride(1), w_down.stride(2)), b_down, z, tiles, order,
                     top_k, blocks, a_gather=False, out_scatter=True, epilogue=0)
        out = _combine(z, slot_weight, n_tokens, top_k)
        ctx.save_for_backward(x, slot_weight, w_up, w_down, order, *tiles, pre, hid, z)
        ctx.top_k, ctx.blocks = top_k, blocks
        return out

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, slot_weight, w_up, w_down, order, *rest = ctx.saved_tensors
        tiles, (pre, hid, z) = tuple(rest[:4]), rest[4:]
        top_k, blocks = ctx.top_k, ctx.blocks
        n_tokens, d = x.shape
        n_slots = order.numel()
        dy = dy.contiguous().to(x.dtype)
        bounds = tiles[3]
        need_x, need_weight, need_up, need_bu, need_down, need_bd = ctx.needs_input_grad[:6]
        d_weight = dx = dw_up = db_up = dw_down = db_down = None
        if need_weight:  # dweight[t, j] = <z[t·k + j], dy[t]>
            d_weight = torch.bmm(z.view(n_tokens, top_k, d), dy[:, :, None]).view(-1).to(slot_weight.dtype)
        if need_down or need_bd:  # dW_down[e] = Σ hid[s]ᵀ (weight · dy[token]), db_down[e] = Σ weight · dy[token]
            dw_down, db_down = torch.empty_like(w_down), x.new_empty(w_down.shape[0], d, dtype=w_down.dtype)
            _launch_wgrad(hid, dy, dw_down, db_down, order, slot_weight, bounds, top_k, blocks, a_gather=False,
                          b_gather=True)
        if need_x or need_up or need_bu:
            # dpre = weight · (dy[token] @ W_downᵀ) ⊙ gelu'(pre), in sorted order
            dpre = torch.empty_like(pre)
            _launch_rows(dy, w_down, (w_down.stride(0), w_down.stride(2), w_down.stride(1)), None, dpre, tiles,
                         order, top_k, blocks, a_gather=True, out_scatter=False, epilogue=2, pre=pre,
                         scale=slot_weight)
            if need_up or need_bu:  # dW_up[e] = Σ x[token]ᵀ dpre[s], db_up[e] = Σ dpre[s]
                dw_up, db_up = torch.empty_like(w_up), x.new_empty(w_up.shape[0], w_up.shape[2], dtype=w_up.dtype)
                _launch_wgrad(x, dpre, dw_up, db_up, order, None, bounds, top_k, blocks, a_gather=True,
                              b_gather=False)
            if need_x:  # each slot's dpre @ W_upᵀ stored in slot order, then each token sums its k rows
                dx_slot = x.new_empty(n_slots, d)
                _launch_rows(dpre, w_up, (w_up.stride(0), w_up.stride(2), w_up.stride(1)), None, dx_slot, tiles,
                             order, top_k, blocks, a_gather=False, out_scatter=True, epilogue=0)
                dx = dx_slot.view(n_tokens, top_k, d).sum(dim=1)
        return dx, d_weight, dw_up, db_up, dw_down, db_down, None, None, None, None


def moe_scatter(x: torch.Tensor, routing: Routing, w_up: torch.Tensor, b_up: torch.Tensor, w_down: torch.Tensor,
                b_down: torch.Tensor, *, blocks: Blocks | None = None) -> torch.Tensor:
    """The routed layer with the gather fused into the GEMMs' loads and the scatter into their stores.

    The same function as :func:`~labsupport.moe.dispatch.moe_grouped` (and :func:`moe_sorted`): an inactive
    slot (or one naming an expert ``>= E``) goes to expert 0 with weight 0. Differentiable in ``x``, the four
    weights and ``routing.weights``. No host synchronisation.

    Args:
        x: ``(T, d)`` fp16, bf16 or fp32 on a CUDA device (or any device under ``TRITON_INTERPRET=1``).
        routing: the :class:`~labsupport.moe.routing.Routing` of the ``T`` tokens.
        w_up, b_up, w_down, b_down: ``(E, d, h)``, ``(E, h)``, ``(E, h, d)``, ``(E, d)``, the dtype of ``x``.
        blocks: fixed tile sizes for every kernel; ``None`` autotunes on a GPU (sorted tiles of
            :data:`GPU_BLOCK_M` rows) and uses :class:`Blocks` ``()`` under the interpreter.
    """
    if triton is None:
        raise RuntimeError(f"moe_scatter needs triton, which did not import: {_TRITON_ERROR}")
    x = require_float_tensor("x", x, ndim=2, dtypes=_DTYPES)
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
    n_experts = w_up.shape[0] if isinstance(w_up, torch.Tensor) and w_up.ndim == 3 else None
    for name, tensor in (("w_up", w_up), ("b_up", b_up), ("w_down", w_down), ("b_down", b_down)):
        require_float_tensor(name, tensor, dtypes=_DTYPES)
        if tensor.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {tensor.device}")
    if n_experts is None:
        raise ValueError(f"w_up must be (experts, d, h), got shape {tuple(w_up.shape)}")
    d, h = x.shape[1], w_up.shape[2]
    expected = {"w_up": (n_experts, d, h), "b_up": (n_experts, h), "w_down": (n_experts, h, d),
                "b_down": (n_experts, d)}
    for name, tensor in (("w_up", w_up), ("b_up", b_up), ("w_down", w_down), ("b_down", b_down)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} (experts, ...), got {tuple(tensor.shape)}")
    tokens, k = routing.experts.shape
    if tokens != x.shape[0]:
        raise ValueError(f"routing is for {tokens} tokens but x has {x.shape[0]} rows")
    if not x.is_cuda and not interpreter_enabled():
        raise ValueError("moe_scatter runs on a CUDA device, or on the CPU under TRITON_INTERPRET=1 "
                         f"(set before triton is imported); x is on {x.device}")
    if blocks is None and interpreter_enabled():
        blocks = Blocks()
    if blocks is not None:
        for name in ("block_m", "block_n", "block_k"):
            value = require_int(f"blocks.{name}", getattr(blocks, name), minimum=16)
            if value & (value - 1):
                raise ValueError(f"blocks.{name} must be a power of two, got {value}")
    block_m = GPU_BLOCK_M if blocks is None else blocks.block_m
    if tokens == 0:
        return x.new_zeros(x.shape)
    experts = routing.experts.reshape(-1)
    active = routing.active.reshape(-1) & (experts < n_experts) & (experts >= 0)
    expert = torch.where(active, experts, torch.zeros_like(experts))
    slot_weight = routing.weights.reshape(-1).to(x.dtype) * active.to(x.dtype)   # slot order (token, slot)
    order = torch.argsort(expert, stable=True)
    tiles = slot_tiles(expert[order], n_experts, block_m)
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        # Triton's CPU interpreter (seen with 3.9) reads bf16 tensors as garbage, even in a plain load and
        # store: run the interpreted kernels in float32 and round the answer (the gradients come back to
        # bf16 through the casts). The bf16 kernels themselves only run on a GPU.
        up, bu, down, bd = (w.float() for w in (w_up, b_up, w_down, b_down))
        return _ScatterMoE.apply(x.float().contiguous(), slot_weight.float().contiguous(), up.contiguous(),
                                 bu.contiguous(), down.contiguous(), bd.contiguous(), order.to(torch.int32),
                                 tiles, k, blocks).to(torch.bfloat16)
    return _ScatterMoE.apply(x.contiguous(), slot_weight.contiguous(), w_up.contiguous(), b_up.contiguous(),
                             w_down.contiguous(), b_down.contiguous(), order.to(torch.int32), tiles, k, blocks)
