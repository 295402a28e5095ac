"""The LTI ladder (ODE → discretisation → recurrence = kernel = FFT convolution), the selective scan, SSD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labsupport.harness.measuring import fit_power_law
from labsupport.harness.numerics import rel_err
from labsupport.ssm import reference as ref
from labsupport.ssm.scans import SCANS

GEN_SEED = 0


def _max_error(method, delta: float, signal: str, sample: str) -> float:
    A = torch.tensor([-1.0, -3.0], dtype=torch.float64)
    B = torch.tensor([1.0, 2.0], dtype=torch.float64)
    C = torch.tensor([1.0, -0.5], dtype=torch.float64)
    steps = round(4.0 / delta)
    t = torch.arange(1, steps + 1, dtype=torch.float64) * delta
    Abar, Bbar = method(A[None], B[None], torch.tensor([delta], dtype=torch.float64))
    at = t - delta / 2 if sample == "mid" else t
    u = torch.ones_like(t) if signal == "step" else torch.cos(2.0 * at)
    y = ref.lti_recurrence(Abar, Bbar, C[None], u[None, :, None])[0, :, 0]
    return float((y - ref.exact_response(A, B, C, t, signal=signal, omega=2.0)).abs().max())


@pytest.mark.parametrize("method, signal, sample, order", [
    (ref.bilinear, "step", "end", 2), (ref.zoh, "cosine", "end", 1), (ref.bilinear, "cosine", "end", 1),
    (ref.zoh, "cosine", "mid", 2), (ref.bilinear, "cosine", "mid", 2)])
def test_discretisation_order(method, signal: str, sample: str, order: int) -> None:
    deltas = [0.1, 0.05, 0.025, 0.0125]
    slope, _ = fit_power_law(deltas, [_max_error(method, d, signal, sample) for d in deltas])
    assert abs(slope - order) < 0.15


def test_zoh_is_exact_for_held_inputs() -> None:
    assert _max_error(ref.zoh, 0.1, "step", "end") < 1e-12


def test_zoh_and_bilinear_agree_to_second_order() -> None:
    A = ref.s4d_init(4, "lin", channels=2)
    B = torch.ones(2, 4, dtype=torch.complex128)
    small = torch.tensor([1e-4, 1e-4], dtype=torch.float64)
    (a1, b1), (a2, b2) = ref.zoh(A, B, small), ref.bilinear(A, B, small)
    assert rel_err(torch.view_as_real(a1), torch.view_as_real(a2)) < 1e-8
    assert rel_err(torch.view_as_real(b1), torch.view_as_real(b2)) < 1e-7


@pytest.mark.parametrize("kind", ["lin", "inv", "real"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_convolution_equals_recurrence(kind: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(GEN_SEED)
    D, N, L = 3, 8, 50
    A = ref.s4d_init(N, kind, channels=D)
    cdtype = torch.complex128 if A.is_complex() else torch.float64
    B = torch.randn(D, N, generator=gen, dtype=torch.float64).to(cdtype)
    C = torch.randn(D, N, generator=gen, dtype=torch.float64).to(cdtype)
    delta = torch.exp(torch.empty(D, dtype=torch.float64).uniform_(math.log(1e-3), math.log(0.1), generator=gen))
    Abar, Bbar = ref.zoh(A, B, delta)
    u = torch.randn(2, L, D, generator=gen, dtype=torch.float64)
    recurrent = ref.lti_recurrence(Abar, Bbar, C, u)
    kernel = ref.ssm_kernel(Abar, Bbar, C, L)
    y = ref.fft_causal_conv(u.to(dtype), kernel.to(dtype))
    assert y.dtype == dtype
    assert rel_err(y, recurrent) < (1e-12 if dtype == torch.float64 else 1e-5)
    direct = torch.stack([sum(kernel[:, l] * u[:, t - l] for l in range(t + 1)) for t in range(L)], dim=1)
    assert rel_err(direct, recurrent) < 1e-12


def test_s4d_init_values() -> None:
    lin = ref.s4d_init(4, "lin")
    assert torch.allclose(lin[0], torch.tensor([complex(-0.5, math.pi * n) for n in range(4)], dtype=torch.complex128))
    inv = ref.s4d_init(4, "inv")
    assert torch.allclose(inv[0].imag, torch.tensor([4 / math.pi * (4 / (2 * n + 1) - 1) for n in range(4)],
                                                    dtype=torch.float64))
    assert ref.s4d_init(3, "real", channels=2).tolist() == [[-1.0, -2.0, -3.0]] * 2
    with pytest.raises(ValueError, match="kind"):
        ref.s4d_init(4, "diagonal")


def test_fft_conv_rejects_a_wrong_kernel() -> None:
    with pytest.raises(ValueError, match="kernel must be"):
        ref.fft_causal_conv(torch.zeros(1, 5, 2), torch.zeros(2, 4))


def _selective_inputs(dtype=torch.float64, L=30, D=3, N=4):
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(2, L, D, generator=gen, dtype=torch.float64)
    delta = F.softplus(torch.randn(2, L, D, generator=gen, dtype=torch.float64))
    A = -torch.rand(D, N, generator=gen, dtype=torch.float64) * 3
    B = torch.randn(2, L, N, generator=gen, dtype=torch.float64)
    C = torch.randn(2, L, N, generator=gen, dtype=torch.float64)
    Dskip = torch.randn(D, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (u, delta, A, B, C, Dskip)]


@pytest.mark.parametrize("scan", list(SCANS))
def test_selective_scan_equals_token_steps(scan: str) -> None:
    u, delta, A, B, C, Dskip = _selective_inputs()
    h = torch.zeros(2, 3, 4, dtype=torch.float64)
    ys = []
    for t in range(u.shape[1]):
        y, h = ref.selective_step(h, u[:, t], delta[:, t], A, B[:, t], C[:, t], Dskip)
        ys.append(y)
    y_scan, h_last = ref.selective_scan(u, delta, A, B, C, Dskip, scan=scan)
    assert rel_err(y_scan, torch.stack(ys, 1)) < 1e-12 and rel_err(h_last, h) < 1e-12


def test_selective_ssm_is_not_a_convolution() -> None:
    """With input-dependent Δ, shifting the input does not shift the output (an LTI system would)."""
    u, delta, A, B, C, _ = _selective_inputs()
    y, _ = ref.selective_scan(u, delta, A, B, C)
    shifted, _ = ref.selective_scan(u.roll(1, 1), delta, A, B, C)
    assert rel_err(shifted[:, 1:], y[:, :-1]) > 1e-2


def test_selective_scan_bad_shapes() -> None:
    u, delta, A, B, C, _ = _selective_inputs()
    with pytest.raises(ValueError, match="delta must be"):
        ref.selective_scan(u, delta[:, :3], A, B, C)
    with pytest.raises(ValueError, match="B must be"):
        ref.selective_scan(u, delta, A, B[..., :2], C)
    with pytest.raises(ValueError, match="scan must be one of"):
        ref.selective_scan(u, delta, A, B, C, scan="magic")


def _ssd_inputs(dtype=torch.float64, L=45):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, L, 3, 5, generator=gen, dtype=torch.float64)
    dt = F.softplus(torch.randn(2, L, 3, generator=gen, dtype=torch.float64))
    A = -torch.rand(3, generator=gen, dtype=torch.float64) * 2
    B = torch.randn(2, L, 3, 4, generator=gen, dtype=torch.float64)
    C = torch.randn(2, L, 3, 4, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (x, dt, A, B, C)]


@pytest.mark.parametrize("chunk", [1, 7, 16, 45, 64])
def test_ssd_ladder(chunk: int) -> None:
    x, dt, A, B, C = _ssd_inputs()
    y_rec, s_rec = ref.ssd_recurrent(x, dt, A, B, C)
    assert rel_err(ref.ssd_quadratic(x, dt, A, B, C), y_rec) < 1e-12
    y_chunk, s_chunk = ref.ssd_chunked(x, dt, A, B, C, chunk_size=chunk)
    assert rel_err(y_chunk, y_rec) < 1e-12 and rel_err(s_chunk, s_rec) < 1e-12


def test_ssd_float32() -> None:
    x, dt, A, B, C = _ssd_inputs(torch.float32)
    y64, _ = ref.ssd_recurrent(*(t.double() for t in (x, dt, A, B, C)))
    y, _ = ref.ssd_chunked(x, dt, A, B, C, chunk_size=16)
    assert y.dtype == torch.float32 and rel_err(y, y64) < 1e-5


def test_ssd_is_chapter_03_decayed_linear_attention() -> None:
    la = pytest.importorskip("labsupport.linear_attention")
    x, dt, A, B, C = _ssd_inputs()
    y_rec, _ = ref.ssd_recurrent(x, dt, A, B, C)
    y_la = la.linear_attention_parallel(C.transpose(1, 2), B.transpose(1, 2), (dt[..., None] * x).transpose(1, 2),
                                        (dt * A).transpose(1, 2))
    assert rel_err(y_la.transpose(1, 2), y_rec) < 1e-12


def test_ssd_and_selective_scan_agree_for_a_scalar_decay() -> None:
    """Mamba-1 with A the same for every state and channel of a head is Mamba-2 (one head, P = D)."""
    x, dt, A, B, C = _ssd_inputs(L=20)
    head = 0
    u = x[:, :, head]                                   # (batch, L, P): P channels
    delta = dt[:, :, head, None].expand_as(u)           # one Δ per token for every channel
    A_full = A[head].expand(u.shape[2], B.shape[-1])    # (P, N), all equal
    y_sel, _ = ref.selective_scan(u, delta.contiguous(), A_full, B[:, :, head], C[:, :, head])
    y_ssd, _ = ref.ssd_recurrent(x, dt, A, B, C)
    assert rel_err(y_sel, y_ssd[:, :, head]) < 1e-12
