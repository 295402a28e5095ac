"""Chapter 01 widget data (labsupport.flash.widget): the recorded tile walk skips hidden tiles and converges."""

from __future__ import annotations

import torch

from labsupport.flash.widget import tile_trace


def qkv(b=1, h=2, lq=33, lk=None, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    make = lambda n: torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(lq), make(lk), make(lk)


def test_causal_skips_blocks_above_the_diagonal():
    q, k, v = qkv(b=1, h=1, lq=64, d=4)
    steps = tile_trace(q[0, 0], k[0, 0], v[0, 0], causal=True, block_q=16, block_k=16)
    assert len(steps) == 1 + 2 + 3 + 4  # lower triangle of a 4x4 grid of tiles
    assert sum(s.masked for s in steps) == 4  # only the diagonal tiles need a mask
    assert steps[0].skipped == [(16, 32), (32, 48), (48, 64)]
    full = tile_trace(q[0, 0], k[0, 0], v[0, 0], causal=False, block_q=16, block_k=16)
    assert len(full) == 16 and not any(s.masked for s in full)


def test_tile_trace_converges_to_exact_output():
    q, k, v = qkv(b=1, h=1, lq=48, d=8)
    steps = tile_trace(q[0, 0], k[0, 0], v[0, 0], block_q=16, block_k=8)
    last_of_each_block = [s for i, s in enumerate(steps) if i + 1 == len(steps) or steps[i + 1].q_range != s.q_range]
    assert all(s.error < 1e-12 for s in last_of_each_block)
    assert steps[0].error > 1e-3  # after one key block the output is not yet right
