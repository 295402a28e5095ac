"""Chapter 02: GQA/MQA, MLA (naive = absorbed), the KIVI-style quantised cache, cache sizes, checkers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from labsupport import grouped_attention as ga
from labsupport.attention import causal_attention
from labsupport.lm.model import TinyLM

f64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ----------------------------------------------------------------------------- MHA / GQA / MQA

@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_grouped_attention_equals_mha_with_repeated_heads_and_sdpa(groups: int) -> None:
    gen = torch.Generator().manual_seed(groups)
    q = torch.randn(2, 8, 11, 4, generator=gen, dtype=f64)
    k, v = (torch.randn(2, groups, 11, 4, generator=gen, dtype=f64) for _ in range(2))
    out = ga.grouped_attention(q, k, v)
    repeated = causal_attention(q, k.repeat_interleave(8 // groups, 1), v.repeat_interleave(8 // groups, 1))
    assert rel(out, repeated) < 1e-14
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel(out, sdpa) < 1e-14


def test_n_kv_heads_equal_n_heads_is_plain_mha() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 9, 8, generator=gen, dtype=f64) for _ in range(3))
    assert rel(ga.grouped_attention(q, k, v), causal_attention(q, k, v)) < 1e-14
    assert ga.repeat_kv(k, 1) is k


def test_repeat_kv_maps_consecutive_query_heads_to_one_kv_head() -> None:
    k = torch.arange(3.0).view(1, 3, 1, 1)
    assert ga.repeat_kv(k, 2).flatten().tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(("heads", "groups", "length"), [(4, 4, 1), (8, 2, 13), (6, 1, 7)])
def test_grouped_decode_step_is_the_last_row_of_full_attention(heads: int, groups: int, length: int) -> None:
    gen = torch.Generator().manual_seed(heads)
    q = torch.randn(2, heads, length, 8, generator=gen, dtype=f64)
    k, v = (torch.randn(2, groups, length, 8, generator=gen, dtype=f64) for _ in range(2))
    step = ga.grouped_decode_step(q[:, :, -1:], k, v)
    assert rel(step, ga.grouped_attention(q, k, v)[:, :, -1:]) < 1e-14


def test_grouped_attention_bad_inputs_name_what_was_expected() -> None:
    q = torch.randn(1, 6, 3, 4)
    with pytest.raises(ValueError, match="must divide"):
        ga.grouped_attention(q, torch.randn(1, 4, 3, 4), torch.randn(1, 4, 3, 4))
    with pytest.raises(ValueError, match=r"\(batch, heads, length, head_dim\)"):
        ga.grouped_attention(q[0], q, q)
    with pytest.raises(ValueError, match="same shape"):
        ga.grouped_attention(q, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="one position"):
        ga.grouped_decode_step(q, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        ga.GroupedQueryAttention(16, 4, 3)
    with pytest.raises(ValueError, match="divisible"):
        ga.GroupedQueryAttention(10, 4)
    with pytest.raises(TypeError, match="n_rep must be an int"):
        ga.repeat_kv(q, 1.5)
    with pytest.raises(ValueError, match="must divide"):
        ga.grouped_mixer(4, 3)


MIXERS = {
    "mha": lambda: ga.grouped_mixer(4, 4),
    "gqa": lambda: ga.grouped_mixer(4, 2),
    "mqa": lambda: ga.grouped_mixer(4, 1),
    "mla": lambda: ga.latent_mixer(4, latent_dim=12, rope_dim=4),
    "mla-no-rope": lambda: ga.latent_mixer(2, latent_dim=8, rope_dim=0),
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixers_in_tinylm_cached_decode_equals_full_forward(name: str) -> None:
    torch.manual_seed(0)
    model = TinyLM(40, d_model=32, n_layers=2, max_len=48, sequence_mixer=MIXERS[name](), channel_mixer=None,
                   short_conv=4).double()
    tokens = torch.randint(0, 40, (2, 25))
    with torch.no_grad():
        full = model(tokens)
    logits, states = model.prefill(tokens[:, :7])
    worst = float((logits - full[:, 6]).abs().max())
    for t in range(7, 25):
        logits, states = model.decode_step(tokens[:, t], states, t)
        worst = max(worst, float((logits - full[:, t]).abs().max()))
    assert worst < 1e-12
    generated = model.generate(tokens[:, :5], 4)
    assert generated.shape == (2, 9)


def test_cache_holds_the_advertised_number_of_elements() -> None:
    x = torch.randn(3, 10, 32)
    for kv_heads in (4, 2, 1):
        layer = ga.GroupedQueryAttention(32, 4, kv_heads)
        _, cache = layer.prefill(x)
        assert cache.nbytes == 3 * 10 * layer.cache_elements_per_token * 4 == 3 * 10 * 2 * kv_heads * 8 * 4
    mla = ga.LatentAttention(32, 4, latent_dim=12, rope_dim=4)
    _, cache = mla.prefill(x)
    assert cache.view().shape == (3, 1, 10, 16) and cache.nbytes == 3 * 10 * 16 * 4


def test_mean_pool_conversion_averages_kv_heads_and_keeps_the_rest() -> None:
    torch.manual_seed(1)
    mha = ga.GroupedQueryAttention(32, 4, 4, bias=True).double()
    gqa = ga.mean_pool_kv_heads(mha, 2)
    assert gqa.n_kv_heads == 2 and torch.equal(gqa.q.weight, mha.q.weight) and torch.equal(gqa.out.weight, mha.out.weight)
    x = torch.randn(2, 6, 32, dtype=f64)
    _, k_old, v_old = mha.project(x)
    _, k_new, v_new = gqa.project(x)
    assert rel(k_new, k_old.view(2, 2, 2, 6, 8).mean(2)) < 1e-14
    assert rel(v_new, v_old.view(2, 2, 2, 6, 8).mean(2)) < 1e-14
    # pooling identical heads changes nothing
    same = ga.GroupedQueryAttention(32, 4, 4).double()
    with torch.no_grad():
        w = same.kv.weight.view(2, 4, 8, 32)
        w[:, 1] = w[:, 0]
        w[:, 3] = w[:, 2]
    assert rel(ga.mean_pool_kv_heads(same, 2)(x), same(x)) < 1e-14
    assert ga.mean_pool_kv_heads(mha, 1).n_kv_heads == 1
    with pytest.raises(ValueError, match="must divide"):
        ga.mean_pool_kv_heads(mha, 3)
    with pytest.raises(TypeError, match="GroupedQueryAttention"):
        ga.mean_pool_kv_heads(torch.nn.Linear(2, 2), 1)


# ----------------------------------------------------------------------------- MLA

def test_mla_absorbed_equals_naive_in_float64() -> None:
    torch.manual_seed(2)
    mla = ga.LatentAttention(48, 6, latent_dim=20, rope_dim=8).double()
    x = torch.randn(2, 17, 48, dtype=f64)
    assert rel(mla(x, absorbed=True), mla(x)) < 1e-13
    # decode with and without absorption
    outs = {}
    for absorbed in (True, False):
        mla.absorbed = absorbed
        state, ys = None, []
        for t in range(17):
            y, state = mla.decode_step(x[:, t:t + 1], state)
            ys.append(y)
        outs[absorbed] = torch.cat(ys, 1)
    assert rel(outs[True], outs[False]) < 1e-13 and rel(outs[True], mla(x)) < 1e-13


def test_absorb_mla_weights_gives_the_same_scores_and_outputs() -> None:
    gen = torch.Generator().manual_seed(5)
    h, d_model, d_c, d_h, t = 3, 10, 6, 4, 7
    w_q, w_uk, w_uv = (torch.randn(h, a, d_h, generator=gen, dtype=f64) for a in (d_model, d_c, d_c))
    w_o = torch.randn(h, d_h, d_model, generator=gen, dtype=f64)
    x = torch.randn(d_model, generator=gen, dtype=f64)
    c = torch.randn(t, d_c, generator=gen, dtype=f64)
    wq_abs, wo_abs = ga.absorb_mla_weights(w_q, w_uk, w_uv, w_o)
    assert wq_abs.shape == (h, d_model, d_c) and wo_abs.shape == (h, d_c, d_model)
    naive_scores = torch.einsum("hd,htd->ht", torch.einsum("m,hmd->hd", x, w_q), torch.einsum("tc,hcd->htd", c, w_uk))
    absorbed_scores = torch.einsum("hc,tc->ht", torch.einsum("m,hmc->hc", x, wq_abs), c)
    assert rel(absorbed_scores, naive_scores) < 1e-14
    p = naive_scores.softmax(-1)
    naive_out = torch.einsum("ht,htd,hdm->m", p, torch.einsum("tc,hcd->htd", c, w_uv), w_o)
    absorbed_out = torch.einsum("ht,tc,hcm->m", p, c, wo_abs)
    assert rel(absorbed_out, naive_out) < 1e-14
    with pytest.raises(ValueError, match="incompatible"):
        ga.absorb_mla_weights(w_q, w_uk, w_uv[:, :-1], w_o)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    gen = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 8, generator=gen, dtype=f64), torch.randn(1, 8, generator=gen, dtype=f64)
    s = [float(ga.rotary(q, torch.tensor([m + 5])) @ ga.rotary(k, torch.tensor([m])).T) for m in (0, 3, 40)]
    assert max(s) - min(s) < 1e-12
    with pytest.raises(ValueError, match="even"):
        ga.rotary(torch.randn(2, 3), torch.arange(2))


def test_mla_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rope_dim must be even"):
        ga.LatentAttention(16, 2, 8, 3)
    with pytest.raises(ValueError, match="divisible"):
        ga.LatentAttention(10, 4, 8, 2)
    with pytest.raises(ValueError, match="one token"):
        ga.LatentAttention(16, 2, 8, 2).decode_step(torch.randn(1, 2, 16), None)
    with pytest.raises(TypeError, match="latent_dim must be an int"):
        ga.latent_mixer(2, 8.0, 2)


# ----------------------------------------------------------------------------- cache sizes

def test_published_cache_sizes_deepseek_v2() -> None:
    mha = ga.cache_elements_per_token(n_kv_heads=128, head_dim=128)
    mla = ga.mla_elements_per_token(latent_dim=512, rope_dim=64)
    assert (mha, mla) == (32_768, 576)
    assert ga.equivalent_kv_groups(mla, 128) == 2.25
    assert ga.cache_elements_per_token(1, 128) == 256  # MQA
    assert math.isclose(mha / mla, 56.888, rel_tol=1e-4)


def test_quantized_bytes_per_element() -> None:
    assert ga.quantized_bytes_per_element(8, 1e9) == pytest.approx(1.0)
    assert ga.quantized_bytes_per_element(2, 32) == 0.25 + 4 / 32
    assert ga.QuantSpec(4, group=32, value_group=32).bytes_per_element(128) == 0.5 + 4 / 32
    with pytest.raises(ValueError, match="between 1 and 8"):
        ga.quantized_bytes_per_element(16, 32)
    with pytest.raises(ValueError, match="group must be a positive"):
        ga.quantized_bytes_per_element(4, 0)
    with pytest.raises(ValueError):
        ga.cache_elements_per_token(0, 128)
    with pytest.raises(ValueError, match="elements_per_token"):
        ga.equivalent_kv_groups(-1, 128)


# ----------------------------------------------------------------------------- quantisation

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
    err = {b: rel(ga.quantized_cache_attention(q, k, v, ga.QuantSpec(b, group=16, residual=16)), exact) for b in (2, 4, 8)}
    assert err[8] < 0.01 < err[2] and err[2] > err[4] > err[8]


# ----------------------------------------------------------------------------- checkers

def quiet(check, fn):
    return check(fn)


def test_checkers_pass_the_references(capsys) -> None:
    assert ga.check_grouped_decode_step(ga.grouped_decode_step)
    assert ga.check_absorb_mla_weights(ga.absorb_mla_weights)
    assert ga.check_quantize_dequantize(ga.quantize_dequantize)
    assert capsys.readouterr().out.count("✅") == 3


def not_done(*args):
    raise NotImplementedError("your code here")


def _attention_decode(q, k, v):
    return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v


GQA_WRONG = {
    "not done": not_done,
    "None": lambda q, k, v: None,
    "raises": lambda q, k, v: 1 / 0,
    "wrong shape (G heads)": lambda q, k, v: ga.grouped_decode_step(q, k, v)[:, : k.shape[1]],
    "wrong dtype": lambda q, k, v: ga.grouped_decode_step(q, k, v).double(),
    "NaN": lambda q, k, v: ga.grouped_decode_step(q, k, v) * float("nan"),
    "repeat instead of repeat_interleave": lambda q, k, v: _attention_decode(
        q, k.repeat(1, q.shape[1] // k.shape[1], 1, 1), v.repeat(1, q.shape[1] // k.shape[1], 1, 1)),
    "scaled by the cache length": lambda q, k, v: ga.grouped_decode_step(q * math.sqrt(q.shape[-1] / k.shape[-2]), k, v),
    "drops the newest token (off by one)": lambda q, k, v: ga.grouped_decode_step(q, k[:, :, :-1], v[:, :, :-1])
    if k.shape[2] > 1 else torch.zeros_like(q),
    "breaks on non-contiguous": lambda q, k, v: ga.grouped_decode_step(q, k.view(-1).view(k.shape), v),
}


MLA_WRONG = {
    "not done": not_done,
    "None": lambda *w: None,
    "one matrix only": lambda w_q, w_uk, w_uv, w_o: w_q @ w_uk.transpose(-1, -2),
    "forgot the transpose": lambda w_q, w_uk, w_uv, w_o: (w_q @ w_uk.transpose(-1, -2)[..., :0], w_uv @ w_o),
    "w_uv and w_uk swapped": lambda w_q, w_uk, w_uv, w_o: (w_q @ w_uv.transpose(-1, -2), w_uk @ w_o),
    "wrong dtype": lambda *w: tuple(t.double() for t in ga.absorb_mla_weights(*w)),
    "NaN": lambda *w: tuple(t * float("nan") for t in ga.absorb_mla_weights(*w)),
    "raises": lambda w_q, w_uk, w_uv, w_o: w_q @ w_uk,
    "summed over heads": lambda *w: tuple(t.sum(0, keepdim=True).expand_as(t) for t in ga.absorb_mla_weights(*w)),
}


def _quant_levels_off_by_one(x, bits, dim):
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / 2**bits).clamp_min(1e-30)
    return torch.round((x - lo) / scale).clamp(0, 2**bits) * scale + lo


def _quant_symmetric(x, bits, dim):
    scale = x.abs().amax(dim, keepdim=True) / (2 ** (bits - 1) - 0.5)
    return torch.round(x / scale) * scale


def _quant_no_zero_guard(x, bits, dim):
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    return torch.round((x - lo) / scale) * scale + lo


QUANT_WRONG = {
    "not done": not_done,
    "None": lambda x, bits, dim: None,
    "raises": lambda x, bits, dim: x.view(-1, 7),
    "identity (no quantisation)": lambda x, bits, dim: x.clone(),
    "statistics over the wrong dimension": lambda x, bits, dim: ga.quantize_dequantize(x, bits, 0 if dim != 0 else 1),
    "2**bits levels (off by one)": _quant_levels_off_by_one,
    "symmetric instead of asymmetric": _quant_symmetric,
    "0/0 on constant slices": _quant_no_zero_guard,
    "returns codes, not values": lambda x, bits, dim: ga.quantize_asymmetric(x, bits, dim)[0],
    "wrong dtype": lambda x, bits, dim: ga.quantize_dequantize(x, bits, dim).double(),
    "wrong shape (keepdim=False)": lambda x, bits, dim: ga.quantize_dequantize(x, bits, dim).sum(dim),
}


WRONG_ANSWERS = [
    pytest.param(checker, wrong, answer, id=f"{checker.__name__}-{wrong}")
    for checker, answers in (
        (ga.check_grouped_decode_step, GQA_WRONG),
        (ga.check_absorb_mla_weights, MLA_WRONG),
        (ga.check_quantize_dequantize, QUANT_WRONG),
    )
    for wrong, answer in answers.items()
]


@pytest.mark.parametrize("checker, wrong, answer", WRONG_ANSWERS)
def test_checkers_reject_wrong_answers_politely(checker, wrong: str, answer, capsys) -> None:
    result = checker(answer)
    out = capsys.readouterr().out
    assert not result
    if wrong == "not done":
        assert result.status == "not done" and "not done yet" in out
    else:
        assert result.status == "failed" and out.startswith("❌") and "Traceback" not in out


def test_checker_not_callable(capsys) -> None:
    assert not ga.check_grouped_decode_step(ga.grouped_decode_step(torch.randn(1, 2, 1, 4), torch.randn(1, 1, 3, 4),
                                                                    torch.randn(1, 1, 3, 4)))
    assert "expected a function" in capsys.readouterr().out


def test_forward_without_sdpa_enable_gqa_gives_the_same_result(monkeypatch) -> None:
    torch.manual_seed(12)
    layer = ga.GroupedQueryAttention(32, 4, 2).double()
    x = torch.randn(2, 9, 32, dtype=f64)
    with torch.no_grad():
        expected = layer(x)
        monkeypatch.setattr(ga, "_SDPA_HAS_GQA", False)
        assert rel(layer(x), expected) < 1e-14
