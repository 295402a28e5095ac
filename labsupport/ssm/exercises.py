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

import functools
from collections.abc import Callable

import torch

from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.diagnosis import known_mistakes
from labsupport.harness.guards import OperationCounter
from labsupport.harness.numerics import seeded_randn
from labsupport.ssm.reference import fft_causal_conv, s4d_init, selective_step, ssd_chunked, zoh
from labsupport.ssm.scans import chunked_scan, combine

__all__ = ["ShortcutRefused", "check_chunked_scan", "check_combine", "check_fft_conv", "check_selective_step",
           "check_ssd_chunked", "check_zoh"]


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


def _euler(A: torch.Tensor, B: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler's first-order step: ``Ā = 1 + ΔA``, ``B̄ = ΔB``."""
    return 1 + delta[..., None] * A, delta[..., None] * B


_ZOH_MISTAKES = [
    known_mistakes({"your Ā matches Euler's 1 + ΔA, a first-order approximation of the exact decay":
                    lambda A, B, delta: (_euler(A, B, delta)[0], None)}, output=0),
    known_mistakes({"your B̄ matches Euler's ΔB, a first-order approximation (exact only as Δ → 0)":
                    lambda A, B, delta: (None, _euler(A, B, delta)[1])}, output=1),
]


def check_zoh(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Exercise: zero-order hold ``(A (D, N), B (D, N), delta (D,)) → (Ā, B̄)``."""
    return check_function(fn, zoh, _zoh_cases(), exercise="zero-order hold", atol=1e-10, rtol=1e-8,
                          output_names=("Abar", "Bbar"), diagnose=_ZOH_MISTAKES, reveal=reveal,
                          recipe="ΔA = delta[..., None] * A; Ā = exp(ΔA); B̄ = expm1(ΔA) / A · B (expm1 keeps a "
                                 "small ΔA accurate where exp(ΔA) − 1 cancels).",
                          hint="Euler's first-order approximations are far off at Δ|A| ≈ 1; and Δ has one value "
                               "per channel, to be broadcast over the state axis. Tiered hints are above the "
                               "exercise.")


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


_COMBINE_MISTAKES = known_mistakes({
    "your offset is a1·b2 + b1: step 2 applied first, then step 1 (the operator is not commutative)":
        lambda a1, b1, a2, b2: (None, a1 * b2 + b1),
}, output=1)


def check_combine(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Exercise: the scan operator ``(a1, b1, a2, b2) → (a1·a2, a2·b1 + b2)`` (step 1 first, then step 2)."""
    return check_function(fn, combine, _combine_cases(), exercise="scan operator", atol=1e-12, rtol=1e-6,
                          output_names=("a", "b"), diagnose=_COMBINE_MISTAKES, reveal=reveal,
                          recipe="h ↦ a2·(a1·h + b1) + b2 = (a1·a2)·h + (a2·b1 + b2): return (a1 * a2, a2 * b1 + b2).",
                          hint="The order matters: step 1 acts first, so its offset is scaled by the second "
                               "decay, not the other way round. Tiered hints are above the exercise.")


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


def _selective_read_before_write(h, u, delta, A, B, C, D):
    """y read from the state before this token's write."""
    y = (h * C[:, None, :]).sum(-1) + D * u
    return y, torch.exp(delta[..., None] * A) * h + (delta * u)[..., None] * B[:, None, :]


_SELECTIVE_MISTAKES = known_mistakes({
    "your y reads the state from before this token's write: update h first, then read y from the new h":
        _selective_read_before_write,
}, output=0)


def check_selective_step(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Exercise: one selective-SSM token ``(h, u, delta, A, B, C, D) → (y, new h)``."""
    return check_function(fn, selective_step, _selective_cases(), exercise="selective-scan step",
                          atol=1e-5, rtol=1e-5, output_names=("y", "h"), diagnose=_SELECTIVE_MISTAKES,
                          reveal=reveal,
                          recipe="h' = exp(delta[..., None] · A) · h + (delta · u)[..., None] · B[:, None, :]; "
                                 "y = (h' · C[:, None, :]).sum(-1) + D · u; return (y, h').",
                          inputs_may_change=True,  # writing the new state into h (a decode loop's own buffer) is fine
                          hint="Δ and u are per channel, B and C per state; read the output from the state after "
                               "this token's write, not before. Tiered hints are above the exercise.")


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


def _circular_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The FFT product without padding: a circular convolution."""
    length = u.shape[1]
    spectrum = torch.fft.rfft(u.transpose(1, 2), n=length) * torch.fft.rfft(kernel, n=length)
    return torch.fft.irfft(spectrum, n=length).transpose(1, 2)


_FFT_MISTAKES = known_mistakes({
    "your outputs match a circular convolution (FFTs of length L): the end of the sequence wrapped into its "
    "start": _circular_conv,
})


def check_fft_conv(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Exercise: the causal convolution by FFT ``(u (batch, L, D), kernel (D, L)) → y (batch, L, D)``."""
    return check_function(_watched(fn, _require_fft), fft_causal_conv, _conv_cases_with_a_long_one(),
                          exercise="FFT convolution", atol=1e-5, rtol=1e-5, diagnose=_FFT_MISTAKES,
                          reveal=reveal, checker="check_fft_conv",
                          recipe="n = 2L; y = irfft(rfft(u.transpose(1, 2), n=n) · rfft(kernel, n=n), n=n)"
                                 "[..., :L].transpose(1, 2), in the input's dtype.",
                          hint="If the early outputs are off and the late ones right, the end of the sequence "
                               "wrapped around into its start: the FFT's convolution is circular. Tiered hints are "
                               "above the exercise.")


# --------------------------------------------------------------------------- refusing the shortcut


class ShortcutRefused(Exception):
    """Raised (and reported by the checker) when an answer computes the right numbers the wrong way."""


_OpRecorder = OperationCounter  # the harness's work guard: counts the aten operations and remembers their names


def _watched(fn: Callable[..., object], check: Callable[[_OpRecorder, tuple], None]) -> Callable[..., object]:
    """``fn`` run under an operation recorder; ``check(recorder, args)`` may raise :class:`ShortcutRefused`."""

    @functools.wraps(fn)
    def watched(*args: object, **kwargs: object) -> object:
        recorder = _OpRecorder()
        with recorder:
            out = fn(*args, **kwargs)
        check(recorder, args)
        return out
    return watched


_FFT_OPS = ("_fft_r2c", "_fft_c2r", "_fft_c2c")


def _conv_cases_with_a_long_one() -> list[Case]:
    cases = _conv_cases()
    gen = _generator(103)
    length, channels = 256, 4
    cases.append(Case(f"batch=2, L={length}, D={channels}, float64", (
        seeded_randn(gen, 2, length, channels), seeded_randn(gen, channels, length)),
        max_elements=8 * 2 * channels * length,
        max_elements_note="(an FFT answer holds signals of length 2L; an L × L matrix of lags is the direct "
                          "convolution this exercise replaces)"))
    return cases


def _require_fft(recorder: _OpRecorder, args: tuple) -> None:
    if not recorder.names.intersection(_FFT_OPS):
        raise ShortcutRefused("no FFT ran: this answer computes the convolution directly (O(L²) work), which is "
                              "what the exercise replaces. Use torch.fft")


# --------------------------------------------------------------------------- the chunked scan


def _chunked_cases() -> list[Case]:
    cases = []
    for number, (batch, length, channels, chunk, dtype, with_h0) in enumerate([
            (1, 1, 1, 4, torch.float64, False), (2, 37, 3, 5, torch.float64, True),
            (2, 64, 3, 8, torch.float64, False), (1, 10, 2, 16, torch.float64, True),
            (2, 50, 4, 7, torch.float32, True)]):
        gen = _generator(120 + number)
        a = torch.rand(batch, length, channels, generator=gen, dtype=torch.float64).to(dtype)
        b = seeded_randn(gen, batch, length, channels, dtype=dtype)
        h0 = seeded_randn(gen, batch, channels, dtype=dtype) if with_h0 else None
        cases.append(Case(f"batch={batch}, L={length}, D={channels}, chunk={chunk}, "
                          f"{str(dtype).removeprefix('torch.')}, h0 {'given' if with_h0 else 'None'}",
                          (a, b, h0, chunk)))
    gen = _generator(126)
    length = 512
    a = torch.tensor([1 - 1e-5, 1e-3, 1e-30, 0.0], dtype=torch.float32).repeat(1, length, 1)
    b = seeded_randn(gen, 1, length, 4, dtype=torch.float32)
    cases.append(Case(f"float32, L={length}, chunk=16, decays 1−1e-5, 1e-3, 1e-30 and 0", (a, b, None, 16)))
    return cases


def _chunked_step_limit(length: int, chunk: int) -> int:
    """Aten operations a chunked answer may run: generous per step, far below one step per position."""
    return 12 * (2 * chunk + -(-length // chunk)) + 150


def _refuse_the_loop(recorder: _OpRecorder, args: tuple) -> None:
    length, chunk = args[1].shape[1], args[3]
    limit = _chunked_step_limit(length, chunk)
    if length >= 256 and recorder.count > limit:
        raise ShortcutRefused(f"this answer ran {recorder.count:,} tensor operations for L = {length} with chunks "
                              f"of {chunk}; a chunked scan takes about 2·chunk + L/chunk steps over all chunks at "
                              f"once (under {limit:,} operations here), not one step per position")


def _reference_chunked(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, chunk_size: int) -> torch.Tensor:
    return chunked_scan(a, b, h0, chunk_size=chunk_size)


def _chunked_without_h0(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, chunk_size: int) -> torch.Tensor:
    return chunked_scan(a, b, None, chunk_size=chunk_size)


_CHUNKED_MISTAKES = known_mistakes({
    "your scan starts from zero: h0 was not carried into the first chunk": _chunked_without_h0,
})


def check_chunked_scan(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Exercise: the chunked scan ``(a, b (B, L, D), h0 (B, D) or None, chunk_size) → h (B, L, D)``.

    Compared with the sequential loop's answer; an answer that walks the positions one by one fails the
    long case by the number of operations it runs.
    """
    return check_function(_watched(fn, _refuse_the_loop), _reference_chunked, _chunked_cases(),
                          exercise="chunked scan", atol=5e-5, rtol=1e-5, diagnose=_CHUNKED_MISTAKES,
                          reveal=reveal, checker="check_chunked_scan",
                          recipe="pad L to n·Q with (a, b) = (1, 0) and view (B, n, Q, D); pass 1: inside every chunk "
                                 "at once from zero, h̃ and P = product of the chunk's a (float64); pass 2: start_0 = h0 "
                                 "(or 0), start_{k+1} = P_k · start_k + h̃_k (float64); pass 3: inside every chunk again "
                                 "from start_k, keeping every position; cut the padding. Never divide by P.",
                          hint="Three passes: the chunks' own summaries from a zero start (every chunk at once), "
                               "the states entering the chunks (one short loop over chunks), and every chunk again "
                               "from its true start. Mind a last chunk that is shorter, h0, and decays that are 0. "
                               "Tiered hints are above the exercise.")


# --------------------------------------------------------------------------- the four-step chunked SSD


def _ssd_cases() -> list[Case]:
    cases = []
    for number, (batch, length, heads, p, n, chunk, dtype) in enumerate([
            (1, 4, 1, 1, 1, 2, torch.float64), (2, 12, 2, 3, 4, 4, torch.float64),
            (1, 13, 3, 2, 5, 4, torch.float64), (2, 9, 2, 2, 3, 1, torch.float64),
            (1, 7, 2, 2, 3, 7, torch.float64), (2, 24, 2, 4, 4, 8, torch.float32)]):
        gen = _generator(140 + number)
        x = seeded_randn(gen, batch, length, heads, p, dtype=dtype)
        dt = torch.nn.functional.softplus(seeded_randn(gen, batch, length, heads) - 1).to(dtype)
        A = -torch.rand(heads, generator=gen, dtype=torch.float64).to(dtype) - 0.1
        B, C = (seeded_randn(gen, batch, length, heads, n, dtype=dtype) for _ in range(2))
        cases.append(Case(f"batch={batch}, L={length}, H={heads}, P={p}, N={n}, chunk={chunk}, "
                          f"{str(dtype).removeprefix('torch.')}", (x, dt, A, B, C, chunk)))
    gen = _generator(150)
    batch, length, heads, p, n, chunk = 1, 256, 2, 4, 4, 16
    x = seeded_randn(gen, batch, length, heads, p)
    dt = torch.nn.functional.softplus(seeded_randn(gen, batch, length, heads) - 1)
    A = -0.5 * torch.ones(heads, dtype=torch.float64)
    B, C = (seeded_randn(gen, batch, length, heads, n) for _ in range(2))
    cases.append(Case(f"batch=1, L={length}, H={heads}, chunk={chunk}, float64", (x, dt, A, B, C, chunk),
                      max_elements=4 * batch * heads * length * chunk,
                      max_elements_note="(a chunked answer holds Q × Q blocks, never the whole L × L matrix)"))
    gen = _generator(151)
    batch, length, heads, p, n, chunk = 1, 32, 2, 2, 4, 8
    x = seeded_randn(gen, batch, length, heads, p, dtype=torch.float32)
    dt = 0.01 * (1 + torch.rand(batch, length, heads, generator=gen))
    dt[:, 0] = 1e4
    A = -torch.ones(heads)
    B, C = (seeded_randn(gen, batch, length, heads, n, dtype=torch.float32) for _ in range(2))
    cases.append(Case("float32, the first step resets the state (dt·A = −10⁴), then small steps",
                      (x, dt, A, B, C, chunk)))
    return cases


def _reference_ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size)


def _ssd_chunks_alone(x, dt, A, B, C, chunk_size):
    """Each chunk computed on its own (step 1 only): no state passes between chunks."""
    from labsupport.ssm.reference import ssd_quadratic
    ys = [ssd_quadratic(x[:, s:s + chunk_size], dt[:, s:s + chunk_size], A, B[:, s:s + chunk_size],
                        C[:, s:s + chunk_size]) for s in range(0, x.shape[1], chunk_size)]
    return torch.cat(ys, dim=1), None


_SSD_MISTAKES = known_mistakes({
    "your y matches every chunk computed on its own: steps 3 and 4 (carry the state, read it) are missing":
        _ssd_chunks_alone,
}, output=0)


def check_ssd_chunked(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Exercise: the four-step chunked SSD ``(x, dt, A, B, C, chunk_size) → (y, last state)``."""
    return check_function(fn, _reference_ssd, _ssd_cases(), exercise="chunked SSD", atol=1e-5, rtol=1e-5,
                          output_names=("y", "state"), diagnose=_SSD_MISTAKES, reveal=reveal,
                          recipe="pad with dt = 0 and view chunks (batch, H, n, Q, …); l = dt·A per chunk; "
                                 "seg[i, j] = Σ_{j<r≤i} l_r as a cumsum down the columns of a masked Q × Q copy of l "
                                 "(−inf above the diagonal), never cumsum_i − cumsum_j; (1) y_intra = (C Bᵀ ⊙ exp(seg)) "
                                 "(dt·x); (2) chunk state = Σ_j exp(seg[Q−1, j]) B_j (dt_j x_j)ᵀ; (3) entering_{k+1} = "
                                 "exp(Σ l over chunk k) · entering_k + chunk state_k; (4) y_inter_i = exp(l_1 + … + l_i) "
                                 "C_i · entering; return (y_intra + y_inter, last state).",
                          hint="If only the float32 case after a huge first step fails, a decay between two "
                               "positions was written as a difference of two running sums, which cancels: add "
                               "up each segment's own terms. If y is right but the state is not, check the decay "
                               "from each position to the end of its chunk. Tiered hints are above the exercise.")
