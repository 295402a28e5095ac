"""Chapter 06, the expert-load explorer: how busy each expert was during training, what a capacity
limit would drop, and which characters each expert serves.

The data come from a :class:`~labsupport.lm.training.TrainingHistory` (the
``tokens_per_expert`` metric that :class:`~labsupport.moe.layer.MoELayer`
reports at every step) and from routing a text through a trained model.

A capacity limit keeps ``min(n_i, C)`` of the ``n_i`` assignments sent to
expert ``i``, whatever the priority order, so the number a capacity factor
would drop is exact from the recorded loads: ``Σ_i max(0, n_i − C)`` with
``C = ceil(cf · T · k / E)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import nn

from labsupport.harness.validation import require_float, require_int
from labsupport.lm.training import TrainingHistory

__all__ = ["character_expert_counts", "dropped_at_capacity", "expert_load", "expert_load_figure",
           "load_imbalance"]


def expert_load(history: TrainingHistory, layer: int = 0) -> torch.Tensor:
    """``(steps, E)``: the fraction of layer ``layer``'s assignments each expert received at each step."""
    if not isinstance(history, TrainingHistory):
        raise TypeError(f"history must be a TrainingHistory, got {type(history).__name__}")
    layer = require_int("layer", layer, minimum=0)
    key = f"blocks.{layer}.channel_mixer.tokens_per_expert"
    if key not in history.metrics:
        found = sorted(k for k in history.metrics if k.endswith("tokens_per_expert"))
        raise KeyError(f"no metric {key!r} in this history (it has {found}); was layer {layer} a MoELayer?")
    counts = torch.tensor(history.metrics[key], dtype=torch.float64)
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)


def load_imbalance(load: torch.Tensor) -> torch.Tensor:
    """Per step, the busiest expert's share over the fair share ``1/E`` (1 = perfect balance, E = collapse)."""
    return load.max(dim=1).values * load.shape[1]


def dropped_at_capacity(load: torch.Tensor, capacity_factor: float) -> torch.Tensor:
    """Per step, the fraction of assignments a capacity of ``cf × fair share`` per expert would drop."""
    capacity_factor = require_float("capacity_factor", capacity_factor, positive=True)
    capacity = capacity_factor / load.shape[1]
    return (load - capacity).clamp_min(0).sum(dim=1)


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


def expert_load_figure(runs: Mapping[str, TrainingHistory], run: str, capacity_factor: float, layer: int = 0,
                       *, char_counts: torch.Tensor | None = None, characters: Sequence[str] | None = None
                       ) -> go.Figure:
    """Expert load of one run over training, the imbalance and drops of every run, and characters per expert.

    Args:
        runs: label -> history of a model whose channel mixers are MoE layers.
        run: the label shown in the load panel.
        capacity_factor: the capacity whose drops are shown (replayed from recorded loads).
        layer: which block's experts.
        char_counts: optional ``(vocab, E)`` counts for a third panel (see :func:`character_expert_counts`).
        characters: the character of each vocabulary id, for that panel's axis.
    """
    if run not in runs:
        raise KeyError(f"unknown run {run!r}; choose one of {list(runs)}")
    load = expert_load(runs[run], layer)
    steps = runs[run].steps or list(range(1, load.shape[0] + 1))
    columns = 3 if char_counts is not None else 2
    titles = ["share per expert", f"dropped at capacity {capacity_factor:g}",
              "first choice per character"][:columns]
    fig = make_subplots(rows=1, cols=columns, subplot_titles=titles, horizontal_spacing=0.1)
    for e in range(load.shape[1]):
        fig.add_trace(go.Scatter(x=steps, y=load[:, e].tolist(), mode="lines", stackgroup="load",
                                 name=f"expert {e}", legendgroup="experts"), row=1, col=1)
    for label, history in runs.items():
        dropped = dropped_at_capacity(expert_load(history, layer), capacity_factor)
        fig.add_trace(go.Scatter(x=history.steps, y=(100 * dropped).tolist(), mode="lines", name=label,
                                 line={"width": 3 if label == run else 1.5}), row=1, col=2)
    if char_counts is not None:
        shown = char_counts.sum(dim=1) > 0
        share = char_counts[shown].double()
        share = share / share.sum(dim=1, keepdim=True)
        labels = ([repr(characters[i])[1:-1] for i in torch.nonzero(shown).flatten().tolist()]
                  if characters is not None else [str(i) for i in torch.nonzero(shown).flatten().tolist()])
        fig.add_trace(go.Heatmap(z=share.tolist(), x=[f"e{e}" for e in range(share.shape[1])], y=labels,
                                 colorscale="Blues", showscale=False), row=1, col=3)
        fig.update_yaxes(autorange="reversed", tickfont={"size": 8}, row=1, col=3)
    fig.update_xaxes(title_text="training step", row=1, col=1)
    fig.update_xaxes(title_text="training step", row=1, col=2)
    fig.update_yaxes(title_text="share", range=[0, 1], row=1, col=1)
    fig.update_yaxes(title_text="% of assignments dropped", row=1, col=2)
    imbalance = float(load_imbalance(load)[-10:].mean())
    fig.update_layout(height=520, title=f"Expert load, layer {layer} — {run}<br><sup>busiest expert at "
                      f"{imbalance:.2f}× its fair share over the last 10 steps (1 = balanced, "
                      f"{load.shape[1]} = collapsed)</sup>",
                      legend={"orientation": "h", "y": -0.25}, margin={"t": 90})
    return fig
