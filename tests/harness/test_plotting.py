"""labsupport.harness.plotting: log-log scaling plots."""

from __future__ import annotations

import time

import plotly.graph_objects as go
import pytest
import torch

from labsupport.harness.measuring import ScalingResult
from labsupport.harness.plotting import plot_scaling

# --------------------------------------------------------------------------- plot_scaling


def test_plot_scaling_is_log_log_with_slopes_in_the_legend() -> None:
    quadratic = ScalingResult("softmax", [64, 128, 256], [1e-3, 4e-3, 16e-3], [4, 16, 64])
    linear = ScalingResult("linear", [64, 128, 256], [1e-3, 2e-3, 4e-3])
    fig = plot_scaling([quadratic, linear], title="cost vs length", x_title="L (tokens)")
    assert isinstance(fig, go.Figure)
    assert [trace.name for trace in fig.data] == ["softmax (slope 2.00)", "linear (slope 1.00)"]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert fig.layout.xaxis.title.text == "L (tokens)"
    assert "(s)" in fig.layout.yaxis.title.text
    assert fig.data[0].mode == "lines+markers"
    memory_fig = plot_scaling([quadratic], title="memory", y="peak_bytes", fit_tail=2)
    assert "bytes" in memory_fig.layout.yaxis.title.text
    assert list(memory_fig.data[0].y) == [4, 16, 64]


def test_plot_scaling_draws_curves_with_zeros_without_a_slope() -> None:
    fig = plot_scaling([ScalingResult("m", [1, 2], [1.0, 2.0], [0, 0])], title="t", y="peak_bytes")
    assert fig.data[0].name == "m"


@pytest.mark.parametrize(
    ("results", "kwargs", "error"),
    [
        ([], {"title": "t"}, ValueError),
        (["not a result"], {"title": "t"}, TypeError),
        ([ScalingResult("a", [1, 2], [1.0, 2.0])], {"title": "t", "y": "flops"}, ValueError),
        ([ScalingResult("a", [1, 2], [1.0, 2.0])], {"title": "t", "y": "peak_bytes"}, ValueError),
        ([ScalingResult("a", [1, 2], [1.0])], {"title": "t"}, ValueError),
        ([ScalingResult("a", [1, 2], [1.0, 2.0])], {"title": None}, TypeError),
        ([ScalingResult("a", [1, 2], [1.0, 2.0])], {"title": "t", "fit_tail": 1}, ValueError),
        ([ScalingResult("a", [1, 2], [1.0, 2.0])], {"title": "t", "expected_slopes": {"b": 2.0}}, ValueError),
        ([ScalingResult("a", [1, 2], [1.0, 2.0])], {"title": "t", "expected_slopes": [2.0]}, TypeError),
    ],
)
def test_plot_scaling_rejects_bad_input(results, kwargs, error) -> None:
    with pytest.raises(error):
        plot_scaling(results, **kwargs)


def test_plot_scaling_warns_plainly_about_implausible_slopes(capsys) -> None:
    falling = ScalingResult("tiled", [64, 128, 256], [4e-3, 3e-3, 2.5e-3])  # exponent -0.34, seen on a busy machine
    flat = ScalingResult("softmax", [64, 128, 256], [1e-3, 1.2e-3, 1.3e-3])
    good = ScalingResult("dense", [64, 128, 256], [1e-3, 4e-3, 16e-3])
    plot_scaling([falling, flat, good], title="t", expected_slopes={"softmax": 2.0, "dense": 2.0})
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 2
    assert "tiled" in lines[0] and "-0.3" in lines[0]
    assert "softmax" in lines[1] and "expected 2" in lines[1]
