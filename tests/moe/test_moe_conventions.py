"""Chapter 06, issue 20: each paper's gating convention, the loss floor, capacity's batch dependence,
loads recorded before dropping, the widget's capacity replay, exact upcycling and the refused combinations."""

from __future__ import annotations

import itertools

import pytest
import torch

from labsupport.harness.settings import seed_everything
from labsupport.lm.layers import MLP
from labsupport.lm.model import TinyLM
from labsupport.lm.tasks import CharCorpus
from labsupport.lm.training import train
from labsupport.moe import MoELayer, moe_mixer
from labsupport.moe import routing as r
from labsupport.moe.widget import dropped_at_capacity, expert_load


def z(t: int, e: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_each_gate_follows_its_paper() -> None:
    logits = z(20, 8)
    probs = logits.softmax(-1)
    switch = r.top_k_routing(logits, 1, gate="probability")          # Switch: the probability itself
    assert torch.allclose(switch.weights[:, 0], probs.max(-1).values)
    deepseek = r.top_k_routing(logits, 3, gate="probability")        # DeepSeekMoE / V2: not renormalised
    assert torch.allclose(deepseek.weights, probs.topk(3, -1).values)
    assert (deepseek.weights.sum(-1) < 1).all()
    gshard = r.top_k_routing(logits, 2, gate="renormalize")          # GShard top-2 / Mixtral
    assert torch.allclose(gshard.weights.sum(-1), torch.ones(20, dtype=torch.float64))
    v3 = r.top_k_routing(logits, 2, gate="sigmoid")                  # DeepSeek-V3: sigmoid, then normalise
    top = logits.sigmoid().topk(2, -1).values
    assert torch.allclose(v3.weights, top / top.sum(-1, keepdim=True))
    assert torch.allclose(v3.probs.sum(-1), torch.ones(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate"):
        r.top_k_routing(logits, 2, gate="softmax")


def router_grad_norm(top_k: int, gate: str) -> float:
    seed_everything(0)
    layer = MoELayer(16, 8, top_k, 32, balance="none", gate=gate).double()
    x = torch.randn(1, 64, 16, dtype=torch.float64)
    layer(x).square().mean().backward()
    return float(layer.router.weight.grad.norm())


def test_renormalised_top_1_starves_the_router_of_gradient_and_switch_does_not() -> None:
    switch = router_grad_norm(1, "probability")
    assert router_grad_norm(1, "renormalize") < 1e-9 * switch       # the weight is 1 whatever the logits
    assert switch > 1e-7 and router_grad_norm(2, "renormalize") > 1e-7
    assert MoELayer(8, 4, 1).gate == "probability" and MoELayer(8, 4, 2).gate == "renormalize"


def test_the_switch_loss_goes_below_one_and_two_experts_bottom_out_at_0_875() -> None:
    probs = torch.tensor([[0.51, 0.49]] * 3 + [[0.0, 1.0]], dtype=torch.float64)
    experts = probs.argmax(-1, keepdim=True)
    assert float(r.load_balancing_loss(probs, experts)) == pytest.approx(0.8825)
    # a grid over four tokens' probabilities of expert 0, each routed by argmax: never below 0.875. The loss is a
    # function of the batch's means (f_i, P_i), so it does not depend on the tokens' order: each multiset of four
    # grid values is visited once (10,626 batches) instead of each of its orderings (21**4 = 194,481), same minimum.
    grid = torch.linspace(0, 1, 21, dtype=torch.float64)
    lowest = min(float(r.load_balancing_loss(p, p.argmax(-1, keepdim=True)))
                 for p0 in itertools.combinations_with_replacement(grid.tolist(), 4)
                 for p in [torch.tensor([[a, 1 - a] for a in p0], dtype=torch.float64)])
    assert 0.875 - 1e-12 <= lowest < 0.9


def test_capacity_drops_depend_on_the_rest_of_the_batch() -> None:
    token = torch.tensor([[0, 1]])                      # alone, both its choices fit (capacity 1)
    assert r.capacity_keep(token, 2, 1).all()
    batch = torch.cat([token, torch.tensor([[1, 0]])])  # a *later* token's first choice takes expert 1
    assert r.capacity_keep(batch, 2, 1)[0].tolist() == [True, False]


def test_loads_are_recorded_before_dropping() -> None:
    seed_everything(0)
    layer = MoELayer(8, 4, 2, 16, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight[0] += 1.0                   # expert 0 wanted by most tokens
    x = torch.randn(1, 200, 8).abs()
    layer(x)
    metrics = layer.training_metrics()
    sent = torch.tensor(metrics["tokens_per_expert"])
    capacity = r.expert_capacity(200, 4, 2, 1.0)
    assert float(sent.sum()) == 400 and float(sent.max()) > capacity
    assert metrics["assignment_budget"] == 400
    assert metrics["dropped_fraction"] == pytest.approx(float((sent - capacity).clamp_min(0).sum()) / 400)


@pytest.mark.parametrize("options", [
    {}, {"router": "top_p", "top_p": 0.3}, {"n_null": 3}, {"balance": "bias", "bias_gamma": 0.05},
])
def test_the_widget_replays_the_runs_own_drop_rate(options) -> None:
    corpus = CharCorpus.from_data("shakespeare.txt", max_chars=5_000)
    seed_everything(0)
    model = TinyLM(corpus.vocab_size, d_model=16, n_layers=1, max_len=16,
                   channel_mixer=moe_mixer(4, 2, 16, capacity_factor=0.8, **options))
    history = train(model, lambda g: corpus.sample_batch(8, 16, generator=g), steps=4, progress=False)
    recorded = history.metrics["blocks.0.channel_mixer.dropped_fraction"]
    replayed = dropped_at_capacity(history, 0.8)
    assert replayed.tolist() == pytest.approx(recorded, abs=1e-12)
    assert max(recorded) > 0


def test_upcycling_is_exact_in_float64_and_refuses_expert_choice() -> None:
    seed_everything(0)
    mlp = MLP(16).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_()                                 # float64 values that float32 cannot hold
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    for gate in ("renormalize", "sigmoid"):
        moe = MoELayer.from_dense(mlp, n_experts=6, top_k=2, gate=gate)
        assert torch.equal(moe.w_up[3], mlp.up.weight.t()) and torch.equal(moe.b_up[5], mlp.up.bias)
        assert float((moe(x) - mlp(x)).abs().max()) < 1e-12
    switch = MoELayer.from_dense(mlp, n_experts=6, top_k=1)         # Switch: dense output × kept probability
    routing, _, _ = switch.route(x.reshape(-1, 16))
    expected = mlp(x).reshape(-1, 16) * routing.weights
    assert torch.allclose(switch(x).reshape(-1, 16), expected, atol=1e-12)
    with pytest.raises(ValueError, match="expert_choice"):
        MoELayer.from_dense(mlp, n_experts=6, top_k=2, router="expert_choice")


def test_top_p_with_bias_balancing_is_refused() -> None:
    with pytest.raises(ValueError, match="top-p"):
        MoELayer(8, 4, 2, router="top_p", balance="bias")


def test_experts_touched_by_a_decode_batch_follow_the_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    E, k = 64, 4
    for batch in (1, 8, 32):
        touched = [len(set(torch.cat([torch.randperm(E, generator=gen)[:k] for _ in range(batch)]).tolist())) / E
                   for _ in range(400)]
        assert sum(touched) / len(touched) == pytest.approx(r.expected_experts_touched(E, k, batch), abs=0.01)
    assert r.expected_experts_touched(E, k, 0) == 0.0


def test_router_jitter_is_noise_in_training_only() -> None:
    seed_everything(0)
    layer = MoELayer(8, 4, 2, 16, jitter=0.5)
    x = torch.randn(1, 50, 8)
    layer.train()
    first, _, _ = layer.route(x[0])
    second, _, _ = layer.route(x[0])
    assert not torch.equal(first.weights, second.weights)
    layer.eval()
    assert torch.equal(layer.route(x[0])[0].weights, layer.route(x[0])[0].weights)
    with pytest.raises(ValueError, match="jitter"):
        MoELayer(8, 4, 2, jitter=2.0)


def test_top_p_reports_its_entropy_loss() -> None:
    layer = MoELayer(8, 4, 2, 16, router="top_p", entropy_weight=0.1, balance="none")
    layer(torch.randn(2, 5, 8))
    loss = layer.auxiliary_losses()["router_entropy"]
    expected = 0.1 * r.router_entropy(layer.last_router_logits)
    assert float(loss) == pytest.approx(float(expected)) and 0 < float(loss) <= 0.1 * float(torch.log(torch.tensor(4.0)))
