"""Input guards: the one place where public functions check what they were given.

Every guard raises ``TypeError`` when a value has the wrong type and
``ValueError`` when it has the right type but an unusable value, with a message
that names the argument, what was expected and what came::

    require_int("steps", 1.5)        # TypeError: steps must be an int, got float (1.5)
    require_int("steps", 0, minimum=1)  # ValueError: steps must be >= 1, got 0

Names follow one rule: ``require_*`` guards inputs; ``check_*`` (in the
families' ``exercises`` modules) grades a learner's function.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Sequence
from typing import TypeVar

import torch

__all__ = [
    "FLOAT_DTYPES",
    "require_callable",
    "require_choice",
    "require_float",
    "require_float_tensor",
    "require_int",
    "require_positive_floats",
    "require_positive_int",
    "require_probability",
    "require_qkv",
    "require_tensor",
]

#: The floating-point dtypes the course's kernels accept.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

T = TypeVar("T")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} ({value!r})"


def require_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` (``bool`` is refused), optionally within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def require_positive_int(name: str, value: object) -> int:
    """``value`` as an ``int`` of at least 1."""
    return require_int(name, value, minimum=1)


def require_float(name: str, value: object, *, positive: bool = False, minimum: float | None = None,
                  maximum: float | None = None) -> float:
    """A finite real number (ints accepted, ``bool`` refused), optionally positive or within bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_describe(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if positive and number <= 0:
        raise ValueError(f"{name} must be positive, got {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {number}")
    return number


def require_probability(name: str, value: object, *, open_right: bool = False) -> float:
    """A number in ``[0, 1]`` (or ``[0, 1)`` with ``open_right``)."""
    number = require_float(name, value, minimum=0.0, maximum=1.0)
    if open_right and number >= 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {number}")
    return number


def require_positive_floats(name: str, values: object) -> list[float]:
    """A non-empty sequence of finite positive numbers, as floats."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of positive numbers, got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty")
    return [require_float(f"{name}[{i}]", v, positive=True) for i, v in enumerate(values)]


def require_callable(name: str, value: object) -> None:
    """Refuse anything that cannot be called."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")


def require_choice(name: str, value: T, choices: Collection[T]) -> T:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {shown}; got {value!r}")
    return value


def require_tensor(name: str, value: object, *, ndim: int | None = None) -> torch.Tensor:
    """A ``torch.Tensor``, optionally with ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def require_float_tensor(name: str, value: object, *, ndim: int | None = None,
                         dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """A floating-point tensor (one of ``dtypes``), optionally with ``ndim`` dimensions."""
    tensor = require_tensor(name, value, ndim=ndim)
    if tensor.dtype not in dtypes:
        allowed = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be a floating-point tensor ({allowed}), got {tensor.dtype}")
    return tensor


def require_qkv(q: object, k: object, v: object, *, ndim: int | None = 4, grouped: bool = False,
                same_value_dim: bool = True, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of attention: ``q (B, H, Lq, D)``, ``k (B, G, Lk, D)``, ``v (B, G, Lk, Dv)``.

    Args:
        ndim: the number of dimensions all three must have (``None``: any, at least 2, equal).
        grouped: allow fewer key/value heads ``G`` than query heads ``H``, ``G`` dividing ``H``
            (grouped-query attention); otherwise ``G == H``.
        same_value_dim: require ``Dv == D``.
        dtypes: allowed floating-point dtypes; the three must share one.
    """
    for name, value in (("q", q), ("k", k), ("v", v)):
        tensor = require_tensor(name, value)
        if ndim == 4 and tensor.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, heads, length, head_dim), "
                             f"got shape {tuple(tensor.shape)}")
    q = require_float_tensor("q", q, ndim=ndim, dtypes=dtypes)
    k = require_float_tensor("k", k, ndim=ndim, dtypes=dtypes)
    v = require_float_tensor("v", v, ndim=ndim, dtypes=dtypes)
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() == 4:
        shapes += " (attention tensors are (batch, heads, length, head_dim))"
    if q.dim() < 2 or not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"q, k, v must be (..., length, head_dim) with the same number of dimensions; got {shapes}")
    if q.shape[:-3] != k.shape[:-3] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"q, k, v must share their batch dimensions and k, v their heads; got {shapes}")
    if q.dim() >= 3:
        heads, kv_heads = q.shape[-3], k.shape[-3]
        if grouped:
            if kv_heads == 0 or heads % kv_heads:
                raise ValueError(f"the number of key/value heads ({kv_heads}) must divide the number of "
                                 f"query heads ({heads}); got {shapes}")
        elif heads != kv_heads:
            raise ValueError(f"q, k, v must have the same number of heads; got {shapes}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dimension; got {shapes}")
    if same_value_dim and v.shape[-1] != k.shape[-1]:
        raise ValueError(f"v must have the head dimension of k; got {shapes}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length; got {shapes}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"q and k must hold at least one position each (length 0 given); got {shapes}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    return q, k, v
