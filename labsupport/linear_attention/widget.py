"""The "memory decay" widget of chapter 03: what a fixed-size state keeps of what was written.

:func:`memory_decay_data` writes random unit keys with random values into one
head's memory under a mechanism's forget and write rules (read from its
:data:`~labsupport.linear_attention.mechanisms.MECHANISMS` row) and measures
what survives; :func:`memory_decay_figure` draws it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labsupport.harness.validation import require_choice, require_float, require_int, require_positive_int
from labsupport.linear_attention.mechanisms import MECHANISMS, widget_mechanisms

__all__ = ["MemoryDecayData", "memory_decay_data", "memory_decay_figure", "widget_parameters_used"]


@dataclass
class MemoryDecayData:
    """What the "memory decay" widget draws.

    Attributes:
        mechanism: one of :func:`~labsupport.linear_attention.mechanisms.widget_mechanisms` (``linear``,
            ``retnet``, ``gla``, ``deltanet``, ``gated_deltanet``).
        survival: ``(L, L)``; entry ``[t, s]`` (``s ≤ t``) is how much of token
            ``s``'s key direction survives in the state after token ``t``:
            ``‖M_t ⋯ M_{s+1} k_s‖`` for unit ``k_s``, where ``M_r`` is the forget
            map of step ``r``. NaN above the diagonal (not yet written).
        recall_error: ``(L,)``; after token ``t``, the mean over stored tokens
            ``s ≤ t`` of ``‖S_tᵀ k_s − v_s‖ / ‖v_s‖``: how badly the memory
            returns what was written (0 = perfect, 1 = nothing left).
        recall_error_recent: ``(L,)``; the same, over the most recent ``d_key``
            tokens only (the ones a state of rank ``d_key`` could hold exactly).
        d_key: key dimension (the rank of the state).
    """

    mechanism: str
    survival: torch.Tensor
    recall_error: torch.Tensor
    recall_error_recent: torch.Tensor
    d_key: int
    decay: float
    beta: float


def widget_parameters_used(mechanism: str) -> dict[str, bool]:
    """Which of the widget's two parameters ``mechanism`` reads: ``{"decay": ..., "beta": ...}``.

    ``decay`` is read by the mechanisms that forget by age (RetNet, GLA, gated DeltaNet), ``beta`` by the
    delta rules. A widget disables the controls of the parameters a mechanism ignores.
    """
    spec = MECHANISMS[require_choice("mechanism", mechanism, widget_mechanisms())]
    return {"decay": spec.decay != "none", "beta": spec.rule == "delta"}


def memory_decay_data(
    mechanism: str,
    *,
    decay: float = 0.95,
    beta: float = 0.5,
    length: int = 64,
    d_key: int = 16,
    seed: int = 0,
) -> MemoryDecayData:
    """Write ``length`` random unit keys with random values into one head's memory, and measure it.

    ``decay`` is the fixed decay ``γ`` (``retnet``), the mean gate (``gla``:
    each token and dimension draws ``α = decay ** u`` with ``u ~ U(0, 2)``) or
    the decay ``α`` of ``gated_deltanet``; ``beta`` is the writing strength of
    the delta rules. ``linear`` and ``deltanet`` ignore ``decay``; the additive
    rules ignore ``beta``. Deterministic for a given ``seed``.
    """
    require_choice("mechanism", mechanism, widget_mechanisms())
    spec = MECHANISMS[mechanism]
    decay = require_float("decay", decay, positive=True, maximum=1.0)
    beta = require_float("beta", beta, positive=True, maximum=1.0)
    length = require_positive_int("length", length)
    d_key = require_positive_int("d_key", d_key)
    seed = require_int("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    keys = F.normalize(torch.randn(length, d_key, generator=gen, dtype=dt), dim=-1)
    values = torch.randn(length, d_key, generator=gen, dtype=dt)
    if spec.decay == "vector_gate":
        gates = decay ** (2.0 * torch.rand(length, d_key, generator=gen, dtype=dt))
    else:
        gates = torch.full((length, d_key), decay if spec.decay in ("fixed", "scalar_gate") else 1.0, dtype=dt)
    eye = torch.eye(d_key, dtype=dt)
    delta = spec.rule == "delta"
    b = float(beta) if delta else 1.0

    survival = torch.full((length, length), float("nan"), dtype=dt)
    error = torch.zeros(length, dtype=dt)
    recent = torch.zeros(length, dtype=dt)
    state = torch.zeros(d_key, d_key, dtype=dt)
    carried = torch.zeros(0, d_key, dtype=dt)  # row s: M_t ⋯ M_{s+1} k_s, for every written s
    for t in range(length):
        k, v = keys[t], values[t]
        forget = torch.diag(gates[t])
        if delta:
            forget = (eye - b * torch.outer(k, k)) @ forget
        state = forget @ state + b * torch.outer(k, v)
        carried = torch.cat([carried @ forget.T, k[None]], dim=0)
        survival[t, : t + 1] = carried.norm(dim=-1)
        recalled = keys[: t + 1] @ state  # row s: S_tᵀ k_s
        rel = (recalled - values[: t + 1]).norm(dim=-1) / values[: t + 1].norm(dim=-1)
        error[t] = rel.mean()
        recent[t] = rel[max(0, t + 1 - d_key):].mean()
    return MemoryDecayData(mechanism, survival, error, recent, d_key, float(decay), float(beta))


def memory_decay_figure(data: MemoryDecayData) -> "go.Figure":  # noqa: F821 - plotly imported lazily
    """A heatmap of :attr:`MemoryDecayData.survival` next to the recall error as the state fills."""
    if not isinstance(data, MemoryDecayData):
        raise TypeError(f"memory_decay_figure expects a MemoryDecayData, got {type(data).__name__}")
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    length = data.survival.shape[0]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.24,
                        subplot_titles=("what survives of token s after token t",
                                        "recall error as the state fills"))
    # NaN (not yet written) becomes None: plotly leaves those cells blank, and widgets can send it as JSON
    z = [[None if math.isnan(x) else x for x in row] for row in data.survival.tolist()]
    fig.add_trace(go.Heatmap(z=z, x=list(range(length)), y=list(range(length)),
                             colorscale="Viridis", zmin=0, zmax=1, colorbar=dict(x=0.39, xanchor="left", thickness=12, title="|kept|")),
                  row=1, col=1)
    steps = list(range(1, length + 1))
    fig.add_trace(go.Scatter(x=steps, y=data.recall_error.numpy(), name="all stored tokens", mode="lines"),
                  row=1, col=2)
    fig.add_trace(go.Scatter(x=steps, y=data.recall_error_recent.numpy(),
                             name=f"last {data.d_key} tokens", mode="lines"), row=1, col=2)
    fig.add_vline(x=data.d_key, line_dash="dot", annotation_text="tokens = d_key", row=1, col=2)
    fig.update_xaxes(title_text="written at token s", row=1, col=1)
    fig.update_yaxes(title_text="state after token t", autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="tokens written", row=1, col=2)
    fig.update_yaxes(title_text="‖Sᵀk − v‖ / ‖v‖", rangemode="tozero", row=1, col=2)
    used = widget_parameters_used(data.mechanism)
    decay = f"decay={data.decay:g}" if used["decay"] else "no decay"
    beta = f"β={data.beta:g}" if used["beta"] else "β not used (additive write)"
    fig.update_layout(height=420, legend=dict(orientation="h", y=-0.25, x=0.55),
                      title=f"{data.mechanism}: {decay}, {beta}, d_key={data.d_key}")
    return fig
