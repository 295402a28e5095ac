"""Chapter 03's mixers inside TinyLM: causality, training, decoding, the TTT/DeltaNet link and the errors."""

from __future__ import annotations

import pytest
import torch

import labsupport.linear_attention as la
from labsupport.harness.numerics import rel_err as rel
from labsupport.linear_attention import LinearAttentionMixer, linear_mixer
from labsupport.lm.model import TinyLM

DT = torch.float64


@pytest.mark.parametrize("mechanism", la.MECHANISMS)
def test_mixer_is_causal(mechanism):
    torch.manual_seed(1)
    mixer = LinearAttentionMixer(16, 4, mechanism=mechanism, chunk_size=4).double()
    x = torch.randn(1, 10, 16, dtype=DT)
    x2 = x.clone()
    x2[:, 7:] += 1.0
    assert torch.allclose(mixer(x)[:, :7], mixer(x2)[:, :7], atol=1e-12)


@pytest.mark.parametrize("mechanism", la.MECHANISMS)
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
