"""Chapter 08, exercises: the checkers for the masking process, the weighted loss, the transfer schedule and
low-confidence remasking.

Each checker runs the learner's function on seeded cases against the reference in
:mod:`labsupport.diffusion.process` / :mod:`labsupport.diffusion.sampling` and prints one line (pass, not done
yet) or a short explanation. Each is built to reject the tempting shortcut:

* ``mask_tokens`` — masking with probability ``1 − t`` instead of ``t``, one ``t`` for the whole batch, or
  writing ``[MASK]`` into the caller's tensor in place;
* ``diffusion_loss`` — the plain mean cross-entropy over masked tokens (no ``1/t``: not a bound), dividing by
  the number of masked tokens instead of the length, or scoring the unmasked positions too; gradients checked;
* ``transfer_schedule`` — the remainder given to the last steps, float counts, or counts that do not add up;
* ``low_confidence_commit`` — ranking confidence over *all* positions (which touches committed tokens), taking
  the least confident, or committing in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from labsupport.diffusion import process, sampling
from labsupport.harness.checking import Case, CheckResult, check_function

__all__ = [
    "check_diffusion_loss",
    "check_low_confidence_commit",
    "check_mask_tokens",
    "check_transfer_schedule",
    "reference_diffusion_loss",
    "reference_low_confidence_commit",
]


def _refuse_in_place(fn: Callable[..., Any], argnum: int, what: str) -> Callable[..., Any]:
    def wrapped(*args: Any) -> Any:
        before = args[argnum].clone() if isinstance(args[argnum], torch.Tensor) else None
        result = fn(*args)
        if before is not None and not torch.equal(before, args[argnum]):
            raise ValueError(f"{what} was modified in place; return a new tensor and leave the input as it was")
        return result
    wrapped.__name__ = getattr(fn, "__name__", "learner_function")
    wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapped


def check_mask_tokens(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(tokens (B, L), mask_prob (B,), mask_id, uniform (B, L)) -> (noisy, masked)``."""
    gen = torch.Generator().manual_seed(801)

    def case(name: str, b: int, length: int, vocab: int, probs: list[float] | None = None) -> Case:
        tokens = torch.randint(0, vocab, (b, length), generator=gen)
        mask_prob = torch.tensor(probs) if probs is not None else torch.rand(b, generator=gen)
        return Case(name, (tokens, mask_prob.float(), vocab, torch.rand(b, length, generator=gen)))

    cases = [
        case("B=2, L=8, t = 0.25 and 0.75 (a different t per sequence)", 2, 8, 5, [0.25, 0.75]),
        case("B=4, L=16, random t", 4, 16, 10),
        case("t = 1: everything masked; t tiny: almost nothing", 2, 12, 7, [1.0, 0.01]),
        case("B=3, L=32, vocab 76 (the corpus)", 3, 32, 76),
    ]
    if not callable(fn):
        return check_function(fn, process.mask_tokens, cases, exercise="mask_tokens")
    return check_function(
        _refuse_in_place(fn, 0, "tokens"), process.mask_tokens, cases, exercise="mask_tokens",
        output_names=("noisy", "masked"),
        hint="masked = uniform < mask_prob[:, None] (each sequence its own t); noisy = tokens with mask_id "
             "where masked — build a new tensor (torch.where or masked_fill), do not write into tokens.",
    )


def reference_diffusion_loss(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor,
                             t: torch.Tensor) -> torch.Tensor:
    """The linear-schedule loss: ``mean_b [(1/t_b) Σ_{i masked} CE_bi] / L``."""
    return process.masked_diffusion_loss(logits, tokens, masked, 1.0 / t).to(logits.dtype)


def check_diffusion_loss(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(logits (B, L, V), tokens (B, L), masked (B, L) bool, t (B,)) -> scalar`` and its gradient."""
    gen = torch.Generator().manual_seed(802)

    def case(name: str, b: int, length: int, vocab: int, t: list[float] | None = None) -> Case:
        logits = torch.randn(b, length, vocab, generator=gen, dtype=torch.float64)
        tokens = torch.randint(0, vocab, (b, length), generator=gen)
        times = torch.tensor(t, dtype=torch.float64) if t is not None else 0.05 + 0.95 * torch.rand(
            b, generator=gen, dtype=torch.float64)
        masked = torch.rand(b, length, generator=gen, dtype=torch.float64) < times[:, None]
        masked[:, 0] = True  # at least one masked position per sequence
        return Case(name, (logits, tokens, masked, times), grad_argnums=(0,))

    cases = [
        case("B=2, L=6, V=5, t = 0.2 and 0.9 (weights 5 and 1.1)", 2, 6, 5, [0.2, 0.9]),
        case("B=4, L=16, V=11, random t", 4, 16, 11),
        case("B=3, L=8, V=76, small t (few masks, large weight)", 3, 8, 76, [0.1, 0.15, 0.3]),
        case("B=1, L=10, V=4, t = 1 (everything masked)", 1, 10, 4, [1.0]),
    ]
    return check_function(
        fn, reference_diffusion_loss, cases, exercise="diffusion_loss", atol=1e-9, rtol=1e-7,
        hint="cross-entropy per position (reduction='none'), zero where not masked, summed over each sequence, "
             "divided by that sequence's t, averaged over the batch, then divided by L (not by the mask count).",
    )


def check_transfer_schedule(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(n_masked, steps) -> (steps,) int64``: equal shares, the remainder to the first steps."""
    cases = [
        Case("32 tokens in 8 steps (4 each)", (32, 8)),
        Case("10 tokens in 4 steps (remainder 2 goes first)", (10, 4)),
        Case("3 tokens in 5 steps (more steps than tokens)", (3, 5)),
        Case("0 tokens in 3 steps", (0, 3)),
        Case("17 tokens in 1 step", (17, 1)),
        Case("127 tokens in 16 steps", (127, 16)),
    ]
    return check_function(
        fn, sampling.transfer_schedule, cases, exercise="transfer_schedule",
        hint="divmod(n_masked, steps) gives the share and the remainder; the first `remainder` steps take one "
             "more. Return an int64 tensor.",
    )


def reference_low_confidence_commit(canvas: torch.Tensor, logits: torch.Tensor, mask_id: int, k: int
                                    ) -> torch.Tensor:
    """Fill, per row, the ``k`` masked positions whose top prediction is most probable, with that prediction."""
    probs = logits.softmax(dim=-1)
    confidence, predicted = probs.max(dim=-1)
    counts = torch.full((canvas.shape[0],), k, dtype=torch.long)
    new, _ = sampling.commit_tokens(canvas, predicted, confidence, counts, torch.ones_like(canvas, dtype=torch.bool),
                                    mask_id)
    return new


def check_low_confidence_commit(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(canvas (B, L), logits (B, L, V), mask_id, k) -> new canvas``.

    The logits of the unmasked positions are random on purpose (and often the most confident): a committed
    token must never change, and only masked positions compete for the ``k`` slots.
    """
    gen = torch.Generator().manual_seed(803)

    def case(name: str, b: int, length: int, vocab: int, k: int, masked_share: float = 0.5) -> Case:
        mask_id = vocab  # the logits have vocab + 1 columns, the last one [MASK] (never predicted)
        canvas = torch.randint(0, vocab, (b, length), generator=gen)
        masked = torch.rand(b, length, generator=gen) < masked_share
        masked[:, -1] = True
        canvas = canvas.masked_fill(masked, mask_id)
        logits = 3 * torch.randn(b, length, vocab + 1, generator=gen, dtype=torch.float64)
        logits[..., mask_id] = float("-inf")
        logits[~masked] += 4.0 * torch.nn.functional.one_hot(torch.randint(0, vocab, (int((~masked).sum()),),
                                                                          generator=gen), vocab + 1)
        return Case(name, (canvas, logits, mask_id, k))

    cases = [
        case("B=1, L=8, V=5, k=1", 1, 8, 5, 1),
        case("B=3, L=16, V=7, k=2; unmasked positions very confident", 3, 16, 7, 2),
        case("B=2, L=12, V=10, k=3, few masks", 2, 12, 10, 3, 0.3),
        case("B=2, L=10, V=4, k=20 (more than the masks: commit them all)", 2, 10, 4, 20),
        case("B=4, L=32, V=76, k=4", 4, 32, 76, 4),
    ]
    if not callable(fn):
        return check_function(fn, reference_low_confidence_commit, cases, exercise="low_confidence_commit")
    return check_function(
        _refuse_in_place(fn, 0, "canvas"), reference_low_confidence_commit, cases,
        exercise="low_confidence_commit",
        hint="confidence = the largest softmax probability at each position; give every position that is NOT "
             "masked confidence −inf before ranking, keep the k highest per row, fill them with their argmax, "
             "and return a new canvas.",
    )
