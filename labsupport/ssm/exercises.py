"""Checkers for chapter 04's exercises: discretisation, the scan operator, a selective step, the FFT convolution.

Each checker runs the learner's function on seeded cases against the reference
in :mod:`labsupport.ssm.reference` / :mod:`labsupport.ssm.scans` through
:func:`labsupport.harness.checking.check_function`, and says what differs. The
cases are chosen so that the usual shortcut fails: Euler's ``Ā = 1 + ΔA`` and
``B̄ = ΔB`` are far off at ``Δ|A| ≈ 1``; the operator's two orders differ; a step
that reads the *old* state is off; an FFT without padding wraps the end of the
sequence into its start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.numerics import seeded_randn
from labsupport.ssm.reference import fft_causal_conv, s4d_init, selective_step, zoh
from labsupport.ssm.scans import combine

__all__ = ["check_combine", "check_fft_conv", "check_selective_step", "check_zoh"]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _zoh_cases() -> list[Case]:
    cases = []
    for number, (channels, n_state, kind, scale) in enumerate(
            [(1, 1, "real", 0.5), (3, 4, "real", 1.0), (2, 4, "lin", 1.0), (2, 8, "inv", 0.3)]):
        gen = _generator(40 + number)
        A = s4d_init(n_state, kind, channels=channels)
        dtype = torch.complex128 if A.is_complex() else torch.float64
        B = seeded_randn(gen, channels, n_state).to(dtype)
        delta = scale * (0.2 + torch.rand(channels, generator=gen, dtype=torch.float64))
        cases.append(Case(f"{kind} A, D={channels}, N={n_state}, Δ up to {float(delta.max()):.2f}", (A, B, delta)))
    return cases


def check_zoh(fn: Callable[..., object]) -> CheckResult:
    """Exercise: zero-order hold ``(A (D, N), B (D, N), delta (D,)) → (Ā, B̄)``."""
    return check_function(fn, zoh, _zoh_cases(), exercise="zero-order hold", atol=1e-10, rtol=1e-8,
                          output_names=("Abar", "Bbar"),
                          hint="Ā = exp(ΔA) and B̄ = (exp(ΔA) − 1)/A · B, with Δ of shape (D,) broadcast over N "
                               "(delta[:, None]); Euler's 1 + ΔA and ΔB are only first-order approximations.")


def _combine_cases() -> list[Case]:
    cases = []
    for number, shape in enumerate([(1,), (3, 5), (2, 4, 6)]):
        gen = _generator(60 + number)
        a1, a2 = (torch.rand(*shape, generator=gen, dtype=torch.float64) for _ in range(2))
        b1, b2 = (seeded_randn(gen, *shape) for _ in range(2))
        cases.append(Case(f"shape {shape}", (a1, b1, a2, b2)))
    gen = _generator(63)
    cases.append(Case("float32, decays near 0 and 1", (torch.tensor([1e-6, 0.999999], dtype=torch.float32),
                                                      torch.tensor([1.0, -2.0], dtype=torch.float32),
                                                      torch.tensor([0.5, 0.999999], dtype=torch.float32),
                                                      seeded_randn(gen, 2, dtype=torch.float32))))
    return cases


def check_combine(fn: Callable[..., object]) -> CheckResult:
    """Exercise: the scan operator ``(a1, b1, a2, b2) → (a1·a2, a2·b1 + b2)`` (step 1 first, then step 2)."""
    return check_function(fn, combine, _combine_cases(), exercise="scan operator", atol=1e-12, rtol=1e-6,
                          output_names=("a", "b"),
                          hint="Apply step 1 to h, then step 2: a2 · (a1 · h + b1) + b2. Read off the factor "
                               "of h and the rest.")


def _selective_cases() -> list[Case]:
    cases = []
    for number, (batch, channels, n_state, dtype) in enumerate(
            [(1, 1, 1, torch.float64), (2, 3, 4, torch.float64), (3, 5, 8, torch.float32)]):
        gen = _generator(80 + number)
        h = seeded_randn(gen, batch, channels, n_state, dtype=dtype)
        u = seeded_randn(gen, batch, channels, dtype=dtype)
        delta = torch.nn.functional.softplus(seeded_randn(gen, batch, channels)).to(dtype)
        A = -torch.arange(1, n_state + 1, dtype=torch.float64).expand(channels, n_state).to(dtype)
        B, C = seeded_randn(gen, batch, n_state, dtype=dtype), seeded_randn(gen, batch, n_state, dtype=dtype)
        D = seeded_randn(gen, channels, dtype=dtype)
        cases.append(Case(f"batch={batch}, D={channels}, N={n_state}, {str(dtype).removeprefix('torch.')}",
                          (h, u, delta, A, B, C, D)))
    return cases


def check_selective_step(fn: Callable[..., object]) -> CheckResult:
    """Exercise: one selective-SSM token ``(h, u, delta, A, B, C, D) → (y, new h)``."""
    return check_function(fn, selective_step, _selective_cases(), exercise="selective-scan step",
                          atol=1e-5, rtol=1e-5, output_names=("y", "h"),
                          inputs_may_change=True,  # writing the new state into h (a decode loop's own buffer) is fine
                          hint="h_new = exp(Δ A) h + (Δ u) B for every channel (Δ, u are per channel, B per state), "
                               "then y = Σ_n C_n h_new + D u — read the new state, not the old one.")


def _conv_cases() -> list[Case]:
    cases = []
    for number, (batch, length, channels, dtype) in enumerate(
            [(1, 2, 1, torch.float64), (2, 9, 3, torch.float64), (1, 16, 4, torch.float32)]):
        gen = _generator(100 + number)
        u = seeded_randn(gen, batch, length, channels, dtype=dtype)
        kernel = seeded_randn(gen, channels, length, dtype=dtype)
        cases.append(Case(f"batch={batch}, L={length}, D={channels}, {str(dtype).removeprefix('torch.')}",
                          (u, kernel)))
    return cases


def check_fft_conv(fn: Callable[..., object]) -> CheckResult:
    """Exercise: the causal convolution by FFT ``(u (batch, L, D), kernel (D, L)) → y (batch, L, D)``."""
    return check_function(fn, fft_causal_conv, _conv_cases(), exercise="FFT convolution", atol=1e-5, rtol=1e-5,
                          hint="Zero-pad both signals to length 2L before the FFT (rfft(..., n=2L)) and keep the "
                               "first L outputs; with n=L the convolution is circular and wraps around.")
