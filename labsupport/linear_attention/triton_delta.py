"""Chapter 03 on a GPU: the chunkwise (gated) delta rule forward in two Triton kernels.

The same computation as :func:`~labsupport.linear_attention.reference.delta_rule_chunkwise` (the WY/UT form),
arranged so that only one small loop is sequential:

1. **Chunk preparation** — one program per chunk of every (batch, head), all chunks at once. From the chunk's
   keys, values, queries, writing strengths ``β`` and log-decays it computes the cumulative log-decay ``b``
   inside the chunk, the matrix ``A = StrictLower(diag(β) (K Kᵀ ⊙ Γ))`` with ``Γ_ij = exp(b_i − b_j)``, the
   inverse ``X = (I + A)⁻¹``, then ``T = X diag(β)``, ``W = T (exp(b) ⊙ K)``, ``U = T V``, and the causal
   intra-chunk scores ``(Q Kᵀ ⊙ Γ)`` (diagonal included). Nothing here depends on the state.

   The inverse is built by **doubling**, with matrix products only: a unit lower-triangular matrix whose
   diagonal blocks of size ``s`` are inverted (``X_s``, block-diagonal) gives the inverse of the blocks of size
   ``2s`` from ``[[L₁₁, 0], [L₂₁, L₂₂]]⁻¹ = [[L₁₁⁻¹, 0], [−L₂₂⁻¹ L₂₁ L₁₁⁻¹, L₂₂⁻¹]]``, which for all blocks at
   once reads ``X_2s = X_s − X_s (A ⊙ M_s) X_s`` with ``M_s`` the mask of the lower-left ``s × s`` corner of every
   ``2s × 2s`` diagonal block. Starting from ``X_1 = I``, ``log₂ C`` steps reach ``X_C = (I + A)⁻¹``: exactly
   blocked forward substitution, with no power series (whose terms can grow large and cancel).
   For chunks of 64 and 128 the default (``inverse="blocked"``) applies doubling only to the four diagonal
   blocks of ``C / 4`` tokens and fills the six blocks below them by block forward substitution,
   ``X_ij = −X_ii Σ_{j ≤ m < i} A_im X_mj``: every product is then ``C/4``-sized, and the inverse costs about
   0.13 MFLOP per chunk of 64 instead of 5.2 (``inverse="doubling"`` keeps the whole-matrix form).

2. **State pass** — the only sequential part, one program per (batch·head, block of ``BV`` value columns), the
   state ``S`` (``D_k × BV``, float32) held on chip for the whole sequence. Per chunk::

       V' = U − W S                                       # the chunk's pseudo-values
       O  = (exp(b) ⊙ Q) S + (Q Kᵀ ⊙ Γ ⊙ causal) V'       # the output, written once
       S  ← exp(b_C) S + (exp(b_C − b) ⊙ K)ᵀ V'            # decayed keys write the state

   By default the output is computed inside the pass, so neither the per-chunk states nor ``V'`` go to memory.
   With ``fused_output=False`` the pass stores the state entering each chunk and ``V'`` instead, and

3. **Output** — one program per (chunk, batch·head, value block), all chunks at once, computes
   ``O = (exp(b) ⊙ Q) S + (Q Kᵀ ⊙ Γ ⊙ causal) V'`` from them: more bytes, but less work in the sequential pass.

Cost per chunk of ``C = 64`` tokens and one head, ``D_k = D_v = 128``, bf16 inputs, float32 intermediates:
the preparation reads ``Q, K, V`` (48 KiB), writes ``W, U`` (64 KiB) and the scores (16 KiB), and does about
3.0 MFLOP (scores 0.66, Gram blocks 0.66, inverse 0.33, ``W`` and ``U`` 1.31); the state pass reads ``W, U, Q, K``
and the scores (112 KiB if its four programs of 32 columns share them through L2; 88 KiB pulled into each
program's SM) and writes ``O`` (16 KiB), doing 7.3 MFLOP. About 256 KiB and 10 MFLOP per chunk, 40 FLOP/byte:
below the tensor cores' ridge (about 150 FLOP/byte for tf32 on an H100), so the whole is bound by memory
traffic (bf16 intermediates: about 176 KiB). The state pass has only ``B·H·D_v/32`` programs (128 for
``B = 2, H = 16``), about one per SM, so each chunk's 88 KiB must reach one SM before its two dependent products
(``W S``, then ``Kᵀ V'``) can finish: the per-SM load bandwidth, and the latency of that chain where loads are
not prefetched (``num_stages``), bound it, not the arithmetic.

Inputs are read in their dtype (fp16, bf16 or fp32) and computed in float32; the matrix products run on the
tensor cores at ``precision`` (``"tf32"`` by default for fp16/bf16 inputs, ``"ieee"`` float32 for float32
inputs). ``W``, ``U`` and the scores travel between the two kernels in ``intermediate_dtype`` (float32 by
default; bf16 halves those bytes at some accuracy cost).

**Forward only.** There is no backward kernel; inputs that require gradients are refused with an error rather
than silently cut from the graph (use the reference form for gradients). The same kernels run on a CPU under
``TRITON_INTERPRET=1`` (set before ``triton`` is first imported), slowly, which is how the tests check them
without a GPU. This module imports without Triton; ``import labsupport.linear_attention`` never imports it::

    from labsupport.linear_attention import triton_delta
    out = triton_delta.delta_rule_chunkwise_triton(q, k, v, beta, log_decay)
"""

from __future__ import annotations

import os

import torch

from labsupport.harness.settings import triton_interpreter_enabled as interpreter_enabled
from labsupport.harness.validation import require_choice, require_float_tensor, require_int
from labsupport.linear_attention.reference import (
    _require_beta,
    _require_log_decay,
    _require_qkv,
    _require_state,
)

try:  # Triton is optional
    import triton

    _TRITON_ERROR: Exception | None = None
except Exception as error:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    _TRITON_ERROR = error

__all__ = ["delta_rule_chunkwise_triton", "interpreter_enabled", "last_kernel_resources", "triton_available"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PRECISIONS = ("ieee", "tf32", "tf32x3")
_CHUNKS = (16, 32, 64, 128)


def triton_available() -> bool:
    """True when Triton imported successfully."""
    return triton is not None


_LAST_KERNELS: dict[str, object] = {}  # what the last launches returned (compiled kernels on a GPU)


def last_kernel_resources() -> dict[str, dict[str, int | None]]:
    """Registers per thread, spilled registers and shared memory (bytes) of the kernels last launched, by name.

    Read from what Triton's launch returns on a GPU (a compiled kernel); ``None`` where it does not say (the CPU
    interpreter returns nothing). For a benchmark's report: spills mean a tile did not fit in registers.
    """
    out = {}
    for name, kernel in _LAST_KERNELS.items():
        meta = getattr(kernel, "metadata", None)
        out[name] = {"registers": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
                     "shared_bytes": getattr(meta, "shared", None)}
    return out


def _pow2(n: int) -> int:
    """The smallest power of two ``>= max(n, 16)`` (``tl.dot`` needs tiles of at least 16)."""
    return max(16, 1 << (n - 1).bit_length())


if triton is not None:
    from labsupport.linear_attention.triton_delta_kernels import (
        _delta_prep_kernel,
        _delta_prep_blocked_kernel,
        _delta_prep_pieces_kernel,
        _delta_state_kernel,
        _delta_output_kernel,
    )


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, log_decay: torch.Tensor | None,
             chunk: int, precision: str, inverse_precision: str, intermediate_dtype: torch.dtype,
             prep_warps: int, store_scores: bool, inverse: str = "blocked",
             prep_columns: int | None = None) -> dict[str, torch.Tensor]:
    """Kernel 1 on checked, contiguous inputs: ``W, U`` (padded to whole chunks), the scores, the cumulative decays."""
    b, h, length, dk = k.shape
    dv = v.shape[-1]
    bh, n, dev = b * h, -(-length // chunk), q.device
    prep = {
        "w": torch.empty(bh, n * chunk, dk, device=dev, dtype=intermediate_dtype),
        "u": torch.empty(bh, n * chunk, dv, device=dev, dtype=intermediate_dtype),
        "sc": torch.empty(bh, n, chunk, chunk, device=dev, dtype=intermediate_dtype) if store_scores else None,
        "g": torch.empty(bh, n * chunk, device=dev, dtype=torch.float32),
    }
    args = (q, k, v, beta, beta if log_decay is None else log_decay, prep["w"], prep["u"],
            prep["g"] if prep["sc"] is None else prep["sc"], prep["g"], length, n)
    common = {"DK": dk, "DV": dv, "BK": _pow2(dk), "BDV": _pow2(dv), "C": chunk, "HAS_DECAY": log_decay is not None,
              "STORE_SCORES": store_scores, "PREC": precision, "PREC_INV": inverse_precision,
              "num_warps": prep_warps, "num_stages": 1}
    if inverse == "blocked" and prep_columns is not None:
        block = chunk // 4
        _LAST_KERNELS["prepare"] = _delta_prep_pieces_kernel[(n, bh)](
            *args, S=block, LOG_S=block.bit_length() - 1, BD=min(prep_columns, common["BK"], common["BDV"]),
            F32=interpreter_enabled() and q.dtype == torch.bfloat16, **common)
    elif inverse == "blocked":
        block = chunk // 4
        _LAST_KERNELS["prepare"] = _delta_prep_blocked_kernel[(n, bh)](*args, S=block, LOG_S=block.bit_length() - 1,
                                                                      **common)
    else:
        _LAST_KERNELS["prepare"] = _delta_prep_kernel[(n, bh)](*args, LOG_C=chunk.bit_length() - 1, **common)
    return prep


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, log_decay: torch.Tensor | None,
             initial_state: torch.Tensor | None, return_state: bool, chunk: int, precision: str,
             inverse_precision: str, intermediate_dtype: torch.dtype, block_v: int, num_warps: int,
             num_stages: int, prep_warps: int, fused_output: bool,
             inverse: str, prep_columns: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The launches on checked, contiguous inputs; no host synchronisation (safe inside a CUDA graph)."""
    b, h, length, dk = k.shape
    dv = v.shape[-1]
    bh, n, dev = b * h, -(-length // chunk), q.device
    _LAST_KERNELS.clear()
    prep = _prepare(q, k, v, beta, log_decay, chunk, precision, inverse_precision, intermediate_dtype, prep_warps,
                    fused_output, inverse, prep_columns)
    out = torch.empty_like(v)
    final = torch.empty(b, h, dk, dv, device=dev, dtype=torch.float32) if return_state else None
    bk, bv = _pow2(dk), min(block_v, _pow2(dv))
    if fused_output:
        hs = vn = prep["g"]  # unused
    else:
        hs = torch.empty(bh, n, dk, dv, device=dev, dtype=intermediate_dtype)
        vn = torch.empty(bh, n * chunk, dv, device=dev, dtype=intermediate_dtype)
    g = prep["g"]

    def state_pass(stages: int) -> None:
        _LAST_KERNELS["state pass"] = _delta_state_kernel[(triton.cdiv(dv, bv), bh)](
            q, k, prep["w"], prep["u"], g if prep["sc"] is None else prep["sc"], g, out, hs, vn,
            g if initial_state is None else initial_state, g if final is None else final, length, n,
            DK=dk, DV=dv, BK=bk, BV=bv, C=chunk, HAS_INITIAL=initial_state is not None,
            STORE_FINAL=final is not None, FUSED_OUTPUT=fused_output, PREC=precision, num_warps=num_warps,
            num_stages=stages,
        )

    try:
        state_pass(num_stages)
    except Exception as error:  # noqa: BLE001 - only a shortage of shared memory is retried
        if type(error).__name__ != "OutOfResources" or num_stages == 1:
            raise
        state_pass(1)  # no prefetching of the next chunk: less shared memory
    if not fused_output:
        _LAST_KERNELS["output"] = _delta_output_kernel[(n, bh, triton.cdiv(dv, bv))](
            q, k, g, hs, vn, out, length, n, DK=dk, DV=dv, BK=bk, BV=bv, C=chunk, PREC=precision,
            num_warps=num_warps, num_stages=1,
        )
    return out, final


def delta_rule_chunkwise_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | float,
    log_decay: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    precision: str | None = None,
    inverse_precision: str | None = None,
    intermediate_dtype: torch.dtype = torch.float32,
    block_v: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
    prep_warps: int | None = None,
    fused_output: bool = True,
    inverse: str | None = None,
    prep_columns: int | None = 32,
    check_values: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(Gated) DeltaNet forward, chunkwise, in two Triton kernels (see the module's docstring).

    Computes what :func:`~labsupport.linear_attention.reference.delta_rule_chunkwise` computes:
    ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t``.
    Forward only: tensors that require gradients are refused.

    Args:
        q, k: ``(B, H, L, D_k)``; v: ``(B, H, L, D_v)``; fp16, bf16 or fp32, on a CUDA device (or on the CPU
            with ``TRITON_INTERPRET=1``). ``L`` need not be a multiple of the chunk; any ``D_k, D_v`` (tiles are
            padded to a power of two, at least 16).
        beta: the writing strength, a float or ``(B, H, L)`` of the dtype of ``q``.
        log_decay: ``None`` (DeltaNet) or ``(B, H, L)`` of the dtype of ``q``, ``<= 0`` (gated DeltaNet).
        chunk_size: tokens per chunk, one of 16, 32, 64, 128.
        initial_state: ``(B, H, D_k, D_v)`` of the dtype of ``q``, default zeros.
        return_state: also return the final state (in the dtype of ``q``).
        precision: of the matrix products on the GPU: ``"ieee"`` (float32), ``"tf32x3"`` (about float32, on
            tensor cores) or ``"tf32"``; default ``"ieee"`` for float32 inputs, ``"tf32"`` otherwise. The CPU
            interpreter always computes in float32.
        inverse_precision: of the products that build ``(I + A)⁻¹``; default ``precision``.
        intermediate_dtype: dtype of ``W``, ``U`` and the scores between the kernels: float32, bfloat16 or float16.
        block_v: value columns per program of the state pass (a power of two, at least 16).
        num_warps, num_stages: launch settings of the state pass; prep_warps: warps of the preparation kernel,
            default 1 for the preparation in pieces of columns and 4 for the others (the fastest measured on an
            H100: ``benchmarks/BENCHMARKS.md``, fifth GPU session).
        fused_output: compute the output inside the state pass (default); ``False`` stores the state entering
            every chunk and ``V'`` instead (in ``intermediate_dtype``), and a third kernel, parallel over chunks,
            computes the output from them.
        inverse: how ``(I + A)⁻¹`` is built: ``"blocked"`` (four diagonal blocks of ``C / 4`` by doubling, the
            rest by block substitution; chunks of 64 or 128, the default there) or ``"doubling"`` (on the whole
            ``C × C`` matrix; any chunk, the default for 16 and 32).
        prep_columns: with ``inverse="blocked"``, the preparation reads ``Q, K, V`` and writes ``W, U`` in pieces
            of this many columns (a power of two, at least 16; default 32), which keeps its registers from
            spilling at ``D = 128``; ``None`` takes whole rows at once (the earlier kernel). The doubling
            preparation always takes whole rows and does not use it.
        check_values: check that ``log_decay <= 0`` (reads the values: a host synchronisation). ``False`` checks
            only shapes and dtypes, so that the call can be captured in a CUDA graph.

    Returns:
        ``(B, H, L, D_v)`` in the dtype of ``q``; with ``return_state``, also the final state.
    """
    if triton is None:
        raise RuntimeError(f"delta_rule_chunkwise_triton needs Triton, which could not be imported "
                           f"({type(_TRITON_ERROR).__name__}: {_TRITON_ERROR})")
    q, k, v = _require_qkv(q, k, v)
    if q.dtype not in _DTYPES:
        raise TypeError(f"delta_rule_chunkwise_triton takes float16, bfloat16 or float32 tensors, got "
                        f"{str(q.dtype).removeprefix('torch.')}; for float64 use reference.delta_rule_chunkwise")
    beta = _require_beta(beta, k)
    if check_values or log_decay is None:
        log_decay = _require_log_decay(log_decay, k, vector_ok=False)
    else:
        log_decay = require_float_tensor("log_decay", log_decay)
        if log_decay.shape != k.shape[:3] or log_decay.dtype != k.dtype:
            raise ValueError(f"log_decay must have shape (B, H, L) = {tuple(k.shape[:3])} and the dtype of q, got "
                             f"{tuple(log_decay.shape)} {str(log_decay.dtype).removeprefix('torch.')}")
    b, h, length, dk = k.shape
    dv = v.shape[-1]
    state = None if initial_state is None else _require_state(initial_state, b, h, dk, dv, k)
    tensors = [t for t in (q, k, v, beta, log_decay, state) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError("delta_rule_chunkwise_triton is forward-only (no backward kernel): call it under "
                           "torch.no_grad() or on detached tensors; for gradients use "
                           "reference.delta_rule_chunkwise")
    chunk = require_int("chunk_size", chunk_size)
    if chunk not in _CHUNKS:
        raise ValueError(f"chunk_size must be one of {_CHUNKS} (a power of two the tensor cores can tile), got {chunk}")
    if precision is None:
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
    precision = require_choice("precision", precision, _PRECISIONS)
    inverse = require_choice("inverse", inverse or ("blocked" if chunk >= 64 else "doubling"), ("blocked", "doubling"))
    if inverse == "blocked" and chunk < 64:
        raise ValueError(f"inverse='blocked' needs chunk_size 64 or 128 (blocks of at least 16), got {chunk}")
    inverse_precision = require_choice("inverse_precision", inverse_precision or precision, _PRECISIONS)
    if prep_columns is not None:
        prep_columns = require_int("prep_columns", prep_columns, minimum=16)
        if prep_columns & (prep_columns - 1):
            raise ValueError(f"prep_columns must be a power of two (at least 16) or None, got {prep_columns}")
    if inverse != "blocked":
        prep_columns = None  # the doubling preparation takes whole rows
    if prep_warps is None:
        prep_warps = 4 if prep_columns is None else 1
    if intermediate_dtype not in _DTYPES:
        raise TypeError(f"intermediate_dtype must be torch.float32, torch.bfloat16 or torch.float16, got "
                        f"{intermediate_dtype!r}")
    block_v = require_int("block_v", block_v, minimum=16)
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two (at least 16), got {block_v}")
    num_warps = require_int("num_warps", num_warps, minimum=1)
    num_stages = require_int("num_stages", num_stages, minimum=1)
    prep_warps = require_int("prep_warps", prep_warps, minimum=1)  # type: ignore[arg-type]
    if max(t.numel() for t in (q, k, v)) >= 2**31 or b * h * (-(-length // chunk)) * chunk * chunk >= 2**31:
        raise ValueError(f"tensors of 2³¹ elements or more are not supported (32-bit offsets); got q {tuple(q.shape)}, "
                         f"v {tuple(v.shape)}: split the batch")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = q.device
    if device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError("the tensors are on the CPU but TRITON_INTERPRET=1 was not set before triton was "
                           "imported; move them to a CUDA device or set the variable first")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensors must be on a CUDA device (or the CPU under TRITON_INTERPRET=1), got {device}")
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    log_decay = None if log_decay is None else log_decay.contiguous()
    state = None if state is None else state.float().contiguous()
    out, final = _forward(q, k, v, beta, log_decay, state, return_state, chunk, precision, inverse_precision,
                          intermediate_dtype, block_v, num_warps, num_stages, prep_warps, bool(fused_output),
                          inverse, prep_columns)
    if return_state:
        return out, final.to(q.dtype)  # type: ignore[union-attr]
    return out
