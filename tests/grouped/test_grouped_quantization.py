"""Chapter 02 KIVI-style cache (labsupport.grouped.quantization): error bounds, groups, decode = one-pass simulation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labsupport import grouped as ga
from labsupport.harness.numerics import rel_err
from labsupport.lm.model import TinyLM

f64 = torch.float64


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 9), seed=st.integers(0, 10_000),
       spread=st.floats(1e-3, 1e3), dim=st.sampled_from([0, 1, -1]))
def test_quantisation_error_is_at_most_half_a_step(bits, rows, cols, seed, spread, dim) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen, dtype=f64) * spread + spread
    codes, scale, lo = ga.quantize_asymmetric(x, bits, dim)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    err = (ga.dequantize(codes, scale, lo) - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-9) + 1e-12 * spread).all())
    # the extremes of every slice are reproduced (up to rounding)
    assert torch.allclose(ga.dequantize(codes, scale, lo).amin(dim), x.amin(dim), atol=1e-9 * spread)


def test_more_bits_less_error_and_constant_slices_exact() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 32, generator=gen, dtype=f64)
    errors = [float((ga.quantize_dequantize(x, b, -1) - x).abs().max()) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]
    c = torch.full((3, 4), -2.5)
    assert torch.equal(ga.quantize_dequantize(c, 2, -1), c)


def test_quantisation_bad_inputs() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        ga.quantize_asymmetric(torch.arange(4), 2, 0)
    with pytest.raises(ValueError, match="between 1 and 8"):
        ga.quantize_asymmetric(torch.randn(4), 9, 0)
    with pytest.raises(ValueError, match="not a multiple of group"):
        ga.fake_quantize(torch.randn(2, 10), 4, -1, 3)
    with pytest.raises(ValueError, match="residual must be >= 0"):
        ga.QuantSpec(4, residual=-1)
    with pytest.raises(TypeError, match="QuantSpec"):
        ga.QuantizedKVCache(4)


def test_reading_an_empty_quantised_cache_says_so() -> None:
    with pytest.raises(ValueError, match="the cache is empty"):
        ga.QuantizedKVCache(ga.QuantSpec(4)).view()


def test_fake_quantize_groups_keys_per_channel() -> None:
    gen = torch.Generator().manual_seed(8)
    k = torch.randn(1, 1, 8, 4, generator=gen, dtype=f64)
    out = ga.fake_quantize(k, 2, -2, 4)
    for g in range(2):
        block = k[:, :, 4 * g:4 * g + 4]
        assert torch.equal(out[:, :, 4 * g:4 * g + 4], ga.quantize_dequantize(block, 2, -2))


@pytest.mark.parametrize("spec", [ga.QuantSpec(2, group=4, residual=4), ga.QuantSpec(4, group=3, residual=0),
                                  ga.QuantSpec(8, group=2, residual=5, value_group=4)])
def test_quantised_cache_decode_equals_its_one_pass_simulation(spec: ga.QuantSpec) -> None:
    torch.manual_seed(9)
    layer = ga.GroupedQueryAttention(32, 4, 2).double()
    layer.kv_quant = spec
    x = torch.randn(2, 21, 32, dtype=f64)
    layer.requires_grad_(False)
    full = layer(x)
    y, cache = layer.prefill(x[:, :6])
    worst = float((y - full[:, :6]).abs().max())
    for t in range(6, 21):
        y, cache = layer.decode_step(x[:, t:t + 1], cache)
        worst = max(worst, float((y - full[:, t:t + 1]).abs().max()))
    assert worst < 1e-12
    assert cache.length == 21 and cache.quantized_length == spec.quantized_length(21)
    assert spec.residual <= 21 - cache.quantized_length < spec.residual + spec.group
    keys, values = cache.view()
    assert keys.shape == values.shape == (2, 2, 21, 8)
    # it is a real approximation: without quantisation the output differs
    layer.kv_quant = None
    assert float((layer(x) - full).abs().max()) > 0
    assert cache.nbytes < 2 * 2 * 2 * 21 * 8 * 8  # smaller than the float64 cache


def test_quantised_cache_in_tinylm_decode_matches_forward() -> None:
    torch.manual_seed(10)
    model = TinyLM(30, d_model=16, n_layers=2, max_len=40, sequence_mixer=ga.grouped_mixer(2, 1),
                   channel_mixer=None).double()
    for block in model.blocks:
        block.mixer.kv_quant = ga.QuantSpec(2, group=4, residual=2)
    tokens = torch.randint(0, 30, (1, 20))
    with torch.no_grad():
        full = model(tokens)
    logits, states = model.prefill(tokens[:, :3])
    for t in range(3, 20):
        logits, states = model.decode_step(tokens[:, t], states, t)
        assert float((logits - full[:, t]).abs().max()) < 1e-12


def test_eight_bits_with_window_is_close_and_two_bits_is_worse() -> None:
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, 64, 16, generator=gen)
    k, v = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(2))
    exact = ga.grouped_attention(q, k, v)
    err = {b: rel_err(ga.quantized_cache_attention(q, k, v, ga.QuantSpec(b, group=16, residual=16)), exact)
           for b in (2, 4, 8)}
    assert err[8] < 0.01 < err[2] and err[2] > err[4] > err[8]
