"""Chapter 02's core exercises: the checkers of the two ideas of the chapter done by the learner.

* :func:`check_mean_pool_kv` — the GQA paper's conversion of a multi-head checkpoint: average the
  key and value projections of each group of heads, working on the weight matrix as ``nn.Linear``
  stores it.
* :func:`check_absorbed_mla_decode_step` — one MLA decode step in the absorbed form, attending over
  the latent cache without ever building per-head keys or values. After the values, it measures the
  work per cached token with the harness's work guards (:mod:`labsupport.harness.guards`: FLOPs of
  matrix products plus elements written, and the largest tensor), so the naive form — up-projecting
  the whole cache at every step, by matrix products or by a broadcast multiply-and-sum, which give
  the same numbers — is refused.

The reference solutions live in the private :mod:`labsupport.grouped._solutions`, out of the
notebook's ``ga`` namespace. Hints come in tiers in the notebook; a failed check prints a pointer
to them, and the recipe only when asked (``reveal=True``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from labsupport.grouped import _solutions
from labsupport.grouped.reference import latent_attention_core
from labsupport.harness.checking import STRICT_ENV_VAR, Case, CheckResult, check_function
from labsupport.harness.guards import LargestTensorRecorder, WorkCounter, refuse_calls, run_guarded

__all__ = ["check_absorbed_mla_decode_step", "check_mean_pool_kv"]


# ----------------------------------------------------------------------------- mean-pool conversion


def _mean_pool_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(21)

    def weight(old: int, head_dim: int, d_model: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(2 * old * head_dim, d_model, generator=gen).to(dtype)

    return [
        Case("4 KV heads -> 2 (head_dim 3, d_model 5)", (weight(4, 3, 5), 3, 2)),
        Case("4 KV heads -> 1 (MQA)", (weight(4, 2, 6), 2, 1)),
        Case("8 KV heads -> 2: groups of 4 consecutive heads", (weight(8, 2, 4), 2, 2)),
        Case("6 KV heads -> 3: groups of 2", (weight(6, 4, 3), 4, 3)),
        Case("unchanged: 3 KV heads -> 3", (weight(3, 2, 5), 2, 3)),
        Case("float64, 4 -> 2", (weight(4, 5, 7, torch.float64), 5, 2)),
        Case("a weight stored transposed in memory (non-contiguous)",
             (torch.randn(6, 2 * 4 * 2, generator=gen).t(), 2, 2)),
    ]


def check_mean_pool_kv(fn: Callable[..., torch.Tensor], reveal: bool = False) -> CheckResult:
    """Check ``mean_pool_kv(kv_weight, head_dim, n_kv_heads)`` against the private reference solution."""
    return check_function(
        fn, _solutions.mean_pool_kv, _mean_pool_cases(), exercise="mean-pool conversion to GQA", atol=1e-6, rtol=1e-5,
        reveal=reveal,
        hint="give the rows their meaning first (keys or values, which KV head, which row of the head), then "
             "decide which old heads form one new head. Tiered hints are above the exercise.",
        recipe="view kv_weight as (2, G, head_dim, d_model); view G as (G', G // G'); mean over the G // G' axis "
               "(consecutive heads); reshape back to (2 · G' · head_dim, d_model).",
    )


# ----------------------------------------------------------------------------- absorbed MLA decode step


def _mla_step_args(gen: torch.Generator, b: int, h: int, t: int, d_h: int, d_c: int, d_r: int,
                   dtype: torch.dtype = torch.float32) -> tuple:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return (randn(b, h, 1, d_h), randn(b, h, 1, d_r), randn(b, 1, t, d_c + d_r), randn(h, d_c, d_h) / 2,
            randn(h, d_c, d_h) / 2, 1.0 / math.sqrt(d_h + d_r))


def _mla_step_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(22)
    wide = _mla_step_args(gen, 1, 2, 5, 4, 6, 2)
    return [
        Case("B=1, 2 heads, 5 cached tokens, d_h=4, d_c=6, d_R=2", _mla_step_args(gen, 1, 2, 5, 4, 6, 2)),
        Case("B=2, 4 heads, 9 cached tokens, a latent narrower than the heads (d_c=3, d_h=8)",
             _mla_step_args(gen, 2, 4, 9, 8, 3, 4)),
        Case("one cached token (the newest)", _mla_step_args(gen, 1, 3, 1, 4, 5, 2)),
        Case("large scores (queries × 20)", (wide[0] * 20, wide[1] * 20, *wide[2:])),
        Case("float64, 3 heads, 12 cached tokens", _mla_step_args(gen, 2, 3, 12, 4, 6, 2, torch.float64)),
        Case("a cache that is a view into a longer buffer (non-contiguous)",
             (*_mla_step_args(gen, 1, 2, 7, 4, 6, 2)[:2], torch.randn(1, 1, 16, 8, generator=gen)[:, :, 3:10],
              *_mla_step_args(gen, 1, 2, 7, 4, 6, 2)[3:])),
    ]


def _fail(exercise: str, message: str) -> CheckResult:
    print(message)
    if os.environ.get(STRICT_ENV_VAR, "") == "1":
        raise AssertionError(message)
    return CheckResult(exercise, "failed", message)


def _refuse_library(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` with the library's absorbed attention (``ga.latent_attention_core``) refused inside it."""
    return refuse_calls(fn, {latent_attention_core: "ga.latent_attention_core is the library's absorbed "
                                                    "attention: the exercise is to write it"})


#: The size of the work check: a cache of 512 tokens, 4 heads of 64, a latent of 8 and a RoPE part of 4.
_WORK_B, _WORK_H, _WORK_T, _WORK_DH, _WORK_DC, _WORK_DR = 1, 4, 512, 64, 8, 4


def absorbed_mla_work(fn: Callable[..., torch.Tensor]) -> tuple[float, int] | None:
    """(work per cached token, largest tensor's elements) of ``fn`` on the work check's case; None if it raised.

    Work is :class:`~labsupport.harness.guards.WorkCounter`'s: multiply-add FLOPs of matrix products plus the
    elements every other operation writes, so a broadcast multiply-and-sum counts as much as the product it
    replaces.
    """
    args = _mla_step_args(torch.Generator().manual_seed(23), _WORK_B, _WORK_H, _WORK_T, _WORK_DH, _WORK_DC, _WORK_DR)
    work, largest = WorkCounter(), LargestTensorRecorder()
    if not run_guarded(fn, args, work, largest):
        return None
    return work.work / _WORK_T, largest.largest_elements


def check_absorbed_mla_decode_step(fn: Callable[..., torch.Tensor], reveal: bool = False) -> CheckResult:
    """Check ``absorbed_mla_decode_step(q_c, q_r, cache, w_uk, w_uv, scale)``: values, then the work per token.

    After the values match, the learner's step runs on a cache of ``T`` = 512 tokens with ``H`` = 4 heads of
    ``d_h`` = 64, a latent of ``d_c`` = 8 and a RoPE part of 4, inside two work guards. Up-projecting the cache
    costs ``2 · 2 · H · d_c · d_h`` = 8,192 FLOPs per cached token as matrix products, or 4,096 written elements as
    a broadcast multiply (and a sum); the absorbed form needs a few hundred. An answer whose work per cached
    token is above ``H · d_c · d_h / 2`` = 1,024, or that creates a tensor of ``T · H · d_h / 2`` elements or
    more (half of one up-projected key or value tensor), is refused, with its numbers in the message. The
    library's ``latent_attention_core`` is refused too.
    """
    exercise = "absorbed MLA decode step"
    result = check_function(_refuse_library(fn), _solutions.absorbed_mla_decode_step, _mla_step_cases(),
                            exercise=exercise, atol=1e-5, rtol=1e-4, quiet=True, reveal=reveal,
                            hint="the cache is read as it is, never up-projected: ask where each of W_UK and W_UV "
                                 "can move instead. Tiered hints are above the exercise.",
                            recipe="q_latent = q_c @ w_ukᵀ (B, H, 1, d_c); scores = scale · ([q_latent, q_r] · "
                                   "cache rows) over the T cached rows, no up-projection; p = softmax over T; "
                                   "return (p @ cache[..., :d_c]) @ w_uv.",
                            checker="check_absorbed_mla_decode_step")
    if not result.passed:
        print(result.message)
        return result
    measured = absorbed_mla_work(fn)
    h, t, d_h, d_c = _WORK_H, _WORK_T, _WORK_DH, _WORK_DC
    per_token, largest = measured if measured is not None else (0.0, 0)
    work_cap, size_cap = h * d_c * d_h // 2, t * h * d_h // 2
    if per_token > work_cap or largest >= size_cap:
        found = []
        if per_token > work_cap:
            found.append(f"did {per_token:,.0f} units of work per cached token (multiply-add FLOPs of matrix "
                         f"products plus elements written by everything else; at most {work_cap:,} allowed)")
        if largest >= size_cap:
            found.append(f"created a tensor of {largest:,} elements (the limit is below {size_cap:,}: half of "
                         f"T × H × d_h, one up-projected key or value tensor)")
        return _fail(exercise,
                     f"❌ {exercise}: the values are right, but on a cache of {t} tokens ({h} heads of {d_h}, "
                     f"d_c={d_c}, d_R={_WORK_DR}) your step " + " and ".join(found) + ". Up-projecting the cache "
                     f"costs {2 * 2 * h * d_c * d_h:,} FLOPs per cached token as matrix products "
                     f"({2 * h * d_c * d_h:,} written elements as a broadcast multiply); the absorbed form a few hundred.\n   hint    "
                     "nothing of size T × H × d_h should be built, by matrix products or by broadcasting: move "
                     "W_UK onto the query and W_UV after the attention, so the cache is only read.")
    message = (f"✅ {exercise}: passed {result.cases_total} cases, and read the cache without up-projecting it "
               f"({per_token:,.0f} units of work per cached token; up-projecting needs {2 * 2 * h * d_c * d_h:,}).")
    print(message)
    return CheckResult(exercise, "passed", message, result.cases_total, result.cases_total)
