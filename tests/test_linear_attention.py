"""Chapter 03: the equivalence ladders, the mixers inside TinyLM, the widget data and the checkers.

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
from labsupport.linear_attention_mixers import MIXER_MECHANISMS, LinearAttentionMixer, linear_mixer
from labsupport.lm.model import TinyLM

DT = torch.float64
TOL = 1e-12


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


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
        assert torch.allclose(la._exclusive_prefix_sum(w), expected, atol=1e-12)


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
    with pytest.raises(ValueError, match="same shape"):
        la.linear_attention_parallel(q[..., :3], k, v)
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
        la.chunkwise_flops(1, 1, 8, 4, 4, 0)


def test_step_functions_reject_bad_shapes():
    state = torch.zeros(2, 3, 4, 5, dtype=DT)
    q = k = torch.zeros(2, 3, 4, dtype=DT)
    v = torch.zeros(2, 3, 5, dtype=DT)
    with pytest.raises(ValueError, match="state"):
        la.recurrent_step(state, q, k, v[..., :4])
    with pytest.raises(ValueError, match="log_decay"):
        la.recurrent_step(state, q, k, v, torch.zeros(2, dtype=DT))
    with pytest.raises(TypeError, match="torch.Tensor"):
        la.delta_rule_step(state, k, v, 0.5)
    with pytest.raises(ValueError, match="beta"):
        la.delta_rule_step(state, k, v, torch.zeros(2, 3, 1, dtype=DT))
    with pytest.raises(ValueError, match="expected state"):
        la.chunkwise_step(state, torch.zeros(2, 3, 7, 4, dtype=DT), torch.zeros(2, 3, 7, 4, dtype=DT),
                          torch.zeros(2, 3, 7, 4, dtype=DT))


# --------------------------------------------------------------------------- cost helpers


def test_chunkwise_flops_counts():
    f = la.chunkwise_flops(1, 4, 8192, 64, 64, 64)
    assert f["executed"] == 4 * (8192 * 2 * 64 * 128 + 8192 * 4 * 64 * 64)
    assert f["useful"] < f["executed"]
    # a ragged last chunk is executed in full
    assert la.chunkwise_flops(1, 1, 65, 4, 4, 64)["executed"] == la.chunkwise_flops(1, 1, 128, 4, 4, 64)["executed"]


def test_state_bytes_do_not_grow_with_context():
    assert la.recurrent_state_bytes(2, 4, 64, 64) == 2 * 4 * 64 * 64 * 2
    with pytest.raises(ValueError):
        la.recurrent_state_bytes(2, 4, 64, 0)


# --------------------------------------------------------------------------- mixers inside TinyLM


@pytest.mark.parametrize("mechanism", MIXER_MECHANISMS)
def test_mixer_decode_matches_forward(mechanism):
    torch.manual_seed(0)
    mixer = LinearAttentionMixer(16, 2, mechanism=mechanism, chunk_size=4, ttt_mini_batch=3).double()
    x = torch.randn(2, 11, 16, dtype=DT)
    full = mixer(x)
    state, outs = None, []
    for t in range(11):
        y, state = mixer.decode_step(x[:, t : t + 1], state)
        outs.append(y)
    assert rel(torch.cat(outs, dim=1), full) < 1e-12
    prefix, state = mixer.prefill(x[:, :6])  # a prompt that ends mid-chunk, then decoding
    rest = []
    for t in range(6, 11):
        y, state = mixer.decode_step(x[:, t : t + 1], state)
        rest.append(y)
    assert rel(torch.cat([prefix] + rest, dim=1), full) < 1e-12


@pytest.mark.parametrize("mechanism", MIXER_MECHANISMS)
def test_mixer_is_causal(mechanism):
    torch.manual_seed(1)
    mixer = LinearAttentionMixer(16, 4, mechanism=mechanism, chunk_size=4).double()
    x = torch.randn(1, 10, 16, dtype=DT)
    x2 = x.clone()
    x2[:, 7:] += 1.0
    assert torch.allclose(mixer(x)[:, :7], mixer(x2)[:, :7], atol=1e-12)


@pytest.mark.parametrize("mechanism", MIXER_MECHANISMS)
def test_mixers_inside_tinylm(mechanism):
    torch.manual_seed(2)
    model = TinyLM(24, 16, 2, 32, sequence_mixer=linear_mixer(mechanism, n_heads=2, chunk_size=8),
                   channel_mixer=None, short_conv=3)
    tokens = torch.randint(0, 24, (2, 14))
    logits = model(tokens)
    assert logits.shape == (2, 14, 24) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    assert model.supports_decoding()
    last, _ = model.prefill(tokens)
    assert torch.allclose(last, logits[:, -1].detach(), atol=1e-5)
    assert model.generate(tokens[:, :5], 4).shape == (2, 9)


def test_ttt_mixer_with_one_token_batches_is_a_deltanet_mixer():
    torch.manual_seed(3)
    ttt = LinearAttentionMixer(16, 2, mechanism="ttt", ttt_mini_batch=1).double()
    delta = LinearAttentionMixer(16, 2, mechanism="deltanet").double()
    delta.load_state_dict(ttt.state_dict())
    x = torch.randn(2, 9, 16, dtype=DT)
    assert rel(ttt(x), delta(x)) < 1e-12


def test_mixer_state_size_and_errors():
    mixer = LinearAttentionMixer(32, 4, mechanism="deltanet")
    assert mixer.state_numel == 4 * 8 * 8
    with pytest.raises(ValueError, match="mechanism"):
        LinearAttentionMixer(32, 4, mechanism="mamba")
    with pytest.raises(ValueError, match="divisible"):
        LinearAttentionMixer(30, 4)
    with pytest.raises(ValueError, match="one token"):
        mixer.decode_step(torch.randn(1, 2, 32), None)
    with pytest.raises(ValueError, match="expected input"):
        mixer(torch.randn(1, 5, 31))
    with pytest.raises(ValueError, match="mechanism"):
        linear_mixer("softmax")


def test_a_mixer_learns_something_quickly():
    """A few optimiser steps lower the MQAR loss of a DeltaNet model (no speed claim, just wiring)."""
    from labsupport.lm.tasks import make_mqar
    from labsupport.lm.training import train

    torch.manual_seed(0)
    model = TinyLM(32, 32, 1, 32, sequence_mixer=linear_mixer("deltanet", n_heads=2, chunk_size=16),
                   channel_mixer=None, short_conv=3)
    history = train(model, lambda g: make_mqar(32, 32, 4, 32, generator=g), steps=30, lr=1e-2, progress=False)
    assert history.losses[-1] < history.losses[0]


# --------------------------------------------------------------------------- widget data


@pytest.mark.parametrize("mechanism", ["linear", "retnet", "gla", "deltanet", "gated_deltanet"])
def test_memory_decay_data_shapes_and_figure(mechanism):
    data = la.memory_decay_data(mechanism, decay=0.9, beta=0.5, length=20, d_key=8)
    assert data.survival.shape == (20, 20) and data.recall_error.shape == (20,)
    lower = torch.tril(torch.ones(20, 20, dtype=torch.bool))
    assert torch.isnan(data.survival[~lower]).all() and torch.isfinite(data.survival[lower]).all()
    assert torch.allclose(data.survival.diagonal(), torch.ones(20, dtype=DT))  # just written: all there
    fig = la.memory_decay_figure(data)
    assert len(fig.data) == 3


def test_memory_decay_data_values():
    linear = la.memory_decay_data("linear", length=30, d_key=8)
    assert torch.allclose(linear.survival[torch.tril(torch.ones(30, 30, dtype=torch.bool))], torch.tensor(1.0, dtype=DT))
    assert linear.recall_error[0] < 1e-12  # one key: exact
    assert linear.recall_error[-1] > linear.recall_error[8]  # interference grows as the state fills
    retnet = la.memory_decay_data("retnet", decay=0.9, length=10, d_key=4)
    assert torch.allclose(retnet.survival[9, :], 0.9 ** torch.arange(9, -1, -1, dtype=DT))
    delta = la.memory_decay_data("deltanet", beta=1.0, length=40, d_key=8)
    assert delta.recall_error[0] < 1e-12
    # the delta rule keeps the most recent token exact with β = 1, unlike the additive rule
    assert delta.recall_error_recent[-1] < linear.recall_error_recent[-1]
    # deterministic
    again = la.memory_decay_data("deltanet", beta=1.0, length=40, d_key=8)
    assert torch.equal(torch.nan_to_num(again.survival), torch.nan_to_num(delta.survival))


def test_memory_decay_data_errors():
    with pytest.raises(ValueError, match="mechanism"):
        la.memory_decay_data("mamba")
    with pytest.raises(ValueError, match="decay"):
        la.memory_decay_data("retnet", decay=1.5)
    with pytest.raises(ValueError, match="beta"):
        la.memory_decay_data("deltanet", beta=0.0)
    with pytest.raises(ValueError, match="length"):
        la.memory_decay_data("linear", length=0)
    with pytest.raises(TypeError, match="MemoryDecayData"):
        la.memory_decay_figure("not data")


# --------------------------------------------------------------------------- checkers, with wrong answers


CHECKERS = {
    "recurrent_step": (la.check_recurrent_step, la.recurrent_step),
    "chunkwise_step": (la.check_chunkwise_step, la.chunkwise_step),
    "chunkwise_decay_step": (la.check_chunkwise_decay_step, la.chunkwise_decay_step),
    "delta_rule_step": (la.check_delta_rule_step, la.delta_rule_step),
}


@pytest.mark.parametrize("name", CHECKERS)
def test_checker_passes_the_reference(name, capsys):
    checker, reference = CHECKERS[name]
    result = checker(reference)
    assert result and result.status == "passed"
    assert "✅" in capsys.readouterr().out


@pytest.mark.parametrize("name", CHECKERS)
def test_checker_reports_not_done(name, capsys):
    checker, _ = CHECKERS[name]

    def todo(*args, **kwargs):
        raise NotImplementedError("your code here")

    result = checker(todo)
    assert result.status == "not done" and not result
    assert "not done yet" in capsys.readouterr().out


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _map_output(fn, change):
    """A wrong answer: the reference with ``change`` applied to its (first) output."""
    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            return (change(out[0]),) + out[1:]
        return change(out)
    return wrong


WRONG_KINDS = {
    "wrong shape": lambda t: t[..., :-1],
    "wrong dtype": lambda t: t.to(torch.float16 if t.dtype == torch.float64 else torch.float64),
    "NaN": lambda t: t + float("nan"),
    "off by a little": lambda t: t * 1.01,
}


@pytest.mark.parametrize("name", CHECKERS)
@pytest.mark.parametrize("kind", WRONG_KINDS)
def test_checker_catches_wrong_outputs(name, kind, capsys):
    checker, reference = CHECKERS[name]
    result = checker(_map_output(reference, WRONG_KINDS[kind]))
    out = capsys.readouterr().out
    assert result.status == "failed" and "❌" in out and "Traceback" not in out


@pytest.mark.parametrize("name", CHECKERS)
def test_checker_catches_none_and_exceptions(name, capsys):
    checker, _ = CHECKERS[name]
    assert checker(lambda *a, **k: None).status == "failed"
    assert "None" in capsys.readouterr().out

    def broken(*args, **kwargs):
        raise RuntimeError("shapes do not line up")

    result = checker(broken)
    out = capsys.readouterr().out
    assert result.status == "failed" and "RuntimeError" in out and "Traceback" not in out
    assert checker("not a function").status == "failed"


def test_recurrent_step_checker_catches_classic_mistakes(capsys):
    def reads_old_state(state, q, k, v, log_decay=None):
        new_state = la.recurrent_step(state, q, k, v, log_decay)[1]
        if log_decay is not None:
            alpha = log_decay.exp()
            state = (alpha[..., None, None] if alpha.dim() == 2 else alpha[..., None]) * state
        return (q[..., :, None] * state).sum(-2), new_state

    def ignores_decay(state, q, k, v, log_decay=None):
        return la.recurrent_step(state, q, k, v, None)

    def decays_columns(state, q, k, v, log_decay=None):  # the gate on the wrong axis
        if log_decay is not None and log_decay.dim() == 3:
            state = state * log_decay.exp()[..., None, :]
            return la.recurrent_step(state, q, k, v, None)
        return la.recurrent_step(state, q, k, v, log_decay)

    for wrong in (reads_old_state, ignores_decay):
        assert la.check_recurrent_step(wrong).status == "failed"
    # wrong axis on a (D_k != D_v) state fails with a shape error, reported, not raised
    assert la.check_recurrent_step(decays_columns).status == "failed"
    assert "Traceback" not in capsys.readouterr().out


def test_chunkwise_step_checker_catches_off_by_one_mask(capsys):
    def strict_mask(state, q, k, v):  # forgets the diagonal: token t does not see itself
        scores = (q @ k.transpose(-1, -2)).tril(-1)
        return q @ state + scores @ v, state + k.transpose(-1, -2) @ v

    def new_state_for_output(state, q, k, v):
        new_state = state + k.transpose(-1, -2) @ v
        return q @ new_state + (q @ k.transpose(-1, -2)).tril() @ v, new_state

    def contiguous_only(state, q, k, v):  # .view on a transposed input fails: reported, not raised
        q = q.view(*q.shape)
        k = k.view(k.shape[0], k.shape[1], -1).view(*k.shape)
        return la.chunkwise_step(state, q, k, v)

    for wrong in (strict_mask, new_state_for_output, contiguous_only):
        assert la.check_chunkwise_step(wrong).status == "failed"
    out = capsys.readouterr().out
    assert "non-contiguous" in out and "Traceback" not in out


def test_delta_rule_checker_catches_classic_mistakes(capsys):
    def forgets_beta_on_erase(state, k, v, beta):  # S + k (β v − Sᵀk)ᵀ
        recalled = (k[..., :, None] * state).sum(-2)
        return state + k[..., :, None] * (beta[..., None] * v - recalled)[..., None, :]

    def additive(state, k, v, beta):
        return state + k[..., :, None] * (beta[..., None] * v)[..., None, :]

    def transposed_read(state, k, v, beta):  # S k instead of Sᵀ k: only works for square states
        recalled = state @ k[..., :, None]
        return state + k[..., :, None] * (beta[..., None] * (v - recalled[..., 0]))[..., None, :]

    for wrong in (forgets_beta_on_erase, additive, transposed_read):
        assert la.check_delta_rule_step(wrong).status == "failed"
    assert "Traceback" not in capsys.readouterr().out


def test_step_checkers_report_code_that_needs_contiguous_inputs(capsys):
    def flattening_recurrent(state, q, k, v, log_decay=None):  # .view() fails on the transposed state
        flat = state.view(*state.shape[:2], -1)
        return la.recurrent_step(flat.view_as(state), q, k, v, log_decay)

    def flattening_delta(state, k, v, beta):
        flat = state.view(*state.shape[:2], -1)
        return la.delta_rule_step(flat.view_as(state), k, v, beta)

    assert la.check_recurrent_step(flattening_recurrent).status == "failed"
    assert la.check_delta_rule_step(flattening_delta).status == "failed"
    out = capsys.readouterr().out
    assert out.count("non-contiguous") >= 2 and "Traceback" not in out


def test_chunkwise_decay_step_chains_into_the_chunkwise_form():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 20, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    log_decay = F.logsigmoid(torch.randn(2, 3, 20, generator=gen, dtype=torch.float64) + 2)
    state = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    outs = []
    for start in range(0, 20, 6):  # a ragged last chunk of 2
        out, state = la.chunkwise_decay_step(state, q[:, :, start:start + 6], k[:, :, start:start + 6],
                                             v[:, :, start:start + 6], log_decay[:, :, start:start + 6])
        outs.append(out)
    ref, ref_state = la.linear_attention_recurrent(q, k, v, log_decay, return_state=True)
    torch.testing.assert_close(torch.cat(outs, dim=2), ref)
    torch.testing.assert_close(state, ref_state)
    with pytest.raises(ValueError, match="log_decay"):
        la.chunkwise_decay_step(state, q[:, :, :6], k[:, :, :6], v[:, :, :6], log_decay[:, :, :5])


def test_chunkwise_decay_step_checker_catches_classic_mistakes(capsys):
    def exclusive_cumsum(state, q, k, v, log_decay):  # b_i without token i's own gate
        b = log_decay.cumsum(-1) - log_decay
        return la.chunkwise_decay_step(state, q, k, v, b.diff(dim=-1, prepend=b[..., :1] * 0))

    def no_query_decay(state, q, k, v, log_decay):  # forgets exp(b) on Q S
        out, new_state = la.chunkwise_decay_step(state, q, k, v, log_decay)
        zero_state = torch.zeros_like(state)
        intra, _ = la.chunkwise_decay_step(zero_state, q, k, v, log_decay)
        return intra + q @ state, new_state

    def undecayed_state(state, q, k, v, log_decay):  # S' = S + Kᵀ V
        out, _ = la.chunkwise_decay_step(state, q, k, v, log_decay)
        return out, state + k.transpose(-1, -2) @ v

    for wrong in (exclusive_cumsum, no_query_decay, undecayed_state):
        assert la.check_chunkwise_decay_step(wrong).status == "failed"
    assert "Traceback" not in capsys.readouterr().out
