"""Chapter 08, exercises: the checkers for the masking process, the weighted loss, the transfer schedule,
low-confidence remasking, Fast-dLLM's threshold commit and the exact AR answer to a one-character gap.

Each checker runs the learner's function on seeded cases against the reference in
:mod:`labsupport.diffusion.process` / :mod:`labsupport.diffusion.sampling` and prints one line (pass, not done
yet) or a short explanation. Each is built to reject the tempting shortcut:

* ``mask_tokens`` — masking with probability ``1 − t`` instead of ``t``, one ``t`` for the whole batch, or
  writing ``[MASK]`` into the caller's tensor in place (the engine compares every input before and after);
* ``diffusion_loss`` — the plain mean cross-entropy over masked tokens (no ``1/t``: not a bound), dividing by
  the number of masked tokens instead of the length, or scoring the unmasked positions too; gradients checked;
* ``transfer_schedule`` — the remainder given to the last steps, float counts, or counts that do not add up;
* ``low_confidence_commit`` — ranking confidence over *all* positions (which touches committed tokens), taking
  the least confident, or committing in place;
* ``threshold_commit`` — a strict ``>`` where the rule is ``≥``, a step that commits nothing when no prediction
  clears the threshold (the sampler would loop for ever), or commits outside the masks;
* ``gap_log_posterior`` — ``p(c | left)`` alone (the right side ignored), scoring only the gap's own token, or
  forgetting to normalise over the candidates;
* ``speculative_verify`` — accepting whenever the target likes the draft at least as much (``p ≥ q``, no
  uniform: greedy, not the target's distribution), redrawing a rejected token from ``p`` instead of the residual
  ``max(p − q, 0)``, forgetting to normalise the residual, counting accepted tokens after the first rejection, or
  giving the bonus from the wrong row.

Where a rule can tell, a failure names the mistake this answer made (``found``, from the wrong answers written
out below as functions); the ``hint`` points at the notebook's tiered hints; the full recipe is printed only when
the learner asks for it, e.g. ``check_diffusion_loss(diffusion_loss, reveal=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from labsupport.diffusion import evaluation, process, sampling, speculative
from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.diagnosis import known_mistakes
from labsupport.lm.model import TinyLM

__all__ = [
    "check_diffusion_loss",
    "check_gap_log_posterior",
    "check_low_confidence_commit",
    "check_mask_tokens",
    "check_speculative_verify",
    "check_threshold_commit",
    "check_transfer_schedule",
    "reference_diffusion_loss",
    "reference_low_confidence_commit",
    "reference_threshold_commit",
]


def _ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy, ``(B, L)``."""
    flat = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                                             reduction="none")
    return flat.view_as(tokens)


# The usual wrong answers, written out so a failure can say which one this answer is.

def _mask_with_one_minus_t(tokens: torch.Tensor, mask_prob: torch.Tensor, mask_id: int, uniform: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    masked = uniform >= mask_prob[:, None]
    return tokens.masked_fill(masked, mask_id), masked


def _mask_with_one_t(tokens: torch.Tensor, mask_prob: torch.Tensor, mask_id: int, uniform: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    masked = uniform < mask_prob[0]
    return tokens.masked_fill(masked, mask_id), masked


_MASK_MISTAKES = [
    known_mistakes({"your mask keeps a share 1 − t of the tokens and masks the rest: the roles of t and 1 − t are "
                    "swapped": _mask_with_one_minus_t,
                    "every sequence in your batch is masked with the first sequence's t": _mask_with_one_t},
                   output=1),
]


def _loss_plain_mean(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, t: torch.Tensor
                     ) -> torch.Tensor:
    return (_ce(logits, tokens) * masked).sum() / masked.sum()


def _loss_plain_mean_per_sequence(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor,
                                  t: torch.Tensor) -> torch.Tensor:
    return ((_ce(logits, tokens) * masked).sum(1) / masked.sum(1)).mean()


def _loss_by_mask_count(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, t: torch.Tensor
                        ) -> torch.Tensor:
    return ((_ce(logits, tokens) * masked).sum(1) / t / masked.sum(1)).mean()


def _loss_every_position(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, t: torch.Tensor
                         ) -> torch.Tensor:
    return (_ce(logits, tokens).sum(1) / t).mean() / tokens.shape[1]


def _loss_times_t(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, t: torch.Tensor
                  ) -> torch.Tensor:
    return ((_ce(logits, tokens) * masked).sum(1) * t).mean() / tokens.shape[1]


_LOSS_MISTAKES = [
    known_mistakes({
        "your loss is the plain mean cross-entropy over the masked tokens, with no 1/t weight: a masked-LM loss, "
        "not a bound on the negative log-likelihood": _loss_plain_mean,
        "your loss averages each sequence's masked cross-entropy and leaves out the 1/t weight":
            _loss_plain_mean_per_sequence,
        "you divide each sequence's weighted sum by its number of masked tokens, not by the sequence length L":
            _loss_by_mask_count,
        "your loss scores the unmasked positions too (they carry no loss: the model sees them)":
            _loss_every_position,
        "your weight multiplies by t where it should divide by it": _loss_times_t,
    }, atol=1e-9, rtol=1e-7),
]


def _schedule_remainder_last(n_masked: int, steps: int) -> torch.Tensor:
    return sampling.transfer_schedule(n_masked, steps).flip(0)


def _schedule_floor_only(n_masked: int, steps: int) -> torch.Tensor:
    return torch.full((steps,), n_masked // steps, dtype=torch.long)


_SCHEDULE_MISTAKES = [
    known_mistakes({"your schedule gives the remainder to the last steps instead of the first":
                    _schedule_remainder_last,
                    "your counts drop the remainder: they add up to less than n_masked, so some masks are never "
                    "committed": _schedule_floor_only}),
]


def _commit_over_all_positions(canvas: torch.Tensor, logits: torch.Tensor, mask_id: int, k: int) -> torch.Tensor:
    """Ranks every position, committed ones included, and writes the prediction at the k surest."""
    confidence, predicted = logits.softmax(dim=-1).max(dim=-1)
    top = confidence.topk(min(k, canvas.shape[1]), dim=1).indices
    return canvas.scatter(1, top, predicted.gather(1, top))


def _commit_masked_among_all(canvas: torch.Tensor, logits: torch.Tensor, mask_id: int, k: int) -> torch.Tensor:
    """Ranks every position, then fills only those of the k surest that are masked (fewer than k commits)."""
    confidence, predicted = logits.softmax(dim=-1).max(dim=-1)
    top = confidence.topk(min(k, canvas.shape[1]), dim=1).indices
    chosen = torch.zeros_like(canvas, dtype=torch.bool).scatter(1, top, True) & (canvas == mask_id)
    return torch.where(chosen, predicted, canvas)


def _commit_least_confident(canvas: torch.Tensor, logits: torch.Tensor, mask_id: int, k: int) -> torch.Tensor:
    confidence, predicted = logits.softmax(dim=-1).max(dim=-1)
    counts = torch.full((canvas.shape[0],), k, dtype=torch.long)
    new, _ = sampling.commit_tokens(canvas, predicted, -confidence, counts,
                                    torch.ones_like(canvas, dtype=torch.bool), mask_id)
    return new


_COMMIT_MISTAKES = [
    known_mistakes({
        "your step ranks every position, already-committed ones included, and overwrote committed tokens with "
        "the model's guess": _commit_over_all_positions,
        "your step ranks every position, already-committed ones included: the committed positions took slots, "
        "so fewer than k masks were filled": _commit_masked_among_all,
        "your step filled the k LEAST confident masked positions": _commit_least_confident,
    }),
]


def _threshold_no_progress(canvas: torch.Tensor, probs: torch.Tensor, mask_id: int, threshold: float
                           ) -> torch.Tensor:
    confidence, predicted = probs.max(dim=-1)
    return torch.where((canvas == mask_id) & (confidence >= threshold), predicted, canvas)


def _threshold_everywhere(canvas: torch.Tensor, probs: torch.Tensor, mask_id: int, threshold: float
                          ) -> torch.Tensor:
    confidence, predicted = probs.max(dim=-1)
    return torch.where(confidence >= threshold, predicted, canvas)


_THRESHOLD_MISTAKES = [
    known_mistakes({
        "a row where no prediction clears the threshold commits nothing in your step: the sampler would never "
        "finish": _threshold_no_progress,
        "your step commits over tokens that were already there, not only at the masks": _threshold_everywhere,
    }),
]


def _gap_left_only(model: TinyLM, tokens: torch.Tensor, position: int) -> torch.Tensor:
    return model(tokens[:, :position]).double()[:, -1].log_softmax(-1)


_GAP_MISTAKES = [
    known_mistakes({"your answer is p(c | left) alone: the characters right of the gap are ignored":
                    _gap_left_only}, atol=1e-8, rtol=1e-6),
]


def check_mask_tokens(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
    return check_function(
        fn, process.mask_tokens, cases, exercise="mask_tokens", output_names=("noisy", "masked"),
        diagnose=_MASK_MISTAKES, reveal=reveal,
        hint="compare the share of masked positions with t: is it t or 1 − t, and does each sequence use its own "
             "t? Return new tensors and leave tokens unchanged. Tiered hints are above the exercise.",
        recipe="masked = uniform < mask_prob[:, None] (one t per row, broadcast along the sequence); "
               "noisy = tokens.masked_fill(masked, mask_id), a new tensor; return (noisy, masked).",
    )


def reference_diffusion_loss(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor,
                             t: torch.Tensor) -> torch.Tensor:
    """The linear-schedule loss: ``mean_b [(1/t_b) Σ_{i masked} CE_bi] / L``."""
    return process.masked_diffusion_loss(logits, tokens, masked, 1.0 / t).to(logits.dtype)


def check_diffusion_loss(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        diagnose=_LOSS_MISTAKES, reveal=reveal,
        hint="the usual slips are the weight (see Hint 1 above the exercise: why a masked token counts more when "
             "t is small) and what you divide by (the answer is nats per position of the sequence); unmasked "
             "positions carry no loss. Tiered hints are above the exercise.",
        recipe="ce = F.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1), reduction='none').view(B, L); "
               "per sequence (ce * masked).sum(1) / t; then .mean() over the batch and / L.",
    )


def check_transfer_schedule(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        diagnose=_SCHEDULE_MISTAKES, reveal=reveal,
        hint="the counts must add up to n_masked, differ by at most one, and put the larger ones first; the "
             "answer is an int64 tensor. Tiered hints are above the exercise.",
        recipe="base, extra = divmod(n_masked, steps); counts = torch.full((steps,), base, dtype=torch.long); "
               "counts[:extra] += 1.",
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


def check_low_confidence_commit(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        return Case(name, (canvas, logits, mask_id, k), notes={"logits": f"V = {vocab} + [MASK]"})

    cases = [
        case("B=1, L=8, V=5, k=1", 1, 8, 5, 1),
        case("B=3, L=16, V=7, k=2; unmasked positions very confident", 3, 16, 7, 2),
        case("B=2, L=12, V=10, k=3, few masks", 2, 12, 10, 3, 0.3),
        case("B=2, L=10, V=4, k=20 (more than the masks: commit them all)", 2, 10, 4, 20),
        case("B=4, L=32, V=76, k=4", 4, 32, 76, 4),
    ]
    return check_function(
        fn, reference_low_confidence_commit, cases, exercise="low_confidence_commit",
        diagnose=_COMMIT_MISTAKES, reveal=reveal,
        hint="only masked positions compete for the k slots, the surest win, and a committed token never changes "
             "(see Hint 1 above the exercise); return a new canvas and leave the one you were given as it was. "
             "Tiered hints are above the exercise.",
        recipe="confidence, guess = logits.softmax(-1).max(-1); set confidence to −inf where canvas != mask_id; "
               "topk(min(k, L)) per row; scatter True into a bool (B, L) tensor and & it with canvas == mask_id; "
               "return torch.where(chosen, guess, canvas).",
    )


def reference_threshold_commit(canvas: torch.Tensor, probs: torch.Tensor, mask_id: int, threshold: float
                               ) -> torch.Tensor:
    """Fast-dLLM's step: commit every masked argmax with probability ≥ ``threshold``, and at least the surest."""
    confidence, predicted = probs.max(dim=-1)
    still = canvas == mask_id
    above = ((confidence >= threshold) & still).sum(dim=1)
    counts = torch.where(still.any(dim=1), above.clamp(min=1), torch.zeros_like(above))
    new, _ = sampling.commit_tokens(canvas, predicted, confidence, counts, torch.ones_like(still), mask_id)
    return new


def check_threshold_commit(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(canvas (B, L), probs (B, L, V), mask_id, threshold) -> new canvas`` (Fast-dLLM's commit rule)."""
    gen = torch.Generator().manual_seed(804)

    def case(name: str, b: int, length: int, vocab: int, threshold: float, sharp: float = 3.0,
             masked_share: float = 0.6, exact_at: bool = False) -> Case:
        mask_id = vocab
        canvas = torch.randint(0, vocab, (b, length), generator=gen)
        masked = torch.rand(b, length, generator=gen) < masked_share
        masked[:, 0] = True
        canvas = canvas.masked_fill(masked, mask_id)
        logits = sharp * torch.randn(b, length, vocab + 1, generator=gen, dtype=torch.float64)
        logits[..., mask_id] = float("-inf")
        probs = logits.softmax(dim=-1)
        if exact_at:  # one masked position sits exactly on the threshold: the rule is ≥
            top = probs[0, 0].argmax()
            probs[0, 0] = (1 - threshold) / (vocab - 1)
            probs[0, 0, mask_id] = 0.0
            probs[0, 0, top] = threshold
        return Case(name, (canvas, probs, mask_id, threshold), notes={"probs": f"V = {vocab} + [MASK]"})

    cases = [
        case("B=2, L=12, V=5, threshold 0.9", 2, 12, 5, 0.9, sharp=4.0),
        case("B=3, L=16, V=7, threshold 0.5", 3, 16, 7, 0.5),
        case("threshold 0.99, flat predictions: nothing clears it (commit the surest anyway)", 2, 10, 6, 0.99,
             sharp=0.3),
        case("a prediction exactly at the threshold 0.75", 1, 8, 4, 0.75, exact_at=True),
        case("B=4, L=32, V=76, threshold 0.3, few masks", 4, 32, 76, 0.3, sharp=5.0, masked_share=0.2),
    ]
    return check_function(
        fn, reference_threshold_commit, cases, exercise="threshold_commit",
        diagnose=_THRESHOLD_MISTAKES, reveal=reveal,
        recipe="counts = ((conf >= threshold) & is_mask).sum(1), raised to 1 where is_mask.any(1); rank the masked "
               "positions by conf (others at −inf) and commit the first counts[b] of row b with their argmax.",
        hint="check three things: a row where no prediction clears the threshold must still make progress; a "
             "prediction exactly at the threshold counts; only masked positions may change. Tiered hints are above "
             "the exercise.",
    )


def _tiny_ar(seed: int, vocab: int, d_model: int = 16, max_len: int = 16) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM(vocab, d_model, 1, max_len, n_heads=2).double().eval()
    with torch.no_grad():
        model.head.weight.mul_(8.0)  # sharper than at initialisation, so the right side matters
    return model


def _reference_gap(model: TinyLM, tokens: torch.Tensor, position: int) -> torch.Tensor:
    return evaluation.ar_gap_log_posterior(model, tokens, position)


def check_gap_log_posterior(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(model, tokens (B, L), position) -> (B, V) float64 log p(c | left, right)`` for a 1-char gap."""
    gen = torch.Generator().manual_seed(805)

    def case(name: str, seed: int, b: int, length: int, vocab: int, position: int) -> Case:
        tokens = torch.randint(0, vocab, (b, length), generator=gen)
        return Case(name, (_tiny_ar(seed, vocab), tokens, position))

    cases = [
        case("B=2, L=8, V=5, gap at 3", 1, 2, 8, 5, 3),
        case("B=3, L=12, V=7, gap at 1 (one character of left context)", 2, 3, 12, 7, 1),
        case("B=1, L=10, V=4, gap at 8 (one character on the right)", 3, 1, 10, 4, 8),
        case("B=2, L=16, V=11, gap at 7", 4, 2, 16, 11, 7),
    ]
    return check_function(
        fn, _reference_gap, cases, exercise="gap_log_posterior", atol=1e-8, rtol=1e-6,
        diagnose=_GAP_MISTAKES, reveal=reveal,
        recipe="rows = tokens.repeat_interleave(V, 0); rows[:, position] = arange(V).repeat(B); lp = model(rows[:, "
               ":-1]).double().log_softmax(-1).gather(-1, rows[:, 1:, None])[..., 0]; "
               "lp[:, position - 1:].sum(1).view(B, V).log_softmax(-1).",
        hint="compare your answer with p(c | left) alone: if they agree, the right side is missing; every "
             "character after the gap depends on c, not only the next one; and each row must be a normalised "
             "log-distribution over the V candidates. Tiered hints are above the exercise.",
    )


# Speculative decoding's acceptance rule (the AR side's answer to parallel decoding).

def _verify_greedy_accept(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, u: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(drafted.shape[0])
    ok = p[rows, drafted] >= q[rows, drafted]
    return _verify_with(p, q, ok, residual=True)


def _verify_redraw_from_p(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, u: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(drafted.shape[0])
    return _verify_with(p, q, u * q[rows, drafted] < p[rows, drafted], residual=False)


def _verify_unnormalised(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, u: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    n, probs = speculative.verify_draft(p, q, drafted, u)
    if int(n) < drafted.shape[0]:
        probs = (p[int(n)] - q[int(n)]).clamp(min=0)
    return n, probs


def _verify_count_all(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, u: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(drafted.shape[0])
    ok = u * q[rows, drafted] < p[rows, drafted]
    n_ref, probs = speculative.verify_draft(p, q, drafted, u)
    return ok.sum(), probs


def _verify_bonus_last_draft_row(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, u: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    n, probs = speculative.verify_draft(p, q, drafted, u)
    if int(n) == drafted.shape[0]:
        probs = p[-2].clone()
    return n, probs


def _verify_with(p: torch.Tensor, q: torch.Tensor, ok: torch.Tensor, residual: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    bad = (~ok).nonzero()
    if bad.numel() == 0:
        return torch.tensor(ok.shape[0]), p[-1].clone()
    n = int(bad[0, 0])
    if not residual:
        return torch.tensor(n), p[n].clone()
    r = (p[n] - q[n]).clamp(min=0)
    return torch.tensor(n), r / r.sum()


_VERIFY_MISTAKES = [
    known_mistakes({
        "your rule accepts a drafted token whenever p ≥ q there and rejects it otherwise, without a uniform: "
        "a token the target likes less than the draft must still be kept with probability p/q":
            _verify_greedy_accept,
        "after a rejection your next token comes from p itself: that counts the tokens the draft already had its "
        "chance at twice (the replacement must come from what p has beyond q)": _verify_redraw_from_p,
        "your replacement distribution is the residual max(p − q, 0) but it does not sum to 1": _verify_unnormalised,
        "your count goes on after the first rejection: everything after a rejected token was drafted from a "
        "context the target did not keep": _verify_count_all,
        "when every draft is accepted your free token comes from the last drafted position's row, not from the "
        "row after it": _verify_bonus_last_draft_row,
    }, atol=1e-9, rtol=1e-7),
]


def check_speculative_verify(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(p (k+1, V), q (k, V), drafted (k,), u (k,)) -> (n_accepted, next_probs (V,))``.

    The cases cover: a draft accepted in full (the free token from the last row of ``p``), a rejection at the
    first, middle and last drafted token, a draft token the target likes less than the draft (kept only when
    ``u < p/q``), and identical ``p`` and ``q`` (always accepted).
    """
    gen = torch.Generator().manual_seed(806)

    def dist(rows: int, vocab: int, sharp: float) -> torch.Tensor:
        return (sharp * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)).softmax(dim=-1)

    def case(name: str, k: int, vocab: int, u_values: list[float] | None = None, same: bool = False,
             sharp: float = 2.0) -> Case:
        q = dist(k, vocab, sharp)
        p = dist(k + 1, vocab, sharp)
        if same:
            p[:k] = q
        drafted = torch.multinomial(q.float(), 1, generator=gen).squeeze(1)
        u = torch.tensor(u_values, dtype=torch.float64) if u_values is not None else torch.rand(
            k, generator=gen, dtype=torch.float64)
        return Case(name, (p, q, drafted, u), notes={"u": "one uniform per drafted token"})

    cases = [
        case("k=3, V=5, u = 0 everywhere (every draft accepted: the free token's row)", 3, 5, [0.0, 0.0, 0.0]),
        case("k=4, V=6, u near 1 (the first draft rejected unless p ≥ q there)", 4, 6, [0.999, 0.5, 0.5, 0.5]),
        case("k=4, V=8, random u", 4, 8),
        case("k=2, V=5, p = q at the drafted rows (always accepted)", 2, 5, same=True),
        case("k=5, V=11, random u, sharp distributions", 5, 11, sharp=4.0),
        case("k=1, V=4, u = 0.6", 1, 4, [0.6]),
        case("k=6, V=76 (the corpus), random u", 6, 76),
    ]
    return check_function(
        fn, speculative.verify_draft, cases, exercise="speculative_verify", atol=1e-9, rtol=1e-7,
        output_names=("n_accepted", "next_probs"), diagnose=_VERIFY_MISTAKES, reveal=reveal,
        hint="go through the drafted tokens in order and stop at the first rejection; a token is kept with a "
             "probability that depends on both p and q there (see Hint 1 above the exercise), and the next token's "
             "distribution is what p has that q did not already offer, or the free row after the draft. Tiered "
             "hints are above the exercise.",
        recipe="for i in range(k): x = drafted[i]; if u[i] < p[i, x] / q[i, x]: continue; else return "
               "(tensor(i), (p[i] − q[i]).clamp(min=0) normalised to sum 1). If none was rejected: "
               "(tensor(k), p[k]).",
    )
