"""The numerics an outside audit found (issue 19): each test failed before its fix.

* ``ssm_kernel`` returned NaN when ``Ā`` underflowed to 0 (the ``l = 0`` term was ``exp(0 · (−inf))``);
* ``zoh`` computed ``exp(ΔA) − 1`` by subtraction and lost a small ``ΔA`` entirely in float32;
* the chunked scan reused one rounded float32 chunk product, so its error grew with the chunk count;
* SSD's decays were differences of cumulative sums, which cancel after one large step;
* autograd through ``log_space_scan`` gave NaN, and through ``blelloch_scan`` raised autograd's in-place error,
  while ``MambaMixer`` accepted either as its training scan.
"""

from __future__ import annotations

import math

import pytest
import torch

from labsupport.harness.numerics import rel_err
from labsupport.ssm import MambaMixer
from labsupport.ssm.reference import lti_recurrence, ssd_chunked, ssd_quadratic, ssd_recurrent, ssm_kernel, zoh
from labsupport.ssm.scans import SCANS, chunked_scan, sequential_scan


def test_kernel_is_finite_when_abar_underflows() -> None:
    A = torch.tensor([[-1.0, -2000.0]], dtype=torch.float64)
    B = torch.ones(1, 2, dtype=torch.float64)
    C = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    Abar, Bbar = zoh(A, B, torch.tensor([1.0], dtype=torch.float64))
    assert float(Abar[0, 1]) == 0.0
    kernel = ssm_kernel(Abar, Bbar, C, 6)
    assert torch.isfinite(kernel).all()
    impulse = torch.zeros(1, 6, 1, dtype=torch.float64)
    impulse[0, 0, 0] = 1.0
    assert rel_err(kernel[0], lti_recurrence(Abar, Bbar, C, impulse)[0, :, 0]) < 1e-14


def test_kernel_of_a_negative_real_abar_alternates() -> None:
    Abar = torch.tensor([[-0.5]], dtype=torch.float64)
    kernel = ssm_kernel(Abar, torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), 4)
    assert torch.allclose(kernel[0], torch.tensor([1.0, -0.5, 0.25, -0.125], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_zoh_keeps_a_tiny_step(dtype: torch.dtype) -> None:
    A = torch.tensor([[-1.0, -3.0]]).to(dtype)
    B = torch.ones(1, 2).to(dtype)
    _, Bbar = zoh(A, B, torch.tensor([1e-9]))
    expected = zoh(A.to(torch.complex128 if dtype.is_complex else torch.float64), B.double() if not dtype.is_complex
                   else B.to(torch.complex128), torch.tensor([1e-9], dtype=torch.float64))[1]
    if dtype.is_complex:
        Bbar, expected = torch.view_as_real(Bbar), torch.view_as_real(expected)
    assert rel_err(Bbar, expected) < 1e-6     # subtraction gave B̄ = 0: a relative error of 1


def test_chunked_scan_float32_error_does_not_grow_with_the_chunk_count() -> None:
    length = 65_536
    a = torch.full((1, length, 1), 1 - 1e-5, dtype=torch.float32)
    b = torch.zeros(1, length, 1)
    b[0, 0, 0] = 1.0
    exact = math.exp((length - 1) * math.log(float(a[0, 0, 0].double())))   # for the decay float32 stores
    loop_error = abs(float(sequential_scan(a, b)[0, -1, 0]) - exact) / exact
    for chunk_size in (None, 16, 64):
        error = abs(float(chunked_scan(a, b, chunk_size=chunk_size)[0, -1, 0]) - exact) / exact
        assert error <= max(2 * loop_error, 1e-5), (chunk_size, error, loop_error)   # was 1.8e-4 at the default


def test_chunked_scan_float32_random_decays_near_one() -> None:
    gen = torch.Generator().manual_seed(0)
    a = 1 - 1e-4 * torch.rand(1, 16_384, 8, generator=gen)
    b = torch.randn(1, 16_384, 8, generator=gen)
    truth = sequential_scan(a.double(), b.double())
    assert rel_err(chunked_scan(a, b), truth) <= 2 * rel_err(sequential_scan(a, b), truth)


def _ssd_after_a_huge_step():
    gen = torch.Generator().manual_seed(0)
    batch, length, heads, p, n = 1, 64, 2, 4, 8
    x = torch.randn(batch, length, heads, p, generator=gen, dtype=torch.float64)
    dt = 0.01 * (1 + torch.rand(batch, length, heads, generator=gen, dtype=torch.float64))
    dt[:, 0] = 1e4                      # a first step that resets the state: log decay −10⁴
    A = -torch.ones(heads, dtype=torch.float64)
    B, C = (torch.randn(batch, length, heads, n, generator=gen, dtype=torch.float64) for _ in range(2))
    return x, dt, A, B, C


def test_ssd_decays_do_not_cancel_after_a_huge_step() -> None:
    args = _ssd_after_a_huge_step()
    truth, _ = ssd_recurrent(*args)
    single = [t.float() for t in args]
    loop_error = rel_err(ssd_recurrent(*single)[0], truth)
    assert rel_err(ssd_chunked(*single, chunk_size=16)[0], truth) < max(20 * loop_error, 1e-5)   # was 2.6e-4
    assert rel_err(ssd_quadratic(*single), truth) < max(20 * loop_error, 1e-5)                   # was 2.8e-4


@pytest.mark.parametrize("name", list(SCANS))
def test_every_scan_has_the_loops_gradient(name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(2, 13, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 13, 3, generator=gen, dtype=torch.float64)
    b[:, 4] = 0.0                       # log b = −inf: autograd through the log gave NaN here
    h0 = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    cotangent = torch.randn(2, 13, 3, generator=gen, dtype=torch.float64)
    grads = []
    for scan in (sequential_scan, SCANS[name]):
        leaves = [t.clone().requires_grad_(True) for t in (a, b, h0)]
        grads.append(torch.autograd.grad((scan(*leaves) * cotangent).sum(), leaves))
    for expected, got in zip(*grads):
        assert torch.isfinite(got).all()
        assert rel_err(got, expected) < 1e-10


@pytest.mark.parametrize("scan", ["blelloch", "log_space", "hillis_steele"])
def test_mamba_mixer_trains_with_any_scan(scan: str) -> None:
    torch.manual_seed(0)
    reference = MambaMixer(16, 4, scan="chunked")
    other = MambaMixer(16, 4, scan=scan)
    other.load_state_dict(reference.state_dict())
    u = torch.randn(2, 11, 16)
    for layer in (reference, other):
        layer(u).square().mean().backward()
    for (name, p), q in zip(reference.named_parameters(), other.parameters()):
        assert torch.isfinite(q.grad).all(), name
        assert rel_err(q.grad, p.grad) < 1e-4, name
