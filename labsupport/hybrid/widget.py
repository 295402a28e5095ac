"""The frontier explorer: recall against bytes per token (or decode time), by family, with the Pareto set marked.

* :func:`frontier_points` — the benchmark's JSONL rows → one point per design: mean recall over seeds at the best
  learning rate (for a chosen task and length), the decode state per token at a chosen context (the sum over the
  design's layers of each registry row's formula, bf16), the decode time per token summed over its layers (from
  the ``cost`` rows, where present), its family and layers.
* :func:`pareto_mask` — which points no other point beats on both axes.
* :func:`frontier_figure` — the plotly figure: one colour per family, hover text with the configuration, the
  Pareto set joined by a line, live points (the notebook's own runs) drawn hollow on top.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from labsupport.harness.validation import require_choice, require_positive_int
from labsupport.hybrid import registry

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["FrontierPoint", "frontier_figure", "frontier_points", "pareto_mask"]


@dataclass(frozen=True)
class FrontierPoint:
    """One design on the frontier."""

    design: str
    family: str
    layers: tuple[str, ...]
    recall: float
    seed_scores: tuple[float, ...]
    lr: float
    bytes_per_token: float
    decode_ms: float | None
    live: bool = False

    def hover(self) -> str:
        scores = ", ".join(f"{s:.0%}" for s in self.seed_scores)
        decode = "—" if self.decode_ms is None else f"{self.decode_ms:.3f} ms"
        return (f"<b>{self.design}</b> ({self.family})<br>layers: {' '.join(self.layers)}<br>"
                f"recall {self.recall:.1%} (seeds: {scores}; lr {self.lr:g})<br>"
                f"state {self.bytes_per_token:,.1f} B/token; decode {decode}")


def _family(layers: Sequence[str]) -> str:
    families = {registry.get(n).family for n in layers}
    return families.pop() if len(families) == 1 else "hybrid"


def frontier_points(rows: Iterable[dict], *, task: str = "mqar", seq_len: int = 64, context: int = 16384,
                    width: int | None = None, live: bool = False) -> list[FrontierPoint]:
    """One :class:`FrontierPoint` per design that has ``quality`` rows for ``task`` at ``seq_len``.

    The recall is the mean over seeds at the learning rate whose mean is best (Zoology's and MAD's practice) among
    the rates run on the most seeds (the grid searches rates on seed 0, then runs the winner on every seed);
    the state is counted at ``context`` tokens for the width the runs used (``d_model`` of the rows).
    """
    rows = list(rows)
    require_positive_int("context", context)
    costs = {r["design"]: r for r in rows if r.get("kind") == "cost" and not r.get("failed")}
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("kind") == "quality" and r["task"] == task and r["seq_len"] == seq_len and \
                (width is None or r["width"] == width) and r["metric"] == "recall" and r.get("score") is not None:
            groups[(r["design"], r["lr"])].append(r)
    best: dict[str, tuple[float, float, list[dict]]] = {}
    most = defaultdict(int)  # a rate searched on seed 0, then run on every seed: the rate with the most seeds won
    for (design, _), runs in groups.items():
        most[design] = max(most[design], len(runs))
    for (design, lr), runs in groups.items():
        if len(runs) < most[design]:
            continue
        mean = statistics.fmean(r["score"] for r in runs)
        if design not in best or mean > best[design][0]:
            best[design] = (mean, lr, runs)
    points = []
    for design, (mean, lr, runs) in best.items():
        layers = tuple(runs[0]["layer_names"])
        if not all(name in registry.names() for name in layers):
            continue  # a row of a mixer this session has not registered
        if design.startswith("stack:"):
            continue  # its linear layers have H heads, which the registry's one-head "linear" row does not count
        d_model = runs[0]["width"]
        state = sum(registry.get(n).state_bytes(context, d_model) for n in layers) / context
        decode = None
        if all(n in costs and f"decode_ms_{context}" in costs[n] for n in layers):
            decode = sum(costs[n][f"decode_ms_{context}"] for n in layers)
        points.append(FrontierPoint(design, _family(layers), layers, mean, tuple(r["score"] for r in runs), lr,
                                    state, decode, live))
    return sorted(points, key=lambda p: p.bytes_per_token)


def pareto_mask(costs: Sequence[float], scores: Sequence[float]) -> list[bool]:
    """True for the points that no other point matches or beats on both axes (lower cost, higher score), with
    one strictly better; exact duplicates are both kept."""
    c, s = torch.tensor(list(costs), dtype=torch.float64), torch.tensor(list(scores), dtype=torch.float64)
    if c.shape != s.shape:
        raise ValueError(f"costs and scores must have the same length, got {len(c)} and {len(s)}")
    at_least = (c[None, :] <= c[:, None]) & (s[None, :] >= s[:, None])
    strictly = (c[None, :] < c[:, None]) | (s[None, :] > s[:, None])
    return (~(at_least & strictly).any(dim=1)).tolist()


_COLOURS = {"softmax": "#1f77b4", "grouped": "#17becf", "sparse": "#2ca02c", "linear": "#ff7f0e", "ssm": "#d62728",
            "hybrid": "#9467bd"}


def frontier_figure(points: Sequence[FrontierPoint], *, x_axis: str = "bytes", family: str = "all",
                    title: str = "") -> go.Figure:
    """Recall against bytes per token (``x_axis="bytes"``) or decode ms per token (``"decode"``), log x.

    ``family`` keeps one family (``"all"`` for every point); the Pareto set of the points shown is joined by a
    dashed line and ringed. Live points are drawn hollow.
    """
    require_choice("x_axis", x_axis, ("bytes", "decode"))
    shown = [p for p in points if family == "all" or p.family == family]
    if x_axis == "decode":
        shown = [p for p in shown if p.decode_ms is not None]
    x_of = (lambda p: p.bytes_per_token) if x_axis == "bytes" else (lambda p: p.decode_ms)
    import plotly.graph_objects as go   # here, so the points and the Pareto set need no plotly

    fig = go.Figure()
    for fam in dict.fromkeys(p.family for p in shown):
        for live in (False, True):
            group = [p for p in shown if p.family == fam and p.live == live]
            if not group:
                continue
            fig.add_trace(go.Scatter(
                x=[x_of(p) for p in group], y=[p.recall for p in group], mode="markers+text",
                text=[p.design for p in group], textposition="top center", textfont={"size": 9},
                hovertext=[p.hover() for p in group], hoverinfo="text",
                name=f"{fam} (live)" if live else fam,
                marker={"size": 11, "color": "white" if live else _COLOURS.get(fam, "#7f7f7f"),
                        "line": {"width": 2, "color": _COLOURS.get(fam, "#7f7f7f")},
                        "symbol": "diamond" if live else "circle"}))
    if shown:
        on = [p for p, keep in zip(shown, pareto_mask([x_of(p) for p in shown], [p.recall for p in shown])) if keep]
        on.sort(key=x_of)
        fig.add_trace(go.Scatter(x=[x_of(p) for p in on], y=[p.recall for p in on], mode="lines+markers",
                                 name="Pareto set", line={"dash": "dash", "color": "black"},
                                 marker={"size": 18, "symbol": "circle-open", "color": "black"},
                                 hoverinfo="skip"))
    fig.update_layout(
        title=title or "recall against decode cost", height=520, template="plotly_white",
        xaxis={"type": "log", "title": "decode state, bytes per token of context (bf16)" if x_axis == "bytes"
               else "decode time per token, ms (sum over layers, one CPU thread)"},
        yaxis={"title": "recall", "tickformat": ".0%", "range": [-0.05, 1.08]})
    return fig
