"""labsupport.harness.costs: byte arithmetic (KV cache, format_bytes) and FLOPs and bytes of a decoder (TransformerShape)."""

from __future__ import annotations

import time

import plotly.graph_objects as go
import pytest
import torch

from labsupport.harness.costs import MODEL_PRESETS, TransformerShape, format_bytes, kv_cache_bytes

MB = 1_000_000

# --------------------------------------------------------------------------- KV cache


def test_kv_cache_bytes_reproduces_the_jamba_papers_llama2_7b_figure() -> None:
    llama2_7b = kv_cache_bytes(layers=32, kv_heads=32, head_dim=128, context=262_144)
    assert llama2_7b == 2**37
    assert format_bytes(llama2_7b) == "128 GiB"
    assert format_bytes(llama2_7b, binary=False) == "137 GB"


def test_kv_cache_bytes_scales_with_every_factor() -> None:
    base = dict(layers=2, kv_heads=4, head_dim=8, context=16)
    assert kv_cache_bytes(**base) == 2 * 2 * 4 * 8 * 16 * 2
    assert kv_cache_bytes(**base, bytes_per_element=1, batch=3) == 2 * 2 * 4 * 8 * 16 * 3
    assert kv_cache_bytes(**{**base, "context": 0}) == 0


@pytest.mark.parametrize(
    ("override", "error"),
    [({"layers": 0}, ValueError), ({"kv_heads": 2.0}, TypeError), ({"context": -1}, ValueError),
     ({"bytes_per_element": 0}, ValueError), ({"batch": None}, TypeError)],
)
def test_kv_cache_bytes_rejects_bad_input(override, error) -> None:
    with pytest.raises(error):
        kv_cache_bytes(**{"layers": 1, "kv_heads": 1, "head_dim": 1, "context": 1, **override})


@pytest.mark.parametrize(
    ("n", "kwargs", "text"),
    [
        (0, {}, "0 B"),
        (1023, {}, "1023 B"),
        (1024, {}, "1 KiB"),
        (1536, {}, "1.5 KiB"),
        (1_048_575, {}, "1 MiB"),  # rounds up into the next unit, never "1024 KiB"
        (4 * MB, {}, "3.81 MiB"),
        (4 * MB, {"binary": False}, "4 MB"),
        (999_999, {"binary": False}, "1 MB"),
        (1500, {"binary": False}, "1.5 kB"),
        (2**40 * 3, {}, "3 TiB"),
    ],
)
def test_format_bytes(n, kwargs, text) -> None:
    assert format_bytes(n, **kwargs) == text


@pytest.mark.parametrize(("n", "error"), [(-1, ValueError), (float("inf"), ValueError), ("1", TypeError), (True, TypeError)])
def test_format_bytes_rejects_bad_input(n, error) -> None:
    with pytest.raises(error):
        format_bytes(n)


# --------------------------------------------------------------------------- TransformerShape


def test_transformer_shape_counts() -> None:
    llama = MODEL_PRESETS["LLaMA-2-7B"]
    assert 6.4e9 < llama.params < 6.8e9  # ~6.6B weights used per token (embedding lookup excluded)
    flops, moved = llama.decode_step(context=1, batch=1)
    assert 0.9 < flops / moved < 1.1  # about one FLOP per byte at batch 1 in fp16
    flops64, moved64 = llama.decode_step(context=1, batch=64)
    assert flops64 / moved64 > 50 * flops / moved * 0.9
    pf, pm = llama.prefill(4096)
    assert pf / pm > 1000  # prefill is compute-bound
    with pytest.raises(ValueError, match="multiple"):
        TransformerShape(2, 64, 6, 4, 16, 128, 100)
    with pytest.raises(ValueError):
        llama.decode_step(0)


def test_prefill_counts_the_mean_causal_context_rounded_up():
    # A prompt of L tokens attends to 1, 2, ..., L keys: on average (L + 1) / 2, not L / 2.
    shape = TransformerShape(layers=2, d_model=64, q_heads=4, kv_heads=2, head_dim=16, d_ff=256, vocab=100)
    for length in (1, 5, 8):
        flops, _ = shape.prefill(length, batch=3)
        assert flops == 3 * length * shape.flops_per_token((length + 1) // 2)
    assert shape.prefill(1)[0] > 0 and shape.prefill(1)[0] == shape.flops_per_token(1)


def test_sparse_decode_formulas():
    from labsupport.harness.costs import decode_read_bytes, nsa_tokens_per_step, policy_tokens_per_step

    assert [nsa_tokens_per_step(s)["total"] + 1 for s in (8192, 16384, 32768, 65536)] == [2048, 2560, 3584, 5632]
    assert nsa_tokens_per_step(16) == {"compressed": 0, "selected": 16, "window": 16, "total": 32}
    assert policy_tokens_per_step("full", 1000, 64) == {"tokens": 1000, "pages": 0}
    assert policy_tokens_per_step("h2o", 1000, 64) == {"tokens": 64, "pages": 0}
    assert policy_tokens_per_step("window", 10, 64) == {"tokens": 10, "pages": 0}
    # 4 pages read: 3 full ones and the newest, which holds 1000 − 62·16 = 8 tokens so far
    assert policy_tokens_per_step("quest", 1000, 70, page=16) == {"tokens": 56, "pages": 63}
    assert decode_read_bytes(100, layers=2, kv_heads=4, head_dim=8, pages=10) == 2 * 2 * 4 * 8 * 2 * 110
    with pytest.raises(ValueError, match="policy"):
        policy_tokens_per_step("lru", 10, 4)


def test_chapter_10_mixing_flops_and_the_roofline_time():
    from labsupport.harness.costs import mixer_token_flops, roofline_seconds

    shape = MODEL_PRESETS["LLaMA-2-7B"]
    per_layer = mixer_token_flops("attention", d_model=shape.d_model, attended=1000)
    assert shape.layers * per_layer == shape.flops_per_token(1000) - 2 * shape.params  # the same attention term
    assert mixer_token_flops("state", d_model=64, state_numbers=2048) == 4 * 2048
    assert roofline_seconds(2e9, 1e9, flops_per_s=1e12, bytes_per_s=1e9) == 1.0  # memory-bound: the larger
    assert roofline_seconds(2e12, 1e3, flops_per_s=1e12, bytes_per_s=1e9) == 2.0
    with pytest.raises(ValueError, match="kind must be"):
        mixer_token_flops("window", d_model=64)
    with pytest.raises(ValueError, match="flops_per_s must be positive"):
        roofline_seconds(1.0, 1.0, flops_per_s=0.0, bytes_per_s=1.0)
