"""Chapter 02 mixers (labsupport.grouped.mixers): GQA/MQA and MLA in TinyLM, their caches, mean-pool conversion."""

from __future__ import annotations

import pytest
import torch

from labsupport import grouped as ga
from labsupport.grouped import mixers
from labsupport.harness.numerics import rel_err
from labsupport.lm.contracts import CacheReport, DecodingMixer
from labsupport.lm.model import TinyLM

f64 = torch.float64


def test_mixer_bad_arguments_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        ga.GroupedQueryAttention(16, 4, 3)
    with pytest.raises(ValueError, match="divisible"):
        ga.GroupedQueryAttention(10, 4)
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


@pytest.mark.parametrize("layer", [ga.GroupedQueryAttention(32, 4, 2), ga.LatentAttention(32, 4, latent_dim=12, rope_dim=4)],
                         ids=["gqa", "mla"])
def test_mixers_meet_the_lm_contract_and_report_their_cache_bytes(layer) -> None:
    assert isinstance(layer, DecodingMixer) and isinstance(layer, CacheReport)
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        _, state = layer.prefill(x)
        assert layer.cache_bytes(state) == state.nbytes == 3 * 10 * layer.cache_elements_per_token * 4
        _, state = layer.decode_step(x[:, :1], state)
    assert layer.cache_bytes(state) == 3 * 11 * layer.cache_elements_per_token * 4
    with pytest.raises(TypeError, match="state must be a"):
        layer.cache_bytes(None)


def test_quantised_cache_bytes_are_reported_packed() -> None:
    layer = ga.GroupedQueryAttention(32, 4, 2)
    layer.kv_quant = ga.QuantSpec(2, group=4, residual=4)
    with torch.no_grad():
        _, state = layer.prefill(torch.randn(1, 12, 32))
    assert isinstance(state, ga.QuantizedKVCache)
    assert layer.cache_bytes(state) == state.nbytes < 12 * layer.cache_elements_per_token * 4


def test_mean_pool_conversion_averages_kv_heads_and_keeps_the_rest() -> None:
    torch.manual_seed(1)
    mha = ga.GroupedQueryAttention(32, 4, 4, bias=True).double()
    gqa = ga.mean_pool_kv_heads(mha, 2)
    assert gqa.n_kv_heads == 2 and torch.equal(gqa.q.weight, mha.q.weight) and torch.equal(gqa.out.weight, mha.out.weight)
    x = torch.randn(2, 6, 32, dtype=f64)
    _, k_old, v_old = mha.project(x)
    _, k_new, v_new = gqa.project(x)
    assert rel_err(k_new, k_old.view(2, 2, 2, 6, 8).mean(2)) < 1e-14
    assert rel_err(v_new, v_old.view(2, 2, 2, 6, 8).mean(2)) < 1e-14
    # pooling identical heads changes nothing
    same = ga.GroupedQueryAttention(32, 4, 4).double()
    with torch.no_grad():
        w = same.kv.weight.view(2, 4, 8, 32)
        w[:, 1] = w[:, 0]
        w[:, 3] = w[:, 2]
    assert rel_err(ga.mean_pool_kv_heads(same, 2)(x), same(x)) < 1e-14
    assert ga.mean_pool_kv_heads(mha, 1).n_kv_heads == 1
    with pytest.raises(ValueError, match="must divide"):
        ga.mean_pool_kv_heads(mha, 3)
    with pytest.raises(TypeError, match="GroupedQueryAttention"):
        ga.mean_pool_kv_heads(torch.nn.Linear(2, 2), 1)


def test_forward_without_sdpa_enable_gqa_gives_the_same_result(monkeypatch) -> None:
    torch.manual_seed(12)
    layer = ga.GroupedQueryAttention(32, 4, 2).double()
    x = torch.randn(2, 9, 32, dtype=f64)
    with torch.no_grad():
        expected = layer(x)
        monkeypatch.setattr(mixers, "_SDPA_HAS_GQA", False)
        assert rel_err(layer(x), expected) < 1e-14


# ----------------------------------------------------------------------------- MLA

def test_mla_absorbed_equals_naive_in_float64() -> None:
    torch.manual_seed(2)
    mla = ga.LatentAttention(48, 6, latent_dim=20, rope_dim=8).double()
    x = torch.randn(2, 17, 48, dtype=f64)
    assert rel_err(mla(x, absorbed=True), mla(x)) < 1e-13
    # decode with and without absorption
    outs = {}
    for absorbed in (True, False):
        mla.absorbed = absorbed
        state, ys = None, []
        for t in range(17):
            y, state = mla.decode_step(x[:, t:t + 1], state)
            ys.append(y)
        outs[absorbed] = torch.cat(ys, 1)
    assert rel_err(outs[True], outs[False]) < 1e-13 and rel_err(outs[True], mla(x)) < 1e-13


def test_mla_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rope_dim must be even"):
        ga.LatentAttention(16, 2, 8, 3)
    with pytest.raises(ValueError, match="divisible"):
        ga.LatentAttention(10, 4, 8, 2)
    with pytest.raises(ValueError, match="one token"):
        ga.LatentAttention(16, 2, 8, 2).decode_step(torch.randn(1, 2, 16), None)
    with pytest.raises(TypeError, match="latent_dim must be an int"):
        ga.latent_mixer(2, 8.0, 2)
