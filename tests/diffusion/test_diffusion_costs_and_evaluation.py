"""The chapter's work formulas (labsupport.harness.costs) and scores (labsupport.diffusion.evaluation)."""

from __future__ import annotations

import pytest
import torch

from labsupport.diffusion import MaskedDenoiser, diffusion_sample
from labsupport.diffusion import evaluation as ev
from labsupport.harness.costs import autoregressive_work, denoising_work
from labsupport.lm.model import TinyLM


def test_denoising_work_matches_what_the_sampler_counts() -> None:
    torch.manual_seed(0)
    model = MaskedDenoiser(5, 16, 1, max_len=24).eval()
    canvas = torch.zeros(1, 24, dtype=torch.long)
    canvas[:, 8:] = model.mask_id
    for per_step, block, cached in [(1, None, False), (4, None, False), (2, 8, False), (2, 8, True), (1, 4, True)]:
        work = denoising_work(8, 16, per_step, block_length=block, cached=cached)
        trace = diffusion_sample(model, canvas, steps=work["steps"], block_length=None if block is None else block,
                                 cache=cached)
        assert trace.forward_tokens == work["positions"], (per_step, block, cached)
    assert denoising_work(96, 32, 8) == {"steps": 4, "positions": 512}
    assert autoregressive_work(96, 32) == {"steps": 32, "positions": 127}
    with pytest.raises(ValueError, match="block_length"):
        denoising_work(8, 8, 1, cached=True)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return MaskedDenoiser(6, 16, 1, max_len=16).eval(), TinyLM(6, 16, 1, 16).eval()


def test_span_nll_is_exact_for_ar_and_a_bound_for_the_denoiser(models) -> None:
    denoiser, ar = models
    tokens = torch.randint(0, 6, (4, 16), generator=torch.Generator().manual_seed(1))
    logits = ar(tokens[:, :-1]).log_softmax(-1)
    by_hand = -logits[:, 4:7].gather(-1, tokens[:, 5:8, None]).squeeze(-1).mean(1)
    assert torch.allclose(ev.span_nll(ar, tokens, 5, 8), by_hand, atol=1e-6)
    bound = ev.span_nll(denoiser, tokens, 5, 8, samples=8)
    assert bound.shape == (4,) and bool((bound > 0).all())
    with pytest.raises(ValueError, match="start"):
        ev.span_nll(ar, tokens, 0, 3)  # the AR model has nothing to condition the first token on


def test_scores(models) -> None:
    _, ar = models
    truth = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    guess = torch.tensor([[1, 0, 3, 4], [1, 2, 0, 0]])
    assert ev.span_accuracy(guess, truth, 1, 4) == pytest.approx(3 / 6)
    assert ev.unigram_entropy_bits(torch.tensor([0, 1, 2, 3])) == pytest.approx(2.0)
    assert ev.unigram_entropy_bits(torch.tensor([5, 5, 5])) == pytest.approx(0.0)
    tokens = torch.randint(0, 6, (2, 10), generator=torch.Generator().manual_seed(2))
    assert ev.judge_nll(ar, tokens, 5) == pytest.approx(float(ev.ar_token_nll(ar, tokens)[:, 4:].mean()))
    assert ev.span_accuracy(guess[:, :2], truth, 0, 2) == pytest.approx(3 / 4)  # a continuation may stop at end
    with pytest.raises(ValueError, match="at least"):
        ev.span_accuracy(guess[:, :3], truth, 1, 4)
    with pytest.raises(ValueError, match="batch"):
        ev.span_accuracy(guess[:1], truth, 1, 2)
    with pytest.raises(ValueError, match="non-empty"):
        ev.unigram_entropy_bits(torch.tensor([], dtype=torch.long))


def test_the_gap_posterior_is_bayes_rule_over_whole_windows() -> None:
    torch.manual_seed(0)
    model = TinyLM(5, 16, 1, 12, n_heads=2).double().eval()
    with torch.no_grad():
        model.head.weight.mul_(5)
    tokens = torch.randint(0, 5, (2, 9), generator=torch.Generator().manual_seed(3))
    posterior = ev.ar_gap_log_posterior(model, tokens, 4)
    assert posterior.shape == (2, 5) and posterior.dtype == torch.float64
    # brute force: the full sequence log-probability (from position 1 on) of every candidate, normalised
    for b in range(2):
        scores = []
        for c in range(5):
            row = tokens[b:b + 1].clone()
            row[0, 4] = c
            scores.append(float(-ev.ar_token_nll(model, row).sum()))
        assert torch.allclose(posterior[b], torch.tensor(scores, dtype=torch.float64).log_softmax(0), atol=1e-9)
    nll, best = ev.ar_infill_one(model, tokens, 4)
    assert torch.allclose(nll.double(), -posterior.gather(1, tokens[:, 4:5]).squeeze(1), atol=1e-6)
    assert torch.equal(best, posterior.argmax(1))
    with pytest.raises(TypeError, match="causal"):
        ev.ar_gap_log_posterior(TinyLM(5, 16, 1, 12, n_heads=2, causal=False), tokens, 4)
