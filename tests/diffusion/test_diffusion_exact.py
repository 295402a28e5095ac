"""labsupport.diffusion.exact: the bound ≥ the exact NLL on a model small enough to enumerate."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from labsupport import diffusion as d
from labsupport.diffusion import exact
from labsupport.diffusion import exact as ex
from labsupport.diffusion.process import MaskedDenoiser, elbo_per_sequence


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = MaskedDenoiser(3, 16, 1, max_len=3)
    sequences = ex.all_sequences(3, 3)
    return model, sequences, ex.masked_log_probs(model, sequences)


def brute_force(table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average over all L! orders, the definition."""
    probs, sums = [], []
    for order in itertools.permutations(range(length)):
        masked, log_p = (1 << length) - 1, torch.zeros(table.shape[0], dtype=torch.float64)
        for i in order:
            log_p = log_p + table[:, masked, i]
            masked &= ~(1 << i)
        probs.append(log_p.exp())
        sums.append(-log_p)
    return -torch.stack(probs).mean(0).log(), torch.stack(sums).mean(0)


def test_all_sequences_and_distribution() -> None:
    seqs = ex.all_sequences(3, 4)
    assert seqs.shape == (81, 4) and len({tuple(s) for s in seqs.tolist()}) == 81
    probs = ex.toy_distribution(3, 4, seed=1)
    assert float(probs.sum()) == pytest.approx(1.0) and bool((probs > 0).all())
    with pytest.raises(ValueError, match="too many"):
        ex.all_sequences(16, 8)


def test_dynamic_programme_equals_the_average_over_every_order(setup) -> None:
    model, sequences, table = setup
    nll, elbo = ex.order_bounds(table)
    nll_bf, elbo_bf = brute_force(table, 3)
    assert torch.allclose(nll, nll_bf, atol=1e-12)
    assert torch.allclose(elbo, elbo_bf, atol=1e-12)


def test_closed_form_weights_equal_the_order_average_and_the_bound_holds(setup) -> None:
    _, _, table = setup
    nll, elbo = ex.order_bounds(table)
    assert torch.allclose(ex.elbo_by_mask_sets(table), elbo, atol=1e-12)
    assert bool((elbo >= nll - 1e-12).all())
    # the model's mixture over orders is a distribution over all sequences
    assert float(torch.exp(-nll).sum()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_monte_carlo_objective_is_unbiased_for_the_exact_bound(setup, schedule: str) -> None:
    model, sequences, table = setup
    _, elbo = ex.order_bounds(table)
    estimate = elbo_per_sequence(model, sequences, samples=400, schedule=schedule,
                                 generator=torch.Generator().manual_seed(5)).double()
    assert float(estimate.mean()) == pytest.approx(float(elbo.mean()), rel=0.02)


def test_training_lowers_the_bound_towards_the_entropy_and_it_stays_above_the_nll() -> None:
    torch.manual_seed(0)
    model = MaskedDenoiser(3, 16, 1, max_len=3)
    sequences = ex.all_sequences(3, 3)
    probs = ex.toy_distribution(3, 3, seed=0, sharpness=1.5)
    record = ex.train_toy(model, probs, sequences, steps=40, lr=1e-2, record_every=20, objective="exact")
    assert record.elbo[-1] < record.elbo[0] - 0.2
    for e, n in zip(record.elbo, record.nll):
        assert e >= n - 1e-9 and n >= record.entropy - 1e-9
    assert record.elbo[-1] - record.entropy < 0.5 * (record.elbo[0] - record.entropy)
    assert all(math.isfinite(g) for g in record.gap)


def test_train_toy_refuses_mismatched_inputs() -> None:
    model = MaskedDenoiser(3, 8, 1, max_len=2)
    with pytest.raises(ValueError, match="entries"):
        ex.train_toy(model, torch.ones(4, dtype=torch.float64) / 4, ex.all_sequences(3, 2), steps=1)
    with pytest.raises(ValueError, match="objective"):
        ex.train_toy(model, torch.ones(9, dtype=torch.float64) / 9, ex.all_sequences(3, 2), steps=1, objective="x")


def test_a_perfect_denoiser_has_bound_equal_to_nll_equal_to_minus_log_p() -> None:
    probs = d.toy_distribution(3, 3, seed=0, sharpness=1.5)
    table = exact.true_log_prob_table(probs, 3, 3)
    nll, elbo = d.order_bounds(table)
    assert torch.allclose(nll, -probs.log(), atol=1e-12)
    assert torch.allclose(elbo, nll, atol=1e-12)


def test_training_with_t_min_is_not_a_bound_it_can_fall_below_the_nll() -> None:
    probs = d.toy_distribution(3, 3, seed=0, sharpness=1.5)
    table = exact.true_log_prob_table(probs, 3, 3)
    nll, elbo = d.order_bounds(table)
    assert torch.allclose(exact.truncated_objective(table, 1e-9), elbo, atol=1e-6)
    truncated = exact.truncated_objective(table, 1e-3)
    assert float((truncated - nll).min()) < -1e-3            # below the exact NLL for some sequence
    single = -(table[:, [1 << i for i in range(3)], range(3)]).sum(dim=1)   # one masked token at a time
    first_order = nll + 1e-3 * (nll - single)             # the missing (0, t_min) slice, to first order
    assert torch.allclose(truncated, first_order, atol=5e-5)
    assert bool(((truncated < nll) == (single > nll)).all())
    from labsupport.lm.objectives import MaskedTokenObjective
    assert "not* a bound" in (MaskedTokenObjective.__doc__ or "")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_estimator_moments_are_the_mean_and_variance_of_the_sampled_estimate(schedule: str) -> None:
    probs = d.toy_distribution(3, 3, seed=0, sharpness=1.5)
    table = exact.true_log_prob_table(probs, 3, 3)
    mean, var = exact.estimator_moments(table, samples=4, schedule=schedule)
    assert torch.allclose(mean, d.elbo_by_mask_sets(table), atol=1e-9)      # unbiased
    draws = exact.sample_estimates(table, samples=4, draws=40_000, schedule=schedule,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(draws.mean(0), mean, rtol=0.02)
    if schedule == "cosine":                                  # finite variance: the sample variance converges
        assert float(draws.var(0).sum()) == pytest.approx(float(var.sum()), rel=0.1)
    else:                                                     # heavy tail: samples mostly miss the rare huge draws
        assert 0.3 * float(var.sum()) < float(draws.var(0).sum()) < float(var.sum())
    assert float((probs * var).sum()) > 0


def test_the_sampled_estimate_has_the_distribution_of_elbo_per_sequence() -> None:
    torch.manual_seed(0)
    model = d.MaskedDenoiser(3, 16, 1, max_len=3).eval()
    sequences = d.all_sequences(3, 3)
    table = d.masked_log_probs(model, sequences)
    mean, var = exact.estimator_moments(table, samples=8, schedule="cosine")
    runs = torch.stack([d.elbo_per_sequence(model, sequences, samples=8, schedule="cosine",
                                            generator=torch.Generator().manual_seed(s)) for s in range(300)]).double()
    z = (runs.mean(0) - mean) / (var / 300).sqrt()
    assert float(z.abs().max()) < 4.5
