"""Chapter 03's reference math: the equivalence ladders, the fast path, validation and the cost formulas.

Every ladder is checked in float64, where the forms agree to rounding (relative
error around 1e-15; we assert 1e-12).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import labsupport.linear_attention as la
from labsupport.harness import costs
from labsupport.harness.numerics import rel_err as rel
from labsupport.linear_attention.fast import _exclusive_prefix_sum

DT = torch.float64
TOL = 1e-12


def qkv(b=2, h=3, length=29, dk=5, dv=4, seed=0, positive=False, unit=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, length, dk, generator=gen, dtype=DT)
    k = torch.randn(b, h, length, dk, generator=gen, dtype=DT)
    v = torch.randn(b, h, length, dv, generator=gen, dtype=DT)
    if positive:
        q, k = la.elu_feature_map(q), la.elu_feature_map(k)
    if unit:
        k = F.normalize(k, dim=-1)
    return q, k, v


def log_gates(shape, seed=1, shift=2.0):
    gen = torch.Generator().manual_seed(seed)
    return F.logsigmoid(torch.randn(*shape, generator=gen, dtype=DT) + shift)


# --------------------------------------------------------------------------- linear-attention ladders


@pytest.mark.parametrize("decay", ["none", "scalar", "vector", "retnet"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 8, 29, 64])
def test_linear_attention_ladder(decay, normalize, chunk):
    q, k, v = qkv(positive=normalize)
    b, h, length, dk = q.shape
    log_decay = {"none": None, "scalar": log_gates((b, h, length)), "vector": log_gates((b, h, length, dk)),
                 "retnet": la.retnet_log_decay(h, length, batch=b)}[decay]
    parallel = la.linear_attention_parallel(q, k, v, log_decay, normalize=normalize)
    recurrent, s_rec = la.linear_attention_recurrent(q, k, v, log_decay, normalize=normalize, return_state=True)
    chunked, s_chk = la.linear_attention_chunkwise(q, k, v, log_decay, chunk_size=chunk, normalize=normalize,
                                                   return_state=True)
    assert rel(recurrent, parallel) < TOL
    assert rel(chunked, parallel) < TOL
    assert rel(s_chk, s_rec) < TOL
    if not normalize:
        assert rel(la.memory_recurrence(q, k, v, log_decay=log_decay), parallel) < TOL


def test_unnormalised_linear_attention_is_a_masked_matrix_product():
    """An independent reference: the explicit double sum o_t = Σ_{s≤t} (q_t·k_s) v_s."""
    q, k, v = qkv(b=1, h=1, length=7)
    expected = torch.stack([sum((q[0, 0, t] @ k[0, 0, s]) * v[0, 0, s] for s in range(t + 1)) for t in range(7)])
    assert rel(la.linear_attention_parallel(q, k, v)[0, 0], expected) < TOL


def test_normalised_rows_are_weighted_averages_of_values():
    """With positive features and normalisation, each output is a convex combination of past values."""
    q, k, _ = qkv(positive=True)
    ones = torch.ones(*q.shape[:3], 3, dtype=DT)
    out = la.linear_attention_parallel(q, k, ones, normalize=True, eps=0.0)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-12)


def test_retnet_decay_values():
    gamma = la.retnet_log_decay(3, 2).exp()[0, :, 0]
    assert torch.allclose(gamma, torch.tensor([1 - 2**-5, 1 - 2**-6, 1 - 2**-7], dtype=DT))


def test_state_carries_across_calls():
    """Processing a sequence in two calls, passing the state, equals one call."""
    q, k, v = qkv(length=30)
    ld = log_gates(q.shape[:3])
    whole = la.linear_attention_chunkwise(q, k, v, ld, chunk_size=8)
    first, state = la.linear_attention_chunkwise(q[:, :, :13], k[:, :, :13], v[:, :, :13], ld[:, :, :13],
                                                 chunk_size=8, return_state=True)
    second = la.linear_attention_recurrent(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], ld[:, :, 13:],
                                           initial_state=state)
    assert rel(torch.cat([first, second], dim=2), whole) < TOL


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 100])
def test_fast_chunkwise_matches(chunk):
    q, k, v = qkv(length=45)
    assert rel(la.linear_attention_chunkwise_fast(q, k, v, chunk_size=chunk), la.linear_attention_parallel(q, k, v)) < TOL


def test_exclusive_prefix_sum():
    for n in (1, 2, 7, 12, 128):
        w = torch.randn(3, n, 5, dtype=DT)
        expected = w.cumsum(1) - w
        assert torch.allclose(_exclusive_prefix_sum(w), expected, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 40), chunk=st.integers(1, 20), dk=st.integers(1, 6), dv=st.integers(1, 6),
       vector=st.booleans(), seed=st.integers(0, 10_000))
def test_linear_attention_ladder_property(length, chunk, dk, dv, vector, seed):
    q, k, v = qkv(b=1, h=2, length=length, dk=dk, dv=dv, seed=seed)
    shape = (1, 2, length, dk) if vector else (1, 2, length)
    ld = log_gates(shape, seed=seed + 1)
    parallel = la.linear_attention_parallel(q, k, v, ld)
    assert rel(la.linear_attention_chunkwise(q, k, v, ld, chunk_size=chunk), parallel) < TOL
    assert rel(la.linear_attention_recurrent(q, k, v, ld), parallel) < TOL


# --------------------------------------------------------------------------- delta rule and TTT ladders


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 8, 29, 64])
def test_delta_rule_ladder(gated, chunk):
    q, k, v = qkv(unit=True)
    beta = torch.rand(q.shape[:3], generator=torch.Generator().manual_seed(3), dtype=DT)
    ld = log_gates(q.shape[:3], shift=3.0) if gated else None
    recurrent, s_rec = la.delta_rule_recurrent(q, k, v, beta, ld, return_state=True)
    chunked, s_chk = la.delta_rule_chunkwise(q, k, v, beta, ld, chunk_size=chunk, return_state=True)
    assert rel(chunked, recurrent) < TOL
    assert rel(s_chk, s_rec) < TOL
    assert rel(la.delta_rule_parallel(q, k, v, beta, ld), recurrent) < TOL
    assert rel(la.memory_recurrence(q, k, v, log_decay=ld, beta=beta, rule="delta"), recurrent) < TOL


def test_delta_rule_against_explicit_householder_products():
    """S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ written with explicit matrices."""
    q, k, v = qkv(b=1, h=1, length=9, dk=4, dv=3, unit=True)
    beta = torch.rand(1, 1, 9, dtype=DT)
    ld = log_gates((1, 1, 9))
    state = torch.zeros(4, 3, dtype=DT)
    outs = []
    for t in range(9):
        kt = k[0, 0, t]
        state = ld[0, 0, t].exp() * (torch.eye(4, dtype=DT) - beta[0, 0, t] * torch.outer(kt, kt)) @ state \
            + beta[0, 0, t] * torch.outer(kt, v[0, 0, t])
        outs.append(state.T @ q[0, 0, t])
    assert rel(la.delta_rule_recurrent(q, k, v, beta, ld)[0, 0], torch.stack(outs)) < TOL


def test_ut_transform_is_the_inverse():
    gen = torch.Generator().manual_seed(4)
    k = F.normalize(torch.randn(2, 6, 5, generator=gen, dtype=DT), dim=-1)
    beta = torch.rand(2, 6, generator=gen, dtype=DT)
    t = la.ut_transform(k, beta)
    a = torch.eye(6, dtype=DT) + (beta[..., None] * (k @ k.mT)).tril(-1)
    assert torch.allclose(a @ t, torch.diag_embed(beta), atol=1e-12)
    assert torch.equal(t, t.tril())


def test_delta_rule_with_beta_one_stores_exactly():
    """β = 1 and orthonormal keys: the memory returns every stored value exactly."""
    dk = 6
    keys = torch.linalg.qr(torch.randn(dk, dk, dtype=DT))[0].T  # rows orthonormal
    v = torch.randn(1, 1, dk, 3, dtype=DT)
    k = keys[None, None]
    _, state = la.delta_rule_recurrent(k, k, v, 1.0, return_state=True)
    assert torch.allclose(k[0, 0] @ state[0, 0], v[0, 0], atol=1e-12)


@pytest.mark.parametrize("mini_batch", [1, 3, 16, 40])
def test_ttt_forms_agree(mini_batch):
    q, k, v = qkv(length=29, unit=True)
    eta = 0.5 * torch.rand(q.shape[:3], dtype=DT)
    loop, s_loop = la.ttt_linear(q, k, v, eta, mini_batch=mini_batch, return_state=True)
    dual, s_dual = la.ttt_linear_minibatch(q, k, v, eta, mini_batch=mini_batch, return_state=True)
    assert rel(dual, loop) < TOL and rel(s_dual, s_loop) < TOL


def test_ttt_with_one_token_batches_is_the_delta_rule():
    q, k, v = qkv(unit=True)
    eta = torch.rand(q.shape[:3], dtype=DT)
    assert rel(la.ttt_linear(q, k, v, eta, mini_batch=1), la.delta_rule_recurrent(q, k, v, eta)) < TOL
    assert rel(la.ttt_linear(q, k, v, 0.3), la.delta_rule_recurrent(q, k, v, 0.3)) < TOL


def test_ttt_closed_form_gradient_equals_autograd():
    q, k, v = qkv(length=10, unit=True)
    assert rel(la.ttt_linear(q, k, v, 0.4, mini_batch=4, use_autograd=True),
               la.ttt_linear(q, k, v, 0.4, mini_batch=4)) < TOL


def test_gradients_flow_through_chunked_forms():
    q, k, v = (t.requires_grad_(True) for t in qkv(b=1, h=2, length=12, dk=3, dv=2, unit=True))
    beta = torch.full(q.shape[:3], 0.5, dtype=DT)
    ref = la.delta_rule_recurrent(q, k, v, beta)
    chk = la.delta_rule_chunkwise(q, k, v, beta, chunk_size=5)
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    g_chk = torch.autograd.grad(chk.sum(), (q, k, v))
    for a, b in zip(g_chk, g_ref):
        assert rel(a, b) < 1e-10


# --------------------------------------------------------------------------- validation


def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="torch.Tensor"):
        la.linear_attention_parallel(q.numpy(), k, v)
    with pytest.raises(ValueError, match="same head dimension"):
        la.linear_attention_parallel(q[..., :3], k, v)
    with pytest.raises(ValueError, match="same shape"):  # queries and keys of different lengths
        la.linear_attention_parallel(q[:, :, :7], k, v)
    with pytest.raises(ValueError, match="4 dimensions"):
        la.linear_attention_recurrent(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="dtype"):
        la.linear_attention_chunkwise(q.float(), k, v)
    with pytest.raises(ValueError, match="log_decay"):
        la.linear_attention_parallel(q, k, v, torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="<= 0"):
        la.linear_attention_parallel(q, k, v, torch.ones(q.shape[:3], dtype=DT))
    with pytest.raises(ValueError, match="chunk_size"):
        la.linear_attention_chunkwise(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        la.delta_rule_recurrent(q, k, v, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="log_decay"):
        la.delta_rule_chunkwise(q, k, v, 0.5, log_gates(q.shape))  # no per-dimension gate for the delta rule
    with pytest.raises(ValueError, match="initial_state"):
        la.linear_attention_recurrent(q, k, v, initial_state=torch.zeros(1, 1, 1, 1, dtype=DT))
    with pytest.raises(ValueError, match="mini_batch"):
        la.ttt_linear(q, k, v, 0.1, mini_batch=0)
    with pytest.raises(ValueError, match="rule"):
        la.memory_recurrence(q, k, v, rule="hebbian")
    with pytest.raises(ValueError, match="n_heads"):
        la.retnet_log_decay(0, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        costs.chunkwise_flops(1, 1, 8, 4, 4, 0)


# --------------------------------------------------------------------------- cost helpers


def test_chunkwise_flops_counts():
    f = costs.chunkwise_flops(1, 4, 8192, 64, 64, 64)
    assert f["executed"] == 4 * (8192 * 2 * 64 * 128 + 8192 * 4 * 64 * 64)
    assert f["useful"] < f["executed"]
    # a ragged last chunk is executed in full
    assert costs.chunkwise_flops(1, 1, 65, 4, 4, 64)["executed"] == costs.chunkwise_flops(1, 1, 128, 4, 4, 64)["executed"]


def test_state_bytes_do_not_grow_with_context():
    assert costs.recurrent_state_bytes(2, 4, 64, 64) == 2 * 4 * 64 * 64 * 2
    with pytest.raises(ValueError):
        costs.recurrent_state_bytes(2, 4, 64, 0)
