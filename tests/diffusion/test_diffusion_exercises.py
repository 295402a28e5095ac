"""Chapter 08 checkers (labsupport.diffusion.exercises): they pass the references and explain wrong answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labsupport.diffusion import process, sampling
from labsupport.diffusion.exercises import (
    check_diffusion_loss,
    check_low_confidence_commit,
    check_mask_tokens,
    check_transfer_schedule,
    reference_diffusion_loss,
    reference_low_confidence_commit,
)


def run(checker, fn, capsys):
    result = checker(fn)
    out = capsys.readouterr().out
    assert "Traceback" not in out
    return result, out


def not_done(*args):
    raise NotImplementedError


def raises(*args):
    raise RuntimeError("boom")


def generic_wrong_answers(checker, capsys) -> None:
    result, out = run(checker, not_done, capsys)
    assert result.status == "not done" and "not done yet" in out
    result, out = run(checker, raises, capsys)
    assert not result and "RuntimeError: boom" in out
    result, out = run(checker, None, capsys)
    assert not result and "expected a function" in out
    result, out = run(checker, lambda *a: None, capsys)
    assert not result


# --------------------------------------------------------------------------- mask_tokens

def test_mask_tokens_checker(capsys) -> None:
    result, out = run(check_mask_tokens, process.mask_tokens, capsys)
    assert result and "passed" in out
    generic_wrong_answers(check_mask_tokens, capsys)

    def inverted(tokens, mask_prob, mask_id, uniform):  # masks with probability 1 - t
        masked = uniform >= mask_prob[:, None]
        return tokens.masked_fill(masked, mask_id), masked

    def one_t(tokens, mask_prob, mask_id, uniform):  # the first sequence's t for everyone
        masked = uniform < mask_prob[0]
        return tokens.masked_fill(masked, mask_id), masked

    def in_place(tokens, mask_prob, mask_id, uniform):
        masked = uniform < mask_prob[:, None]
        tokens[masked] = mask_id
        return tokens, masked

    def float_mask(tokens, mask_prob, mask_id, uniform):
        noisy, masked = process.mask_tokens(tokens, mask_prob, mask_id, uniform)
        return noisy, masked.float()

    def wrong_shape(tokens, mask_prob, mask_id, uniform):
        noisy, masked = process.mask_tokens(tokens, mask_prob, mask_id, uniform)
        return noisy[:, :-1], masked

    for wrong in (inverted, one_t, float_mask, wrong_shape):
        result, _ = run(check_mask_tokens, wrong, capsys)
        assert not result, wrong.__name__
    result, out = run(check_mask_tokens, in_place, capsys)
    assert not result and "in place" in out


# --------------------------------------------------------------------------- diffusion_loss

def ce(logits, tokens):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none").view_as(tokens)


def test_diffusion_loss_checker(capsys) -> None:
    result, out = run(check_diffusion_loss, reference_diffusion_loss, capsys)
    assert result and "passed" in out
    generic_wrong_answers(check_diffusion_loss, capsys)

    def unweighted(logits, tokens, masked, t):  # the plain masked-LM loss: not a bound
        return (ce(logits, tokens) * masked).sum() / masked.sum()

    def by_mask_count(logits, tokens, masked, t):
        return ((ce(logits, tokens) * masked).sum(1) / t / masked.sum(1)).mean()

    def every_position(logits, tokens, masked, t):
        return (ce(logits, tokens).sum(1) / t).mean() / tokens.shape[1]

    def times_t(logits, tokens, masked, t):
        return ((ce(logits, tokens) * masked).sum(1) * t).mean() / tokens.shape[1]

    def no_gradient(logits, tokens, masked, t):
        return reference_diffusion_loss(logits.detach(), tokens, masked, t)

    def nan_answer(logits, tokens, masked, t):
        return torch.tensor(float("nan"), dtype=logits.dtype)

    for wrong in (unweighted, by_mask_count, every_position, times_t, no_gradient, nan_answer):
        result, _ = run(check_diffusion_loss, wrong, capsys)
        assert not result, wrong.__name__


# --------------------------------------------------------------------------- transfer_schedule

def test_transfer_schedule_checker(capsys) -> None:
    result, out = run(check_transfer_schedule, sampling.transfer_schedule, capsys)
    assert result and "passed" in out
    generic_wrong_answers(check_transfer_schedule, capsys)

    def remainder_last(n, steps):
        return sampling.transfer_schedule(n, steps).flip(0)

    def floats(n, steps):
        return sampling.transfer_schedule(n, steps).double()

    def floor_only(n, steps):  # drops the remainder: some masks never get committed
        return torch.full((steps,), n // steps, dtype=torch.long)

    def as_list(n, steps):
        return sampling.transfer_schedule(n, steps).tolist()

    for wrong in (remainder_last, floats, floor_only, as_list):
        result, _ = run(check_transfer_schedule, wrong, capsys)
        assert not result, wrong.__name__


# --------------------------------------------------------------------------- low_confidence_commit

def test_low_confidence_commit_checker(capsys) -> None:
    result, out = run(check_low_confidence_commit, reference_low_confidence_commit, capsys)
    assert result and "passed" in out
    generic_wrong_answers(check_low_confidence_commit, capsys)

    def over_all_positions(canvas, logits, mask_id, k):  # ranks committed positions too
        conf, pred = logits.softmax(-1).max(-1)
        top = conf.topk(k if k <= canvas.shape[1] else canvas.shape[1], dim=1).indices
        out = canvas.clone()
        out.scatter_(1, top, pred.gather(1, top))
        return out

    def least_confident(canvas, logits, mask_id, k):
        conf, pred = logits.softmax(-1).max(-1)
        return reference_low_confidence_commit(canvas, -logits, mask_id, k)

    def in_place(canvas, logits, mask_id, k):
        new = reference_low_confidence_commit(canvas, logits, mask_id, k)
        canvas.copy_(new)
        return canvas

    def fill_everything(canvas, logits, mask_id, k):
        pred = logits.argmax(-1)
        return torch.where(canvas == mask_id, pred, canvas)

    def off_by_one(canvas, logits, mask_id, k):
        return reference_low_confidence_commit(canvas, logits, mask_id, k + 1)

    for wrong in (over_all_positions, least_confident, fill_everything, off_by_one):
        result, _ = run(check_low_confidence_commit, wrong, capsys)
        assert not result, wrong.__name__
    result, out = run(check_low_confidence_commit, in_place, capsys)
    assert not result and "in place" in out


@pytest.mark.parametrize("checker", [check_mask_tokens, check_diffusion_loss, check_transfer_schedule,
                                     check_low_confidence_commit])
def test_strict_mode_raises_on_a_wrong_answer(checker, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LABSUPPORT_STRICT_CHECKS", "1")
    with pytest.raises(AssertionError):
        checker(raises)


def test_threshold_commit_checker_passes_the_reference_and_refuses_its_shortcuts(capsys) -> None:
    from labsupport.diffusion.exercises import check_threshold_commit, reference_threshold_commit

    result, out = run(check_threshold_commit, reference_threshold_commit, capsys)
    assert result and "passed" in out
    generic_wrong_answers(check_threshold_commit, capsys)

    def strict(canvas, probs, mask_id, threshold):           # > instead of ≥, and no guaranteed progress
        confidence, predicted = probs.max(-1)
        return torch.where((canvas == mask_id) & (confidence > threshold), predicted, canvas)

    def everywhere(canvas, probs, mask_id, threshold):       # commits over given tokens too
        confidence, predicted = probs.max(-1)
        return torch.where(confidence >= threshold, predicted, canvas)

    def progress_only_by_threshold(canvas, probs, mask_id, threshold):
        confidence, predicted = probs.max(-1)
        return torch.where((canvas == mask_id) & (confidence >= threshold), predicted, canvas)

    for wrong in (strict, everywhere, progress_only_by_threshold):
        result, out = run(check_threshold_commit, wrong, capsys)
        assert not result and "progress" in out
        assert ">=" not in out and "clamp" not in out               # the hint diagnoses, never gives the code


def test_gap_log_posterior_checker_refuses_the_left_only_answer(capsys) -> None:
    from labsupport.diffusion.evaluation import ar_gap_log_posterior
    from labsupport.diffusion.exercises import check_gap_log_posterior

    result, out = run(check_gap_log_posterior, ar_gap_log_posterior, capsys)
    assert result and "passed" in out

    def left_only(model, tokens, position):
        return model(tokens[:, :position]).double()[:, -1].log_softmax(-1)

    def unnormalised(model, tokens, position):
        return ar_gap_log_posterior(model, tokens, position) - 0.5

    def float32(model, tokens, position):
        return ar_gap_log_posterior(model, tokens, position).float()

    for wrong in (left_only, unnormalised, float32):
        result, out = run(check_gap_log_posterior, wrong, capsys)
        assert not result
    result, out = run(check_gap_log_posterior, not_done, capsys)
    assert result.status == "not done"


@pytest.mark.parametrize("checker_name", ["check_mask_tokens", "check_diffusion_loss", "check_transfer_schedule",
                                          "check_low_confidence_commit", "check_threshold_commit",
                                          "check_gap_log_posterior"])
def test_no_checker_hint_prints_the_recipe(checker_name: str, capsys) -> None:
    from labsupport.diffusion import exercises

    def wrong(*args):
        return None

    getattr(exercises, checker_name)(wrong)
    out = capsys.readouterr().out
    for recipe in ("uniform < mask_prob", "divmod", "reduction='none'", "−inf before ranking", "masked_fill",
                   "log_softmax", "repeat_interleave"):
        assert recipe not in out, (checker_name, recipe)


# --------------------------------------------------------------------------- diagnoses and the recipe on request

def _loss_plain_mean(logits, tokens, masked, t):
    return (ce(logits, tokens) * masked).sum() / masked.sum()


def _loss_by_mask_count(logits, tokens, masked, t):
    return ((ce(logits, tokens) * masked).sum(1) / t / masked.sum(1)).mean()


def _schedule_remainder_last(n, steps):
    return sampling.transfer_schedule(n, steps).flip(0)


def _commit_over_all_positions(canvas, logits, mask_id, k):
    conf, pred = logits.softmax(-1).max(-1)
    top = conf.topk(min(k, canvas.shape[1]), dim=1).indices
    return canvas.scatter(1, top, pred.gather(1, top))


def _commit_least_confident(canvas, logits, mask_id, k):
    conf, pred = logits.softmax(-1).max(-1)
    conf = conf.masked_fill(canvas != mask_id, float("inf"))
    chosen = torch.zeros_like(canvas, dtype=torch.bool).scatter(
        1, (-conf).topk(min(k, canvas.shape[1]), dim=1).indices, True) & (canvas == mask_id)
    return torch.where(chosen, pred, canvas)


def _mask_one_minus_t(tokens, mask_prob, mask_id, uniform):
    masked = uniform >= mask_prob[:, None]
    return tokens.masked_fill(masked, mask_id), masked


def _threshold_no_progress(canvas, probs, mask_id, threshold):
    confidence, predicted = probs.max(-1)
    return torch.where((canvas == mask_id) & (confidence >= threshold), predicted, canvas)


def _gap_left_only(model, tokens, position):
    return model(tokens[:, :position]).double()[:, -1].log_softmax(-1)


def _checker(name):
    from labsupport.diffusion import exercises

    return getattr(exercises, name)


DIAGNOSED = [
    ("check_diffusion_loss", _loss_plain_mean, "plain mean cross-entropy over the masked tokens, with no 1/t"),
    ("check_diffusion_loss", _loss_by_mask_count, "by its number of masked tokens, not by the sequence length"),
    ("check_transfer_schedule", _schedule_remainder_last, "remainder to the last steps instead of the first"),
    ("check_low_confidence_commit", _commit_over_all_positions, "already-committed ones included"),
    ("check_low_confidence_commit", _commit_least_confident, "LEAST confident"),
    ("check_mask_tokens", _mask_one_minus_t, "t and 1 − t are swapped"),
    ("check_threshold_commit", _threshold_no_progress, "commits nothing"),
    ("check_gap_log_posterior", _gap_left_only, "p(c | left) alone"),
]


@pytest.mark.parametrize("checker_name, wrong, diagnosis", DIAGNOSED, ids=[w.__name__ for _, w, _ in DIAGNOSED])
def test_a_failure_names_the_mistake_and_hides_the_recipe(checker_name, wrong, diagnosis, capsys) -> None:
    checker = _checker(checker_name)
    result, out = run(checker, wrong, capsys)
    assert not result and "\n   found   " in out and diagnosis in result.diagnosis, out
    assert "hints are above the exercise" in out.lower()
    assert f"`{checker_name}({wrong.__name__}, reveal=True)` prints the full recipe" in out


@pytest.mark.parametrize("checker_name, wrong, fragment", [
    ("check_mask_tokens", _mask_one_minus_t, "uniform < mask_prob"),
    ("check_diffusion_loss", _loss_plain_mean, "reduction='none'"),
    ("check_transfer_schedule", _schedule_remainder_last, "divmod"),
    ("check_low_confidence_commit", _commit_least_confident, "topk"),
    ("check_threshold_commit", _threshold_no_progress, "raised to 1 where"),
    ("check_gap_log_posterior", _gap_left_only, "repeat_interleave"),
])
def test_the_recipe_appears_only_with_reveal(checker_name, wrong, fragment, capsys) -> None:
    checker = _checker(checker_name)
    _, hidden = run(checker, wrong, capsys)
    assert fragment not in hidden and "\n   recipe  try the tiered hints first" in hidden
    result = checker(wrong, reveal=True)
    shown = capsys.readouterr().out
    assert not result and fragment in shown.split("\n   recipe  ")[-1]


def test_commit_cases_say_the_logits_have_a_mask_column(capsys) -> None:
    from labsupport.diffusion.exercises import check_threshold_commit

    _, out = run(check_low_confidence_commit, _commit_least_confident, capsys)
    assert "(V = 5 + [MASK])" in out
    _, out = run(check_threshold_commit, _threshold_no_progress, capsys)
    assert "+ [MASK])" in out


def test_the_engine_refuses_in_place_writes_without_a_wrapper(capsys) -> None:
    from labsupport.diffusion import exercises

    assert not hasattr(exercises, "_refuse_in_place")

    def in_place(tokens, mask_prob, mask_id, uniform):
        masked = uniform < mask_prob[:, None]
        tokens[masked] = mask_id
        return tokens, masked

    result, out = run(check_mask_tokens, in_place, capsys)
    assert not result and "changed its input `tokens` in place" in out
