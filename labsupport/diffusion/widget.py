"""Watching the masks resolve: the data and the figure of the chapter's denoising explorer.

* :func:`denoising_state` — for one sequence of a :class:`~labsupport.diffusion.sampling.SampleTrace` after
  ``step`` steps: each position's character, whether it was given, committed or is still masked, and the
  colour value (the confidence at commit, or the step of commit).
* :func:`candidate_lists` — the model's top candidates at each position, as recorded before a step's commit.
* :func:`denoising_figure` — that state as a character grid coloured by confidence or by step (each still-masked
  cell showing its top candidate faintly, the top three on hover), above the mean confidence of the tokens
  committed at each step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from labsupport.diffusion.sampling import SampleTrace
from labsupport.harness.validation import require_choice, require_int, require_positive_int

__all__ = ["COLOUR_BY", "DenoisingState", "candidate_lists", "denoising_figure", "denoising_state", "trace_summary", "visible_char"]

COLOUR_BY = ("confidence", "step")
_MASK_GLYPH = "░"


def visible_char(c: str) -> str:
    """A printable stand-in for a character in the grid: ``␣`` for a space, ``⏎`` for a newline."""
    return {" ": "␣", "\n": "⏎", "\t": "⇥"}.get(c, c)


@dataclass
class DenoisingState:
    """One sequence after some steps. Lists have one entry per position.

    Attributes:
        text: the character shown (``░`` where still masked).
        kind: ``"given"``, ``"committed"`` or ``"masked"``.
        value: the colour value of a committed position (confidence or step), ``nan`` otherwise.
        step: steps done; total_steps: steps of the whole run.
    """

    text: list[str]
    kind: list[str]
    value: list[float]
    step: int
    total_steps: int

    @property
    def masked_left(self) -> int:
        return self.kind.count("masked")


def denoising_state(trace: SampleTrace, chars: Sequence[str], *, row: int = 0, step: int | None = None,
                    colour_by: str = "confidence") -> DenoisingState:
    """The state of sequence ``row`` after ``step`` steps (``None``: the end)."""
    if not isinstance(trace, SampleTrace):
        raise TypeError(f"trace must be a SampleTrace, got {type(trace).__name__}")
    require_choice("colour_by", colour_by, COLOUR_BY)
    row = require_int("row", row, minimum=0, maximum=trace.tokens.shape[0] - 1)
    step = trace.steps if step is None else require_int("step", step, minimum=0, maximum=trace.steps)
    tokens = trace.tokens[row].tolist()
    committed_at = trace.commit_step[row].tolist()
    confidence = trace.confidence[row].tolist()
    text, kind, value = [], [], []
    for token, at, conf in zip(tokens, committed_at, confidence):
        if at < 0:
            text.append(visible_char(chars[token]))
            kind.append("given")
            value.append(float("nan"))
        elif at < step:
            text.append(visible_char(chars[token]))
            kind.append("committed")
            value.append(float(conf) if colour_by == "confidence" else float(at))
        else:
            text.append(_MASK_GLYPH)
            kind.append("masked")
            value.append(float("nan"))
    return DenoisingState(text, kind, value, step, trace.steps)


def _mean_confidence_per_step(trace: SampleTrace, row: int) -> list[float]:
    out = []
    for s in range(trace.steps):
        now = trace.commit_step[row] == s
        out.append(float(trace.confidence[row][now].mean()) if bool(now.any()) else float("nan"))
    return out


def denoising_figure(trace: SampleTrace, chars: Sequence[str], *, row: int = 0, step: int | None = None,
                     colour_by: str = "confidence", width: int = 32, title: str | None = None):
    """The character grid of sequence ``row`` after ``step`` steps (``width`` characters a line), and below it
    the mean confidence of the tokens committed at each step (the current one marked). Returns a ``go.Figure``."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    width = require_positive_int("width", width)
    state = denoising_state(trace, chars, row=row, step=step, colour_by=colour_by)
    n = len(state.text)
    lines = (n + width - 1) // width
    # Empty cells are None (JSON null), not NaN: a widget's messages must be valid JSON.
    grid_value: list[list[float | None]] = [[None] * width for _ in range(lines)]
    grid_given: list[list[float | None]] = [[None] * width for _ in range(lines)]
    xs, ys, labels, colours, hovers = [], [], [], [], []
    top = 1.0 if colour_by == "confidence" else max(1, trace.steps - 1)
    upcoming = candidate_lists(trace, chars, row=row, step=state.step)
    for i, (char, kind, value) in enumerate(zip(state.text, state.kind, state.value)):
        r, c = divmod(i, width)
        if kind == "committed":
            grid_value[r][c] = value
        elif kind == "given":
            grid_given[r][c] = 1.0
        xs.append(c)
        ys.append(r)
        options = upcoming[i] if upcoming is not None and kind == "masked" else []
        # A masked cell shows, faintly, the model's top candidate for it at the next step (hover: the top 3).
        labels.append(options[0][0] if options else char)
        hovers.append("next step's top candidates: " + ", ".join(f"{t} {p:.2f}" for t, p in options)
                      if options else kind)
        if kind == "masked":
            colours.append("#b0b0b0" if options else "#9a9a9a")
        elif kind == "committed" and value / top < 0.55:  # dark end of the colour scale: white text
            colours.append("#ffffff")
        else:
            colours.append("#111111")
    fig = make_subplots(rows=2, cols=1, row_heights=[0.68, 0.32], vertical_spacing=0.14,
                        subplot_titles=("the canvas", "mean confidence of the tokens committed at each step"))
    fig.add_trace(go.Heatmap(z=grid_given, colorscale=[[0, "#e4e4e4"], [1, "#e4e4e4"]], showscale=False,
                             hoverinfo="skip", xgap=1, ygap=1), row=1, col=1)
    if colour_by == "confidence":
        scale = dict(colorscale="Viridis", zmin=0.0, zmax=1.0, colorbar=dict(title="confidence", len=0.6, y=0.72))
    else:
        scale = dict(colorscale="Plasma", zmin=0, zmax=max(1, trace.steps - 1),
                     colorbar=dict(title="step", len=0.6, y=0.72))
    fig.add_trace(go.Heatmap(z=grid_value, xgap=1, ygap=1, hovertemplate=f"{colour_by} %{{z:.2f}}<extra></extra>",
                             **scale), row=1, col=1)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="text", text=labels, textfont=dict(color=colours, size=13),
                             hovertext=hovers, hoverinfo="text", showlegend=False), row=1, col=1)
    fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    per_step = [None if math.isnan(v) else v for v in _mean_confidence_per_step(trace, row)]
    fig.add_trace(go.Bar(x=list(range(trace.steps)), y=per_step, marker_color=[
        "#d62728" if s == state.step - 1 else "#1f77b4" for s in range(trace.steps)], showlegend=False,
        hovertemplate="step %{x}: %{y:.2f}<extra></extra>"), row=2, col=1)
    fig.update_yaxes(range=[0, 1], title_text="confidence", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    heading = title or "Denoising step by step"
    faint = "; faint grey: each mask's top candidate for the next step" if upcoming is not None else ""
    fig.update_layout(
        title=dict(text=f"{heading}<br><sup>after {state.step} of {state.total_steps} steps, "
                        f"{state.masked_left} masks left; grey cells were given{faint}</sup>"),
        height=520, margin=dict(t=90, b=40, l=30, r=30))
    return fig


def candidate_lists(trace: SampleTrace, chars: Sequence[str], *, row: int = 0, step: int = 0
                    ) -> list[list[tuple[str, float]]] | None:
    """Per position of sequence ``row``: the model's top candidates ``(character, probability)`` as predicted at
    step ``step`` (before its commit); ``None`` when the trace recorded none or the run has ended."""
    if not trace.candidates or step >= len(trace.candidates):
        return None
    ids, probs = trace.candidates[step]
    out = []
    for position in range(ids.shape[1]):
        out.append([(visible_char(chars[int(t)]), float(p)) for t, p in zip(ids[row, position], probs[row, position])
                    if int(t) >= 0])
    return out


def trace_summary(trace: SampleTrace) -> dict[str, float]:
    """Mean confidence of the committed tokens and the number of steps, for captions."""
    generated = trace.commit_step >= 0
    mean = float(trace.confidence[generated].mean()) if bool(generated.any()) else float("nan")
    return {"steps": float(trace.steps), "mean_confidence": mean,
            "generated": float(generated.sum()) / max(1, trace.tokens.shape[0]),
            "forward_tokens": float(trace.forward_tokens)}

