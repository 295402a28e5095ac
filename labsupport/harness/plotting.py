"""Plots every chapter draws: cost against size on log-log axes, and training curves.

* :func:`plot_scaling` — log-log plotly figure with the fitted slope in each legend entry.
* :func:`plot_histories` — training loss and evaluation accuracy of several runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import plotly.graph_objects as go

from labsupport.harness.measuring import ScalingResult, exponent_warning, fit_power_law
from labsupport.harness.validation import require_int

__all__ = ["HistoryLike", "plot_histories", "plot_scaling"]


class HistoryLike(Protocol):
    """What :func:`plot_histories` reads (``labsupport.lm.training.TrainingHistory`` has it all)."""

    label: str
    steps: list[int]
    losses: list[float]
    eval_steps: list[int]
    eval_accuracy: list[float]


_Y_AXIS_TITLES = {"seconds": "time per call (s)", "peak_bytes": "peak extra memory (bytes)"}


def plot_scaling(
    results: Sequence[ScalingResult],
    *,
    title: str,
    y: Literal["seconds", "peak_bytes"] = "seconds",
    fit_tail: int | None = None,
    x_title: str = "size",
    expected_slopes: Mapping[str, float] | None = None,
) -> go.Figure:
    """Log-log plot of cost against size, one line per result, fitted slope in each legend entry.

    Args:
        results: the curves, e.g. from :func:`sweep`.
        title: figure title.
        y: ``"seconds"`` or ``"peak_bytes"`` (needs results measured with ``memory=True``).
        fit_tail: passed to :func:`fit_power_law` as ``tail`` (capped at each curve's length).
        x_title: the x-axis title, e.g. ``"sequence length L (tokens)"``.
        expected_slopes: the slope each curve should have, by label (e.g.
            ``{"softmax attention": 2.0}``); a fitted slope more than 0.5 away is warned about.

    A slope of 1 means linear growth, 2 quadratic. Curves whose values include
    zeros (e.g. no extra memory) are drawn without a fitted slope. A slope that
    cannot be right (negative, above 3.5, or far from ``expected_slopes``) is
    printed as a plain warning (:func:`labsupport.harness.measuring.exponent_warning`).
    """
    if isinstance(results, ScalingResult):
        results = [results]
    if isinstance(results, (str, bytes)) or not isinstance(results, Sequence):
        raise TypeError(f"results must be a list of ScalingResult, got {type(results).__name__}")
    if len(results) == 0:
        raise ValueError("results must not be empty")
    for i, result in enumerate(results):
        if not isinstance(result, ScalingResult):
            raise TypeError(f"results[{i}] must be a ScalingResult, got {type(result).__name__}")
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    if y not in _Y_AXIS_TITLES:
        raise ValueError(f"y must be one of {sorted(_Y_AXIS_TITLES)}, got {y!r}")
    if fit_tail is not None:
        require_int("fit_tail", fit_tail, minimum=2)
    if expected_slopes is None:
        expected_slopes = {}
    if not isinstance(expected_slopes, Mapping):
        raise TypeError(f"expected_slopes must be a dict of label -> slope, got {type(expected_slopes).__name__}")
    unknown = sorted(set(expected_slopes) - {result.label for result in results})
    if unknown:
        raise ValueError(f"expected_slopes names curves that are not plotted: {unknown}")

    figure = go.Figure()
    for result in results:
        values = result.seconds if y == "seconds" else result.peak_bytes
        if values is None:
            raise ValueError(
                f"result {result.label!r} has no peak_bytes; run sweep(..., memory=True) to plot memory"
            )
        if len(values) != len(result.sizes):
            raise ValueError(
                f"result {result.label!r} has {len(result.sizes)} sizes but {len(values)} values"
            )
        name = result.label
        if len(result.sizes) >= 2 and all(v > 0 for v in values):
            tail = None if fit_tail is None else min(fit_tail, len(result.sizes))
            exponent, _ = fit_power_law(result.sizes, values, tail=tail)
            name = f"{result.label} (slope {exponent:.2f})"
            warning = exponent_warning(result.label, exponent, expected=expected_slopes.get(result.label))
            if warning:
                print(warning)
        figure.add_trace(go.Scatter(x=list(result.sizes), y=list(values), mode="lines+markers", name=name))
    figure.update_layout(
        title=title,
        xaxis={"title": {"text": x_title}, "type": "log"},
        yaxis={"title": {"text": _Y_AXIS_TITLES[y]}, "type": "log"},
        legend_title_text="fitted log-log slope" if fit_tail is None else f"slope of the {fit_tail} largest sizes",
        template="plotly_white",
    )
    return figure


def plot_histories(histories: Sequence[HistoryLike], *, title: str = "Training") -> go.Figure:
    """Loss (left axis, log) and evaluation accuracy (right axis) of several runs."""
    if not histories:
        raise ValueError("plot_histories needs at least one TrainingHistory")
    fig = go.Figure()
    for h in histories:
        fig.add_trace(go.Scatter(x=h.steps, y=h.losses, name=f"{h.label}: train loss", mode="lines"))
        if h.eval_steps:
            fig.add_trace(go.Scatter(x=h.eval_steps, y=h.eval_accuracy, name=f"{h.label}: recall",
                                     mode="lines+markers", yaxis="y2"))
    fig.update_layout(
        title=title,
        xaxis_title="training step",
        yaxis=dict(title="cross-entropy loss", type="log"),
        yaxis2=dict(title="accuracy at scored positions", overlaying="y", side="right", range=[0, 1.02],
                    tickmode="linear", tick0=0, dtick=0.2, tickformat=".0%", showgrid=False),
        legend=dict(orientation="h", y=-0.2),
        height=420,
    )
    return fig
