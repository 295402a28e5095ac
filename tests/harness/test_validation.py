"""labsupport.harness.validation: the one set of input guards."""

from __future__ import annotations

import pytest
import torch

from labsupport.harness.validation import (
    require_callable,
    require_choice,
    require_float,
    require_float_tensor,
    require_int,
    require_positive_floats,
    require_positive_int,
    require_probability,
    require_qkv,
)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: require_int("steps", 1.5), TypeError, "steps must be an int, got float"),
        (lambda: require_int("steps", True), TypeError, "steps must be an int"),
        (lambda: require_int("steps", 0, minimum=1), ValueError, "steps must be >= 1, got 0"),
        (lambda: require_int("bits", 9, maximum=8), ValueError, "bits must be <= 8"),
        (lambda: require_positive_int("heads", -2), ValueError, "heads must be >= 1"),
        (lambda: require_float("lr", "0.1"), TypeError, "lr must be a number"),
        (lambda: require_float("lr", float("nan")), ValueError, "lr must be finite"),
        (lambda: require_float("lr", 0.0, positive=True), ValueError, "lr must be positive"),
        (lambda: require_probability("p", 1.0, open_right=True), ValueError, r"p must be in \[0, 1\)"),
        (lambda: require_positive_floats("sizes", []), ValueError, "sizes must not be empty"),
        (lambda: require_positive_floats("sizes", [1, -1]), ValueError, r"sizes\[1\] must be positive"),
        (lambda: require_callable("fn", 3), TypeError, "fn must be callable"),
        (lambda: require_choice("mode", "x", ("a", "b")), ValueError, "mode must be one of 'a', 'b'; got 'x'"),
        (lambda: require_float_tensor("q", torch.zeros(2, dtype=torch.long)), TypeError, "floating-point"),
        (lambda: require_float_tensor("q", [1.0]), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_guards_name_the_argument_and_what_came(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


def test_guards_return_the_checked_value() -> None:
    assert require_int("n", 3, minimum=1) == 3
    assert require_float("x", 2) == 2.0 and isinstance(require_float("x", 2), float)
    assert require_positive_floats("v", [1, 2.5]) == [1.0, 2.5]
    assert require_choice("m", "a", ("a",)) == "a"


def _qkv(q=(1, 4, 5, 8), k=(1, 4, 6, 8), v=(1, 4, 6, 8), dtype=torch.float32):
    return torch.zeros(q, dtype=dtype), torch.zeros(k, dtype=dtype), torch.zeros(v, dtype=dtype)


def test_require_qkv_accepts_attention_shapes() -> None:
    q, k, v = _qkv()
    assert require_qkv(q, k, v)[0] is q
    require_qkv(*_qkv(k=(1, 2, 6, 8), v=(1, 2, 6, 8)), grouped=True)
    require_qkv(*_qkv(v=(1, 4, 6, 3)), same_value_dim=False)


@pytest.mark.parametrize(
    ("tensors", "options", "error", "message"),
    [
        (_qkv(q=(1, 4, 5, 7)), {}, ValueError, "same head dimension"),
        (_qkv(k=(1, 2, 6, 8), v=(1, 2, 6, 8)), {}, ValueError, "same number of heads"),
        (_qkv(k=(1, 3, 6, 8), v=(1, 3, 6, 8)), {"grouped": True}, ValueError, "must divide"),
        (_qkv(v=(1, 4, 7, 8)), {}, ValueError, "same length"),
        (_qkv(v=(1, 4, 6, 3)), {}, ValueError, "head dimension of k"),
        (_qkv(q=(1, 4, 0, 8)), {}, ValueError, "at least one position"),
        (_qkv(q=(4, 5, 8), k=(4, 6, 8), v=(4, 6, 8)), {}, ValueError, "4 dimensions"),
        (_qkv(dtype=torch.float64), {"dtypes": (torch.float16, torch.float32)}, TypeError, "float16/float32"),
    ],
)
def test_require_qkv_rejects_mismatches(tensors, options, error, message) -> None:
    with pytest.raises(error, match=message):
        require_qkv(*tensors, **options)


def test_require_qkv_rejects_mixed_dtypes() -> None:
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="share one dtype"):
        require_qkv(q, k.double(), v)
