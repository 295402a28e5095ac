"""The fused native scan equals the loop, keeps the scan contract, and refuses what it cannot do.

Building it takes about a minute the first time (torch caches the build); without a C++
compiler or ninja the tests that need the build are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from labsupport.harness.numerics import rel_err
from labsupport.ssm.native import native_scan, native_scan_available
from labsupport.ssm.scans import sequential_scan

AVAILABLE, REASON = native_scan_available()
needs_build = pytest.mark.skipif(not AVAILABLE, reason=f"fused native scan not buildable: {REASON}")


def _inputs(length: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(2, length, 3, 4, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(2, length, 3, 4, generator=gen, dtype=torch.float64).to(dtype)
    h0 = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).to(dtype)
    return a, b, h0


@needs_build
@pytest.mark.parametrize("length", [1, 2, 37, 1000])
def test_native_scan_equals_the_loop(length: int) -> None:
    a, b, h0 = _inputs(length, torch.float64)
    assert rel_err(native_scan(a, b, h0), sequential_scan(a, b, h0)) < 1e-12
    assert rel_err(native_scan(a, b), sequential_scan(a, b)) < 1e-12
    a32, b32, h032 = _inputs(length, torch.float32)
    out = native_scan(a32, b32, h032)
    assert out.dtype == torch.float32
    assert rel_err(out, sequential_scan(a32.double(), b32.double(), h032.double())) < 1e-5


@needs_build
def test_native_scan_half_precision_accumulates_in_float32_and_reads_strided_inputs() -> None:
    a, b, _ = _inputs(300, torch.float32)
    expected = sequential_scan(a.half().float(), b.half().float())
    out = native_scan(a.half(), b.half())
    assert out.dtype == torch.float16
    assert rel_err(out.float(), expected) < 2e-3
    # a transposed (non-contiguous) view gives the same numbers as its contiguous copy
    at, bt = a.transpose(2, 3), b.transpose(2, 3)
    assert not at.is_contiguous()
    assert rel_err(native_scan(at, bt), sequential_scan(at.contiguous(), bt.contiguous())) < 1e-6


@needs_build
def test_native_scan_is_stable_at_65536_with_decays_near_0_and_1() -> None:
    length = 65_536
    a = torch.full((1, length, 2), 1.0 - 1e-6)
    a[:, :, 1] = 1e-30
    b = torch.zeros(1, length, 2)
    b[:, 0] = 1.0
    h = native_scan(a, b)
    assert torch.isfinite(h).all()
    assert h[0, -1, 0].item() == pytest.approx((1.0 - 1e-6) ** (length - 1), rel=1e-3)  # the long memory survives
    assert h[0, -1, 1].item() == 0.0  # and a near-zero decay forgets exactly


def test_native_scan_refuses_gradients_and_bad_inputs() -> None:
    a, b, _ = _inputs(8, torch.float32)
    with pytest.raises(RuntimeError, match="chunked_scan"):
        native_scan(a.requires_grad_(), b)
    with pytest.raises(ValueError, match="one shape"):
        native_scan(torch.rand(1, 4, 2), torch.rand(1, 5, 2))
    with pytest.raises(TypeError):
        native_scan(torch.ones(1, 4, 2, dtype=torch.int64), torch.ones(1, 4, 2, dtype=torch.int64))


def test_availability_names_the_missing_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    import labsupport.ssm.native as native

    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    available, reason = native.native_scan_available()
    assert not available and "compiler" in reason


@needs_build
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_selective_scan_equals_the_reference(dtype: torch.dtype) -> None:
    from labsupport.ssm import native_selective_scan, selective_scan
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(2, 57, 6, generator=gen, dtype=torch.float64)
    delta = torch.nn.functional.softplus(torch.randn(2, 57, 6, generator=gen, dtype=torch.float64))
    A = -torch.rand(6, 4, generator=gen, dtype=torch.float64) - 0.1
    B, C = (torch.randn(2, 57, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    D = torch.randn(6, generator=gen, dtype=torch.float64)
    y, last = selective_scan(u, delta, A, B, C, D, scan="sequential")
    cast = [t.to(dtype) for t in (u, delta, A, B, C, D)]
    y_n, last_n = native_selective_scan(*cast)
    assert y_n.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(y_n, y) < tolerance and rel_err(last_n, last) < tolerance
    with pytest.raises(TypeError):
        native_selective_scan(u, delta.float(), A, B, C)
    with pytest.raises(RuntimeError):
        native_selective_scan(u.requires_grad_(True), delta, A, B, C)
