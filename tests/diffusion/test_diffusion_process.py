"""labsupport.diffusion.process: the schedule, the forward process, the weighted loss, the SUBS denoiser."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labsupport.diffusion import process as p
from labsupport.lm.objectives import MaskedTokenObjective
from labsupport.lm.tasks import TaskBatch


def test_schedules_start_unmasked_end_masked_and_weight_is_minus_alpha_dot_over_one_minus_alpha() -> None:
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(p.mask_probability(t, "linear"), t)
    assert torch.allclose(p.loss_weight(t, "linear"), 1 / t)
    assert float(p.mask_probability(torch.tensor([1.0]), "cosine")) == pytest.approx(1.0)
    # cosine: weight = -alpha'(t) / (1 - alpha(t)), checked by a finite difference
    h = 1e-6
    alpha = lambda x: 1 - p.mask_probability(x, "cosine")  # noqa: E731
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    derivative = (alpha(t + h) - alpha(t - h)) / (2 * h)
    assert torch.allclose(p.loss_weight(t, "cosine"), -derivative / (1 - alpha(t)), rtol=1e-6)


@pytest.mark.parametrize("bad", [torch.tensor([0.0]), torch.tensor([1.5]), torch.tensor([float("nan")])])
def test_times_outside_zero_one_are_refused(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        p.loss_weight(bad)
    with pytest.raises(ValueError, match="schedule"):
        p.mask_probability(torch.tensor([0.5]), "quadratic")


def test_mask_tokens_masks_exactly_where_uniform_is_below_t_and_leaves_the_input() -> None:
    tokens = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    uniform = torch.tensor([[0.1, 0.6, 0.3, 0.9], [0.1, 0.6, 0.3, 0.9]])
    noisy, masked = p.mask_tokens(tokens, torch.tensor([0.5, 0.2]), 9, uniform)
    assert masked.tolist() == [[True, False, True, False], [True, False, False, False]]
    assert noisy.tolist() == [[9, 2, 9, 4], [9, 3, 2, 1]]
    assert tokens.tolist() == [[1, 2, 3, 4], [4, 3, 2, 1]]


def test_mask_tokens_refuses_bad_input() -> None:
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="int64"):
        p.mask_tokens(tokens.float(), torch.ones(2), 5, torch.rand(2, 3))
    with pytest.raises(ValueError, match="already contain"):
        p.mask_tokens(tokens, torch.ones(2), 0, torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"mask_prob \(B,\)"):
        p.mask_tokens(tokens, torch.ones(3), 5, torch.rand(2, 3))


def test_the_loss_matches_lm_masked_token_objective_on_the_same_draws() -> None:
    torch.manual_seed(0)
    model = p.MaskedDenoiser(6, 16, 1, max_len=12)
    tokens = torch.randint(0, 6, (5, 12), generator=torch.Generator().manual_seed(1))
    objective = MaskedTokenObjective(model.mask_id)
    expected = objective(model, TaskBatch(tokens, tokens), torch.Generator().manual_seed(3))
    noisy, masked, t = objective.corrupt(tokens, torch.Generator().manual_seed(3))
    ours = p.masked_diffusion_loss(model(noisy), tokens, masked, 1 / t)
    assert float(ours.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    # the device-aware subclass draws the same masks
    again = p.DiffusionObjective(model.mask_id)(model, TaskBatch(tokens, tokens), torch.Generator().manual_seed(3))
    assert float(again.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_loss_ignores_unmasked_positions_and_weights_by_one_over_t() -> None:
    logits = torch.randn(1, 4, 5, dtype=torch.float64)
    tokens = torch.tensor([[0, 1, 2, 3]])
    masked = torch.tensor([[True, False, True, False]])
    ce = torch.nn.functional.cross_entropy(logits[0], tokens[0], reduction="none")
    value = p.masked_diffusion_loss(logits, tokens, masked, torch.tensor([1 / 0.25], dtype=torch.float64))
    assert float(value) == pytest.approx(float((ce[0] + ce[2]) / 0.25 / 4))
    logits[0, 1] = float("-inf")  # an unmasked position's -inf logits must not leak NaN
    assert math.isfinite(float(p.masked_diffusion_loss(logits, tokens, masked, torch.ones(1))))


def test_subs_never_predicts_mask_and_copies_unmasked_tokens() -> None:
    torch.manual_seed(0)
    model = p.MaskedDenoiser(5, 16, 1, max_len=8)
    noisy = torch.tensor([[0, 5, 2, 5, 4, 5, 1, 3]])
    probs = model(noisy).softmax(dim=-1)
    assert torch.all(probs[..., model.mask_id] == 0)
    given = noisy[0] != model.mask_id
    assert torch.equal(probs[0, given].argmax(-1), noisy[0, given])
    assert torch.allclose(probs[0, given].max(-1).values, torch.ones(int(given.sum())))
    assert torch.allclose(probs.sum(-1), torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"0\.\.5"):
        model(torch.tensor([[0, 7]]))


def test_subs_holds_in_half_precision() -> None:
    logits = torch.randn(2, 6, 4).half()
    noisy = torch.tensor([[3, 0, 3, 1, 3, 2], [3, 3, 3, 3, 3, 3]])
    out = p.subs_logits(logits, noisy, 3)
    assert out.dtype == torch.float16
    assert not torch.isnan(out.float().softmax(-1)).any()


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 10), st.floats(0.01, 1.0))
def test_mask_tokens_property_masked_positions_hold_mask_id(b: int, length: int, t: float) -> None:
    gen = torch.Generator().manual_seed(b * 100 + length)
    tokens = torch.randint(0, 7, (b, length), generator=gen)
    noisy, masked = p.mask_tokens(tokens, torch.full((b,), t), 7, torch.rand(b, length, generator=gen))
    assert torch.equal(noisy == 7, masked)
    assert torch.equal(noisy[~masked], tokens[~masked])


def test_elbo_estimate_refuses_a_model_without_mask_id_and_bad_where() -> None:
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="mask_id"):
        p.elbo_per_sequence(torch.nn.Identity(), tokens)
    model = p.MaskedDenoiser(3, 8, 1, max_len=4)
    with pytest.raises(ValueError, match="where"):
        p.elbo_per_sequence(model, tokens, where=torch.ones(1, 3, dtype=torch.bool))


def test_loss_accumulates_half_precision_in_float32_and_keeps_float64() -> None:
    logits = torch.randn(2, 8, 6, dtype=torch.float64)
    tokens = torch.randint(0, 6, (2, 8), generator=torch.Generator().manual_seed(0))
    masked = torch.rand(2, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    weight = torch.tensor([2.0, 3.0], dtype=torch.float64)
    exact = p.masked_diffusion_loss(logits, tokens, masked, weight)
    assert exact.dtype == torch.float64
    for dtype in (torch.float16, torch.bfloat16):
        low = p.masked_diffusion_loss(logits.to(dtype), tokens, masked, weight)
        assert low.dtype == torch.float32 and abs(float(low) - float(exact)) < 0.02 * abs(float(exact))


def test_loss_is_finite_at_long_length_in_half_precision() -> None:
    length = 65_536
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(1, length, 8, generator=gen)).half()
    tokens = torch.randint(0, 8, (1, length), generator=gen)
    masked = torch.rand(1, length, generator=gen) < 0.3
    value = p.masked_diffusion_loss(logits, tokens, masked, torch.tensor([1 / 0.3]))
    reference = p.masked_diffusion_loss(logits.double(), tokens, masked, torch.tensor([1 / 0.3], dtype=torch.float64))
    assert math.isfinite(float(value)) and abs(float(value) - float(reference)) < 1e-4 * float(reference)


@pytest.mark.parametrize("t_value", [1e-7, 1e-5, 1e-4, 1e-3, 0.3])
def test_the_cosine_schedule_stays_accurate_in_float32_at_tiny_t(t_value: float) -> None:
    # 1 − cos(πt/2) cancels in float32 (it is 0 for t ≤ 1e-4): the probability must stay positive and the weight
    # finite, both within float32 rounding of the float64 closed forms 2 sin²(πt/4) and (π/2) cot(πt/4).
    t32 = torch.tensor([t_value], dtype=torch.float32)
    exact_p = 2 * math.sin(math.pi * t_value / 4) ** 2
    exact_w = (math.pi / 2) / math.tan(math.pi * t_value / 4)
    prob, weight = p.mask_probability(t32, "cosine"), p.loss_weight(t32, "cosine")
    assert prob.dtype == weight.dtype == torch.float32
    assert float(prob) > 0 and math.isfinite(float(weight))
    assert float(prob) == pytest.approx(exact_p, rel=1e-5)
    assert float(weight) == pytest.approx(exact_w, rel=1e-5)


def test_the_denoiser_refuses_negative_ids_and_overlong_canvases_with_a_clear_error() -> None:
    torch.manual_seed(0)
    model = p.MaskedDenoiser(5, 16, 1, max_len=8)
    with pytest.raises(ValueError, match=r"0\.\.5"):
        model(torch.tensor([[0, -1, 2]]))
    with pytest.raises(ValueError, match=r"0\.\.5"):
        model(torch.tensor([[0, 6, 2]]))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 4))
