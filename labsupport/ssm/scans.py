"""Scans of the linear recurrence ``h_t = a_t · h_{t-1} + b_t``, each equal to the sequential loop.

Every selective state-space layer (Mamba's S6) runs this recurrence element-wise
over ``(batch, length, channels, state)`` tensors. Pairs ``(a, b)`` compose with
the associative operator

    ``(a₁, b₁) ∘ (a₂, b₂) = (a₁ a₂, a₂ b₁ + b₂)``     (first apply 1, then 2)

so the prefix "sums" ``h_t`` can be computed in many orders. The scans here:

* :func:`sequential_scan` — the loop: ``L`` dependent steps, the ground truth.
* :func:`hillis_steele_scan` — ``log₂ L`` steps, each touching every element (``L log L`` work).
* :func:`blelloch_scan` — the work-efficient up-sweep / down-sweep (``2 log₂ L`` steps, ``O(L)`` work).
* :func:`log_space_scan` — Heinsen's closed form with ``cumsum`` and ``logcumsumexp``; negative
  ``b`` are handled by scanning their positive and negative parts separately.
* :func:`chunked_scan` — sequential inside chunks, for all chunks at once, then sequential across
  chunks: about ``2√L`` short steps instead of ``L``. On a CPU this is the fast one.

Shapes: ``a`` and ``b`` are ``(B, L, *rest)`` and the scan runs along dimension 1;
``h0`` (optional) is ``(B, *rest)``, the state before the first position. All scans
return ``h`` of the shape of ``b``. The decays ``a`` may be any real numbers for
every scan except :func:`log_space_scan`, which needs ``a > 0`` (a state-space decay
``exp(Δ A)`` always is). Half-precision inputs are scanned in float32 and the
result cast back.
"""

from __future__ import annotations

import functools
import math

import torch

from labsupport.harness.numerics import accumulation_dtype
from labsupport.harness.validation import require_float_tensor, require_int

__all__ = [
    "SCANS",
    "blelloch_scan",
    "chunked_scan",
    "combine",
    "hillis_steele_scan",
    "log_space_scan",
    "sequential_scan",
]


def combine(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan operator: ``(a₁, b₁) ∘ (a₂, b₂) = (a₁ a₂, a₂ b₁ + b₂)`` — apply step 1, then step 2."""
    return a1 * a2, a2 * b1 + b2


def prepare_scan_inputs(a: object, b: object, h0: object | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype]:
    """Validate ``(a, b, h0)``; return them in the accumulation dtype, plus the dtype to return."""
    a = require_float_tensor("a", a)
    b = require_float_tensor("b", b)
    if a.dim() < 2:
        raise ValueError(f"a and b must be (batch, length, ...) with at least 2 dimensions, got a {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape (batch, length, ...), got a {tuple(a.shape)} and "
                         f"b {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share one dtype, got {a.dtype} and {b.dtype}")
    if a.shape[1] == 0:
        raise ValueError(f"the scan needs at least one position (length 0 given), a {tuple(a.shape)}")
    out_dtype = b.dtype
    work = accumulation_dtype(out_dtype)
    if h0 is not None:
        h0 = require_float_tensor("h0", h0)
        expected = (a.shape[0], *a.shape[2:])
        if tuple(h0.shape) != expected:
            raise ValueError(f"h0 must be the state before the first position, shape (batch, ...) = {expected}; "
                             f"got {tuple(h0.shape)}")
        h0 = h0.to(work)
    return a.to(work), b.to(work), h0, out_dtype


def _fold_initial_state(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """``b`` with the initial state folded into its first position: ``b₀ ← a₀ h0 + b₀``."""
    if h0 is None:
        return b
    b = b.clone()
    b[:, 0] = a[:, 0] * h0 + b[:, 0]
    return b


def sequential_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """``h_t = a_t h_{t-1} + b_t`` one position at a time: the definition every other scan must match."""
    a, b, h0, out_dtype = prepare_scan_inputs(a, b, h0)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = torch.empty_like(b)
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out[:, t] = h
    return out.to(out_dtype)


def hillis_steele_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Hillis–Steele: at step ``d`` every position combines with the one ``2^d`` before it.

    After ``⌈log₂ L⌉`` steps position ``t`` holds the composition of positions ``0..t``.
    Each step does work on every element, so the total is ``O(L log L)``: fewer
    sequential steps than the loop, but more arithmetic.
    """
    a, b, h0, out_dtype = prepare_scan_inputs(a, b, h0)
    b = _fold_initial_state(a, b, h0)
    length = b.shape[1]
    offset = 1
    while offset < length:
        # position t takes (a, b) of t - offset as the earlier step: (a', b') ∘ (a, b)
        a_prev, b_prev = a[:, :-offset], b[:, :-offset]
        a_new, b_new = combine(a_prev, b_prev, a[:, offset:], b[:, offset:])
        a = torch.cat([a[:, :offset], a_new], dim=1)
        b = torch.cat([b[:, :offset], b_new], dim=1)
        offset *= 2
    return b.to(out_dtype)


def blelloch_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Blelloch's work-efficient scan: an up-sweep builds a tree of partial compositions, a down-sweep
    hands every position the composition of everything before it.

    The length is padded to a power of two with identity steps ``(1, 0)``. Both
    sweeps take ``log₂ L`` steps; together they do ``O(L)`` combines. The
    down-sweep yields *exclusive* prefixes ``(A_{<t}, h_{t-1})``; one more combine
    with each position's own step makes them inclusive. The sweeps write in place;
    gradients come from the same scan run in reverse (see :class:`_ScanFunction`).
    """
    return _run(_blelloch_forward, a, b, h0)


def _blelloch_forward(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    b = _fold_initial_state(a, b, h0)
    batch, length, *rest = b.shape
    n = 1 << max(0, math.ceil(math.log2(length)))
    A = torch.ones(batch, n, *rest, dtype=a.dtype, device=a.device)
    X = torch.zeros(batch, n, *rest, dtype=b.dtype, device=b.device)
    A[:, :length], X[:, :length] = a, b
    own_a, own_b = A.clone(), X.clone()
    levels = int(math.log2(n))
    # up-sweep: node (right end of a block of 2s) ← left half ∘ right half
    for level in range(levels):
        stride = 1 << (level + 1)
        Av, Xv = A.view(batch, n // stride, stride, *rest), X.view(batch, n // stride, stride, *rest)
        left, right = stride // 2 - 1, stride - 1
        Av[:, :, right], Xv[:, :, right] = combine(Av[:, :, left], Xv[:, :, left], Av[:, :, right], Xv[:, :, right])
    # down-sweep: the root gets the identity; a left child gets its parent's prefix, a right child the
    # parent's prefix composed with the left child's block
    A[:, n - 1], X[:, n - 1] = 1.0, 0.0
    for level in reversed(range(levels)):
        stride = 1 << (level + 1)
        Av, Xv = A.view(batch, n // stride, stride, *rest), X.view(batch, n // stride, stride, *rest)
        left, right = stride // 2 - 1, stride - 1
        block_a, block_b = Av[:, :, left].clone(), Xv[:, :, left].clone()
        Av[:, :, left], Xv[:, :, left] = Av[:, :, right], Xv[:, :, right]
        Av[:, :, right], Xv[:, :, right] = combine(Av[:, :, right], Xv[:, :, right], block_a, block_b)
    _, inclusive = combine(A, X, own_a, own_b)
    return inclusive[:, :length]


def _log_scan_nonnegative(log_a_cum: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h_t = Σ_{s≤t} exp(a*_t − a*_s) b_s`` for ``b ≥ 0``, in log space (``b = 0`` gives ``log b = −inf``)."""
    log_b = torch.log(b)  # −inf where b == 0: contributes nothing
    return torch.exp(log_a_cum + torch.logcumsumexp(log_b - log_a_cum, dim=1))


def log_space_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Heinsen's log-space scan: ``a*_t = Σ_{s≤t} log a_s``, ``h_t = exp(a*_t + logcumsumexp_s(log b_s − a*_s))``.

    Two library calls (``cumsum`` and ``logcumsumexp``) replace the loop. Two pitfalls:

    * **signs.** ``log b`` needs ``b > 0``. Heinsen uses a complex logarithm; here
      ``b`` is split into ``b⁺ = max(b, 0)`` and ``b⁻ = max(−b, 0)``, each scanned in
      log space, and ``h = h⁺ − h⁻`` (the recurrence is linear in ``b``).
    * **magnitude.** ``a*_t`` falls linearly with ``t``: with decays near 0 it reaches
      ``−10⁵`` and beyond at ``L = 65,536``, where float32 keeps only about two
      decimal places, and ``a*_t − a*_s`` would lose most of ``h``'s digits. The
      log-space arithmetic therefore runs in float64 whatever the input dtype.

    Needs ``a > 0`` (a decay ``exp(Δ A)`` always is; an ``a`` that underflowed to 0
    is treated as the smallest positive float64). Autograd through ``log b`` at ``b = 0``
    would give NaN; gradients come from the same scan run in reverse instead.
    """
    a_ = require_float_tensor("a", a)
    if bool((a_ < 0).any()):
        raise ValueError("log_space_scan needs decays a >= 0 (state-space decays exp(ΔA) are positive); "
                         "use another scan for negative a")
    return _run(_log_space_forward, a, b, h0)


def _log_space_forward(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    work = b.dtype
    a64, b64 = a.double(), _fold_initial_state(a, b, h0).double()
    log_a_cum = torch.log(a64.clamp_min(torch.finfo(torch.float64).tiny)).cumsum(dim=1)
    h = _log_scan_nonnegative(log_a_cum, b64.clamp_min(0.0)) - _log_scan_nonnegative(log_a_cum, (-b64).clamp_min(0.0))
    return h.to(work)


def _chunked_forward(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, chunk_size: int | None
                     ) -> torch.Tensor:
    """The chunked scan's arithmetic, on validated tensors of the working dtype, without autograd."""
    batch, length, *rest = b.shape
    c = max(1, round(math.sqrt(length / 2))) if chunk_size is None else chunk_size
    n = -(-length // c)
    pad = n * c - length
    if pad:
        a = torch.cat([a, a.new_ones(batch, pad, *rest)], dim=1)
        b = torch.cat([b, b.new_zeros(batch, pad, *rest)], dim=1)
    a_chunks = a.reshape(batch, n, c, *rest)
    b_chunks = b.reshape(batch, n, c, *rest)
    # 1. each chunk's summary (P, h~), every chunk at once; one buffer, updated in place
    # The product P of each chunk's decays, and the carry across chunks, are kept in float64: every
    # chunk's P is rounded once and then multiplied into the state n times, so a float32 P's rounding
    # error (the same for equal decays) would add up over the chunks instead of averaging out.
    wide = torch.float64
    h = b_chunks[:, :, 0].clone()
    p = a_chunks[:, :, 0].to(wide)
    for i in range(1, c):
        torch.addcmul(b_chunks[:, :, i], a_chunks[:, :, i], h, out=h)
        if a.dtype != wide:
            torch.mul(p, a_chunks[:, :, i], out=p)
    if a.dtype == wide:
        p = a_chunks.prod(dim=2)
    # 2. the state entering each chunk
    starts = torch.empty_like(h, dtype=wide)
    state = torch.zeros_like(b[:, 0], dtype=wide) if h0 is None else h0.to(wide)
    for k in range(n):
        starts[:, k] = state
        state = torch.addcmul(h[:, k].to(wide), p[:, k], state)
    starts = starts.to(b.dtype)
    # 3. the loop inside every chunk again, from its true start, written straight into the output
    out = torch.empty_like(b_chunks)
    previous = starts
    for i in range(c):
        torch.addcmul(b_chunks[:, :, i], a_chunks[:, :, i], previous, out=out[:, :, i])
        previous = out[:, :, i]
    return out.reshape(batch, n * c, *rest)[:, :length]


class _ScanFunction(torch.autograd.Function):
    """A scan with a hand-written backward, itself the same scan run in reverse.

    With ``g_t = ∂loss/∂h_t`` from above, the total gradient of ``h_t`` obeys the
    recurrence run backwards in time, ``δ_t = g_t + a_{t+1} δ_{t+1}``; then
    ``∂loss/∂b_t = δ_t``, ``∂loss/∂a_t = δ_t h_{t−1}`` and ``∂loss/∂h0 = a_0 δ_0``.
    Autograd through a scan's Python loops would record thousands of slice
    operations, cannot follow Blelloch's or the chunked scan's in-place updates, and
    through the log-space scan meets ``log 0`` (where ``b = 0``) and returns NaN;
    this records none of it. ``forward_fn(a, b, h0)`` works on validated tensors.
    """

    @staticmethod
    def forward(ctx, forward_fn, a: torch.Tensor, b: torch.Tensor,  # type: ignore[override]
                h0: torch.Tensor | None) -> torch.Tensor:
        h = forward_fn(a, b, h0)
        ctx.save_for_backward(a, h, h0)
        ctx.forward_fn = forward_fn
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):  # type: ignore[override]
        a, h, h0 = ctx.saved_tensors
        next_a = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
        delta = ctx.forward_fn(next_a.flip(1), grad_h.flip(1).contiguous(), None).flip(1)
        previous = torch.cat([(torch.zeros_like(h[:, :1]) if h0 is None else h0[:, None]), h[:, :-1]], dim=1)
        grad_h0 = None if h0 is None else a[:, 0] * delta[:, 0]
        return None, delta * previous, delta, grad_h0


def _run(forward_fn, a: object, b: object, h0: object | None) -> torch.Tensor:
    """Validate, then run ``forward_fn`` directly or, when a gradient is needed, through :class:`_ScanFunction`."""
    a_, b_, h0_, out_dtype = prepare_scan_inputs(a, b, h0)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (a, b, h0))
    if needs_grad:
        h = _ScanFunction.apply(forward_fn, a_, b_, h0_)
    else:
        with torch.no_grad():
            h = forward_fn(a_, b_, h0_)
    return h.to(out_dtype)


def chunked_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, *,
                 chunk_size: int | None = None) -> torch.Tensor:
    """Sequential inside chunks (all chunks at once), then sequential across chunks.

    1. Cut the length into ``n = L / C`` chunks and run the loop over the ``C``
       positions of a chunk for every chunk simultaneously, from a zero state,
       keeping only each chunk's summary: the composition ``(P_k, h̃_k)`` of its steps
       (``C`` steps on tensors ``n`` times larger than one position).
    2. Carry the true state across chunks: ``h_start[k+1] = P_k · h_start[k] + h̃_k``
       (``n`` steps on one position's worth of data).
    3. Run the loop inside every chunk again, all chunks at once, now from the true
       starting states, writing the output (``C`` more steps).

    About ``2C + L/C`` Python steps instead of ``L``; ``C ≈ √(L/2)`` (the default)
    minimises them. Each step is one fused multiply-add (``addcmul``) over all
    chunks, written in place: no temporary tensors, so the memory traffic stays
    close to the loop's. No division and no logarithm: decays near 0 make ``P``
    underflow to exactly 0 (the true value), decays near 1 keep the long memory.
    Differentiable: the backward pass is the same scan run in reverse.
    """
    if chunk_size is not None:
        chunk_size = require_int("chunk_size", chunk_size, minimum=1)
    return _run(functools.partial(_chunked_forward, chunk_size=chunk_size), a, b, h0)


#: name → scan, in the order the chapter builds them.
SCANS = {
    "sequential": sequential_scan,
    "hillis_steele": hillis_steele_scan,
    "blelloch": blelloch_scan,
    "log_space": log_space_scan,
    "chunked": chunked_scan,
}
