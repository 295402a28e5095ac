"""The registry: every row builds, decodes equal to its forward pass, and its formula matches its real state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from labsupport.hybrid import PRESETS, registry
from labsupport.lm.model import TinyLM

D_MODEL = 32
LENGTH = 45  # longer than every window and budget (32), so an evicting cache really evicts


def _decode_all(module: nn.Module, x: torch.Tensor, split: int | None = None) -> torch.Tensor:
    """Outputs of prefilling ``x[:, :split]`` (or nothing) and then stepping through the rest."""
    outputs, state = [], None
    start = 0
    if split:
        y, state = module.prefill(x[:, :split])
        outputs.append(y)
        start = split
    for t in range(start, x.shape[1]):
        y, state = module.decode_step(x[:, t:t + 1], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("name", registry.names(decoding_only=True))
def test_every_decoding_mixer_decodes_equal_to_its_forward(name: str) -> None:
    spec = registry.get(name)
    torch.manual_seed(0)
    module = spec.build(D_MODEL, 0).double().eval()
    length = LENGTH if spec.exact_until is None else spec.exact_until
    x = torch.randn(2, length, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        full = module(x)
        stepped = _decode_all(module, x)
        assert (stepped - full).abs().max() < 1e-9, f"{name}: token-by-token decoding differs from forward"
        if hasattr(module, "prefill"):
            split = _decode_all(module, x, split=length // 2)
            assert (split - full).abs().max() < 1e-9, f"{name}: prefill + decode differs from forward"


@pytest.mark.parametrize("name", [n for n in registry.names() if registry.get(n).exact_until is not None])
def test_an_evicting_policy_really_departs_from_forward_past_its_budget(name: str) -> None:
    """``exact_until`` is not decoration: past the budget the policy's decode is no longer the dense forward."""
    spec = registry.get(name)
    torch.manual_seed(0)
    module = spec.build(D_MODEL, 0).double().eval()
    x = torch.randn(2, spec.exact_until + 24, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        assert (_decode_all(module, x) - module(x)).abs().max() > 1e-6


@pytest.mark.parametrize("name", registry.names(decoding_only=True))
def test_the_state_formula_matches_the_state_held(name: str) -> None:
    """What the formula adds between two contexts is what the real state adds (fp32: 4 bytes), and the real
    state holds at least what the formula counts (extras such as a conv window are context-independent)."""
    spec = registry.get(name)
    module = spec.build(D_MODEL, 0).eval()
    x = torch.randn(1, 80, D_MODEL)
    held = {}
    with torch.no_grad():
        state = None
        for t in range(80):
            _, state = module.decode_step(x[:, t:t + 1], state)
            if t + 1 in (10, 40, 80):
                held[t + 1] = registry.held_bytes(module, state)
    for a, b in ((10, 40), (40, 80)):
        grown = held[b] - held[a]
        assert grown == spec.state_bytes(b, D_MODEL, bytes_per_element=4) - \
            spec.state_bytes(a, D_MODEL, bytes_per_element=4), f"{name}: state grows {grown} bytes from {a} to {b}"
    assert held[80] >= spec.state_bytes(80, D_MODEL, bytes_per_element=4)
    assert held[80] <= spec.state_bytes(80, D_MODEL, bytes_per_element=4) + 4 * 3 * 4 * D_MODEL + 4 * 2 * D_MODEL


@pytest.mark.parametrize("name", registry.names())
def test_every_row_builds_a_tiny_lm_that_trains_one_step(name: str) -> None:
    spec = registry.get(name)
    torch.manual_seed(0)
    model = TinyLM(16, d_model=D_MODEL, n_layers=2, max_len=24, sequence_mixer=spec.build, channel_mixer=None,
                   positional=spec.positional, short_conv=4)
    tokens = torch.randint(0, 16, (2, 24))
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


def test_registering_ones_own_mixer_is_one_call_and_it_joins_every_list() -> None:
    from labsupport.lm.layers import SoftmaxAttention

    spec = registry.register("my_attention", lambda d, i: SoftmaxAttention(d, 2), family="mine",
                             state_numbers=lambda context, d_model: 2 * d_model * context)
    try:
        assert spec.decodes and "my_attention" in registry.names() and "mine" in registry.families()
        assert registry.get("my_attention").state_bytes(100, 8) == 2 * 8 * 100 * 2
        with pytest.raises(ValueError, match="registered already"):
            registry.register("my_attention", lambda d, i: SoftmaxAttention(d, 2),
                              state_numbers=lambda c, d: 0)
    finally:
        registry.unregister("my_attention")
    assert "my_attention" not in registry.names()


@pytest.mark.parametrize("bad, message", [
    ({"build": lambda d, i: 3}, "must return an nn.Module"),
    ({"state_numbers": lambda c, d: -1}, ">= 0"),
    ({"state_numbers": lambda c, d: 1 / 0}, "raised ZeroDivisionError"),
    ({"name": ""}, "non-empty"),
    ({"positional": "rope"}, "positional"),
])
def test_register_refuses_a_broken_row_with_a_clear_message(bad: dict, message: str) -> None:
    from labsupport.lm.layers import SoftmaxAttention

    args = {"name": "broken", "build": lambda d, i: SoftmaxAttention(d, 2), "state_numbers": lambda c, d: 1} | bad
    name, build = args.pop("name"), args.pop("build")
    with pytest.raises((ValueError, TypeError), match=message):
        registry.register(name, build, **args)
    assert "broken" not in registry.names()


def test_a_mixer_without_decode_step_is_registered_as_not_decoding() -> None:
    spec = registry.register("no_decode", lambda d, i: nn.Linear(d, d), state_numbers=lambda c, d: 0)
    try:
        assert not spec.decodes and "no_decode" not in registry.names(decoding_only=True)
    finally:
        registry.unregister("no_decode")


def test_the_state_conventions_are_basieds() -> None:
    d, context = 64, 1000
    assert registry.get("attention").state_numbers(context, d) == 2 * d * context
    assert registry.get("sliding_window").state_numbers(context, d) == 2 * d * registry.WINDOW
    assert registry.get("mamba").state_numbers(context, d) == 2 * d * registry.MAMBA_STATE
    assert registry.get("gated_deltanet").state_numbers(context, d) == d * d
    assert registry.get("quest").read_numbers(context, d) < registry.get("quest").state_numbers(context, d)
    assert [s.name for s in registry.specs() if s.grows_with_context] == [
        "attention", "gqa", "mqa", "mla", "quest", "hymba_attention+mamba"]


def test_a_factory_that_cannot_build_says_so() -> None:
    def broken(d_model: int, layer_index: int) -> nn.Module:
        raise RuntimeError("needs d_model 48")

    with pytest.raises(ValueError, match="raised RuntimeError at d_model 16 and 64"):
        registry.register("broken_factory", broken, state_numbers=lambda c, d: 0)


def test_mixers_with_their_own_conv_get_no_second_one_in_front() -> None:
    """Mamba, S4D and SSD bring a conv (registry.own_conv): TinyLM's short_conv skips them, not attention."""
    from labsupport.lm.model import TinyLM
    from labsupport.ssm.mixers import MambaMixer

    for name, wants_block_conv in (("mamba", False), ("s4d", False), ("ssd", False), ("attention", True),
                                   ("gated_deltanet", True), ("hymba_attention+mamba", True)):
        model = TinyLM(16, d_model=32, n_layers=2, max_len=16, sequence_mixer=registry.get(name).build,
                       channel_mixer=None, short_conv=4, positional="none")
        assert all((b.conv is not None) == wants_block_conv for b in model.blocks), name
    plain = TinyLM(16, d_model=32, n_layers=1, max_len=16, sequence_mixer=lambda d, i: MambaMixer(d, 4),
                   channel_mixer=None, short_conv=4, positional="none")
    assert plain.blocks[0].conv is not None      # only a mixer that says so loses the block's conv
    jamba = TinyLM(16, d_model=32, n_layers=8, max_len=16, sequence_mixer=PRESETS["jamba"].factory(),
                   channel_mixer=None, short_conv=4, positional="none")
    names = PRESETS["jamba"].layer_names()
    assert [b.conv is None for b in jamba.blocks] == [n == "mamba" for n in names]
