"""Chapter 04 on a GPU: the SSD recurrence as one fused Triton scan, the state kept in registers.

The honest baseline for the chunked SSD (:func:`labsupport.ssm.reference.ssd_chunked`) is not a
Python loop that launches a few kernels per token, but the recurrence itself compiled into one
kernel, as Mamba's selective-scan kernel does::

    S_t = exp(dt_t · A_h) · S_{t−1} + B_t (dt_t · x_t)ᵀ        (N × P per head)
    y_t = S_tᵀ C_t

One program owns one (batch, head) and a block of ``BLOCK_P`` of the head's ``P`` channels. Its
slice of the state, ``N × BLOCK_P`` numbers, lives in registers for the whole sequence: the
``(batch, L, H, N, P)`` states are never written to memory, and each input is read once
(``B_t, C_t`` once per channel block). Every step is a handful of multiply-adds per register, so
the kernel is bound by how fast it can walk the sequence: each block of ``STEPS`` tokens is
unrolled so that their loads are in flight together.

What it cannot do is use the matrix units: there is no matrix product in a recurrence. That is the
chunked SSD's advantage, measured in ``benchmarks/ssm_scan_triton_gpu.py``.

Forward only. Runs under ``TRITON_INTERPRET=1`` on the CPU (slowly), which is how it is tested.
This module imports without Triton; ``import labsupport.ssm`` does not import it.
"""

from __future__ import annotations

import torch

from labsupport.harness.settings import triton_interpreter_enabled
from labsupport.harness.validation import require_int
from labsupport.ssm.reference import _check_ssd

try:  # Triton is optional
    import triton
    import triton.language as tl

    _TRITON_ERROR: Exception | None = None
except Exception as error:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERROR = error

__all__ = ["ssd_scan_triton", "scan_bytes", "triton_available"]


def triton_available() -> bool:
    """True when Triton imported successfully."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _ssd_scan_kernel(
        X, DT, A, Bm, Cm, Y, S_OUT,
        stride_xb, stride_xl, stride_xh,
        stride_db, stride_dl,
        stride_bb, stride_bl, stride_bh,
        stride_cb, stride_cl, stride_ch,
        stride_yb, stride_yl, stride_yh,
        length, n_heads, head_dim, state_dim, batch,  # batch: only the autotuner's key (how many programs)
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, STEPS: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        p_ok = offs_p < head_dim
        n_ok = offs_n < state_dim
        a = tl.load(A + h).to(tl.float32)
        x_ptr = X + b * stride_xb + h * stride_xh + offs_p
        y_ptr = Y + b * stride_yb + h * stride_yh + offs_p
        d_ptr = DT + b * stride_db + h
        b_ptr = Bm + b * stride_bb + h * stride_bh + offs_n
        c_ptr = Cm + b * stride_cb + h * stride_ch + offs_n
        state = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)  # this program's slice of S, in registers
        for t0 in range(0, length, STEPS):
            for i in tl.static_range(STEPS):  # unrolled: the STEPS tokens' loads can be in flight together
                t = t0 + i
                ok = t < length
                tt = tl.minimum(t, length - 1)  # past the end: read the last token, with dt = 0 (S unchanged)
                dt = tl.where(ok, tl.load(d_ptr + tt * stride_dl).to(tl.float32), 0.0)
                x = tl.load(x_ptr + tt * stride_xl, mask=p_ok, other=0.0).to(tl.float32)
                bt = tl.load(b_ptr + tt * stride_bl, mask=n_ok, other=0.0).to(tl.float32)
                ct = tl.load(c_ptr + tt * stride_cl, mask=n_ok, other=0.0).to(tl.float32)
                state = state * tl.exp(dt * a) + bt[:, None] * (dt * x)[None, :]
                y = tl.sum(state * ct[:, None], axis=0)
                tl.store(y_ptr + t * stride_yl, y.to(Y.dtype.element_ty), mask=p_ok & (offs_p * 0 + t < length))
        s_ptrs = S_OUT + pid_bh * state_dim * head_dim + offs_n[:, None] * head_dim + offs_p[None, :]
        tl.store(s_ptrs, state, mask=n_ok[:, None] & p_ok[None, :])

    _ssd_scan_autotuned = triton.autotune(
        configs=[triton.Config({"BLOCK_P": bp, "STEPS": st}, num_warps=w)
                 for bp, st, w in ((4, 8, 1), (8, 8, 1), (8, 16, 1), (16, 8, 2), (16, 16, 2), (32, 8, 4))],
        key=["batch", "n_heads", "head_dim", "state_dim", "BLOCK_N"],
    )(_ssd_scan_kernel)


def ssd_scan_triton(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
    block_p: int | None = None, steps: int | None = None, num_warps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~labsupport.ssm.reference.ssd_recurrent` as one fused kernel: ``(y (batch, L, H, P), S (batch, H, N, P))``.

    Shapes as in :mod:`labsupport.ssm.reference`: ``x (batch, L, H, P)``, ``dt (batch, L, H)``, ``A (H,)``,
    ``B, C (batch, L, H, N)``. ``y`` has ``x``'s dtype; the state is accumulated and returned in fp32.
    On a GPU, leave ``block_p`` and ``steps`` as ``None`` to autotune; under the interpreter one
    configuration runs (default 4 channels, 4 steps).
    """
    if triton is None:
        raise RuntimeError(f"ssd_scan_triton needs Triton, which could not be imported "
                           f"({type(_TRITON_ERROR).__name__}: {_TRITON_ERROR})")
    _check_ssd(x, dt, A, B, C)
    on_cpu = x.device.type == "cpu"
    if on_cpu and not triton_interpreter_enabled():
        raise RuntimeError("the tensors are on the CPU but TRITON_INTERPRET=1 was not set before triton was imported")
    batch, length, heads, p = x.shape
    n = B.shape[-1]
    x, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, B, C))
    y = torch.empty_like(x)
    state = torch.empty(batch, heads, n, p, device=x.device, dtype=torch.float32)
    block_n = max(2, triton.next_power_of_2(n))
    args = (x, dt, A, B, C, y, state,
            x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1),
            B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
            y.stride(0), y.stride(1), y.stride(2), length, heads, p, n, batch)
    if dt.stride(2) != 1:
        raise ValueError("dt's last dimension (heads) must be contiguous")
    if not on_cpu and block_p is None and steps is None:
        grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]), batch * heads)  # noqa: E731
        _ssd_scan_autotuned[grid](*args, BLOCK_N=block_n)
    else:
        bp = require_int("block_p", block_p or 4, minimum=1)
        st = require_int("steps", steps or 4, minimum=1)
        if bp & (bp - 1):
            raise ValueError(f"block_p must be a power of two, got {bp}")
        _ssd_scan_kernel[(triton.cdiv(p, bp), batch * heads)](*args, BLOCK_P=bp, BLOCK_N=block_n, STEPS=st,
                                                              num_warps=num_warps)
    return y, state


def scan_bytes(batch: int, length: int, heads: int, head_dim: int, state_dim: int, itemsize: int = 4) -> int:
    """The least memory traffic of the SSD forward: read ``x, dt, B, C`` once, write ``y`` once (the state stays on chip)."""
    per_token = heads * (2 * head_dim + 2 * state_dim + 1)
    return batch * length * per_token * itemsize + batch * heads * state_dim * head_dim * 4
