"""Numerical yardsticks shared by every chapter: relative error, closeness, seeded test tensors.

* :func:`rel_err` — ``‖a − b‖ / ‖b‖``, the number every equivalence ladder prints.
* :func:`assert_close` — :func:`rel_err` below a tolerance, or an ``AssertionError`` saying by how much.
* :func:`seeded_randn` — a standard-normal tensor from a given generator (the cases of checkers and tests).
* :func:`accumulation_dtype` — the dtype to accumulate in: float64 stays, everything else goes to float32.
* :func:`masked_softmax` — a softmax whose fully masked slices give zeros instead of NaN.

Two conventions hold for every attention form of the course (softmax, tiled, grouped, latent, cached):

* **Low precision.** fp16 and bf16 inputs are computed in float32 — scores, softmax, running
  statistics, recurrent states — and the output is cast back to the input dtype. A logsumexp is
  returned in float32 (float64 for float64 inputs).
* **Fully masked rows.** A query that may see no key at all (causal with more queries than keys,
  the bottom-right-aligned mask leaving the first ``Lq − Lk`` rows empty) has output **zeros** and
  logsumexp **−inf**, never NaN. ``tests/test_masked_rows.py`` holds every form to it.
"""

from __future__ import annotations

import torch

from labsupport.harness.validation import require_float, require_int, require_tensor

__all__ = ["accumulation_dtype", "assert_close", "masked_softmax", "rel_err", "seeded_randn"]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual − expected‖ / ‖expected‖`` in float64 (0 when both are zero).

    The Frobenius norm over all elements; gradients are detached. A NaN or inf
    anywhere gives ``nan`` or ``inf``, so a broken result never looks close.
    """
    actual = require_tensor("actual", actual)
    expected = require_tensor("expected", expected)
    if actual.shape != expected.shape:
        raise ValueError(f"rel_err needs two tensors of one shape, got {tuple(actual.shape)} and "
                         f"{tuple(expected.shape)}")
    a = actual.detach().to(torch.float64)
    b = expected.detach().to(torch.float64)
    difference = float((a - b).norm())
    scale = float(b.norm())
    if scale == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, tol: float, what: str = "result") -> float:
    """Assert ``rel_err(actual, expected) <= tol`` and return the error.

    The message names ``what`` was compared and the error found, e.g.
    ``chunkwise vs recurrent: relative error 3.1e-04 > 1e-10``.
    """
    tol = require_float("tol", tol, minimum=0.0)
    error = rel_err(actual, expected)
    if not error <= tol:  # also catches NaN
        raise AssertionError(f"{what}: relative error {error:.1e} > {tol:.0e}")
    return error


def seeded_randn(generator: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64,
                 scale: float = 1.0) -> torch.Tensor:
    """``scale · N(0, 1)`` of ``shape`` drawn from ``generator`` (in float64, then cast to ``dtype``).

    Drawing in float64 and casting makes a float32 case the rounded copy of the
    float64 case with the same seed, so the two can be compared.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    dims = [require_int(f"shape[{i}]", s, minimum=0) for i, s in enumerate(shape)]
    return (scale * torch.randn(*dims, generator=generator, dtype=torch.float64)).to(dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype (fp16/bf16 accumulate in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_softmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` after subtracting the maximum; a slice that is entirely ``-inf`` gives zeros.

    ``torch.softmax`` gives NaN on such a slice (``exp(-inf - (-inf))``); this is the
    fully-masked-row convention of the module docstring. Computed in the dtype of ``scores``
    (pass float32 scores for fp16/bf16 work). Differentiable.
    """
    scores = require_tensor("scores", scores)
    peak = scores.amax(dim=dim, keepdim=True)
    peak = torch.where(torch.isinf(peak) & (peak < 0), torch.zeros_like(peak), peak)
    e = torch.exp(scores - peak)
    total = e.sum(dim=dim, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)
