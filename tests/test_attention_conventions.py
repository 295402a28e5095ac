"""The two conventions every attention form of chapters 00-03 keeps (see ``labsupport.harness.numerics``).

* Fully masked rows: a query that sees no key gives output zeros (and logsumexp -inf), never NaN.
* Low precision: fp16/bf16 inputs are computed in float32, so large scores and long sequences stay finite
  and accurate; the output keeps the input dtype.

Tests may compare families; the library never does.
"""

from __future__ import annotations

import math

import pytest
import torch

from labsupport import attention, flash, grouped
from labsupport.attention import _solutions as _attention_solutions  # noqa: F401  (loads attention._solutions)
from labsupport.harness.numerics import masked_softmax, rel_err
from labsupport.linear_attention import reference as lin
from labsupport.linear_attention.fast import linear_attention_chunkwise_fast

LOW = (torch.float16, torch.bfloat16)


def _qkv(lq: int, lk: int, *, b: int = 1, h: int = 2, g: int = 2, d: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64),
            torch.randn(b, g, lk, d, generator=gen, dtype=torch.float64),
            torch.randn(b, g, lk, d, generator=gen, dtype=torch.float64))


# ----------------------------------------------------------------------------- fully masked rows


def _latent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    rows = torch.cat([k[:, :1], v[:, :1]], dim=-1)  # (B, 1, T, 2D): keys are the first D columns' partner
    qq = torch.cat([q, torch.zeros_like(q)], dim=-1)
    return grouped.latent_attention_core(qq, rows, q.shape[-1], q.shape[-1] ** -0.5)


MASKED_FORMS = {
    "flash.naive_attention": lambda q, k, v: flash.naive_attention(q, k, v, causal=True),
    "flash.flash_attention_forward": lambda q, k, v: flash.flash_attention_forward(q, k, v, causal=True,
                                                                                   block_q=8, block_k=4)[0],
    "grouped.grouped_attention": lambda q, k, v: grouped.grouped_attention(q, k, v, causal=True),
    "grouped.latent_attention_core": _latent,
}


@pytest.mark.parametrize("form", sorted(MASKED_FORMS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_a_row_that_sees_no_key_gives_zeros(form, dtype):
    q, k, v = (t.to(dtype) for t in _qkv(20, 12))  # causal, bottom-right: rows 0..7 see no key
    out = MASKED_FORMS[form](q, k, v)
    assert out.dtype == dtype
    assert bool(torch.isfinite(out).all()), f"{form} gives NaN/inf on fully masked rows"
    assert bool((out[..., :8, :] == 0).all())
    visible = flash.naive_attention(*_qkv(20, 12), causal=True)
    if form != "grouped.latent_attention_core":
        assert rel_err(out[..., 8:, :].double(), visible[..., 8:, :]) < {torch.float16: 5e-3}.get(dtype, 1e-5)


def test_the_tiled_logsumexp_of_a_masked_row_is_minus_inf():
    q, k, v = _qkv(20, 12)
    _, lse = flash.flash_attention_forward(q, k, v, causal=True, block_q=64, block_k=64)
    assert bool((lse[..., :8] == -math.inf).all()) and bool(torch.isfinite(lse[..., 8:]).all())


def test_masked_softmax_gives_zeros_on_a_masked_row_and_softmax_elsewhere():
    scores = torch.tensor([[-math.inf, -math.inf], [0.5, -math.inf], [1.0, 2.0]])
    p = masked_softmax(scores)
    assert torch.equal(p[0], torch.zeros(2))
    assert torch.allclose(p[1:], scores[1:].softmax(-1))


def test_online_softmax_row_with_leading_masked_entries():
    x = torch.tensor([-math.inf, -math.inf, -math.inf, 1.0, 2.0, -0.5], dtype=torch.float64)
    p, history = flash.online_softmax_row(x, 2)
    assert torch.allclose(p, x.softmax(-1))
    assert history[0][0] == -math.inf and history[0][1] == 0.0
    empty, _ = flash.online_softmax_row(torch.full((4,), -math.inf), 2)
    assert torch.equal(empty, torch.zeros(4))


# ----------------------------------------------------------------------------- fp16 / bf16


SOFTMAX_FORMS = {
    "attention.causal_attention": lambda q, k, v: attention.causal_attention(q, k, v),
    "attention._solutions.decode_step_answer": lambda q, k, v: attention._solutions.decode_step_answer(q[:, :, -1:], k, v),
    "grouped.grouped_attention": lambda q, k, v: grouped.grouped_attention(q, k, v),
    "grouped.grouped_decode_step": lambda q, k, v: grouped.grouped_decode_step(q[:, :, -1:], k, v),
    "flash.naive_attention": lambda q, k, v: flash.naive_attention(q, k, v, causal=True),
}


@pytest.mark.parametrize("form", sorted(SOFTMAX_FORMS))
@pytest.mark.parametrize("dtype", LOW)
def test_large_fp16_scores_stay_finite_and_accurate(form, dtype):
    q, k, v = (t * 100 for t in _qkv(64, 64, seed=3))  # q·k reaches 1e5: past fp16's largest number (65,504)
    low = [t.to(dtype) for t in (q, k, v)]
    expected = SOFTMAX_FORMS[form](*(t.double() for t in low))  # the same rounded inputs, in float64
    got = SOFTMAX_FORMS[form](*low)
    assert got.dtype == dtype
    assert bool(torch.isfinite(got).all())
    assert rel_err(got.double(), expected) < 1e-2  # the output's own rounding, nothing more


@pytest.mark.parametrize("dtype", LOW)
def test_linear_attention_accumulates_in_float32(dtype):
    gen = torch.Generator().manual_seed(1)
    length = 65_536
    q, k, v = (torch.rand(1, 1, length, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    low = [t.to(dtype) for t in (q, k, v)]
    normalised = lin.linear_attention_chunkwise(*low, normalize=True)
    assert normalised.dtype == dtype and bool(torch.isfinite(normalised).all())
    assert rel_err(normalised.double(), lin.linear_attention_chunkwise(q, k, v, normalize=True)) < 1e-2
    short = 4096  # the token loop, long enough for an fp16/bf16 state to lose every small write
    plain = lin.linear_attention_recurrent(*(t[:, :, :short] for t in low))
    assert rel_err(plain.double(), lin.linear_attention_recurrent(q[:, :, :short], k[:, :, :short],
                                                                  v[:, :, :short])) < 1e-2
    fast = linear_attention_chunkwise_fast(*low)
    assert fast.dtype == dtype
    assert rel_err(fast.double(), lin.linear_attention_chunkwise(q, k, v)) < 1e-2


@pytest.mark.parametrize("dtype", LOW)
def test_delta_rule_runs_in_low_precision(dtype):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.nn.functional.normalize(torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64), dim=-1)
               for _ in range(3))
    beta = torch.rand(1, 2, 40, generator=gen, dtype=torch.float64)
    expected = lin.delta_rule_recurrent(q, k, v, beta)
    for form in (lin.delta_rule_recurrent, lin.delta_rule_chunkwise, lin.delta_rule_parallel):
        got = form(q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype))
        assert got.dtype == dtype
        assert rel_err(got.double(), expected) < 0.03, form.__name__


# ----------------------------------------------------------------------------- strong gates


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("log_alpha", [-1.0, -1.7, -5.0, -20.0])
def test_gated_deltanet_chunkwise_survives_strong_gates(dtype, log_alpha):
    gen = torch.Generator().manual_seed(4)
    b, h, length, d = 1, 2, 150, 8
    q, k = (torch.nn.functional.normalize(torch.randn(b, h, length, d, generator=gen, dtype=torch.float64), dim=-1)
            for _ in range(2))
    v = torch.randn(b, h, length, d, generator=gen, dtype=torch.float64)
    beta = torch.rand(b, h, length, generator=gen, dtype=torch.float64)
    log_decay = torch.full((b, h, length), log_alpha, dtype=torch.float64)
    expected, state = lin.delta_rule_recurrent(q, k, v, beta, log_decay, return_state=True)
    got, got_state = lin.delta_rule_chunkwise(*(t.to(dtype) for t in (q, k, v, beta, log_decay)), chunk_size=64,
                                              return_state=True)
    assert bool(torch.isfinite(got).all()) and bool(torch.isfinite(got_state).all())
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert rel_err(got.double(), expected) < tol
    assert rel_err(got_state.double(), state) < tol


# ----------------------------------------------------------------------------- clear behaviour instead of NaN


def test_chunkwise_fast_refuses_autograd_with_a_clear_message():
    q, k, v = (t.float().requires_grad_(True) for t in _qkv(16, 16, h=1, g=1))
    with pytest.raises(RuntimeError, match="forward-only.*linear_attention_chunkwise"):
        linear_attention_chunkwise_fast(q, k, v, chunk_size=4)
    with torch.no_grad():
        assert linear_attention_chunkwise_fast(q, k, v, chunk_size=4).shape == (1, 1, 16, 8)


def test_sequence_loss_refuses_a_batch_with_nothing_scored():
    from labsupport.lm.objectives import sequence_loss
    with pytest.raises(ValueError, match="no position to score"):
        sequence_loss(torch.randn(2, 3, 5), torch.full((2, 3), -100))


def test_causal_attention_refuses_unequal_lengths():
    q, k, v = _qkv(3, 5)
    with pytest.raises(ValueError, match="Lq == Lk"):
        attention.causal_attention(q, k, v)
