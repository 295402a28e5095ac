"""Chapter 03's core exercise: one chunk of gated DeltaNet through the UT transform.

* :func:`gated_delta_chunk_step` — the reference solution: a whole chunk of the gated delta rule
  ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ`` computed with matrix products and one
  triangular solve, no loop over the chunk's tokens.
* :func:`check_gated_delta_chunk_step` — compares a learner's chunk with it on seeded cases, then
  refuses the shortcut the chapter teaches against: a loop over the tokens (the recurrent form,
  which gives the same numbers). It counts the torch operations the function runs on a chunk of 4
  and of 32 tokens; a chunkwise answer runs the same operations whatever the chunk length.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from labsupport.harness.checking import STRICT_ENV_VAR, Case, CheckResult, check_function
from labsupport.harness.numerics import seeded_randn
from labsupport.harness.validation import require_float_tensor

__all__ = ["check_gated_delta_chunk_step", "gated_delta_chunk_step"]


def _require_delta_chunk(state: object, q: object, k: object, v: object, beta: object, log_decay: object) -> None:
    for name, x in (("state", state), ("q", q), ("k", k), ("v", v)):
        require_float_tensor(name, x, ndim=4)
    for name, x in (("beta", beta), ("log_decay", log_decay)):
        require_float_tensor(name, x, ndim=3)
    if (q.shape != k.shape or v.shape[:3] != k.shape[:3] or state.shape != (*k.shape[:2], k.shape[-1], v.shape[-1])
            or beta.shape != k.shape[:3] or log_decay.shape != k.shape[:3]):
        raise ValueError("expected state (B, H, D_k, D_v), q and k (B, H, C, D_k), v (B, H, C, D_v), beta and "
                         f"log_decay (B, H, C); got {tuple(state.shape)}, {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(beta.shape)}, {tuple(log_decay.shape)}")


def gated_delta_chunk_step(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           beta: torch.Tensor, log_decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of gated DeltaNet, chunkwise (UT transform), from the state before the chunk.

    Token ``i`` of the chunk does ``S_i = α_i (I − β_i k_i k_iᵀ) S_{i−1} + β_i k_i v_iᵀ`` and reads
    ``o_i = S_iᵀ q_i``. With ``b = cumsum(log α)`` inside the chunk (token ``i``'s own gate included)
    and ``Γ_ij = exp(b_i − b_j)``:

    * ``T = (I + StrictLower(diag(β) (K Kᵀ ⊙ Γ)))⁻¹ diag(β)`` (a triangular solve);
    * the corrected values ``U = T V − T (exp(b) ⊙ K) S``;
    * ``O = (exp(b) ⊙ Q) S + (Q Kᵀ ⊙ Γ ⊙ causal) U`` and ``S' = exp(b_C) S + (exp(b_C − b) ⊙ K)ᵀ U``.

    Args:
        state: ``(B, H, D_k, D_v)``; q, k: ``(B, H, C, D_k)``; v: ``(B, H, C, D_v)``;
        beta: ``(B, H, C)`` write strengths; log_decay: ``(B, H, C)``, ``≤ 0``.

    Returns:
        ``(O (B, H, C, D_v), new_state (B, H, D_k, D_v))``.
    """
    _require_delta_chunk(state, q, k, v, beta, log_decay)
    c = k.shape[2]
    b = log_decay.cumsum(-1)                                              # (B, H, C)
    causal = torch.ones(c, c, dtype=torch.bool, device=k.device).tril()
    diff = b[..., :, None] - b[..., None, :]                             # b_i − b_j
    gamma = diff.masked_fill(~causal, -math.inf).exp()                    # Γ ⊙ causal (diagonal included)
    a = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * gamma).tril(-1)
    eye = torch.eye(c, dtype=k.dtype, device=k.device)
    t = torch.linalg.solve_triangular(eye + a, torch.diag_embed(beta), upper=False, unitriangular=True)
    w = t @ (k * b.exp()[..., None])                                      # (B, H, C, D_k)
    u = t @ v - w @ state                                                 # the chunk's corrected values
    out = (q * b.exp()[..., None]) @ state + ((q @ k.transpose(-1, -2)) * gamma) @ u
    k_written = k * (b[..., -1:] - b).exp()[..., None]
    new_state = b[..., -1:, None].exp() * state + k_written.transpose(-1, -2) @ u
    return out, new_state


# --------------------------------------------------------------------------- the checker


def _delta_chunk_args(gen: torch.Generator, b: int, h: int, c: int, dk: int, dv: int, *,
                      dtype: torch.dtype = torch.float64, zero_state: bool = False, gate: str = "random",
                      beta_one: bool = False) -> tuple[torch.Tensor, ...]:
    state = torch.zeros(b, h, dk, dv, dtype=dtype) if zero_state else seeded_randn(gen, b, h, dk, dv, dtype=dtype)
    q = F.normalize(seeded_randn(gen, b, h, c, dk, dtype=dtype), dim=-1)
    k = F.normalize(seeded_randn(gen, b, h, c, dk, dtype=dtype), dim=-1)
    v = seeded_randn(gen, b, h, c, dv, dtype=dtype)
    beta = torch.ones(b, h, c, dtype=dtype) if beta_one else torch.rand(b, h, c, generator=gen,
                                                                        dtype=torch.float64).to(dtype)
    if gate == "none":
        log_decay = torch.zeros(b, h, c, dtype=dtype)
    elif gate == "strong":
        log_decay = torch.full((b, h, c), math.log(0.3), dtype=dtype)
    else:
        log_decay = F.logsigmoid(torch.randn(b, h, c, generator=gen, dtype=torch.float64) + 2.0).to(dtype)
    return state, q, k, v, beta, log_decay


def _delta_chunk_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(707)
    nc = _delta_chunk_args(gen, 1, 2, 7, 4, 3, dtype=torch.float32)
    return [
        Case("first chunk, zero state, no gate (log α = 0): DeltaNet, C=6",
             _delta_chunk_args(gen, 1, 2, 6, 4, 3, zero_state=True, gate="none")),
        Case("a later chunk, random gates and β, C=8", _delta_chunk_args(gen, 2, 2, 8, 5, 4)),
        Case("β = 1 (each write replaces what its key held), C=5", _delta_chunk_args(gen, 1, 2, 5, 4, 4, beta_one=True)),
        Case("a single-token chunk, C=1", _delta_chunk_args(gen, 1, 1, 1, 4, 4)),
        Case("strong decay (α = 0.3), C=8", _delta_chunk_args(gen, 1, 2, 8, 3, 5, gate="strong")),
        Case("float32, non-contiguous q and v, C=7",
             (nc[0], nc[1].transpose(-1, -2).contiguous().transpose(-1, -2), nc[2],
              nc[3].transpose(-1, -2).contiguous().transpose(-1, -2), nc[4], nc[5])),
    ]


class _OperationCounter(TorchDispatchMode):
    """Counts the torch operations run inside it (each call of an ATen operator is one)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.count += 1
        return func(*args, **(kwargs or {}))


def _operations(fn: Callable[..., object], args: tuple) -> int | None:
    """How many torch operations ``fn(*args)`` runs; ``None`` when it raises."""
    counter = _OperationCounter()
    try:
        with counter, torch.no_grad():
            fn(*(a.clone() for a in args))
    except Exception:
        return None
    return counter.count


def _fail(exercise: str, message: str) -> CheckResult:
    print(message)
    if os.environ.get(STRICT_ENV_VAR, "") == "1":
        raise AssertionError(message)
    return CheckResult(exercise, "failed", message)


def check_gated_delta_chunk_step(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check ``fn(state, q, k, v, beta, log_decay) -> (O, new_state)``: values, then no loop over tokens.

    A chunkwise answer runs the same torch operations for a chunk of 32 tokens as for one of 4; a loop
    over the tokens runs several more per token. More than 20 extra operations for the 28 extra tokens is
    refused, with both counts in the message.
    """
    exercise = "gated delta rule, one chunk (UT transform)"
    result = check_function(
        fn, gated_delta_chunk_step, _delta_chunk_cases(), exercise=exercise, atol=1e-6, rtol=1e-5,
        output_names=("O", "new_state"), quiet=True, reveal=reveal, checker="check_gated_delta_chunk_step",
        hint="write the chunk's corrected values U (what each token really adds) as the solution of one "
             "lower-triangular system; once U is known the chunk is exercise 4 with U in place of V. Tiered "
             "hints are above the exercise.",
        recipe="b = cumsum(log_decay); Γ_ij = exp(b_i − b_j) (j ≤ i); A = StrictLower(diag(β) (K Kᵀ ⊙ Γ)); "
               "T = (I + A)⁻¹ diag(β) by torch.linalg.solve_triangular (lower, unitriangular); U = T V − T (exp(b) "
               "⊙ K) S; O = (exp(b) ⊙ Q) S + (Q Kᵀ ⊙ Γ) U; S' = exp(b_C) S + (exp(b_C − b) ⊙ K)ᵀ U.",
    )
    if not result.passed:
        print(result.message)
        return result
    gen = torch.Generator().manual_seed(708)
    short = _operations(fn, _delta_chunk_args(gen, 1, 2, 4, 8, 8))
    long = _operations(fn, _delta_chunk_args(gen, 1, 2, 32, 8, 8))
    if short is not None and long is not None and long - short > 20:
        return _fail(exercise,
                     f"❌ {exercise}: the values are right, but your function ran {short} torch operations on a "
                     f"chunk of 4 tokens and {long} on a chunk of 32: it steps through the tokens one by one, "
                     "which is the recurrent form, not the chunkwise one.\n   hint    replace the loop by one "
                     "triangular solve (torch.linalg.solve_triangular) for all the chunk's corrected values at "
                     "once; everything else is matrix products over the whole chunk.")
    message = (f"✅ {exercise}: passed {result.cases_total} cases, with no loop over the tokens "
               f"({short} torch operations for a chunk of 4 tokens, {long} for 32).")
    print(message)
    return CheckResult(exercise, "passed", message, result.cases_total, result.cases_total)
