"""labsupport.harness.numerics: rel_err, assert_close, seeded_randn, accumulation_dtype."""

from __future__ import annotations

import math

import pytest
import torch

from labsupport.harness.numerics import accumulation_dtype, assert_close, rel_err, seeded_randn


def test_rel_err_is_the_relative_frobenius_distance() -> None:
    b = torch.tensor([3.0, 4.0])
    assert rel_err(b + torch.tensor([0.0, 0.5]), b) == pytest.approx(0.1)
    assert rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    assert rel_err(torch.ones(3), torch.zeros(3)) == math.inf


def test_rel_err_never_hides_nan_and_works_across_dtypes() -> None:
    b = torch.ones(4)
    assert math.isnan(rel_err(torch.tensor([1.0, float("nan"), 1.0, 1.0]), b))
    assert rel_err(b.half(), b.double()) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        rel_err(torch.ones(3), torch.ones(4))
    with pytest.raises(TypeError):
        rel_err([1.0], b)


def test_assert_close_reports_what_and_how_far() -> None:
    b = torch.ones(4)
    assert assert_close(b, b, tol=0.0) == 0.0
    with pytest.raises(AssertionError, match="chunkwise vs recurrent: relative error 5.0e-01 > 1e-06"):
        assert_close(b * 1.5, b, tol=1e-6, what="chunkwise vs recurrent")
    with pytest.raises(AssertionError):
        assert_close(b * float("nan"), b, tol=1.0)


def test_seeded_randn_is_reproducible_and_float32_rounds_float64() -> None:
    a = seeded_randn(torch.Generator().manual_seed(3), 2, 5)
    b = seeded_randn(torch.Generator().manual_seed(3), 2, 5, dtype=torch.float32)
    assert a.dtype == torch.float64 and b.dtype == torch.float32
    assert torch.equal(a.float(), b)
    with pytest.raises(TypeError, match="torch.Generator"):
        seeded_randn(3, 2)


def test_accumulation_dtype() -> None:
    assert accumulation_dtype(torch.float64) == torch.float64
    for low in (torch.float16, torch.bfloat16, torch.float32):
        assert accumulation_dtype(low) == torch.float32
