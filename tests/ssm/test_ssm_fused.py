"""The fused selective scan equals the unfused one, never creates a (batch, L, D, N) tensor, and counts its bytes."""

from __future__ import annotations

import pytest
import torch

from labsupport.harness.checking import LargestTensorRecorder
from labsupport.harness.numerics import rel_err
from labsupport.ssm import fused_selective_scan, selective_scan, selective_scan_traffic


def _inputs(length: int = 300, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(2, length, 6, generator=gen, dtype=dtype)
    delta = torch.nn.functional.softplus(torch.randn(2, length, 6, generator=gen, dtype=dtype))
    A = -torch.rand(6, 4, generator=gen, dtype=dtype) - 0.1
    B, C = (torch.randn(2, length, 4, generator=gen, dtype=dtype) for _ in range(2))
    D = torch.randn(6, generator=gen, dtype=dtype)
    h0 = torch.randn(2, 6, 4, generator=gen, dtype=dtype)
    return u, delta, A, B, C, D, h0


@pytest.mark.parametrize("block", [1, 64, 299, 300, 1000])
def test_fused_equals_the_unfused_scan(block: int) -> None:
    args = _inputs()
    y, state = selective_scan(*args, scan="sequential")
    y_f, state_f = fused_selective_scan(*args, block=block)
    assert rel_err(y_f, y) < 1e-12 and rel_err(state_f, state) < 1e-12


def test_fused_never_creates_a_full_length_expanded_tensor() -> None:
    u, delta, A, B, C, D, _ = _inputs(length=512, dtype=torch.float32)
    with torch.no_grad(), LargestTensorRecorder() as recorder:
        fused_selective_scan(u, delta, A, B, C, D, block=32)
    assert recorder.largest_elements <= 2 * 32 * 6 * 4 + 512 * 6 * 2   # a block's (2, 32, 6, 4), or y
    with torch.no_grad(), LargestTensorRecorder() as recorder:
        selective_scan(u, delta, A, B, C, D)
    assert recorder.largest_elements >= 2 * 512 * 6 * 4                 # the unfused path expands everything


def test_fused_has_the_unfused_gradient() -> None:
    args = [t.requires_grad_(True) for t in _inputs(length=40)]
    y, _ = selective_scan(*args, scan="sequential")
    expected = torch.autograd.grad(y.square().sum(), args)
    y_f, _ = fused_selective_scan(*args, block=16)
    got = torch.autograd.grad(y_f.square().sum(), args)
    for e, g in zip(expected, got):
        assert rel_err(g, e) < 1e-10


def test_traffic_counts() -> None:
    counts = selective_scan_traffic(1, 4096, 128, 16, block=64)
    inputs_outputs = (3 * 4096 * 128 + 2 * 4096 * 16 + 128 * 16) * 4
    assert counts["fused, block in cache"] == inputs_outputs
    assert counts["expanded (selective_scan)"] == 12 * 4096 * 128 * 16 * 4 + inputs_outputs
    assert counts["working set per block"] == 4 * 64 * 128 * 16 * 4
    with pytest.raises(ValueError):
        selective_scan_traffic(0, 4096, 128, 16)
