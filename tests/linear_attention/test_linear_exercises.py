"""Chapter 03's exercises: the step functions, and their checkers fed wrong answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import labsupport.linear_attention as la
from labsupport.linear_attention import _solutions

DT = torch.float64


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


def test_chunkwise_decay_step_chains_into_the_chunkwise_form():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 20, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    log_decay = F.logsigmoid(torch.randn(2, 3, 20, generator=gen, dtype=torch.float64) + 2)
    state = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    outs = []
    for start in range(0, 20, 6):  # a ragged last chunk of 2
        out, state = _solutions.chunkwise_decay_step(state, q[:, :, start:start + 6], k[:, :, start:start + 6],
                                             v[:, :, start:start + 6], log_decay[:, :, start:start + 6])
        outs.append(out)
    ref, ref_state = la.linear_attention_recurrent(q, k, v, log_decay, return_state=True)
    torch.testing.assert_close(torch.cat(outs, dim=2), ref)
    torch.testing.assert_close(state, ref_state)
    with pytest.raises(ValueError, match="log_decay"):
        _solutions.chunkwise_decay_step(state, q[:, :, :6], k[:, :, :6], v[:, :, :6], log_decay[:, :, :5])


# --------------------------------------------------------------------------- checkers, with wrong answers


CHECKERS = {
    "recurrent_step": (la.check_recurrent_step, la.recurrent_step),
    "chunkwise_step": (la.check_chunkwise_step, la.chunkwise_step),
    "chunkwise_decay_step": (la.check_chunkwise_decay_step, _solutions.chunkwise_decay_step),
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


def test_chunkwise_decay_step_checker_catches_classic_mistakes(capsys):
    def exclusive_cumsum(state, q, k, v, log_decay):  # b_i without token i's own gate
        b = log_decay.cumsum(-1) - log_decay
        return _solutions.chunkwise_decay_step(state, q, k, v, b.diff(dim=-1, prepend=b[..., :1] * 0))

    def no_query_decay(state, q, k, v, log_decay):  # forgets exp(b) on Q S
        out, new_state = _solutions.chunkwise_decay_step(state, q, k, v, log_decay)
        zero_state = torch.zeros_like(state)
        intra, _ = _solutions.chunkwise_decay_step(zero_state, q, k, v, log_decay)
        return intra + q @ state, new_state

    def undecayed_state(state, q, k, v, log_decay):  # S' = S + Kᵀ V
        out, _ = _solutions.chunkwise_decay_step(state, q, k, v, log_decay)
        return out, state + k.transpose(-1, -2) @ v

    for wrong in (exclusive_cumsum, no_query_decay, undecayed_state):
        assert la.check_chunkwise_decay_step(wrong).status == "failed"
    assert "Traceback" not in capsys.readouterr().out
