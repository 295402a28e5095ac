"""Chapter 06 dispatch and layer (labsupport.moe.dispatch, labsupport.moe.layer): every equivalence of the chapter."""

from __future__ import annotations

import pytest
import torch

from labsupport.harness.settings import seed_everything
from labsupport.lm.contracts import AuxiliaryLossSource, ChannelMixer, CustomInit, MetricSource
from labsupport.lm.layers import MLP
from labsupport.lm.model import TinyLM
from labsupport.lm.tasks import CharCorpus
from labsupport.lm.training import train
from labsupport.moe import MoELayer, moe_expert_choice, moe_loop, moe_mixer, moe_sorted
from labsupport.moe import routing as r


def layer64(**options) -> MoELayer:
    seed_everything(0)
    layer = MoELayer(8, 4, 2, 16, **options).double()
    with torch.no_grad():  # nonzero biases so that a forgotten bias shows
        layer.b_up.normal_()
        layer.b_down.normal_()
    return layer


def tokens(t: int = 40, d: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(t, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def weights(layer: MoELayer):
    return layer.w_up, layer.b_up, layer.w_down, layer.b_down


@pytest.mark.parametrize("options", [
    {}, {"capacity_factor": 0.75}, {"router": "top_p", "top_p": 0.5}, {"n_null": 2}, {"balance": "bias"},
])
def test_sorted_dispatch_equals_the_per_token_loop_in_float64(options) -> None:
    layer = layer64(**options)
    x = tokens()
    routing, _, _ = layer.route(x)
    loop, fast = moe_loop(x, routing, *weights(layer)), moe_sorted(x, routing, *weights(layer))
    assert torch.allclose(fast, loop, atol=1e-13, rtol=0)


def test_expert_choice_batched_path_equals_a_loop_over_experts() -> None:
    layer = layer64(router="expert_choice")
    x = tokens()
    picked, gates, _ = r.expert_choice_routing(layer.router(x), 10)
    expected = torch.zeros_like(x)
    for e in range(4):
        for slot in range(10):
            t = int(picked[e, slot])
            h = torch.nn.functional.gelu(x[t] @ layer.w_up[e] + layer.b_up[e])
            expected[t] += gates[e, slot] * (h @ layer.w_down[e] + layer.b_down[e])
    assert torch.allclose(moe_expert_choice(x, picked, gates, *weights(layer)), expected, atol=1e-13)


def test_dropped_assignments_add_nothing_and_the_block_passes_the_token_through() -> None:
    layer = layer64(capacity_factor=1e-9)  # capacity 1 per expert
    x = tokens(40)
    routing, _, dropped = layer.route(x)
    assert int(routing.active.sum()) == 4 and int(dropped.sum()) == 80 - 4
    out = layer(x[None])[0]
    untouched = ~routing.active.any(dim=1)
    assert torch.equal(out[untouched], torch.zeros_like(out[untouched]))
    assert layer.training_metrics()["dropped_fraction"] == pytest.approx(76 / 80)


def test_null_experts_skip_compute_and_are_counted() -> None:
    layer = layer64(n_null=4)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[4:, 0] = 50.0  # every token with x_0 > 0 prefers two null experts
    x = tokens(60)
    layer(x[None])
    skipping = int((x[:, 0] > 0).sum())
    assert layer.training_metrics()["experts_per_token"] == pytest.approx(2 * (60 - skipping) / 60)


def test_upcycled_layer_reproduces_the_dense_mlp_at_initialisation() -> None:
    seed_everything(0)
    mlp = MLP(16).double()
    with torch.no_grad():
        mlp.up.bias.normal_()
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    for k in (2, 3):  # renormalised weights sum to 1 (top-1 uses Switch's weighting: tests/moe/test_moe_conventions.py)
        moe = MoELayer.from_dense(mlp, n_experts=6, top_k=k)
        assert moe.w_up.dtype == torch.float64
        assert torch.allclose(moe(x), mlp(x), atol=1e-14)


def test_shared_experts_add_a_dense_path() -> None:
    layer = layer64(n_shared=2)
    x = tokens()
    routing, _, _ = layer.route(x)
    expected = moe_sorted(x, routing, *weights(layer)) + layer.shared(x)
    assert torch.allclose(layer(x[None])[0], expected, atol=1e-13)
    counts = layer.parameter_counts()
    assert counts["active"] - counts["total"] == -2 * sum(p[0].numel() for p in weights(layer))


def test_the_layer_keeps_the_bench_contracts_and_reports_its_losses() -> None:
    layer = MoELayer(8, 4, 2, z_loss_weight=1e-3)
    assert isinstance(layer, ChannelMixer) and isinstance(layer, AuxiliaryLossSource)
    assert isinstance(layer, MetricSource) and isinstance(layer, CustomInit)
    layer(torch.randn(2, 5, 8))
    assert set(layer.auxiliary_losses()) == {"load_balance", "z_loss"}
    assert sum(layer.training_metrics()["tokens_per_expert"]) == 2 * 5 * 2
    assert set(MoELayer(8, 4, 2, balance="none").auxiliary_losses()) == set()


def test_half_precision_forward_stays_finite() -> None:
    layer = MoELayer(16, 4, 2).to(torch.bfloat16)
    y = layer(torch.randn(2, 64, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_training_a_tiny_moe_lm_moves_the_bias_and_reports_metrics_every_step() -> None:
    corpus = CharCorpus.from_data("shakespeare.txt", max_chars=5_000)
    seed_everything(0)
    model = TinyLM(corpus.vocab_size, d_model=16, n_layers=1, max_len=16,
                   channel_mixer=moe_mixer(4, 2, 16, balance="bias", bias_gamma=0.01))
    history = train(model, lambda g: corpus.sample_batch(8, 16, generator=g), steps=5, progress=False)
    assert len(history.metrics["blocks.0.channel_mixer.tokens_per_expert"]) == 5
    bias = model.blocks[0].channel_mixer.selection_bias
    steps_taken = bias / 0.01  # five moves of ±γ (or 0) each: an odd multiple of γ, or an even one after a tie
    assert bias.abs().sum() > 0 and torch.allclose(steps_taken, steps_taken.round(), atol=1e-4)
    assert float(bias.abs().max()) <= 5 * 0.01 + 1e-6


@pytest.mark.parametrize("options, match", [
    ({"router": "soft"}, "router"),
    ({"balance": "magic"}, "balance"),
    ({"capacity_factor": -1.0}, "capacity_factor"),
    ({"router": "expert_choice", "n_null": 1}, "expert choice"),
])
def test_bad_options_get_clear_errors(options, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        MoELayer(8, 4, 2, **options)


def test_wrong_width_and_wrong_dense_module_are_refused() -> None:
    with pytest.raises(ValueError, match="d_model=8"):
        MoELayer(8, 4, 2)(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="MLP"):
        MoELayer.from_dense(torch.nn.Linear(4, 4))


def test_the_cost_formula_counts_the_layers_parameters() -> None:
    from labsupport.harness.costs import moe_parameters

    for n_shared in (0, 2):
        layer = MoELayer(16, 8, 2, 24, n_shared=n_shared)
        formula = moe_parameters(16, 24, 8, 2, n_shared=n_shared)
        assert layer.parameter_counts() == {"total": formula["total"], "active": formula["active"]}
        assert formula["total"] == sum(p.numel() for p in layer.parameters())
    with pytest.raises(ValueError, match="top_k"):
        moe_parameters(16, 24, 4, 5)


def test_forward_leaves_the_metrics_on_the_device_until_they_are_read() -> None:
    """No ``.tolist()``/``float()`` per forward pass: on a GPU each would stall the stream."""
    layer = MoELayer(8, 4, 2)
    layer(torch.randn(2, 5, 8))
    from_data = {name: value for name, value in layer._metrics.items() if name != "assignment_budget"}  # T·k: a shape
    assert from_data and all(isinstance(value, torch.Tensor) for value in from_data.values())
    metrics = layer.training_metrics()  # converted here, once, when asked
    assert isinstance(metrics["tokens_per_expert"], list) and sum(metrics["tokens_per_expert"]) == 20
    assert isinstance(metrics["dropped_fraction"], float) and isinstance(metrics["experts_per_token"], float)
