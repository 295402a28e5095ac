"""Chapter 03's registry: one row per mechanism, and every row's two forms compute the same thing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import labsupport.linear_attention as la
from labsupport.harness.numerics import rel_err as rel
from labsupport.linear_attention import LinearAttentionMixer
from labsupport.linear_attention.mechanisms import FormOptions, MemoryInputs

DT = torch.float64


def test_the_registry_names_the_six_mechanisms_in_the_chapter_order():
    assert list(la.MECHANISMS) == ["linear", "retnet", "gla", "deltanet", "gated_deltanet", "ttt"]
    for name, spec in la.MECHANISMS.items():
        assert spec.name == name and spec.label and spec.forget and spec.write
        assert la.get_mechanism(name) is spec
    assert la.widget_mechanisms() == ("linear", "retnet", "gla", "deltanet", "gated_deltanet")


def test_rows_are_frozen_and_checked():
    spec = la.MECHANISMS["deltanet"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.beta = False  # type: ignore[misc]
    with pytest.raises(ValueError, match="decay"):
        dataclasses.replace(spec, decay="sometimes")
    with pytest.raises(ValueError, match="mechanism"):
        la.get_mechanism("mamba")


def _inputs(spec, b=2, h=2, length=11, d=4, seed=0):
    """Random features, values and the gates the row asks for, in float64."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=gen, dtype=DT) for _ in range(3))
    q, k = spec.features(q, k)
    gate = lambda *s: F.logsigmoid(torch.randn(*s, generator=gen, dtype=DT) + 2.0)  # noqa: E731
    log_decay = {"none": None, "fixed": la.retnet_log_decay(h, length, batch=b), "scalar_gate": gate(b, h, length),
                 "vector_gate": gate(b, h, length, d)}[spec.decay]
    beta = torch.rand(b, h, length, generator=gen, dtype=DT) if spec.beta else None
    return MemoryInputs(q, k, v, log_decay, beta)


@pytest.mark.parametrize("spec", la.MECHANISMS.values(), ids=list(la.MECHANISMS))
def test_every_rows_step_form_continues_its_sequence_form(spec):
    """Stepping token by token from nothing, or from the state a prefix left, gives the sequence form's outputs."""
    x = _inputs(spec)
    options = FormOptions(chunk_size=4, mini_batch=3, normalize=spec.normalize)
    whole, _ = spec.sequence_form(x, options)
    state, outs = None, []
    for t in range(x.q.shape[2]):
        y, state = spec.step_form(state, x.token(t), options)
        outs.append(y)
    assert rel(torch.stack(outs, dim=2), whole) < 1e-12
    prefix, state = spec.sequence_form(MemoryInputs(*(None if t is None else t[:, :, :6] for t in x)), options)
    rest = []
    for t in range(6, x.q.shape[2]):
        y, state = spec.step_form(state, x.token(t), options)
        rest.append(y)
    assert rel(torch.cat([prefix, torch.stack(rest, dim=2)], dim=2), whole) < 1e-12


UNIFIED = [s for s in la.MECHANISMS.values() if s.name != "ttt" and not s.normalize]


@pytest.mark.parametrize("spec", UNIFIED, ids=[s.name for s in UNIFIED])
def test_every_per_token_row_is_the_unified_loop(spec):
    """The row's gates and rule, fed to ``memory_recurrence``, give its sequence form.

    Left out: linear attention's normaliser (not in the loop) and TTT's mini-batches (tested against the delta rule).
    """
    x = _inputs(spec)
    whole, _ = spec.sequence_form(x, FormOptions(chunk_size=4))
    beta = 1.0 if x.beta is None else x.beta
    assert rel(la.memory_recurrence(x.q, x.k, x.v, log_decay=x.log_decay, beta=beta, rule=spec.rule), whole) < 1e-12


def test_mixer_parameters_follow_the_rows_gates():
    for name, spec in la.MECHANISMS.items():
        params = {n.split(".")[0] for n, _ in LinearAttentionMixer(16, 2, mechanism=name).named_parameters()}
        assert ("beta" in params) == spec.beta
        assert ("gate" in params) == (spec.decay == "vector_gate")
        assert ("alpha" in params) == (spec.decay == "scalar_gate")
        assert ("head_norm" in params) == (not spec.normalize)


@pytest.mark.parametrize("spec", la.MECHANISMS.values(), ids=list(la.MECHANISMS))
def test_every_row_builds_a_mixer_whose_decode_steps_equal_its_forward_pass(spec):
    mechanism = spec.name
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
