"""Chapter 03's memory-decay widget: its data and its figure."""

from __future__ import annotations

import pytest
import torch

import labsupport.linear_attention as la

DT = torch.float64


# --------------------------------------------------------------------------- widget data


@pytest.mark.parametrize("mechanism", la.widget_mechanisms())
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


def test_widget_parameters_used_match_what_the_data_reads():
    """A parameter marked unused does not change the data; one marked used does (so its control may be disabled)."""
    from labsupport.linear_attention.widget import widget_parameters_used

    for mechanism in la.widget_mechanisms():
        used = widget_parameters_used(mechanism)
        base = la.memory_decay_data(mechanism, decay=0.9, beta=0.5, length=24, d_key=8)
        other_decay = la.memory_decay_data(mechanism, decay=0.6, beta=0.5, length=24, d_key=8)
        other_beta = la.memory_decay_data(mechanism, decay=0.9, beta=0.9, length=24, d_key=8)
        assert used["decay"] == (not torch.equal(base.recall_error, other_decay.recall_error)), mechanism
        assert used["beta"] == (not torch.equal(base.recall_error, other_beta.recall_error)), mechanism
        title = la.memory_decay_figure(base).layout.title.text
        assert ("no decay" in title) == (not used["decay"]) and ("β not used" in title) == (not used["beta"])
    with pytest.raises(ValueError, match="mechanism"):
        widget_parameters_used("ttt")
