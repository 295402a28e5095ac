"""Chapter 01 references (labsupport.flash): tiled = dense, backward = autograd, IO model, checkers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labsupport.flash import (
    FlashAttentionFunction,
    TwoLevelMemory,
    causal_mask,
    check_flash_backward,
    check_flash_forward,
    check_online_softmax_update,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    flash_attention_io,
    flash_block_sizes,
    naive_attention,
    online_softmax_row,
    online_softmax_update,
    stable_softmax,
    standard_attention_io,
    tile_trace,
)


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


# --------------------------------------------------------------------------- IO model


def test_memory_refuses_to_overflow():
    mem = TwoLevelMemory(100)
    mem.load("a", 60)
    with pytest.raises(MemoryError):
        mem.load("b", 41)
    with pytest.raises(ValueError):
        TwoLevelMemory(0)
    with pytest.raises(KeyError):
        mem.store("nothing")
    with pytest.raises(ValueError):
        mem.load("c", -1)
    mem.free("a")
    mem.load("b", 41)
    mem.store("b")
    assert mem.read_bytes == (60 + 41) * 2 and mem.write_bytes == 41 * 2 and mem.peak_resident == 60


def test_io_counts_follow_the_theory():
    d, m = 64, 32 * 1024
    std = [standard_attention_io(n, d, m).total_bytes for n in (512, 1024, 2048)]
    fl = [flash_attention_io(n, d, m).total_bytes for n in (512, 1024, 2048)]
    # standard: 4 N^2 element moves (2 bytes each) for S and P, plus the tiled products' re-reads
    assert all(1.0 < s / (4 * n * n * 2) < 1.5 for s, n in zip(std, (512, 1024, 2048)))
    # both quadratic in N at fixed M, the tiled one several times smaller
    assert 3.5 < fl[2] / fl[1] < 4.5 and 3.5 < std[2] / std[1] < 4.5
    assert fl[2] * 4 < std[2]
    # tiled ~ 1/M: doubling the fast memory roughly halves the traffic; standard does not care
    n = 2048
    f1, f2 = flash_attention_io(n, d, m).total_bytes, flash_attention_io(n, d, 2 * m).total_bytes
    s1, s2 = standard_attention_io(n, d, m).total_bytes, standard_attention_io(n, d, 2 * m).total_bytes
    assert 1.7 < f1 / f2 < 2.3 and s1 / s2 < 1.2
    # causal skips about half of the key blocks
    assert flash_attention_io(n, d, m, causal=True).total_bytes < 0.6 * f1


def test_io_blocks_fit_and_tiny_memory_is_refused():
    for m in (300, 4096, 100_000):
        report = flash_attention_io(256, 64, m)
        assert report.peak_resident <= m
        assert standard_attention_io(256, 64, m).peak_resident <= m
    with pytest.raises(ValueError):
        flash_block_sizes(256, 64, 200)
    with pytest.raises(ValueError):
        flash_attention_io(0, 64, 4096)


# --------------------------------------------------------------------------- checkers with wrong answers


def run_checker(checker, fn, capsys):
    result = checker(fn)
    out = capsys.readouterr().out
    assert "Traceback" not in out
    return result, out


def ref_update(m, l, acc, scores, v):
    return online_softmax_update(m, l, acc, scores, v)


def wrong_update_no_rescale(m, l, acc, scores, v):
    m_new = torch.maximum(m, scores.amax(-1))
    p = torch.exp(scores - m_new[..., None])
    return m_new, l + p.sum(-1), acc + p @ v


def wrong_update_nan_on_masked(m, l, acc, scores, v):
    m_new = torch.maximum(m, scores.amax(-1))
    alpha = torch.exp(m - m_new)
    p = torch.exp(scores - m_new[..., None])
    return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + p @ v


def wrong_update_view(m, l, acc, scores, v):
    flat = scores.view(-1)  # fails on a non-contiguous tensor
    return online_softmax_update(m, l, acc, flat.view(scores.shape), v)


@pytest.mark.parametrize(
    "fn,expect",
    [
        (lambda m, l, acc, s, v: online_softmax_update(m, l, acc, s, v)[:2], "expected 3 values"),
        (lambda m, l, acc, s, v: (m, l, acc[..., :1]), "shape"),
        (lambda m, l, acc, s, v: tuple(t.float() for t in online_softmax_update(m, l, acc, s, v)), "dtype"),
        (lambda m, l, acc, s, v: None, "None"),
        (wrong_update_no_rescale, "entries are off"),
        (wrong_update_nan_on_masked, "NaN"),
        (wrong_update_view, "view"),
        (lambda *a: 1 / 0, "ZeroDivisionError"),
        (lambda *a: (_ for _ in ()).throw(NotImplementedError("your code here")), "not done yet"),
    ],
)
def test_update_checker_explains_wrong_answers(fn, expect, capsys):
    result, out = run_checker(check_online_softmax_update, fn, capsys)
    assert not result
    assert expect in out


def test_checkers_pass_the_references(capsys):
    assert run_checker(check_online_softmax_update, ref_update, capsys)[0]
    assert run_checker(check_flash_forward, flash_attention_forward, capsys)[0]
    assert run_checker(check_flash_backward, flash_attention_backward, capsys)[0]


def forward_off_by_one(q, k, v, causal=False, block_q=64, block_k=64):
    # masks j >= i + offset instead of j > i + offset: the diagonal is lost
    scale = 1 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        s = s.masked_fill(j >= i + (lk - lq), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def forward_dense_nan(q, k, v, causal=False, block_q=64, block_k=64):
    # dense softmax: a fully masked row becomes NaN
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def forward_view(q, k, v, causal=False, block_q=64, block_k=64):
    b, h, n, d = q.shape
    q.view(b, h * n, d)  # fails on the non-contiguous case
    return flash_attention_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)


@pytest.mark.parametrize(
    "fn,expect",
    [
        (forward_off_by_one, "causal"),
        (forward_dense_nan, "NaN"),
        (forward_view, "non-contiguous"),
        (lambda q, k, v, **kw: flash_attention_forward(q, k, v, **kw)[0], "expected a tuple"),
        (lambda q, k, v, **kw: (flash_attention_forward(q, k, v, **kw)[0].float(), None), "dtype"),
        (lambda q, k, v, **kw: (flash_attention_forward(q, k, v, **kw)[0].transpose(-1, -2), None), "shape"),
        (lambda q, k, v, **kw: None, "None"),
        (lambda q, k, v, **kw: q.missing, "AttributeError"),
    ],
)
def test_forward_checker_explains_wrong_answers(fn, expect, capsys):
    result, out = run_checker(check_flash_forward, fn, capsys)
    assert not result
    assert expect in out


def backward_forgets_d(q, k, v, out, lse, dout, causal=False, block_q=64, block_k=64):
    # dS = P * dP, without subtracting D = rowsum(dO * O)
    scale = 1 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), float("-inf"))
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.inf, lse)[..., None])
    ds = p * (dout @ v.transpose(-1, -2))
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, p.transpose(-1, -2) @ dout


def backward_dense(q, k, v, out, lse, dout, causal=False, block_q=64, block_k=64):
    # autograd through the dense softmax: NaN gradients on fully masked rows
    with torch.enable_grad():  # the checker runs learners' code under no_grad
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if causal:
            s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), float("-inf"))
        o = torch.softmax(s, -1) @ v
        return torch.autograd.grad(o, (q, k, v), dout)


def backward_off_by_one(q, k, v, out, lse, dout, causal=False, block_q=64, block_k=64):
    return flash_attention_backward(q, k, v, out, lse, dout, causal=False, block_q=block_q, block_k=block_k)


@pytest.mark.parametrize(
    "fn,expect",
    [
        (backward_forgets_d, "output[0] (dq): "),
        (backward_dense, "NaN"),
        (backward_off_by_one, "causal"),
        (lambda *a, **kw: tuple(g.float() for g in flash_attention_backward(*a, **kw)), "dtype"),
        (lambda *a, **kw: None, "None"),
        (lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom")), "RuntimeError: boom"),
    ],
)
def test_backward_checker_explains_wrong_answers(fn, expect, capsys):
    result, out = run_checker(check_flash_backward, fn, capsys)
    assert not result
    assert expect in out
