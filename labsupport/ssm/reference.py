"""State-space models from the ODE to Mamba-2, written for reading: every form the chapter proves equal.

Continuous system (diagonal ``A``, one input channel per SSM)::

    h'(t) = A h(t) + B u(t),    y(t) = Re(C · h(t))

* Discretisation with step ``Δ``: :func:`zoh` (zero-order hold, exact for inputs held
  constant over each step) and :func:`bilinear` (Tustin); :func:`exact_response` is
  the ODE's exact solution for a step or a cosine input, the yardstick of both.
* The LTI views of a discretised SSM: :func:`lti_recurrence` (a loop over time),
  :func:`ssm_kernel` (``K̄_l = Re Σ_n C_n Ā_nˡ B̄_n``) and :func:`fft_causal_conv` (the
  causal convolution by FFT, padded to ``2L`` so that it does not wrap around).
  :func:`s4d_init` gives S4D's diagonal ``A`` (``"lin"``, ``"inv"``, or Mamba's real ``"real"``).
* The selective SSM of Mamba (S6): :func:`selective_scan` (input-dependent ``Δ, B, C``,
  any scan of :mod:`labsupport.ssm.scans`) and :func:`selective_step` (one token).
* Mamba-2 / SSD, a scalar decay per head: :func:`ssd_recurrent`, :func:`ssd_quadratic`
  (the "attention" form ``(C Bᵀ ⊙ decay) X``) and :func:`ssd_chunked` (quadratic inside
  chunks, a recurrence on states across chunks).

Shapes: LTI parameters are per channel, ``A, B, C (D, N)``, ``delta (D,)``; sequences
are ``u (batch, L, D)``. Selective parameters are ``delta (batch, L, D)`` and
``B, C (batch, L, N)``; SSD uses ``x (batch, L, H, P)``, ``dt (batch, L, H)``,
``A (H,)`` and ``B, C (batch, L, H, N)``.
"""

from __future__ import annotations

import math

import torch

from labsupport.harness.numerics import accumulation_dtype
from labsupport.harness.validation import require_choice, require_float, require_float_tensor, require_int
from labsupport.ssm.scans import SCANS

__all__ = [
    "bilinear",
    "exact_response",
    "fft_causal_conv",
    "lti_recurrence",
    "s4d_init",
    "selective_scan",
    "selective_step",
    "ssd_chunked",
    "ssd_quadratic",
    "ssd_recurrent",
    "ssm_kernel",
    "zoh",
]

_COMPLEX_OR_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)


def _tensor(name: str, value: object, ndim: int | None = None) -> torch.Tensor:
    return require_float_tensor(name, value, ndim=ndim, dtypes=_COMPLEX_OR_FLOAT)


# --------------------------------------------------------------------------- discretisation


def zoh(A: torch.Tensor, B: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold for a diagonal ``A``: ``Ā = exp(ΔA)``, ``B̄ = (exp(ΔA) − 1) / A · B``.

    ``A, B`` are ``(..., N)``; ``delta`` broadcasts against them with a trailing state
    axis (``(D,)`` against ``(D, N)`` becomes ``(D, 1)``). ``A`` must have no zero entry.
    ``exp(ΔA) − 1`` is computed by ``expm1``: for a small ``ΔA`` the subtraction
    ``exp(ΔA) − 1`` cancels (in float32, ``Δ = 1e-9`` gives ``B̄ = 0`` instead of ``ΔB``).
    """
    A, B = _tensor("A", A), _tensor("B", B)
    delta = _tensor("delta", delta)
    dA = delta[..., None] * A
    return torch.exp(dA), torch.expm1(dA) / A * B


def bilinear(A: torch.Tensor, B: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (Tustin) discretisation: ``Ā = (1 + ΔA/2) / (1 − ΔA/2)``, ``B̄ = ΔB / (1 − ΔA/2)``."""
    A, B = _tensor("A", A), _tensor("B", B)
    delta = _tensor("delta", delta)[..., None]
    denominator = 1 - delta * A / 2
    return (1 + delta * A / 2) / denominator, delta * B / denominator


def exact_response(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, t: torch.Tensor, *,
                   signal: str = "step", omega: float = 1.0) -> torch.Tensor:
    """The continuous system's exact output ``y(t) = Re Σ_n C_n h_n(t)`` from ``h(0) = 0``, one channel.

    ``A, B, C`` are ``(N,)``; ``t`` is ``(T,)``. ``signal="step"`` is ``u = 1`` for ``t > 0``:
    ``h = B (e^{At} − 1) / A``. ``signal="cosine"`` is ``u = cos(ωt)`` (real ``A, B``):
    ``h = Re[B (e^{iωt} − e^{At}) / (iω − A)]``.
    """
    A, B, C, t = _tensor("A", A, 1), _tensor("B", B, 1), _tensor("C", C, 1), _tensor("t", t, 1)
    require_choice("signal", signal, ("step", "cosine"))
    omega = require_float("omega", omega, positive=True)
    At = A * t[:, None]
    if signal == "step":
        h = B * torch.expm1(At) / A
    else:
        if A.is_complex() or B.is_complex():
            raise ValueError("the cosine response here needs real A and B")
        iw = torch.complex(torch.zeros((), dtype=t.dtype), torch.tensor(omega, dtype=t.dtype))
        h = (B * (torch.exp(iw * t[:, None]) - torch.exp(At)) / (iw - A)).real
    return (C * h).sum(-1).real


def s4d_init(d_state: int, kind: str = "lin", *, channels: int = 1,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """S4D's diagonal ``A`` of shape ``(channels, d_state)``.

    * ``"lin"`` (S4D-Lin): ``A_n = −½ + iπn`` — frequencies on a line;
    * ``"inv"`` (S4D-Inv): ``A_n = −½ + i (N/π)(N/(2n+1) − 1)`` — frequencies falling like ``1/n``;
    * ``"real"`` (Mamba's S4D-Real): ``A_n = −(n + 1)``, real decays only.
    """
    n_state = require_int("d_state", d_state, minimum=1)
    channels = require_int("channels", channels, minimum=1)
    require_choice("kind", kind, ("lin", "inv", "real"))
    n = torch.arange(n_state, dtype=dtype)
    if kind == "real":
        A = -(n + 1)
    else:
        imag = math.pi * n if kind == "lin" else (n_state / math.pi) * (n_state / (2 * n + 1) - 1)
        A = torch.complex(torch.full_like(n, -0.5), imag)
    return A.expand(channels, n_state).clone()


# --------------------------------------------------------------------------- the LTI views


def lti_recurrence(Abar: torch.Tensor, Bbar: torch.Tensor, C: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``h_t = Ā h_{t−1} + B̄ u_t``, ``y_t = Re Σ_n C_n h_{t,n}``, a loop over time.

    ``Abar, Bbar, C (D, N)`` (real or complex), ``u (batch, L, D)`` → ``y (batch, L, D)``.
    """
    Abar, Bbar, C, u = _tensor("Abar", Abar, 2), _tensor("Bbar", Bbar, 2), _tensor("C", C, 2), _tensor("u", u, 3)
    h = torch.zeros(u.shape[0], *Abar.shape, dtype=torch.promote_types(Abar.dtype, u.dtype))
    ys = []
    for t in range(u.shape[1]):
        h = Abar * h + Bbar * u[:, t, :, None]
        ys.append((C * h).sum(-1).real)
    return torch.stack(ys, dim=1).to(u.dtype)


def ssm_kernel(Abar: torch.Tensor, Bbar: torch.Tensor, C: torch.Tensor, length: int) -> torch.Tensor:
    """The convolution kernel ``K̄_l = Re Σ_n C_n Ā_nˡ B̄_n`` for ``l = 0 … L−1``: ``(D, L)``.

    ``Āˡ`` is computed as ``|Ā|ˡ · exp(i l arg Ā)`` (a Vandermonde product), never as repeated
    products. An ``Ā`` that underflowed to 0 (a very fast decay) has ``Ā⁰ = 1`` and ``Āˡ = 0``
    after: the ``l = 0`` power is set to 1 rather than computed as ``exp(0 · (−inf))``, which is NaN.
    """
    Abar, Bbar, C = _tensor("Abar", Abar, 2), _tensor("Bbar", Bbar, 2), _tensor("C", C, 2)
    length = require_int("length", length, minimum=1)
    steps = torch.arange(length, dtype=Abar.real.dtype)
    magnitude = torch.exp(torch.log(Abar.abs())[..., None] * steps)   # (D, N, L); NaN only at l = 0 when Ā = 0
    magnitude = torch.where(steps == 0, torch.ones_like(magnitude), magnitude)
    if Abar.is_complex():
        powers = magnitude * torch.exp(1j * torch.angle(Abar)[..., None] * steps)
    else:
        powers = magnitude * torch.where(Abar < 0, -1.0, 1.0)[..., None] ** steps
    return ((C * Bbar)[..., None] * powers).sum(-2).real


def fft_causal_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Causal convolution ``y_t = Σ_{l≤t} K_l u_{t−l}`` by FFT, both padded to ``2L`` (no wrap-around).

    ``u (batch, L, D)``, ``kernel (D, L)`` → ``(batch, L, D)``. Without the padding the FFT
    computes a *circular* convolution, and the end of the sequence leaks into its start.
    """
    u, kernel = _tensor("u", u, 3), _tensor("kernel", kernel, 2)
    length = u.shape[1]
    if kernel.shape != (u.shape[2], length):
        raise ValueError(f"kernel must be (channels, length) = {(u.shape[2], length)}, got {tuple(kernel.shape)}")
    work = accumulation_dtype(u.dtype)
    n = 2 * length
    spectrum = torch.fft.rfft(u.to(work).transpose(1, 2), n=n) * torch.fft.rfft(kernel.to(work), n=n)
    return torch.fft.irfft(spectrum, n=n)[..., :length].transpose(1, 2).to(u.dtype)


# --------------------------------------------------------------------------- selective (Mamba, S6)


def _selective_elements(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan's ``(a, b)``: ``a = exp(Δ A)`` (ZOH), ``b = Δ B u`` (Euler), both ``(batch, L, D, N)``."""
    a = torch.exp(delta[..., None] * A)
    b = (delta * u)[..., None] * B[:, :, None, :]
    return a, b


def _check_selective(u: object, delta: object, A: object, B: object, C: object) -> None:
    u, delta = _tensor("u", u, 3), _tensor("delta", delta, 3)
    A, B, C = _tensor("A", A, 2), _tensor("B", B, 3), _tensor("C", C, 3)
    batch, length, channels = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must be (batch, L, D) like u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.shape[0] != channels:
        raise ValueError(f"A must be (D, N) with D = {channels} channels, got {tuple(A.shape)}")
    for name, value in (("B", B), ("C", C)):
        if value.shape != (batch, length, A.shape[1]):
            raise ValueError(f"{name} must be (batch, L, N) = {(batch, length, A.shape[1])}, got {tuple(value.shape)}")


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, h0: torch.Tensor | None = None, *,
                   scan: str = "chunked") -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective SSM: ``h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t``, ``y_t = C_t · h_t + D u_t``.

    Args:
        u: ``(batch, L, D)`` inputs; ``delta``: ``(batch, L, D)`` positive steps (after softplus).
        A: ``(D, N)`` negative decay rates; ``B, C``: ``(batch, L, N)``, shared by the channels.
        D: ``(D,)`` skip connection, or ``None``. ``h0``: ``(batch, D, N)`` starting state.
        scan: a name in :data:`labsupport.ssm.scans.SCANS` (all give the same numbers).

    Returns:
        ``y (batch, L, D)`` and the last state ``(batch, D, N)``.
    """
    _check_selective(u, delta, A, B, C)
    require_choice("scan", scan, tuple(SCANS))
    a, b = _selective_elements(u, delta, A, B)
    h = SCANS[scan](a, b, h0)
    y = (h * C[:, :, None, :]).sum(-1)
    if D is not None:
        y = y + D * u
    return y, h[:, -1]


def selective_step(h: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the selective SSM: ``h ← exp(ΔA) h + Δ B u``, ``y = C · h + D u``.

    ``h (batch, D, N)``, ``u, delta (batch, D)``, ``A (D, N)``, ``B, C (batch, N)``, ``D (D,)``
    → ``(y (batch, D), new h)``. This is all a decode step does: constant memory, constant time.
    """
    h_new = torch.exp(delta[..., None] * A) * h + (delta * u)[..., None] * B[:, None, :]
    y = (h_new * C[:, None, :]).sum(-1)
    if D is not None:
        y = y + D * u
    return y, h_new


# --------------------------------------------------------------------------- Mamba-2 / SSD


def _check_ssd(x: object, dt: object, A: object, B: object, C: object) -> None:
    x, dt, A = _tensor("x", x, 4), _tensor("dt", dt, 3), _tensor("A", A, 1)
    B, C = _tensor("B", B, 4), _tensor("C", C, 4)
    batch, length, heads, _ = x.shape
    if dt.shape != (batch, length, heads) or A.shape != (heads,):
        raise ValueError(f"dt must be (batch, L, H) = {(batch, length, heads)} and A (H,) = ({heads},); got "
                         f"dt {tuple(dt.shape)}, A {tuple(A.shape)}")
    if B.shape[:3] != (batch, length, heads) or C.shape != B.shape:
        raise ValueError(f"B and C must be (batch, L, H, N) with (batch, L, H) = {(batch, length, heads)}; got "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)}")


def ssd_recurrent(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD as a loop: ``S_t = exp(dt_t A) S_{t−1} + B_t (dt_t x_t)ᵀ`` (``(N, P)`` per head), ``y_t = S_tᵀ C_t``.

    Returns ``y (batch, L, H, P)`` and the last state ``(batch, H, N, P)``.
    """
    _check_ssd(x, dt, A, B, C)
    batch, length, heads, p = x.shape
    state = x.new_zeros(batch, heads, B.shape[-1], p)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + B[:, t, :, :, None] * (dt[:, t, :, None] * x[:, t])[:, :, None, :]
        ys.append((C[:, t, :, :, None] * state).sum(-2))
    return torch.stack(ys, dim=1), state


def _segment_sums(log_a: torch.Tensor) -> torch.Tensor:
    """``M[..., i, j] = Σ_{j<r≤i} log_a_r`` for ``i ≥ j``, ``−inf`` above the diagonal (``(..., T, T)``).

    Each entry is a sum of its own terms (a cumulative sum down the columns of a masked copy),
    never a difference of two running totals: ``cumsum_i − cumsum_j`` cancels once an early
    ``log_a`` is large (in float32, a first step of ``−10⁴`` leaves about 10⁻³ of absolute
    error in every later difference, and ``exp`` turns that into a relative error).
    """
    length = log_a.shape[-1]
    below = torch.ones(length, length, dtype=torch.bool, device=log_a.device).tril(-1)   # r > j
    terms = log_a[..., :, None].expand(*log_a.shape, length).masked_fill(~below, 0.0)  # [..., r, j]
    sums = terms.cumsum(-2)                                                                # Σ_{j<r≤i}
    causal = torch.ones(length, length, dtype=torch.bool, device=log_a.device).tril()
    return sums.masked_fill(~causal, -math.inf)


def ssd_quadratic(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
                  ) -> torch.Tensor:
    """SSD as masked attention: ``Y = (C Bᵀ ⊙ L) (dt · X)`` with ``L_ij = exp(Σ_{j<r≤i} dt_r A)``, per head.

    This is chapter 03's decayed linear attention with ``q = C``, ``k = B``, ``v = dt · x``
    and log-decay ``dt · A``. ``O(L²)`` work, no loop.
    """
    _check_ssd(x, dt, A, B, C)
    log_a = (dt * A).transpose(1, 2)                        # (batch, H, L)
    decay = torch.exp(_segment_sums(log_a))                 # (batch, H, L, L)
    scores = C.transpose(1, 2) @ B.transpose(1, 2).transpose(-1, -2)  # (batch, H, L, L)
    values = (dt[..., None] * x).transpose(1, 2)            # (batch, H, L, P)
    return ((scores * decay) @ values).transpose(1, 2)


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
                chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD algorithm: quadratic (matmul) form inside chunks of ``Q`` tokens, a recurrence across chunks.

    Per chunk: (1) the intra-chunk output ``(C Bᵀ ⊙ L) X`` as in :func:`ssd_quadratic`;
    (2) the chunk's own contribution to the state, ``Σ_j exp(b_Q − b_j) B_j X_jᵀ``;
    (3) the states entering each chunk, by a short scan over chunks; (4) each
    token's read of the entering state, ``exp(b_i) C_iᵀ S``. Everything but (3) is a
    batched matrix product. Returns ``y (batch, L, H, P)`` and the last state.
    """
    _check_ssd(x, dt, A, B, C)
    q = require_int("chunk_size", chunk_size, minimum=1)
    batch, length, heads, p = x.shape
    n_state = B.shape[-1]
    pad = -length % q
    if pad:  # padded positions have dt = 0: decay 1, nothing written
        x, dt, B, C = (torch.cat([t, t.new_zeros(batch, pad, *t.shape[2:])], dim=1) for t in (x, dt, B, C))
    n = x.shape[1] // q

    def chunks(t: torch.Tensor) -> torch.Tensor:  # (batch, L, H, ...) -> (batch, H, n, Q, ...)
        return t.reshape(batch, n, q, heads, *t.shape[3:]).movedim(3, 1)

    xc, bc, cc = chunks(dt[..., None] * x), chunks(B), chunks(C)
    log_a = chunks(dt * A)                                       # (batch, H, n, Q)
    within = log_a.cumsum(-1)                                    # b_i inside each chunk
    segments = _segment_sums(log_a)                              # (batch, H, n, Q, Q)
    y_intra = ((cc @ bc.transpose(-1, -2)) * torch.exp(segments)) @ xc
    to_end = torch.exp(segments[..., -1, :])                     # exp(b_Q − b_j), summed, not subtracted
    chunk_states = (bc * to_end[..., None]).transpose(-1, -2) @ xc   # (batch, H, n, N, P)
    chunk_decay = torch.exp(within[..., -1])                     # (batch, H, n)
    state = x.new_zeros(batch, heads, n_state, p)
    entering = []
    for k in range(n):
        entering.append(state)
        state = chunk_decay[:, :, k, None, None] * state + chunk_states[:, :, k]
    entering_states = torch.stack(entering, dim=2)               # (batch, H, n, N, P)
    y_inter = (cc * torch.exp(within)[..., None]) @ entering_states
    y = (y_intra + y_inter).movedim(1, 3).reshape(batch, n * q, heads, p)[:, :length]
    return y, state
