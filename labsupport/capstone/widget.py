"""The capstone's explorer: a workload's sliders → its bottleneck → the designs ranked on it, with their evidence.

* :func:`recommendation_figure` — two panels: each cost term against its limit (the bottleneck in red), and the
  best-ranked designs' number on that bottleneck relative to full attention, coloured by quality risk, with the
  evidence of the top pick (numbers and the chapters they come from) written under the figure.
* :func:`recommendation_text` — the same recommendation as plain lines, for the notebook's print-out.
* :func:`explorer_controls` — the sliders and dropdowns, set to a profile's values.
"""

from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labsupport.capstone.ranking import Candidate, FrontierEvidence, design_terms, rank_designs
from labsupport.capstone.workloads import HARDWARE, PROFILES, Workload, pressures, workload_terms
from labsupport.harness.costs import format_bytes

__all__ = ["PROMPTS", "explorer_controls", "profile_values", "recommendation_figure", "recommendation_text",
           "workload_from"]

PROMPTS = [2**k for k in range(8, 19)]
OUTPUTS = [2**k for k in range(4, 13)]
BATCHES = [2**k for k in range(0, 9)]
_RISK_COLOURS = {"low": "#2ca02c", "untested": "#ff7f0e", "high": "#d62728"}
_UNITS = {"prefill compute": "prefill time", "decode bandwidth": "decode time", "sequential decoding": "decode time",
          "cache memory": "memory", "recall": "total time"}


def _nearest(options: list[int], value: int) -> int:
    return min(options, key=lambda o: abs(o - value))


def profile_values(profile: str) -> dict[str, object]:
    """The explorer's control values for a profile (lengths and batch rounded to the sliders' powers of two)."""
    w = PROFILES[profile]
    return {"hardware": w.hardware, "prompt": _nearest(PROMPTS, w.prompt), "output": _nearest(OUTPUTS, w.output),
            "batch": _nearest(BATCHES, w.batch), "recall_need": w.recall_need}


def workload_from(profile: str, hardware: str, prompt: int, output: int, batch: int, recall_need: float) -> Workload:
    """The profile with the sliders' values in place of its own."""
    return PROFILES[profile].with_(hardware=hardware, prompt=int(prompt), output=int(output), batch=int(batch),
                                   recall_need=float(recall_need))


def explorer_controls(profile: str = "RAG over long documents") -> dict[str, widgets.ValueWidget]:
    """Dropdowns for the profile and the hardware, sliders for the prompt, output, batch and recall need."""
    v = profile_values(profile)
    return {
        "profile": widgets.Dropdown(options=list(PROFILES), value=profile, description="workload"),
        "hardware": widgets.Dropdown(options=list(HARDWARE), value=v["hardware"], description="hardware"),
        "prompt": widgets.SelectionSlider(options=PROMPTS, value=v["prompt"], description="prompt"),
        "output": widgets.SelectionSlider(options=OUTPUTS, value=v["output"], description="output"),
        "batch": widgets.SelectionSlider(options=BATCHES, value=v["batch"], description="batch"),
        "recall_need": widgets.FloatSlider(value=v["recall_need"], min=0.0, max=1.0, step=0.05,
                                           description="recall need"),
    }


def _metric_label(bottleneck: str, value: float) -> str:
    return format_bytes(value * 2**30) if bottleneck == "cache memory" else f"{value:.3g} s"


def recommendation_text(workload: Workload, frontier: FrontierEvidence, *, top: int = 5) -> list[str]:
    """The bottleneck, the pick and the next designs, each line with its numbers and their sources."""
    bottleneck, ranked = rank_designs(workload, frontier)
    base = design_terms(("attention",), workload)
    p = pressures(workload_terms(workload), workload)
    lines = [f"{workload.name} on {workload.machine.describe()}",
             f"  bottleneck: {bottleneck}  (" + ", ".join(f"{k} {v:.2f}" for k, v in p.items()) +
             "; each time as a share of the deadline, the memory of the budget)"]
    baseline = {"prefill compute": base[0], "decode bandwidth": base[1] + base[2],
                "sequential decoding": base[1] + base[2], "cache memory": base[3],
                "recall": base[0] + base[1] + base[2]}[bottleneck]
    for i, c in enumerate(ranked[:top]):
        saving = c.metric / float(baseline)
        lines.append(f"  {i + 1}. {c.design:28s} {_metric_label(bottleneck, c.metric):>10s} "
                     f"({saving:.2f}× attention's), risk {c.risk}, fits {'yes' if c.fits else 'NO'}")
        lines.append(f"       {c.evidence(bottleneck)}")
    if bottleneck == "sequential decoding":
        lines.append("  no sequence mixer moves this bottleneck: every step re-reads the weights. More tokens per "
                     "read do: a larger batch, speculative decoding, several tokens per step (ch 08), fewer active "
                     "weights per token (ch 06).")
    lines.append(f"  recall evidence: {frontier.source}")
    return lines


def recommendation_figure(profile: str, hardware: str, prompt: int, output: int, batch: int, recall_need: float,
                          *, frontier: FrontierEvidence, top: int = 8) -> go.Figure:
    """The explorer's figure for a profile with the sliders' values (see the module's docstring)."""
    workload = workload_from(profile, hardware, prompt, output, batch, recall_need)
    bottleneck, ranked = rank_designs(workload, frontier)
    p = pressures(workload_terms(workload), workload)
    base = design_terms(("attention",), workload)
    baseline = {"prefill compute": base[0], "decode bandwidth": base[1] + base[2],
                "sequential decoding": base[1] + base[2], "cache memory": base[3],
                "recall": base[0] + base[1] + base[2]}[bottleneck]
    shown: list[Candidate] = ranked[:top][::-1]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.38, 0.62], horizontal_spacing=0.2,
                        subplot_titles=("cost over its limit (Transformer)",
                                        f"{_UNITS[bottleneck]}, × full attention's"))
    names = list(p)
    fig.add_trace(go.Bar(x=[p[n] for n in names], y=names, orientation="h", showlegend=False,
                         marker_color=["#d62728" if n == bottleneck else "#9e9e9e" for n in names],
                         text=[f"{p[n]:.2f}" for n in names], textposition="auto"), row=1, col=1)
    fig.add_vline(x=1.0, line_dash="dash", line_color="black", row=1, col=1)
    for risk, colour in _RISK_COLOURS.items():
        group = [c for c in shown if c.risk == risk]
        fig.add_trace(go.Bar(
            x=[c.metric / float(baseline) for c in group], y=[c.design for c in group], orientation="h",
            name=f"risk {risk}", marker_color=colour, marker_line_width=[0 if c.fits else 3 for c in group],
            text=[f"recall {c.recall:.0%}" + ("" if c.fits else ", does not fit") for c in group],
            textposition="auto", hovertext=[c.evidence(bottleneck) for c in group], hoverinfo="text"),
            row=1, col=2)
    fig.update_yaxes(categoryorder="array", categoryarray=[c.design for c in shown], row=1, col=2)
    fig.update_xaxes(type="log", row=1, col=2)
    pick = next((c for c in ranked if c.fits), None)
    evidence = "no design fits the memory budget" if pick is None else (
        f"pick: <b>{pick.design}</b> — {_metric_label(bottleneck, pick.metric)}, risk {pick.risk}, "
        f"recall {pick.recall:.0%} ({pick.recall_source})")
    fig.update_layout(
        title={"text": f"{profile} · {hardware}: bottleneck <b>{bottleneck}</b>", "font": {"size": 15}},
        template="plotly_white", height=560, autosize=True, barmode="overlay",
        margin={"l": 10, "r": 10, "t": 70, "b": 90},
        legend={"orientation": "h", "y": -0.12, "x": 0.45},
        annotations=list(fig.layout.annotations) + [go.layout.Annotation(
            text=evidence + "<br>state per layer: ch 07's registry at the model's width; times: the roofline "
                            "(ch 00) on " + workload.machine.source,
            xref="paper", yref="paper", x=0, y=-0.24, showarrow=False, align="left", font={"size": 11})])
    return fig
