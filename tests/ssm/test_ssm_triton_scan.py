"""The fused Triton SSD scan (labsupport.ssm.triton_scan) under Triton's CPU interpreter, against the loop."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

from labsupport.ssm import triton_scan  # noqa: E402
from labsupport.ssm.reference import ssd_recurrent  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not triton_scan.triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton with TRITON_INTERPRET=1 set before triton was imported",
)


def inputs(batch=2, length=13, heads=3, p=6, n=5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, p, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, heads, generator=gen) - 1.0)
    A = -torch.rand(heads, generator=gen) * 2.0 - 0.1
    B = torch.randn(batch, length, heads, n, generator=gen)
    C = torch.randn(batch, length, heads, n, generator=gen)
    return x.to(dtype), dt, A, B.to(dtype), C.to(dtype)


@needs_interpreter
@pytest.mark.parametrize("length,p,n,block_p,steps", [(13, 6, 5, 4, 4), (16, 8, 8, 8, 8), (1, 3, 2, 2, 4),
                                                      (21, 16, 16, 4, 8)])
def test_fused_scan_matches_the_loop(length, p, n, block_p, steps):
    x, dt, A, B, C = inputs(length=length, p=p, n=n)
    y, state = triton_scan.ssd_scan_triton(x, dt, A, B, C, block_p=block_p, steps=steps)
    y_ref, state_ref = ssd_recurrent(x.double(), dt.double(), A.double(), B.double(), C.double())
    assert y.shape == y_ref.shape and state.shape == state_ref.shape
    assert float((y.double() - y_ref).abs().max() / y_ref.abs().max()) < 1e-5
    assert float((state.double() - state_ref).abs().max() / state_ref.abs().max()) < 1e-5


@needs_interpreter
def test_fused_scan_non_contiguous_x_and_half_precision_output():
    x, dt, A, B, C = inputs()
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    y, _ = triton_scan.ssd_scan_triton(x_t, dt, A, B, C)
    y_ref, _ = ssd_recurrent(x, dt, A, B, C)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    y16, _ = triton_scan.ssd_scan_triton(x.half(), dt, A, B.half(), C.half())
    assert y16.dtype == torch.float16
    assert float((y16.float() - y_ref).abs().max() / y_ref.abs().max()) < 5e-3


def test_bad_inputs_and_bytes():
    x, dt, A, B, C = inputs()
    with pytest.raises(ValueError):
        triton_scan.ssd_scan_triton(x, dt[:, :5], A, B, C)
    if triton_scan.triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(ValueError, match="power of two"):
            triton_scan.ssd_scan_triton(x, dt, A, B, C, block_p=3)
    # x, y: 2·P, B, C: 2·N, dt: 1 per (token, head); the final state once
    assert triton_scan.scan_bytes(1, 10, 2, 4, 3) == 10 * 2 * (8 + 6 + 1) * 4 + 2 * 3 * 4 * 4
