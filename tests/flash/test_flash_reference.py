"""Chapter 01 reference math (labsupport.flash.reference): dense attention, the safe and the online softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labsupport.flash.reference import naive_attention, online_softmax_row, online_softmax_update, stable_softmax


def qkv(b=1, h=2, lq=33, lk=None, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    make = lambda n: torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(lq), make(lk), make(lk)


# --------------------------------------------------------------------------- dense references


@pytest.mark.parametrize("causal", [False, True])
def test_naive_matches_sdpa_in_float64(causal):
    q, k, v = qkv(lq=29)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(naive_attention(q, k, v, causal=causal), ref, rtol=1e-12, atol=1e-12)


def test_stable_softmax_survives_huge_scores_and_masked_rows():
    x = torch.tensor([[1000.0, 1001.0, 999.0], [float("-inf")] * 3], dtype=torch.float64)
    out = stable_softmax(x)
    torch.testing.assert_close(out[0], torch.softmax(x[0], -1))
    assert torch.equal(out[1], torch.zeros(3, dtype=torch.float64))


def test_online_softmax_row_equals_softmax_for_every_block_size():
    x = torch.randn(37, dtype=torch.float64) * 10
    for block in (1, 4, 7, 37, 100):
        out, history = online_softmax_row(x, block)
        torch.testing.assert_close(out, torch.softmax(x, -1))
        assert len(history) == math.ceil(37 / block)
        assert history[-1][0] == float(x.max())
        assert math.isclose(history[-1][1], float(torch.exp(x - x.max()).sum()), rel_tol=1e-12)


def test_online_update_two_halves_equal_one_pass():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(5, 12, generator=gen, dtype=torch.float64) * 4
    v = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    m0 = torch.full((5,), float("-inf"), dtype=torch.float64)
    l0, acc0 = torch.zeros(5, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64)
    m1, l1, a1 = online_softmax_update(m0, l0, acc0, s[:, :5], v[:5])
    m2, l2, a2 = online_softmax_update(m1, l1, a1, s[:, 5:], v[5:])
    torch.testing.assert_close(a2 / l2[:, None], torch.softmax(s, -1) @ v)
    torch.testing.assert_close(m2, s.amax(-1))


def test_online_update_keeps_fully_masked_rows_at_zero():
    s = torch.full((2, 4), float("-inf"), dtype=torch.float64)
    m0 = torch.full((2,), float("-inf"), dtype=torch.float64)
    m, l, acc = online_softmax_update(m0, torch.zeros(2, dtype=torch.float64),
                                      torch.zeros(2, 3, dtype=torch.float64), s,
                                      torch.randn(4, 3, dtype=torch.float64))
    assert torch.isinf(m).all() and (l == 0).all() and (acc == 0).all()
