"""Chapter 03's core exercise (labsupport.linear_attention.exercises_core): one chunk of gated DeltaNet via UT.

The reference equals the recurrent form and the library's chunkwise form; wrong answers of every kind fail
with a message and no traceback; a loop over the tokens — right values, the recurrent form — is refused.
"""

from __future__ import annotations

import math

import pytest
import torch

from labsupport import linear_attention as la
from labsupport.linear_attention import _solutions
from labsupport.linear_attention.exercises_core import _delta_chunk_args


def test_core_checker_passes_the_reference(capsys) -> None:
    assert la.check_gated_delta_chunk_step(_solutions.gated_delta_chunk_step)
    out = capsys.readouterr().out
    assert out.startswith("✅") and "no loop over the tokens" in out


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunk_step_equals_recurrent_and_chains_into_the_library_form(chunk: int) -> None:
    gen = torch.Generator().manual_seed(chunk)
    state, q, k, v, beta, log_decay = _delta_chunk_args(gen, 2, 2, 3 * chunk, 4, 3)
    out_ref, state_ref = la.delta_rule_recurrent(q, k, v, beta, log_decay, initial_state=state, return_state=True)
    outs = []
    for start in range(0, 3 * chunk, chunk):
        window = slice(start, start + chunk)
        o, state = _solutions.gated_delta_chunk_step(state, q[:, :, window], k[:, :, window], v[:, :, window],
                                             beta[:, :, window], log_decay[:, :, window])
        outs.append(o)
    assert torch.allclose(torch.cat(outs, 2), out_ref, atol=1e-12, rtol=0)
    assert torch.allclose(state, state_ref, atol=1e-12, rtol=0)


def test_guard_names_what_was_expected() -> None:
    state, q, k, v, beta, log_decay = _delta_chunk_args(torch.Generator().manual_seed(0), 1, 2, 4, 3, 3)
    with pytest.raises(ValueError, match="beta and log_decay"):
        _solutions.gated_delta_chunk_step(state, q, k, v, beta[..., :-1], log_decay)
    with pytest.raises(TypeError, match="log_decay"):
        _solutions.gated_delta_chunk_step(state, q, k, v, beta, None)


def not_done(*args):
    raise NotImplementedError("your code here")


def _token_loop(state, q, k, v, beta, log_decay):
    return la.delta_rule_recurrent(q, k, v, beta, log_decay, initial_state=state, return_state=True)


def _gate_ignored(state, q, k, v, beta, log_decay):
    return _solutions.gated_delta_chunk_step(state, q, k, v, beta, torch.zeros_like(log_decay))


def _without_ut(state, q, k, v, beta, log_decay):   # exercise 4 with β V in place of the corrected values
    return _solutions.chunkwise_decay_step(state, q, k, beta[..., None] * v, log_decay)


def _state_not_decayed(state, q, k, v, beta, log_decay):
    out, new = _solutions.gated_delta_chunk_step(state, q, k, v, beta, log_decay)
    return out, new + (1 - log_decay.sum(-1).exp())[..., None, None] * state


def _gate_off_by_one(state, q, k, v, beta, log_decay):   # exclusive cumulative sum: the own gate left out
    shifted = torch.cat([torch.zeros_like(log_decay[..., :1]), log_decay[..., :-1]], dim=-1)
    return _solutions.gated_delta_chunk_step(state, q, k, v, beta, shifted)


def _only_output(state, q, k, v, beta, log_decay):
    return _solutions.gated_delta_chunk_step(state, q, k, v, beta, log_decay)[0]


WRONG = {
    "not done": not_done,
    "None": lambda *a: None,
    "raises": lambda state, q, k, v, beta, log_decay: q @ v,
    "only the output (no state)": _only_output,
    "wrong dtype": lambda *a: tuple(t.double() if t.dtype == torch.float32 else t.float()
                                    for t in _solutions.gated_delta_chunk_step(*a)),
    "NaN": lambda *a: tuple(t * math.nan for t in _solutions.gated_delta_chunk_step(*a)),
    "gate ignored": _gate_ignored,
    "no UT transform (β v written as is)": _without_ut,
    "old state not decayed": _state_not_decayed,
    "own gate left out (off by one)": _gate_off_by_one,
    "a loop over the tokens (the recurrent form)": _token_loop,
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_core_checker_rejects_wrong_answers_politely(wrong: str, capsys) -> None:
    result = la.check_gated_delta_chunk_step(WRONG[wrong])
    out = capsys.readouterr().out
    assert not result
    if wrong == "not done":
        assert result.status == "not done" and "not done yet" in out
    else:
        assert result.status == "failed" and out.startswith("❌") and "Traceback" not in out
    if wrong.startswith("a loop"):
        assert "values are right" in out and "one by one" in out


def test_token_loop_is_refused_in_strict_mode(monkeypatch) -> None:
    monkeypatch.setenv("LABSUPPORT_STRICT_CHECKS", "1")
    with pytest.raises(AssertionError, match="one by one"):
        la.check_gated_delta_chunk_step(_token_loop)
