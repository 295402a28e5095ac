"""Chapter 02 cache arithmetic: the published per-token sizes (labsupport.harness.costs) and QuantSpec's bytes."""

from __future__ import annotations

import math

import pytest

from labsupport import grouped as ga
from labsupport.harness.costs import (
    cache_elements_per_token,
    equivalent_kv_groups,
    mla_elements_per_token,
    quantized_bytes_per_element,
)


def test_published_cache_sizes_deepseek_v2() -> None:
    mha = cache_elements_per_token(n_kv_heads=128, head_dim=128)
    mla = mla_elements_per_token(latent_dim=512, rope_dim=64)
    assert (mha, mla) == (32_768, 576)
    assert equivalent_kv_groups(mla, 128) == 2.25
    assert cache_elements_per_token(1, 128) == 256  # MQA
    assert math.isclose(mha / mla, 56.888, rel_tol=1e-4)


def test_quantized_bytes_per_element() -> None:
    assert quantized_bytes_per_element(8, 1e9) == pytest.approx(1.0)
    assert quantized_bytes_per_element(2, 32) == 0.25 + 4 / 32
    assert ga.QuantSpec(4, group=32, value_group=32).bytes_per_element(128) == 0.5 + 4 / 32
    with pytest.raises(ValueError, match="bits must be <= 8, got 16"):
        quantized_bytes_per_element(16, 32)
    with pytest.raises(ValueError, match="group must be positive"):
        quantized_bytes_per_element(4, 0)
    with pytest.raises(ValueError):
        cache_elements_per_token(0, 128)
    with pytest.raises(ValueError, match="elements_per_token"):
        equivalent_kv_groups(-1, 128)
