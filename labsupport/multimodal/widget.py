"""The chapter's explorers: a scan order drawn over an image, and the tokens ToMe merged in each block.

Both return a plain ``go.Figure`` from plain arguments, so ``harness.widgets.interactive_figure`` can drive them
with sliders and leave a static figure behind.
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from labsupport.harness.validation import require_choice, require_int, require_tensor
from labsupport.multimodal.scans import SCAN_ORDERS, scan_permutations, seen_mask

__all__ = ["merge_groups", "merge_figure", "scan_figure"]

_DIRECTION_COLOURS = ("#d62728", "#1f77b4", "#ff7f0e", "#2ca02c")


def _gaps(values: torch.Tensor, hidden: torch.Tensor) -> list[list[float | None]]:
    """``values`` as nested lists with ``None`` (a gap plotly leaves transparent; NaN would break a live widget's
    JSON) where ``hidden`` is True."""
    return [[None if h else float(v) for v, h in zip(row, hide)] for row, hide in zip(values.tolist(), hidden.tolist())]


def _image_trace(image: torch.Tensor) -> go.Heatmap:
    return go.Heatmap(z=image.flip(0).tolist(), colorscale="Greys", showscale=False, hoverinfo="skip")


def scan_figure(image: torch.Tensor, order: str, row: int, column: int) -> go.Figure:
    """The path(s) of ``order`` over ``image (H, W)`` (one patch per pixel) and what patch ``(row, column)`` has seen.

    Shaded cells: the patches whose information can reach the chosen patch's output in one causal pass along
    every direction of the order (their union). The first direction's path is drawn solid, the others dotted.
    """
    image = require_tensor("image", image, ndim=2).detach().float().cpu()
    require_choice("order", order, SCAN_ORDERS)
    h, w = image.shape
    row = require_int("row", row, minimum=0, maximum=h - 1)
    column = require_int("column", column, minimum=0, maximum=w - 1)
    index = row * w + column
    seen = seen_mask(order, h, w)[index].view(h, w).float()
    fig = go.Figure(_image_trace(image))
    fig.add_trace(go.Heatmap(z=_gaps(seen.flip(0), seen.flip(0) == 0),
                             colorscale=[[0, "rgba(255,200,0,0.45)"], [1, "rgba(255,200,0,0.45)"]],
                             showscale=False, hoverinfo="skip", name="seen"))
    for k, perm in enumerate(scan_permutations(order, h, w)):
        rows, cols = (perm // w).tolist(), (perm % w).tolist()
        offset = 0.08 * (k - 1.5) if order == "cross" else 0.1 * k
        fig.add_trace(go.Scatter(x=[c + offset for c in cols], y=[h - 1 - r + offset for r in rows],
                                 mode="lines", line=dict(color=_DIRECTION_COLOURS[k], width=2 if k == 0 else 1,
                                                         dash="solid" if k == 0 else "dot"),
                                 name=f"direction {k + 1}", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[column], y=[h - 1 - row], mode="markers",
                             marker=dict(size=14, symbol="x", color="black"), name="chosen patch"))
    fig.update_layout(title=f"{order} scan: patch ({row}, {column}) has seen {int(seen.sum())} of {h * w} patches",
                      height=420, width=520, xaxis=dict(visible=False), yaxis=dict(visible=False, scaleanchor="x"),
                      legend=dict(orientation="h", y=-0.05))
    return fig


def merge_groups(source: torch.Tensor) -> torch.Tensor:
    """For one image's ``source (P,)`` (patch → token), each patch's group id, or −1 if its token is one patch."""
    source = require_tensor("source", source, ndim=1)
    counts = torch.bincount(source)
    return torch.where(counts[source] > 1, source, torch.full_like(source, -1))


def merge_figure(image: torch.Tensor, sources: list[torch.Tensor], layer: int) -> go.Figure:
    """``image (H, W)`` with the patches merged into one token after block ``layer`` (0-based) coloured alike."""
    image = require_tensor("image", image, ndim=2).detach().float().cpu()
    layer = require_int("layer", layer, minimum=0, maximum=len(sources) - 1)
    h, w = image.shape
    groups = merge_groups(sources[layer].cpu()).view(h, w).float()
    tokens = int(sources[layer].max()) + 1
    shown = _gaps(groups.flip(0), groups.flip(0) < 0)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("image", f"after block {layer + 1}: {tokens} tokens"))
    fig.add_trace(_image_trace(image), row=1, col=1)
    fig.add_trace(_image_trace(image), row=1, col=2)
    fig.add_trace(go.Heatmap(z=shown, colorscale="Turbo", showscale=False, opacity=0.75,
                             hovertemplate="token %{z}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title="ToMe: patches sharing a colour are one token (uncoloured: a token of one patch)",
                      height=360, width=700)
    return fig
