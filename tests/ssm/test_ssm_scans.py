"""Every scan equals the sequential loop, in float64 and float32, and stays sane at L = 65,536."""

from __future__ import annotations

import pytest
import torch

from labsupport.harness.numerics import rel_err
from labsupport.ssm.scans import SCANS, chunked_scan, combine, log_space_scan, sequential_scan

PARALLEL = [name for name in SCANS if name != "sequential"]


def _inputs(length: int, dtype: torch.dtype, seed: int = 0, rest: tuple[int, ...] = (3, 4)):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(2, length, *rest, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(2, length, *rest, generator=gen, dtype=torch.float64).to(dtype)
    h0 = torch.randn(2, *rest, generator=gen, dtype=torch.float64).to(dtype)
    return a, b, h0


@pytest.mark.parametrize("name", PARALLEL)
@pytest.mark.parametrize("length", [1, 2, 5, 16, 37, 100])
def test_scan_equals_the_loop_in_float64(name: str, length: int) -> None:
    a, b, h0 = _inputs(length, torch.float64)
    assert rel_err(SCANS[name](a, b, h0), sequential_scan(a, b, h0)) < 1e-12
    assert rel_err(SCANS[name](a, b), sequential_scan(a, b)) < 1e-12


@pytest.mark.parametrize("name", PARALLEL)
def test_scan_equals_the_loop_in_float32(name: str) -> None:
    a, b, h0 = _inputs(77, torch.float32)
    expected = sequential_scan(a.double(), b.double(), h0.double())
    out = SCANS[name](a, b, h0)
    assert out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("name", PARALLEL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(name: str, dtype: torch.dtype) -> None:
    a, b, _ = _inputs(300, dtype)
    a = (0.9 + 0.1 * a.float()).to(dtype)  # long memory: sums of ~10 terms, fine in fp32, lossy in fp16
    out = SCANS[name](a, b)
    assert out.dtype == dtype
    expected = sequential_scan(a.double(), b.double())
    assert rel_err(out, expected) < 1e-2


@pytest.mark.parametrize("chunk", [1, 3, 8, 100, 200])
def test_chunked_scan_any_chunk_size(chunk: int) -> None:
    a, b, h0 = _inputs(100, torch.float64)
    assert rel_err(chunked_scan(a, b, h0, chunk_size=chunk), sequential_scan(a, b, h0)) < 1e-12


def test_negative_inputs_and_decays() -> None:
    a, b, h0 = _inputs(50, torch.float64)
    a = 2 * a - 1  # decays of both signs: every scan but the log-space one handles them
    for name in ("hillis_steele", "blelloch", "chunked"):
        assert rel_err(SCANS[name](a, b, h0), sequential_scan(a, b, h0)) < 1e-12
    with pytest.raises(ValueError, match="a >= 0"):
        log_space_scan(a, b)


@pytest.mark.parametrize("name", list(SCANS))
def test_long_sequences_stay_stable(name: str) -> None:
    """L = 65,536 in float32: decays near 1 keep a memory from the first token; decays near 0 neither
    overflow nor underflow to NaN."""
    length = 65_536
    # channel 0: a = 1 − 1e-5, one impulse at t = 0 → h_t = (1 − 1e-5)^t (about 0.52 at the end)
    # channel 1: a = 1e-3, b = 1 everywhere → h_t = 1 + 1e-3 + ... ≈ 1.001001
    # channel 2: a = 1e-30 (denormal range), b alternating ±1
    a = torch.tensor([1 - 1e-5, 1e-3, 1e-30], dtype=torch.float32).expand(1, length, 3).clone()
    b = torch.zeros(1, length, 3, dtype=torch.float32)
    b[0, 0, 0] = 1.0
    b[0, :, 1] = 1.0
    b[0, :, 2] = torch.tensor([1.0, -1.0]).repeat(length // 2)
    h = SCANS[name](a, b)
    assert torch.isfinite(h).all()
    steps = torch.arange(length, dtype=torch.float64)
    long_memory = torch.exp(steps * torch.log1p(torch.tensor(-1e-5, dtype=torch.float64)))
    assert rel_err(h[0, :, 0], long_memory) < 1e-3
    assert abs(float(h[0, -1, 1]) - 1 / (1 - 1e-3)) < 1e-5
    assert torch.allclose(h[0, :, 2].double(), b[0, :, 2].double(), atol=1e-6)


def test_combine_is_associative_and_matches_two_steps() -> None:
    a, b, _ = _inputs(3, torch.float64)
    first = combine(*combine(a[:, 0], b[:, 0], a[:, 1], b[:, 1]), a[:, 2], b[:, 2])
    second = combine(a[:, 0], b[:, 0], *combine(a[:, 1], b[:, 1], a[:, 2], b[:, 2]))
    assert all(rel_err(x, y) < 1e-15 for x, y in zip(first, second))
    h = torch.randn(2, 3, 4, dtype=torch.float64)
    two_steps = a[:, 1] * (a[:, 0] * h + b[:, 0]) + b[:, 1]
    ab, bb = combine(a[:, 0], b[:, 0], a[:, 1], b[:, 1])
    assert rel_err(ab * h + bb, two_steps) < 1e-15


def test_chunked_scan_gradients() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(2, 11, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 11, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(chunked_scan, (a, b, h0))
    assert torch.autograd.gradcheck(lambda x, y: chunked_scan(x, y), (a, b))


def test_bad_inputs_are_named() -> None:
    a, b, h0 = _inputs(5, torch.float64)
    for scan in SCANS.values():
        with pytest.raises(ValueError, match="one shape"):
            scan(a, b[:, :4])
        with pytest.raises(TypeError, match="share one dtype"):
            scan(a, b.float())
        with pytest.raises(ValueError, match="h0 must be"):
            scan(a, b, h0[:, :2])
        with pytest.raises(TypeError, match="a must be a torch.Tensor"):
            scan([1.0], b)
        with pytest.raises(ValueError, match="at least 2 dimensions"):
            scan(a[0, 0, 0], b[0, 0, 0])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_scan(a, b, chunk_size=0)
