"""Chapter 03's core exercise: one chunk of gated DeltaNet through the UT transform.

:func:`check_gated_delta_chunk_step` compares a learner's chunk of the gated delta rule
``S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ`` with the private reference solution
(:mod:`labsupport.linear_attention._solutions`: matrix products and one triangular solve) on seeded
cases, then refuses the shortcut the chapter teaches against: a loop over the tokens (the recurrent
form, which gives the same numbers). It counts the torch operations the function runs on a chunk of
4 and of 32 tokens (:func:`labsupport.linear_attention.exercises.refuse_token_loop`, the harness's
``OperationCounter``); a chunkwise answer runs the same operations whatever the chunk length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.numerics import seeded_randn
from labsupport.linear_attention._solutions import gated_delta_chunk_step
from labsupport.linear_attention.exercises import refuse_token_loop

__all__ = ["check_gated_delta_chunk_step"]


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
    return refuse_token_loop(exercise, fn, _token_loop_args, result)


def _token_loop_args(length: int) -> tuple[torch.Tensor, ...]:
    return _delta_chunk_args(torch.Generator().manual_seed(708), 1, 2, length, 8, 8)
