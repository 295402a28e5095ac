"""The impulse-response explorer's data: LTI memory ignores the input; selective memory holds or drops."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest
import torch

from labsupport.ssm.widget import impulse_response_data, impulse_response_figure


def test_lti_memory_is_the_same_whatever_the_event() -> None:
    curves = [impulse_response_data(0.05, event).lti_memory for event in ("none", "hold", "drop")]
    assert all(torch.equal(curves[0], c) for c in curves[1:])
    assert torch.allclose(curves[0][1], torch.exp(-2 * 0.05 * torch.arange(64, dtype=torch.float64)))


def test_hold_keeps_and_drop_forgets() -> None:
    none = impulse_response_data(0.05, "none", event_at=20)
    hold = impulse_response_data(0.05, "hold", event_at=20)
    drop = impulse_response_data(0.05, "drop", event_at=20)
    assert torch.allclose(none.selective_memory, none.lti_memory)  # no event: a selective SSM with constant Δ is LTI
    assert float(hold.selective_memory[0, -1]) > 0.9 * float(hold.selective_memory[0, 19])
    assert float(drop.selective_memory[:, 20:].max()) < 1e-4
    assert torch.allclose(drop.selective_memory[:, :20], none.selective_memory[:, :20])


def test_half_life() -> None:
    data = impulse_response_data(0.1, "none")
    assert data.half_life(0) == pytest.approx(math.log(2) / 0.1)
    memory = float(data.lti_memory[0, round(data.half_life(0))])
    assert memory == pytest.approx(0.5, abs=0.04)


def test_figure_and_bad_input() -> None:
    figure = impulse_response_figure(impulse_response_data(0.02, "drop", d_state=3))
    assert isinstance(figure, go.Figure) and len(figure.data) == 6
    with pytest.raises(ValueError, match="event must be one of"):
        impulse_response_data(0.05, "forget")
    with pytest.raises(ValueError, match="delta must be positive"):
        impulse_response_data(0.0)
    with pytest.raises(ValueError, match="event_at must be <="):
        impulse_response_data(0.05, event_at=64, length=64)
    with pytest.raises(TypeError, match="ImpulseResponseData"):
        impulse_response_figure(None)


def test_learned_step_sizes_of_a_tiny_selective_model() -> None:
    import pytest
    from labsupport.lm.model import TinyLM
    from labsupport.ssm import learned_step_sizes, learned_steps_figure, mamba_mixer

    torch.manual_seed(0)
    model = TinyLM(8, d_model=16, n_layers=2, max_len=12, channel_mixer=None, positional="none",
                   sequence_mixer=mamba_mixer(4))
    tokens = torch.randint(0, 8, (3, 12))
    data = tokens >= 2
    steps = learned_step_sizes(model, tokens, data)
    assert steps.deltas.shape == (2, 3, 12) and bool((steps.deltas > 0).all())
    mixer = model.blocks[0].mixer
    assert float(steps.deltas[0].min()) > 0 and len(steps.mean_on(1)) == 2
    learned_steps_figure(steps, example=2, layer=1)
    with pytest.raises(ValueError):
        learned_step_sizes(model, tokens, data[:, :5])
    lti = TinyLM(8, d_model=16, n_layers=1, max_len=12, channel_mixer=None, positional="none",
                 sequence_mixer=mamba_mixer(4, selective=False))
    with pytest.raises(ValueError):
        learned_step_sizes(lti, tokens, data)
    with pytest.raises(ValueError):
        mixer.step_sizes(torch.randn(2, 5, 3))


def test_most_selective_channels_are_found() -> None:
    from labsupport.ssm.widget import LearnedSteps

    tokens = torch.tensor([[0, 3, 0, 4]])
    data = tokens >= 2
    per_channel = torch.ones(1, 1, 4, 3)
    per_channel[0, 0, 1, 2] = per_channel[0, 0, 3, 2] = 10.0      # channel 2 takes large steps on data
    steps = LearnedSteps(tokens, data, per_channel.mean(-1), per_channel)
    assert steps.most_selective(0, 1).tolist() == [2]
    assert abs(float(steps.channel_ratios(0)[2]) - 10.0) < 1e-6
