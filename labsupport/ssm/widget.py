"""The chapter's explorer: how long an SSM remembers, time-invariant against selective.

:func:`impulse_response_data` computes, for a diagonal SSM with S4D-Real decays
``A_n = −n`` (Mamba's start) and a step ``Δ``:

* the LTI layer's memory of a token ``l`` steps back, per state ``n``: ``exp(Δ A_n)ˡ`` — the
  same curve for every input, whatever the token says;
* a selective layer's memory of the first token, seen at every later position, when one
  token at position ``event_at`` sets its own ``Δ``: ``"hold"`` (``Δ → 0``: the state passes
  through unchanged, the token is skipped) or ``"drop"`` (``Δ`` large: the state is reset,
  the past forgotten), or ``"none"``.

:func:`impulse_response_figure` draws both side by side.

:func:`learned_step_sizes` reads the same quantity out of a *trained* model: the ``Δ_t`` each selective
layer chose on every token of a batch (mean over its channels), and :func:`learned_steps_figure` plots
them for one example with the data tokens marked — selection as the trained model does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from labsupport.harness.validation import require_choice, require_float, require_int

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["ImpulseResponseData", "LearnedSteps", "impulse_response_data", "impulse_response_figure",
           "learned_step_sizes", "learned_steps_figure"]

EVENTS = ("none", "hold", "drop")
HOLD_DELTA = 1e-4
DROP_DELTA = 10.0


@dataclass(frozen=True)
class ImpulseResponseData:
    """The curves of the explorer.

    Attributes:
        lags: ``(L,)`` positions ``0 … L−1`` after the remembered token.
        lti_memory: ``(N, L)`` the LTI layer's ``exp(Δ A_n)ˡ`` per state ``n``.
        selective_memory: ``(N, L)`` the selective layer's memory of token 0 with the event applied.
        deltas: ``(L,)`` the selective layer's ``Δ_t`` (the event's token differs).
        delta, event, event_at: the settings.
    """

    lags: torch.Tensor
    lti_memory: torch.Tensor
    selective_memory: torch.Tensor
    deltas: torch.Tensor
    delta: float
    event: str
    event_at: int

    def half_life(self, state: int = 0) -> float:
        """Tokens until the LTI memory of state ``state`` falls to one half: ``ln 2 / (Δ |A_n|)``."""
        rate = self.delta * (state + 1)
        return float(torch.log(torch.tensor(2.0)) / rate)


def impulse_response_data(delta: float = 0.05, event: str = "hold", *, event_at: int = 20, length: int = 64,
                          d_state: int = 4) -> ImpulseResponseData:
    """Memory curves of an LTI and a selective diagonal SSM (see the module docstring)."""
    delta = require_float("delta", delta, positive=True)
    require_choice("event", event, EVENTS)
    length = require_int("length", length, minimum=2)
    event_at = require_int("event_at", event_at, minimum=1, maximum=length - 1)
    d_state = require_int("d_state", d_state, minimum=1)
    A = -torch.arange(1, d_state + 1, dtype=torch.float64)
    lags = torch.arange(length, dtype=torch.float64)
    lti = torch.exp(delta * A[:, None] * lags)
    deltas = torch.full((length,), delta, dtype=torch.float64)
    deltas[0] = 0.0  # the remembered token itself: memory starts at 1
    if event == "hold":
        deltas[event_at:] = HOLD_DELTA
    elif event == "drop":
        deltas[event_at] = DROP_DELTA
    selective = torch.exp(A[:, None] * deltas.cumsum(0))
    return ImpulseResponseData(lags, lti, selective, deltas, delta, event, event_at)


def impulse_response_figure(data: ImpulseResponseData) -> go.Figure:
    """Two panels: the LTI kernel's decay per state, the selective memory of token 0 with its event."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not isinstance(data, ImpulseResponseData):
        raise TypeError(f"expected ImpulseResponseData, got {type(data).__name__}")
    words = {"none": "no special token", "hold": f"tokens from {data.event_at} on hold (Δ→0)",
             "drop": f"token {data.event_at} drops (Δ large)"}
    figure = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.08, subplot_titles=[
        "LTI: the same kernel for every input", "selective: the input sets Δ"])
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    lags = data.lags.tolist()
    for n in range(data.lti_memory.shape[0]):
        color = colors[n % len(colors)]
        figure.add_trace(go.Scatter(x=lags, y=data.lti_memory[n].tolist(), name=f"state n={n + 1} (A = −{n + 1})",
                                    legendgroup=str(n), line={"color": color}), row=1, col=1)
        figure.add_trace(go.Scatter(x=lags, y=data.selective_memory[n].tolist(), showlegend=False,
                                    legendgroup=str(n), line={"color": color}), row=1, col=2)
    if data.event != "none":
        figure.add_vline(x=data.event_at, line_dash="dot", line_color="gray", row=1, col=2)
    figure.update_xaxes(title_text="tokens since the remembered one")
    figure.update_yaxes(title_text="fraction of the token still in the state", range=[0, 1.05], row=1, col=1)
    figure.update_layout(template="plotly_white", height=440, legend={"orientation": "h", "y": -0.25},
                         margin={"t": 90},
                         title=f"Memory of token 0 — LTI: exp(Δ A_n)^l with Δ = {data.delta:.3g}<br>"
                               f"<sup>selective: {words[data.event]}</sup>")
    return figure


@dataclass(frozen=True)
class LearnedSteps:
    """The step sizes a trained model chose.

    Attributes:
        tokens: ``(batch, L)`` the input tokens.
        data: ``(batch, L)`` bool, True where the token carries data (to be remembered).
        deltas: ``(layers, batch, L)`` each selective layer's ``Δ_t``, averaged over its channels.
        per_channel: ``(layers, batch, L, channels)`` every channel's ``Δ_t``.
    """

    tokens: torch.Tensor
    data: torch.Tensor
    deltas: torch.Tensor
    per_channel: torch.Tensor

    def channel_ratios(self, layer: int) -> torch.Tensor:
        """``(channels,)`` each channel's mean ``Δ`` on data tokens over its mean ``Δ`` on the rest."""
        deltas = self.per_channel[layer]
        return deltas[self.data].mean(0) / deltas[~self.data].mean(0)

    def most_selective(self, layer: int, k: int = 8) -> torch.Tensor:
        """The ``k`` channels of ``layer`` whose data/rest ratio of mean ``Δ`` is furthest from 1 (either way)."""
        k = require_int("k", k, minimum=1, maximum=self.per_channel.shape[-1])
        return self.channel_ratios(layer).log().abs().topk(k).indices

    def mean_on(self, layer: int) -> tuple[float, float]:
        """Layer ``layer``'s mean ``Δ`` on data tokens and on the other tokens."""
        deltas = self.deltas[layer]
        return float(deltas[self.data].mean()), float(deltas[~self.data].mean())


def learned_step_sizes(model: nn.Module, tokens: torch.Tensor, data: torch.Tensor) -> LearnedSteps:
    """Run ``model`` on ``tokens`` and record every selective ``MambaMixer``'s ``Δ`` (mean over channels).

    ``tokens (batch, L)`` long; ``data (batch, L)`` bool marks the tokens to be remembered. Each
    mixer's input is caught with a forward hook and its ``step_sizes`` computed from it.
    """
    from labsupport.ssm.mixers import MambaMixer

    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a (batch, L) tensor, got {getattr(tokens, 'shape', type(tokens))}")
    if not isinstance(data, torch.Tensor) or data.shape != tokens.shape or data.dtype != torch.bool:
        raise ValueError(f"data must be a bool tensor shaped like tokens {tuple(tokens.shape)}")
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer) and m.selective]
    if not mixers:
        raise ValueError("the model has no selective MambaMixer: there is no learned Δ_t to read")
    inputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda module, args, out, i=i: inputs.__setitem__(i, args[0]))
             for i, m in enumerate(mixers)]
    try:
        with torch.no_grad():
            model(tokens)
            per_channel = torch.stack([m.step_sizes(inputs[i]) for i, m in enumerate(mixers)])
    finally:
        for hook in hooks:
            hook.remove()
    return LearnedSteps(tokens, data, per_channel.mean(-1), per_channel)


def learned_steps_figure(steps: LearnedSteps, example: int = 0, layer: int = 0, top: int = 8) -> go.Figure:
    """``Δ_t`` along one example for one layer, data tokens marked: the mean over all channels (bars) and over
    the ``top`` most selective channels (line); the title gives the means by kind of token."""
    import plotly.graph_objects as go

    if not isinstance(steps, LearnedSteps):
        raise TypeError(f"expected LearnedSteps, got {type(steps).__name__}")
    example = require_int("example", example, minimum=0, maximum=steps.tokens.shape[0] - 1)
    layer = require_int("layer", layer, minimum=0, maximum=steps.deltas.shape[0] - 1)
    deltas, data = steps.deltas[layer, example], steps.data[example]
    positions = torch.arange(deltas.shape[0])
    on_data, off_data = steps.mean_on(layer)
    chosen = steps.most_selective(layer, min(top, steps.per_channel.shape[-1]))
    figure = go.Figure()
    figure.add_trace(go.Bar(x=positions.tolist(), y=deltas.tolist(), name="Δ_t (mean over channels)",
                            marker={"color": ["#d62728" if d else "#9ecae1" for d in data.tolist()]},
                            text=[str(int(t)) for t in steps.tokens[example].tolist()], textposition="outside"))
    figure.add_trace(go.Scatter(x=positions.tolist(),
                                y=steps.per_channel[layer, example][:, chosen].mean(-1).tolist(),
                                mode="lines+markers", line={"color": "black"},
                                name=f"Δ_t (mean over the {len(chosen)} most selective channels)"))
    figure.update_layout(template="plotly_white", height=380, yaxis={"title": "learned Δ_t", "type": "log"},
                         xaxis={"title": "position (red: a data token to remember; labels: the token)"},
                         legend={"orientation": "h", "y": -0.3},
                         title=f"Layer {layer}: the step the trained S6 layer chose per token<br><sup>mean Δ on "
                               f"data tokens {on_data:.3g}, on the rest {off_data:.3g} (this layer, whole batch)</sup>")
    return figure
