"""Hybrid stacks: pattern → factory, presets, head split; every hybrid decodes equal to its forward pass."""

from __future__ import annotations

import pytest
import torch

from labsupport.hybrid import registry
from labsupport.hybrid.stacks import (
    PRESETS,
    HeadSplitMixer,
    layer_names,
    pattern_factory,
    stack_bytes_per_token,
    stack_state_numbers,
)
from labsupport.lm.model import TinyLM


def test_the_layer_index_picks_the_letter_and_a_short_pattern_repeats() -> None:
    legend = {"M": "mamba", "A": "attention"}
    assert layer_names("MMA", legend, 7) == ["mamba", "mamba", "attention"] * 2 + ["mamba"]
    factory = pattern_factory("MA", legend)
    kinds = [type(factory(16, i)).__name__ for i in range(4)]
    assert kinds == ["MambaMixer", "SoftmaxAttention"] * 2


@pytest.mark.parametrize("pattern, legend, message", [
    ("", {"A": "attention"}, "non-empty"),
    ("AX", {"A": "attention"}, "does not define"),
    ("A", {"A": "no_such_mixer"}, "not registered"),
])
def test_a_bad_pattern_is_refused_clearly(pattern: str, legend: dict, message: str) -> None:
    with pytest.raises((ValueError, KeyError), match=message):
        pattern_factory(pattern, legend)


def _logits_by_decoding(model: TinyLM, tokens: torch.Tensor, split: int) -> torch.Tensor:
    logits, states = model.prefill(tokens[:, :split])
    out = [logits]
    for t in range(split, tokens.shape[1]):
        logits, states = model.decode_step(tokens[:, t], states, t)
        out.append(logits)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_hybrid_decodes_equal_to_its_forward(name: str) -> None:
    preset = PRESETS[name]
    torch.manual_seed(0)
    model = TinyLM(24, d_model=32, n_layers=len(preset.pattern), max_len=48, sequence_mixer=preset.factory(),
                   channel_mixer="mlp", short_conv=4, positional=preset.positional).double().eval()
    tokens = torch.randint(0, 24, (2, 44))
    with torch.no_grad():
        full = model(tokens)[:, 19:]
        stepped = _logits_by_decoding(model, tokens, split=20)
    assert (stepped - full).abs().max() < 1e-8


def test_a_head_split_layer_decodes_equal_to_its_forward_and_holds_both_states() -> None:
    torch.manual_seed(0)
    layer = registry.get("hymba_attention+mamba").build(32, 0).double().eval()
    assert isinstance(layer, HeadSplitMixer)
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        y, state = layer.prefill(x[:, :10])
        outs = [y]
        for t in range(10, 30):
            y, state = layer.decode_step(x[:, t:t + 1], state)
            outs.append(y)
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-10
    both = registry.held_bytes(layer.first, state[0]) + registry.held_bytes(layer.second, state[1])
    assert layer.cache_bytes(state) == both > 0


def test_each_layer_type_keeps_its_own_state() -> None:
    d = 64
    gemma = PRESETS["gemma3"].layer_names()
    # 5 window layers keep 32 tokens, the global layer the whole context
    assert stack_state_numbers(gemma, 10_000, d) == 5 * 2 * d * 32 + 2 * d * 10_000
    jamba = PRESETS["jamba"].layer_names()
    assert stack_state_numbers(jamba, 10_000, d) == 7 * 2 * d * 16 + 2 * d * 10_000
    # per token: a pure attention stack is flat, a hybrid tends to its attention share
    attention = ["attention"] * 8
    assert stack_bytes_per_token(attention, 1000, d) == stack_bytes_per_token(attention, 100_000, d)
    ratio = stack_bytes_per_token(jamba, 1_000_000, d) / stack_bytes_per_token(attention, 1_000_000, d)
    assert abs(ratio - 1 / 8) < 1e-3


def test_the_measured_state_of_a_hybrid_grows_as_its_formula_says() -> None:
    preset = PRESETS["gemma3"]
    torch.manual_seed(0)
    model = TinyLM(24, d_model=32, n_layers=6, max_len=128, sequence_mixer=preset.factory(), channel_mixer=None,
                   positional=preset.positional).eval()
    tokens = torch.randint(0, 24, (1, 100))

    def held(length: int) -> int:
        _, states = model.prefill(tokens[:, :length])  # a block state is (conv state, mixer state)
        return sum(registry.held_bytes(block.mixer, state[1]) for block, state in zip(model.blocks, states))

    grown = held(90) - held(50)
    names = preset.layer_names()
    assert grown == 4 * (stack_state_numbers(names, 90, 32) - stack_state_numbers(names, 50, 32))
