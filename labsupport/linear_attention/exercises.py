"""Chapter 03's exercises and their checkers.

The three step functions are the library's versions of the notebook's warm-ups (and what the library's
loops do once per token or per chunk); the notebook uses ``la.recurrent_step`` in section 6:

* :func:`recurrent_step` — one token of (decayed) linear attention (exercise 1);
* :func:`chunkwise_step` — one chunk without decay (exercise 2);
* :func:`delta_rule_step` — one delta-rule write (exercise 3).

The warm-ups' statements say that the library holds these steps. Exercise 4, one chunk with a scalar
decay per head and token, is a core exercise: its reference solution lives in the private :mod:`labsupport.linear_attention._solutions`,
and its checker also refuses a loop over the chunk's tokens (:func:`refuse_token_loop`, shared with exercise 5).

Each ``check_*`` compares a learner's function with the matching step on
seeded cases (built by the ``_*_cases`` functions below) through
:func:`labsupport.harness.checking.check_function`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from labsupport.harness.checking import STRICT_ENV_VAR, Case, CheckResult, check_function
from labsupport.harness.diagnosis import known_mistakes
from labsupport.harness.guards import OperationCounter, run_guarded
from labsupport.harness.numerics import seeded_randn
from labsupport.harness.validation import require_float_tensor
from labsupport.linear_attention._solutions import chunkwise_decay_step, require_chunk_inputs
from labsupport.linear_attention.reference import delta_rule_update, recurrent_update

__all__ = [
    "check_chunkwise_decay_step",
    "check_chunkwise_step",
    "check_delta_rule_step",
    "check_recurrent_step",
    "refuse_token_loop",
    "chunkwise_step",
    "delta_rule_step",
    "recurrent_step",
]


# --------------------------------------------------------------------------- step functions (the solutions)


def _require_token_inputs(state: object, k: object, v: object, q: object = None) -> None:
    """One token's ``state (B, H, D_k, D_v)``, ``k (B, H, D_k)``, ``v (B, H, D_v)`` and optionally ``q``."""
    state = require_float_tensor("state", state)
    k = require_float_tensor("k", k)
    v = require_float_tensor("v", v)
    if state.dim() < 2 or k.shape != (*state.shape[:-2], state.shape[-2]) or v.shape != (*state.shape[:-2], state.shape[-1]):
        raise ValueError("expected state (B, H, D_k, D_v), k (B, H, D_k) and v (B, H, D_v); got "
                         f"{tuple(state.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q is not None and (require_float_tensor("q", q).shape != k.shape):
        raise ValueError(f"q must have the shape of k {tuple(k.shape)}, got {tuple(q.shape)}")


def recurrent_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of (decayed) linear attention: ``S' = α ⊙ S + k vᵀ``, ``o = S'ᵀ q``.

    Args:
        state: ``(B, H, D_k, D_v)``.
        q, k: ``(B, H, D_k)``; v: ``(B, H, D_v)``.
        log_decay: ``None``, ``(B, H)`` (one decay per head) or ``(B, H, D_k)`` (a gate per key dimension).

    Returns:
        ``(o, new_state)`` with ``o`` of shape ``(B, H, D_v)``.
    """
    _require_token_inputs(state, k, v, q=q)
    if log_decay is not None:
        log_decay = require_float_tensor("log_decay", log_decay)
        if log_decay.shape not in (state.shape[:-2], k.shape):
            raise ValueError(f"log_decay must have shape {tuple(state.shape[:-2])} (one decay per head) or "
                             f"{tuple(k.shape)} (one per key dimension), got {tuple(log_decay.shape)}")
    return recurrent_update(state, q, k, v, log_decay)


def chunkwise_step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of linear attention (no decay, no normaliser).

    ``O = Q S + (Q Kᵀ ⊙ causal) V`` and ``S' = S + Kᵀ V``.

    Args:
        state: ``(B, H, D_k, D_v)``; q, k: ``(B, H, C, D_k)``; v: ``(B, H, C, D_v)``.

    Returns:
        ``(O, new_state)`` with ``O`` of shape ``(B, H, C, D_v)``.
    """
    require_chunk_inputs(state, q, k, v)
    scores = (q @ k.transpose(-1, -2)).tril()
    out = q @ state + scores @ v
    return out, state + k.transpose(-1, -2) @ v


def delta_rule_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """One delta-rule write: ``S' = S + β k (v − Sᵀ k)ᵀ`` = ``(I − β k kᵀ) S + β k vᵀ``.

    Args:
        state: ``(B, H, D_k, D_v)``; k: ``(B, H, D_k)``; v: ``(B, H, D_v)``; beta: ``(B, H)``.

    Returns:
        the new state, ``(B, H, D_k, D_v)``.
    """
    _require_token_inputs(state, k, v)
    beta = require_float_tensor("beta", beta)
    if beta.shape != state.shape[:-2]:
        raise ValueError(f"beta must have shape {tuple(state.shape[:-2])} (one per head), got {tuple(beta.shape)}")
    return delta_rule_update(state, k, v, beta)


# --------------------------------------------------------------------------- checkers


def _log_gate(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return F.logsigmoid(torch.randn(*shape, generator=gen, dtype=torch.float64) + 2.0).to(dtype)


def _recurrent_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(303)
    b, h, dk, dv = 2, 3, 4, 5

    def token(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token's q, k (B, H, D_k) and v (B, H, D_v), drawn in that order."""
        return tuple(seeded_randn(gen, b, h, d, dtype=dtype) for d in (dk, dk, dv))  # type: ignore[return-value]

    cases = [
        Case("no decay, zero state (first token)", (torch.zeros(b, h, dk, dv, dtype=torch.float64), *token(), None)),
        Case("no decay, a filled state", (seeded_randn(gen, b, h, dk, dv), *token(), None)),
        Case("a decay per head, log_decay (B, H)",
             (seeded_randn(gen, b, h, dk, dv), *token(), _log_gate(gen, b, h))),
        Case("a gate per key dimension, log_decay (B, H, D_k)",
             (seeded_randn(gen, b, h, dk, dv), *token(), _log_gate(gen, b, h, dk))),
        Case("float32, non-contiguous state (a transposed view)",
             (seeded_randn(gen, b, h, dv, dk, dtype=torch.float32).transpose(-1, -2), *token(torch.float32),
              _log_gate(gen, b, h, dtype=torch.float32))),
    ]
    return cases


def _read_before_write(state, q, k, v, log_decay=None, *, decay: bool = True):
    """o read from the state before this token's write (decayed or not): the usual slip."""
    if decay and log_decay is not None:
        alpha = log_decay.exp()
        state = state * (alpha[..., None, None] if alpha.dim() == state.dim() - 2 else alpha[..., :, None])
    return (q[..., :, None] * state).sum(-2)


_RECURRENT_MISTAKES = known_mistakes({
    "your o reads the state before this token's write: the order is forget, write, then read":
        _read_before_write,
    "your o reads the old state, before both the decay and the write":
        lambda *a, **kw: _read_before_write(*a, **kw, decay=False),
}, output=0)

_CHUNK_MISTAKES = known_mistakes({
    "your O leaves out the diagonal: token i also reads its own pair (j ≤ i, itself included)":
        lambda state, q, k, v: q @ state + (q @ k.transpose(-1, -2)).tril(-1) @ v,
    "your O reads the new state: earlier chunks reach the chunk through the state it came in with":
        lambda state, q, k, v: q @ (state + k.transpose(-1, -2) @ v) + (q @ k.transpose(-1, -2)).tril() @ v,
    "your O has no causal mask: token i reads later tokens of the chunk":
        lambda state, q, k, v: q @ state + (q @ k.transpose(-1, -2)) @ v,
}, output=0)

_DELTA_MISTAKES = known_mistakes({
    "your write adds β k vᵀ without first taking away what the memory already returns for k":
        lambda state, k, v, beta: state + k[..., :, None] * (beta[..., None] * v)[..., None, :],
    "your correction uses what the memory returns for k without β weighting the whole write":
        lambda state, k, v, beta: state + k[..., :, None] * (
            beta[..., None] * v - (k[..., :, None] * state).sum(-2))[..., None, :],
})

_DECAY_CHUNK_MISTAKES = [
    known_mistakes({"your new state adds the chunk with no decay at all":
                    lambda state, q, k, v, log_decay: (None, state + k.transpose(-1, -2) @ v)}, output=1),
    known_mistakes({"your new state decays the chunk's pairs but not the state it came in with":
                    lambda state, q, k, v, log_decay: (None, state + (k * (log_decay.cumsum(-1)[..., -1:]
                                                                           - log_decay.cumsum(-1)).exp()[..., None]
                                                                      ).transpose(-1, -2) @ v)}, output=1),
]


def check_recurrent_step(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check ``fn(state, q, k, v, log_decay) -> (o, new_state)`` against :func:`recurrent_step`."""
    return check_function(
        fn, recurrent_step, _recurrent_cases(), exercise="recurrent_step", atol=1e-6, rtol=1e-5,
        diagnose=_RECURRENT_MISTAKES, reveal=reveal,
        hint="the order is forget, write, read; α multiplies the rows of S (one per key dimension), and "
        "log_decay may be None. Tiered hints are above the exercise.",
        recipe="α = exp(log_decay) with trailing axes to (B, H, D_k, 1) (1 when None); S' = α ⊙ S + k vᵀ "
        "(k[..., :, None] * v[..., None, :]); o = S'ᵀ q = (q[..., :, None] * S').sum(-2).",
        output_names=("o", "new_state"),
    )


def _chunk_state_q_k(gen: torch.Generator, b: int, h: int, c: int, dk: int, dv: int, dtype: torch.dtype, *,
                     zero_state: bool, non_contiguous: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk checker case's incoming state and its q, k (as transposed views when ``non_contiguous``)."""
    state = torch.zeros(b, h, dk, dv, dtype=dtype) if zero_state else seeded_randn(gen, b, h, dk, dv, dtype=dtype)
    if non_contiguous:
        q = seeded_randn(gen, b, c, h, dk, dtype=dtype).transpose(1, 2)
        k = seeded_randn(gen, b, h, dk, c, dtype=dtype).transpose(-1, -2)
    else:
        q, k = seeded_randn(gen, b, h, c, dk, dtype=dtype), seeded_randn(gen, b, h, c, dk, dtype=dtype)
    return state, q, k


def _chunk_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(404)
    cases = []
    for name, (b, h, c, dk, dv), dtype, zero in [
        ("first chunk, zero state, C=8", (1, 2, 8, 4, 3), torch.float64, True),
        ("a later chunk, C=6", (2, 2, 6, 5, 4), torch.float64, False),
        ("a single-token chunk, C=1", (1, 1, 1, 4, 4), torch.float64, False),
        ("float32, non-contiguous q and k, C=7", (1, 3, 7, 4, 6), torch.float32, False),
    ]:
        state, q, k = _chunk_state_q_k(gen, b, h, c, dk, dv, dtype, zero_state=zero,
                                       non_contiguous="non-contiguous" in name)
        cases.append(Case(name, (state, q, k, seeded_randn(gen, b, h, c, dv, dtype=dtype))))
    return cases


def check_chunkwise_step(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check ``fn(state, q, k, v) -> (O, new_state)`` against :func:`chunkwise_step`."""
    return check_function(
        fn, chunkwise_step, _chunk_cases(), exercise="chunkwise_step", atol=1e-6, rtol=1e-5,
        diagnose=_CHUNK_MISTAKES, reveal=reveal,
        hint="the output has two parts: what earlier chunks left in the state, and the chunk's own pairs; "
        "the new state adds every pair of the chunk. Tiered hints are above the exercise.",
        recipe="O = Q S + tril(Q Kᵀ) V (the diagonal included); S' = S + Kᵀ V.",
        output_names=("O", "new_state"),
    )


def _decay_chunk_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(606)
    cases = []
    for name, (b, h, c, dk, dv), dtype, zero, gate in [
        ("first chunk, zero state, no decay (log α = 0), C=5", (1, 2, 5, 4, 3), torch.float64, True, "none"),
        ("a later chunk, random gates, C=6", (2, 2, 6, 5, 4), torch.float64, False, "random"),
        ("a single-token chunk, C=1", (1, 1, 1, 4, 4), torch.float64, False, "random"),
        ("strong decay (α ≈ 0.3), C=8", (1, 2, 8, 3, 5), torch.float64, False, "strong"),
        ("float32, non-contiguous q and k, C=7", (1, 3, 7, 4, 6), torch.float32, False, "random"),
    ]:
        state, q, k = _chunk_state_q_k(gen, b, h, c, dk, dv, dtype, zero_state=zero,
                                       non_contiguous="non-contiguous" in name)
        if gate == "none":
            log_decay = torch.zeros(b, h, c, dtype=dtype)
        elif gate == "strong":
            log_decay = torch.full((b, h, c), math.log(0.3), dtype=dtype)
        else:
            log_decay = _log_gate(gen, b, h, c, dtype=dtype)
        cases.append(Case(name, (state, q, k, seeded_randn(gen, b, h, c, dv, dtype=dtype), log_decay)))
    return cases


def refuse_token_loop(exercise: str, fn: Callable[..., object], make_args: Callable[[int], tuple],
                      result: CheckResult, allowance: int = 20) -> CheckResult:
    """After the values passed (``result``), refuse ``fn`` if it loops over a chunk's tokens; print the verdict.

    ``make_args(c)`` builds the arguments of a chunk of ``c`` tokens. A chunkwise answer runs the same torch
    operations for a chunk of 32 tokens as for one of 4 (:class:`~labsupport.harness.guards.OperationCounter`);
    a loop over the tokens runs its body once more per token. More than ``allowance`` extra operations for the
    28 extra tokens is refused, with both counts in the message.
    """
    counts = []
    for length in (4, 32):
        counter = OperationCounter()
        counts.append(counter.count if run_guarded(fn, make_args(length), counter) else None)
    short, long = counts
    if short is not None and long is not None and long - short > allowance:
        message = (f"❌ {exercise}: the values are right, but your function ran {short} torch operations on a "
                   f"chunk of 4 tokens and {long} on a chunk of 32: it steps through the tokens one by one, "
                   "which is the recurrent form, not the chunkwise one.\n   hint    write every token's factor "
                   "as an entry of a C × C (or C-long) tensor built at once from one cumulative sum, so the "
                   "whole chunk is a few matrix products; tiered hints are above the exercise.")
        print(message)
        if os.environ.get(STRICT_ENV_VAR, "") == "1":
            raise AssertionError(message)
        return CheckResult(exercise, "failed", message)
    message = (f"✅ {exercise}: passed {result.cases_total} cases, with no loop over the tokens "
               f"({short} torch operations for a chunk of 4 tokens, {long} for 32).")
    print(message)
    return CheckResult(exercise, "passed", message, result.cases_total, result.cases_total)


def _decay_chunk_args(length: int) -> tuple:
    gen = torch.Generator().manual_seed(607)
    state, q, k = _chunk_state_q_k(gen, 1, 2, length, 8, 8, torch.float64, zero_state=False, non_contiguous=False)
    return state, q, k, seeded_randn(gen, 1, 2, length, 8), _log_gate(gen, 1, 2, length)


def check_chunkwise_decay_step(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check ``fn(state, q, k, v, log_decay) -> (O, new_state)``: values, then no loop over the chunk's tokens."""
    exercise = "chunkwise_decay_step"
    result = check_function(
        fn, chunkwise_decay_step, _decay_chunk_cases(), exercise=exercise, atol=1e-6, rtol=1e-5,
        diagnose=_DECAY_CHUNK_MISTAKES, reveal=reveal, quiet=True, checker="check_chunkwise_decay_step",
        hint="every decay factor is a difference of one cumulative sum of log_decay (token i's own gate "
        "included); four things decay: the old state as each token reads it, each earlier pair as token i "
        "reads it, each pair until the end of the chunk, and the old state into S'. Tiered hints are above "
        "the exercise.",
        recipe="b = log_decay.cumsum(-1); Γ_ij = exp(b_i − b_j) for j ≤ i (mask the exponent with -inf above the "
        "diagonal before exp); O = (exp(b) ⊙ Q) S + (Q Kᵀ ⊙ Γ) V; S' = exp(b_C) S + (exp(b_C − b) ⊙ K)ᵀ V.",
        output_names=("O", "new_state"),
    )
    if not result.passed:
        print(result.message)
        return result
    return refuse_token_loop(exercise, fn, _decay_chunk_args, result)


def _delta_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(505)
    b, h, dk, dv = 2, 2, 6, 3
    unit = lambda *s: F.normalize(seeded_randn(gen, *s), dim=-1)  # noqa: E731
    cases = [
        Case("zero state, β = 1: stores v exactly", (torch.zeros(b, h, dk, dv, dtype=torch.float64), unit(b, h, dk),
                                                  seeded_randn(gen, b, h, dv), torch.ones(b, h, dtype=torch.float64))),
        Case("a filled state, random β", (seeded_randn(gen, b, h, dk, dv), unit(b, h, dk), seeded_randn(gen, b, h, dv),
                                          torch.rand(b, h, generator=gen, dtype=torch.float64))),
        Case("keys not normalised", (seeded_randn(gen, b, h, dk, dv), seeded_randn(gen, b, h, dk),
                                     seeded_randn(gen, b, h, dv), torch.rand(b, h, generator=gen, dtype=torch.float64))),
        Case("float32, non-contiguous state", (seeded_randn(gen, b, h, dv, dk, dtype=torch.float32).transpose(-1, -2),
                                               unit(b, h, dk).float(), seeded_randn(gen, b, h, dv, dtype=torch.float32),
                                               torch.rand(b, h, generator=gen))),
    ]
    return cases


def check_delta_rule_step(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check ``fn(state, k, v, beta) -> new_state`` against :func:`delta_rule_step`."""
    return check_function(
        fn, delta_rule_step, _delta_cases(), exercise="delta_rule_step", atol=1e-6, rtol=1e-5,
        diagnose=_DELTA_MISTAKES, reveal=reveal,
        hint="the delta rule writes a correction, not v itself: what does the memory return for k before the "
        "write? β has shape (B, H). Tiered hints are above the exercise.",
        recipe="read = Sᵀ k = (k[..., :, None] * S).sum(-2) (a D_v vector); S' = S + β k (v − read)ᵀ, with "
        "β[..., None, None].",
    )
