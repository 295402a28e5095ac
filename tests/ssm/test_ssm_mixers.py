"""The Mamba mixer in the lm bench: prefill + decode = forward, constant state, both SSM kinds."""

from __future__ import annotations

import pytest
import torch

from labsupport.harness.costs import mamba_state_bytes
from labsupport.harness.numerics import rel_err
from labsupport.lm.contracts import CacheReport, DecodingMixer, SequenceMixer
from labsupport.lm.model import TinyLM
from labsupport.ssm.mixers import MambaMixer, mamba_mixer
from labsupport.ssm.scans import SCANS


@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_prefill_then_decode_equals_forward(selective: bool, gated: bool) -> None:
    torch.manual_seed(0)
    mixer = MambaMixer(16, 8, selective=selective, gated=gated).double()
    assert isinstance(mixer, (SequenceMixer, DecodingMixer, CacheReport))
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    full = mixer(x)
    out, state = mixer.prefill(x[:, :6])
    outs = [out]
    for t in range(6, 13):
        y, state = mixer.decode_step(x[:, t:t + 1], state)
        outs.append(y)
    assert rel_err(torch.cat(outs, 1), full) < 1e-12
    state, outs = None, []
    for t in range(13):
        y, state = mixer.decode_step(x[:, t:t + 1], state)
        outs.append(y)
    assert rel_err(torch.cat(outs, 1), full) < 1e-12


def test_short_prompt_shorter_than_the_conv_window() -> None:
    torch.manual_seed(1)
    mixer = MambaMixer(8, 4).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    out, state = mixer.prefill(x[:, :2])
    y, _ = mixer.decode_step(x[:, 2:3], state)
    assert rel_err(torch.cat([out, y], 1), mixer(x[:, :3])) < 1e-12


@pytest.mark.parametrize("scan", list(SCANS))
def test_every_scan_gives_the_same_mixer(scan: str) -> None:
    torch.manual_seed(2)
    mixer = MambaMixer(8, 4).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    expected = mixer(x)
    mixer.scan = scan
    assert rel_err(mixer(x), expected) < 1e-12


def test_state_is_constant_in_the_context() -> None:
    mixer = MambaMixer(16, 8)
    _, short = mixer.prefill(torch.randn(1, 4, 16))
    _, long = mixer.prefill(torch.randn(1, 400, 16))
    assert mixer.cache_bytes(short) == mixer.cache_bytes(long) == mamba_state_bytes(
        1, mixer.d_inner, 8, 4, bytes_per_element=4)


def test_lti_layer_has_a_kernel_and_the_selective_one_refuses() -> None:
    lti = MambaMixer(8, 4, selective=False)
    assert lti.lti_kernel(10).shape == (lti.d_inner, 10)
    with pytest.raises(ValueError, match="no single kernel"):
        MambaMixer(8, 4).lti_kernel(10)


def test_init_follows_mamba() -> None:
    mixer = MambaMixer(32, 16)
    assert torch.allclose(mixer.A[0], -torch.arange(1, 17, dtype=torch.float32))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias.detach())
    assert float(dt.min()) >= 1e-3 - 1e-7 and float(dt.max()) <= 0.1 + 1e-6
    assert mixer.dt_rank == 2


def test_inside_tinylm_prefill_and_decode_match_forward() -> None:
    torch.manual_seed(3)
    model = TinyLM(32, d_model=16, n_layers=2, max_len=40, sequence_mixer=mamba_mixer(4), channel_mixer="mlp",
                   positional="none").double()
    tokens = torch.randint(0, 32, (2, 20))
    logits = model(tokens)
    last, states = model.prefill(tokens[:, :8])
    assert rel_err(last, logits[:, 7]) < 1e-12
    for t in range(8, 20):
        last, states = model.decode_step(tokens[:, t], states, t)
        assert rel_err(last, logits[:, t]) < 1e-12


def test_training_step_reaches_every_parameter() -> None:
    torch.manual_seed(4)
    for selective in (True, False):
        mixer = MambaMixer(8, 4, selective=selective)
        mixer(torch.randn(2, 7, 8)).square().sum().backward()
        missing = [n for n, p in mixer.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert missing == []


def test_bad_inputs() -> None:
    mixer = MambaMixer(8, 4)
    with pytest.raises(ValueError, match="d_model=8"):
        mixer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="one token"):
        mixer.decode_step(torch.randn(2, 2, 8), None)
    with pytest.raises(ValueError, match="scan must be one of"):
        MambaMixer(8, scan="fast")
    with pytest.raises(ValueError, match="dt_min"):
        MambaMixer(8, dt_min=0.5, dt_max=0.1)
    with pytest.raises(TypeError, match="d_state must be an int"):
        mamba_mixer(1.5)


def test_mamba_state_bytes_formula() -> None:
    assert mamba_state_bytes(64, 8192, 16, 4) == 64 * 8192 * 19 * 2
    assert mamba_state_bytes(2, 10, 4, 1, bytes_per_element=4, batch=3) == 2 * 10 * 4 * 4 * 3
    with pytest.raises(ValueError, match="d_state must be >= 1"):
        mamba_state_bytes(1, 8, 0)
