"""Chapter 01 tiled attention (labsupport.flash.tiled): tiled = dense, backward = autograd, input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labsupport.flash.reference import causal_mask, naive_attention, online_softmax_row
from labsupport.flash.tiled import (
    FlashAttentionFunction,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
)
from labsupport.flash.widget import tile_trace


def qkv(b=1, h=2, lq=33, lk=None, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    make = lambda n: torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(lq), make(lk), make(lk)


def dense_lse(q, k, causal):
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), float("-inf"))
    return torch.logsumexp(s, dim=-1)


# --------------------------------------------------------------------------- tiled forward


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "lq,lk,bq,bk", [(33, 33, 16, 8), (64, 64, 16, 16), (5, 5, 64, 64), (20, 12, 8, 8), (9, 30, 4, 16), (30, 9, 7, 5)]
)
def test_tiled_forward_equals_dense(causal, lq, lk, bq, bk):
    q, k, v = qkv(lq=lq, lk=lk)
    out, lse = flash_attention_forward(q, k, v, causal=causal, block_q=bq, block_k=bk)
    torch.testing.assert_close(out, naive_attention(q, k, v, causal=causal), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, dense_lse(q, k, causal), rtol=1e-12, atol=1e-12)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("causal", [False, True])
def test_tiled_forward_matches_sdpa(causal):
    q, k, v = qkv(b=2, h=3, lq=50, d=16)
    out, _ = flash_attention_forward(q, k, v, causal=causal, block_q=16, block_k=32)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def test_fully_masked_rows_give_zeros_and_minus_inf_lse():
    q, k, v = qkv(lq=20, lk=12)  # bottom-right causal: rows 0..7 see no key
    out, lse = flash_attention_forward(q, k, v, causal=True, block_q=8, block_k=8)
    assert torch.equal(out[..., :8, :], torch.zeros_like(out[..., :8, :]))
    assert torch.isneginf(lse[..., :8]).all() and torch.isfinite(lse[..., 8:]).all()
    assert torch.equal(naive_attention(q, k, v, causal=True)[..., :8, :], out[..., :8, :])


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 1e-6)])
def test_low_precision_inputs_keep_their_dtype(dtype, tol):
    q, k, v = qkv(lq=40, d=16, dtype=dtype)
    out, lse = flash_attention_forward(q, k, v, causal=True, block_q=16, block_k=16)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref = naive_attention(q.double(), k.double(), v.double(), causal=True)
    assert float((out.double() - ref).norm() / ref.norm()) < tol
    gq = torch.autograd.grad(flash_attention(q.requires_grad_(), k, v, causal=True).float().sum(), q)[0]
    assert gq.dtype == dtype and torch.isfinite(gq).all()


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(33, 33), (20, 12), (9, 30)])
def test_backward_equals_autograd_of_dense(causal, lq, lk):
    q, k, v = (t.requires_grad_() for t in qkv(lq=lq, lk=lk))
    dout = torch.randn(1, 2, lq, 8, dtype=torch.float64)
    want = torch.autograd.grad(naive_attention(q, k, v, causal=causal), (q, k, v), dout)
    got = torch.autograd.grad(flash_attention(q, k, v, causal=causal, block_q=8, block_k=16), (q, k, v), dout)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
        assert not torch.isnan(g).any()


def test_backward_passes_gradcheck():
    q, k, v = (t.requires_grad_() for t in qkv(b=1, h=1, lq=6, lk=9, d=3))
    fn = lambda q, k, v: FlashAttentionFunction.apply(q, k, v, True, None, 4, 4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_backward_uses_rowsum_of_dout_times_out():
    # D = rowsum(dO * O): with dO = O the value gradient is P^T O and D = |O|^2 per row
    q, k, v = qkv(lq=16)
    out, lse = flash_attention_forward(q, k, v)
    dq, dk, dv = flash_attention_backward(q, k, v, out, lse, out.clone())
    p = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(8), -1)
    torch.testing.assert_close(dv, p.transpose(-1, -2) @ out)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda q, k, v: flash_attention_forward(q.numpy(), k, v), TypeError),
        (lambda q, k, v: flash_attention_forward(q, k[..., :4], v), ValueError),
        (lambda q, k, v: flash_attention_forward(q, k, v[..., :5, :]), ValueError),
        (lambda q, k, v: flash_attention_forward(q, k.float(), v), TypeError),
        (lambda q, k, v: flash_attention_forward(q, k, v, block_q=0), ValueError),
        (lambda q, k, v: flash_attention_forward(q.long(), k.long(), v.long()), TypeError),
        (lambda q, k, v: naive_attention(q[0], k, v), ValueError),
        (lambda q, k, v: flash_attention_backward(q, k, v, q, q[..., 0], q[..., :3, :]), ValueError),
        (lambda q, k, v: tile_trace(q, k, v), ValueError),
        (lambda q, k, v: online_softmax_row(q, 4), ValueError),
    ],
)
def test_bad_input_raises_clear_errors(call, error):
    q, k, v = qkv(lq=10)
    with pytest.raises(error):
        call(q, k, v)


def test_backward_with_fully_masked_rows_inside_one_block():
    # Lq=20 > Lk=12, causal: rows 0..7 see no key, and with 64-wide blocks they share a tile with rows that do.
    # Without the guard on lse = -inf, exp(S - lse) is exp(-inf + inf) = NaN there.
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 20, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 12, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dout = torch.randn(1, 2, 20, 4, generator=gen, dtype=torch.float64)
    out, lse = flash_attention_forward(q, k, v, causal=True, block_q=64, block_k=64)
    grads = flash_attention_backward(q, k, v, out, lse, dout, causal=True, block_q=64, block_k=64)
    expected = torch.autograd.grad(naive_attention(q, k, v, causal=True), (q, k, v), dout)
    for got, want in zip(grads, expected):
        assert bool(torch.isfinite(got).all())
        assert torch.allclose(got, want, atol=1e-10)
