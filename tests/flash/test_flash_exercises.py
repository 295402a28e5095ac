"""Chapter 01 checkers (labsupport.flash.exercises): they pass the references and explain wrong answers."""

from __future__ import annotations

import math

import pytest
import torch

from labsupport.flash.exercises import check_flash_backward, check_flash_forward, check_online_softmax_update
from labsupport.flash.reference import _online_update as online_softmax_update  # the public ones are refused
from labsupport.flash.reference import causal_mask
from labsupport.flash.tiled import _tiled_backward as flash_attention_backward
from labsupport.flash.tiled import _tiled_forward as flash_attention_forward


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


# --------------------------------------------------------------------------- the tiling guard (issue 24)


def _tile_loop(q, k, v, causal, block_q, block_k, *, key_block=None, full_mask=False):
    """The tiled forward, with one of two slips: key blocks as wide as the key axis, or a full-size causal mask."""
    lq, lk, scale = q.shape[-2], k.shape[-2], q.shape[-1] ** -0.5
    block_k = lk if key_block == "all" else block_k
    everything = causal_mask(lq, lk) if full_mask else None
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype)
    for q0 in range(0, lq, block_q):
        q1 = min(q0 + block_q, lq)
        m = torch.full((*q.shape[:-2], q1 - q0), float("-inf"), dtype=q.dtype)
        l, acc = torch.zeros_like(m), torch.zeros(*q.shape[:-2], q1 - q0, v.shape[-1], dtype=q.dtype)
        for k0 in range(0, lk, block_k):
            k1 = min(k0 + block_k, lk)
            s = q[..., q0:q1, :] @ k[..., k0:k1, :].transpose(-1, -2) * scale
            if causal:
                visible = everything[q0:q1, k0:k1] if full_mask else (
                    torch.arange(k0, k1)[None, :] <= torch.arange(q0, q1)[:, None] + lk - lq)
                s = s.masked_fill(~visible, float("-inf"))
            m, l, acc = online_softmax_update(m, l, acc, s, v[..., k0:k1, :])
        seen = l > 0
        safe = torch.where(seen, l, torch.ones_like(l))
        out[..., q0:q1, :] = acc / safe[..., None]
        lse[..., q0:q1] = torch.where(seen, m + torch.log(safe), m)
    return out, lse


def test_query_chunking_is_refused_and_named(capsys):
    # one key block as wide as the key axis: right numbers, and the old cap (L²/4 = 64 × 256) let it through
    fn = lambda q, k, v, causal=False, block_q=64, block_k=64: _tile_loop(q, k, v, causal, block_q, block_k,
                                                                          key_block="all")
    result, out = run_checker(check_flash_forward, fn, capsys)
    assert not result and "tiling guard" in out
    assert "64 × 256 tensor is a whole row of key blocks" in out and "query chunking" in out


def test_a_full_size_causal_mask_is_named_as_a_mask(capsys):
    fn = lambda q, k, v, causal=False, block_q=64, block_k=64: _tile_loop(q, k, v, causal, block_q, block_k,
                                                                          full_mask=True)
    result, out = run_checker(check_flash_forward, fn, capsys)
    assert not result and "(256, 256)" in out and "causal mask built for all positions" in out


def test_the_tile_loop_itself_passes_under_the_cap(capsys):
    fn = lambda q, k, v, causal=False, block_q=64, block_k=64: _tile_loop(q, k, v, causal, block_q, block_k)
    assert run_checker(check_flash_forward, fn, capsys)[0]


def test_the_chapter_module_does_not_hold_exercise_answers_under_their_names():
    from labsupport import flash
    from labsupport.flash import exercises

    assert not hasattr(flash, "online_softmax_update") and not hasattr(exercises, "online_softmax_update")


def test_the_library_versions_of_the_exercises_are_refused(capsys):
    from labsupport import flash
    from labsupport.flash import reference

    cases = [
        (check_online_softmax_update, lambda *a: reference.online_softmax_update(*a), "online_softmax_update"),
        (check_flash_forward, lambda q, k, v, **kw: flash.flash_attention_forward(q, k, v, **kw),
         "ref.flash_attention_forward"),
        (check_flash_backward, lambda *a, **kw: flash.flash_attention_backward(*a, **kw), "ref.flash_attention_backward"),
    ]
    for checker, fn, name in cases:
        result, out = run_checker(checker, fn, capsys)
        assert not result and "LibraryCallRefused" in out and name in out and "library's version" in out
