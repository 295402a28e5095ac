"""Chapter 06 routing (labsupport.moe.routing): the identities the chapter states, checked."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labsupport.moe import routing as r


def logits(t: int, e: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 20), e=st.integers(1, 12), seed=st.integers(0, 10_000), data=st.data())
def test_renormalised_top_k_equals_a_softmax_over_the_top_k_logits(t, e, seed, data) -> None:
    k = data.draw(st.integers(1, e))
    z = logits(t, e, seed)
    routing = r.top_k_routing(z, k)
    top_logits = z.gather(1, routing.experts)
    assert torch.allclose(routing.weights, top_logits.softmax(dim=-1), atol=1e-12)
    assert torch.allclose(routing.weights.sum(-1), torch.ones(t, dtype=torch.float64))
    assert (routing.weights[:, :-1] >= routing.weights[:, 1:]).all()  # largest first


def test_top_k_in_half_precision_accumulates_in_float32() -> None:
    z = logits(64, 8, dtype=torch.float16) * 30
    routing = r.top_k_routing(z, 2)
    assert routing.probs.dtype == torch.float32 and torch.isfinite(routing.weights).all()


def test_balance_loss_is_one_at_perfect_balance_in_switch_form_and_k_in_mixtral_form() -> None:
    t, e = 64, 8
    uniform = torch.full((t, e), 1 / e, dtype=torch.float64)
    for k in (1, 2, 4):
        experts = (torch.arange(t * k).view(t, k)) % e  # every expert gets exactly t·k/e assignments
        assert float(r.load_balancing_loss(uniform, experts)) == pytest.approx(1.0)
        assert float(r.load_balancing_loss(uniform, experts, convention="mixtral")) == pytest.approx(k)


def test_balance_loss_reaches_n_when_everything_goes_to_one_confident_expert() -> None:
    probs = torch.zeros(10, 4, dtype=torch.float64)
    probs[:, 2] = 1
    assert float(r.load_balancing_loss(probs, torch.full((10, 1), 2))) == pytest.approx(4.0)


def test_balance_loss_gradient_flows_only_through_the_mean_probabilities() -> None:
    z = logits(32, 4).requires_grad_()
    probs = z.softmax(-1)
    experts = probs.topk(2, -1).indices
    (grad,) = torch.autograd.grad(r.load_balancing_loss(probs, experts), z)
    fraction = torch.bincount(experts.flatten(), minlength=4).double() / 64  # constants, as the loss treats them
    (expected,) = torch.autograd.grad((4 * fraction * z.softmax(-1).mean(0)).sum(), z)
    assert torch.allclose(grad, expected, atol=1e-14)


def test_z_loss_is_the_mean_squared_logsumexp() -> None:
    z = logits(5, 3)
    assert float(r.router_z_loss(z)) == pytest.approx(float((torch.logsumexp(z, -1) ** 2).mean()))


def _loop_keep(experts: torch.Tensor, n: int, capacity: int) -> torch.Tensor:
    keep = torch.zeros_like(experts, dtype=torch.bool)
    used = [0] * n
    for slot in range(experts.shape[1]):
        for t in range(experts.shape[0]):
            e = int(experts[t, slot])
            if used[e] < capacity:
                keep[t, slot] = True
                used[e] += 1
    return keep


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 30), e=st.integers(1, 6), cap=st.integers(0, 12), seed=st.integers(0, 999), data=st.data())
def test_vectorised_capacity_equals_the_loop_and_never_exceeds_capacity(t, e, cap, seed, data) -> None:
    k = data.draw(st.integers(1, e))
    gen = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    keep = r.capacity_keep(experts, e, cap)
    assert torch.equal(keep, _loop_keep(experts, e, cap))
    kept = torch.bincount(experts[keep], minlength=e)
    assert (kept <= cap).all()
    dropped = int((~keep).sum())
    assert dropped == int((torch.bincount(experts.flatten(), minlength=e) - cap).clamp_min(0).sum())


def test_expert_capacity_formula() -> None:
    assert r.expert_capacity(4096, 8, 2, 1.25) == math.ceil(1.25 * 4096 * 2 / 8)
    with pytest.raises(ValueError, match="capacity_factor"):
        r.expert_capacity(10, 2, 1, 0.0)


def test_expert_choice_gives_every_expert_exactly_its_capacity() -> None:
    tokens, gates, probs = r.expert_choice_routing(logits(40, 4), 10)
    assert tokens.shape == (4, 10) and gates.shape == (4, 10)
    for e in range(4):
        assert torch.equal(gates[e], probs[tokens[e], e])
        assert len(set(tokens[e].tolist())) == 10


def test_top_p_uses_one_expert_when_confident_and_more_when_unsure() -> None:
    z = torch.tensor([[8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    routing = r.top_p_routing(z, 0.6, 3)
    assert routing.active.sum(1).tolist() == [1, 3]
    assert torch.allclose(routing.weights.sum(1), torch.ones(2))
    assert float(routing.weights[0, 0]) == 1.0


def test_selection_bias_changes_the_choice_but_not_the_weights_source() -> None:
    z = logits(6, 4)
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0], dtype=torch.float64)
    routing = r.top_k_routing(z, 1, selection_bias=bias)
    assert (routing.experts[:, 0] == 3).all() and torch.allclose(routing.weights, torch.ones(6, 1, dtype=torch.float64))
    routing2 = r.top_k_routing(z, 2, selection_bias=bias)
    chosen = routing2.probs.gather(1, routing2.experts)
    assert torch.allclose(routing2.weights, chosen / chosen.sum(1, keepdim=True))


def test_bias_update_moves_towards_balance_by_gamma() -> None:
    bias = torch.zeros(4)
    new = r.update_balance_bias(bias, torch.tensor([10, 2, 4, 4]), 0.5)
    assert new.tolist() == [-0.5, 0.5, 0.5, 0.5] and bias.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("call, match", [
    (lambda: r.top_k_routing(torch.zeros(3, 4), 5), "k must be <= 4"),
    (lambda: r.top_k_routing(torch.zeros(3, 4, dtype=torch.long), 1), "floating-point"),
    (lambda: r.top_k_routing(torch.zeros(3), 1), "2 dimensions"),
    (lambda: r.load_balancing_loss(torch.zeros(3, 4), torch.zeros(2, 1, dtype=torch.long)), "3 tokens"),
    (lambda: r.load_balancing_loss(torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.long), convention="x"),
     "convention"),
    (lambda: r.update_balance_bias(torch.zeros(4), torch.zeros(3), 0.1), "one entry per expert"),
    (lambda: r.top_k_routing(torch.zeros(3, 4), 1, selection_bias=torch.zeros(3)), "one entry per expert"),
])
def test_bad_inputs_get_clear_errors(call, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call()
