"""Chapter 06, the expert-load explorer: how busy each expert was during training, what a capacity
limit drops, and which characters each expert serves.

The data come from a :class:`~labsupport.lm.training.TrainingHistory` (the
``tokens_per_expert`` and ``assignment_budget`` metrics that
:class:`~labsupport.moe.layer.MoELayer` reports at every step: the assignments
each expert was *sent*, before any capacity limit, and ``T·k``) and from routing
a text through a trained model.

A capacity limit keeps ``min(n_i, C)`` of the ``n_i`` assignments sent to
expert ``i``, whatever the priority order, so the fraction a capacity factor
drops is exact from the recorded loads: ``Σ_i max(0, n_i − C) / (T·k)`` with the
layer's own ``C = ceil(cf · T · k / E)`` — also for top-p routing and null
experts, where fewer than ``T·k`` assignments reach the real experts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import nn

from labsupport.harness.validation import require_float, require_int
from labsupport.lm.training import TrainingHistory
from labsupport.moe.routing import expert_capacity

__all__ = ["character_expert_counts", "dropped_at_capacity", "expert_load", "expert_load_figure",
           "load_imbalance", "most_imbalanced_layer"]


def _metric(history: TrainingHistory, layer: int, name: str) -> list:
    if not isinstance(history, TrainingHistory):
        raise TypeError(f"history must be a TrainingHistory, got {type(history).__name__}")
    layer = require_int("layer", layer, minimum=0)
    key = f"blocks.{layer}.channel_mixer.{name}"
    if key not in history.metrics:
        found = sorted(k for k in history.metrics if k.endswith(name))
        raise KeyError(f"no metric {key!r} in this history (it has {found}); was layer {layer} a MoELayer?")
    return history.metrics[key]


def expert_load(history: TrainingHistory, layer: int = 0) -> torch.Tensor:
    """``(steps, E)``: the fraction of layer ``layer``'s routed assignments each expert was sent at each step."""
    counts = torch.tensor(_metric(history, layer, "tokens_per_expert"), dtype=torch.float64)
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)


def load_imbalance(load: torch.Tensor) -> torch.Tensor:
    """Per step, the busiest expert's share over the fair share ``1/E`` (1 = perfect balance, E = collapse)."""
    return load.max(dim=1).values * load.shape[1]


def most_imbalanced_layer(history: TrainingHistory, last: int = 10) -> int:
    """The MoE layer whose busiest expert sat furthest above its fair share over the last ``last`` steps."""
    last = require_int("last", last, minimum=1)
    layers = sorted(int(k.split(".")[1]) for k in history.metrics
                    if k.startswith("blocks.") and k.endswith(".channel_mixer.tokens_per_expert"))
    if not layers:
        raise KeyError("this history has no tokens_per_expert metric: were its channel mixers MoE layers?")
    return max(layers, key=lambda i: (float(load_imbalance(expert_load(history, i))[-last:].mean()), -i))


def dropped_at_capacity(history: TrainingHistory, capacity_factor: float, layer: int = 0) -> torch.Tensor:
    """Per step, the fraction of the ``T·k`` assignments a capacity factor ``cf`` drops in layer ``layer``.

    Replayed from the loads sent before dropping, with the layer's own capacity
    ``C = ceil(cf · T·k / E)``; equal to the run's ``dropped_fraction`` when the run used ``cf``.
    """
    capacity_factor = require_float("capacity_factor", capacity_factor, positive=True)
    counts = torch.tensor(_metric(history, layer, "tokens_per_expert"), dtype=torch.float64)
    budget = torch.tensor(_metric(history, layer, "assignment_budget"), dtype=torch.float64)
    n_experts = counts.shape[1]
    capacity = torch.tensor([expert_capacity(int(b), n_experts, 1, capacity_factor) for b in budget.tolist()],
                            dtype=torch.float64)
    return (counts - capacity[:, None]).clamp_min(0).sum(dim=1) / budget.clamp_min(1)


@torch.no_grad()
def character_expert_counts(model: nn.Module, tokens: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """``(vocab, E + n_null)``: how often each input token id had each expert as its first choice in layer ``layer``.

    Columns past ``E`` are the layer's null experts (if any).
    """
    mixer = model.blocks[layer].channel_mixer  # type: ignore[index,union-attr]
    if not hasattr(mixer, "last_top_expert"):
        raise TypeError(f"layer {layer}'s channel mixer is {type(mixer).__name__}, not a MoELayer")
    was_training = model.training
    model.eval()
    model(tokens)
    model.train(was_training)
    chosen = mixer.last_top_expert.reshape(-1)
    width = mixer.n_experts + mixer.n_null  # type: ignore[union-attr]
    counts = torch.zeros(model.vocab_size, width, dtype=torch.long)
    counts.index_put_((tokens.reshape(-1), chosen), torch.ones_like(chosen), accumulate=True)
    return counts


def expert_load_figure(runs: Mapping[str, TrainingHistory], run: str, capacity_factor: float,
                       layer: int | None = None, *, char_counts: torch.Tensor | None = None,
                       characters: Sequence[str] | None = None) -> go.Figure:
    """Expert load of one run over training; busiest/fair share and drops of every run; characters per expert.

    Four panels on a 2 × 2 grid that takes the notebook's width: the chosen run's
    share per expert (stacked), busiest/fair share per run (a line each), the
    fraction a capacity factor drops per run (replayed with each layer's own
    capacity), and, when ``char_counts`` is given, each character's first choice.

    Args:
        runs: label -> history of a model whose channel mixers are MoE layers.
        run: the label shown in the load panel.
        capacity_factor: the capacity whose drops are shown.
        layer: which block's experts; ``None`` picks the chosen run's most imbalanced layer.
        char_counts: optional ``(vocab, E)`` counts (see :func:`character_expert_counts`).
        characters: the character of each vocabulary id, for that panel's axis.
    """
    if run not in runs:
        raise KeyError(f"unknown run {run!r}; choose one of {list(runs)}")
    if layer is None:
        layer = most_imbalanced_layer(runs[run])
    load = expert_load(runs[run], layer)
    steps = runs[run].steps or list(range(1, load.shape[0] + 1))
    titles = ["share of assignments per expert", "busiest expert / fair share, every run",
              f"dropped at capacity factor {capacity_factor:g}, every run",
              "first choice per character" if char_counts is not None else ""]
    fig = make_subplots(rows=2, cols=2, subplot_titles=titles, horizontal_spacing=0.12, vertical_spacing=0.2)
    for e in range(load.shape[1]):
        fig.add_trace(go.Scatter(x=steps, y=load[:, e].tolist(), mode="lines", stackgroup="load",
                                 name=f"expert {e}", legendgroup="experts", showlegend=False,
                                 hovertemplate=f"expert {e}: %{{y:.3f}}<extra></extra>"), row=1, col=1)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, (label, history) in enumerate(runs.items()):
        width = 3 if label == run else 1.5
        colour = palette[i % len(palette)]
        imbalance = load_imbalance(expert_load(history, layer))
        fig.add_trace(go.Scatter(x=history.steps, y=imbalance.tolist(), mode="lines", name=label,
                                 legendgroup=label, line={"width": width, "color": colour}), row=1, col=2)
        dropped = dropped_at_capacity(history, capacity_factor, layer)
        fig.add_trace(go.Scatter(x=history.steps, y=(100 * dropped).tolist(), mode="lines", name=label,
                                 legendgroup=label, showlegend=False, line={"width": width, "color": colour}),
                      row=2, col=1)
    if char_counts is not None:
        shown = char_counts.sum(dim=1) > 0
        share = char_counts[shown].double()
        share = share / share.sum(dim=1, keepdim=True)
        labels = ([repr(characters[i])[1:-1] for i in torch.nonzero(shown).flatten().tolist()]
                  if characters is not None else [str(i) for i in torch.nonzero(shown).flatten().tolist()])
        fig.add_trace(go.Heatmap(z=share.tolist(), x=[f"e{e}" for e in range(share.shape[1])], y=labels,
                                 colorscale="Blues", showscale=False), row=2, col=2)
        fig.update_yaxes(autorange="reversed", tickfont={"size": 8}, row=2, col=2)
    else:
        fig.update_xaxes(visible=False, row=2, col=2)
        fig.update_yaxes(visible=False, row=2, col=2)
    fig.update_xaxes(title_text="training step", row=1, col=1)
    fig.update_xaxes(title_text="training step", row=1, col=2)
    fig.update_xaxes(title_text="training step", row=2, col=1)
    fig.update_yaxes(title_text="share", range=[0, 1], row=1, col=1)
    fig.update_yaxes(title_text="× fair share", rangemode="tozero", row=1, col=2)
    fig.update_yaxes(title_text="% dropped", rangemode="tozero", row=2, col=1)
    imbalance = float(load_imbalance(load)[-10:].mean())
    fig.update_layout(height=800, autosize=True, margin={"t": 110, "l": 60, "r": 20, "b": 130},
                      title={"text": f"Expert load, layer {layer} — {run}<br><sup>busiest expert at "
                                     f"{imbalance:.2f}× its fair share over the last 10 steps (1 = balanced, "
                                     f"{load.shape[1]} = collapsed)</sup>", "y": 0.97},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.1, "x": 0, "font": {"size": 10}})
    return fig
