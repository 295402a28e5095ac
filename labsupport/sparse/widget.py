"""The attention-sparsity explorer of chapter 05: a pattern or policy, its budget, and what it keeps.

:func:`explorer_data` runs a trained model on a needle-in-a-haystack batch under one pattern (a static mask
in the parallel forward) or one decode policy (a bounded cache, token by token), and gathers what the
explorer shows: which positions each query reads, the model's real (dense) attention map, the density,
the bytes one decode step reads, and whether the needle survives. :func:`explorer_figure` draws it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from labsupport.harness.costs import decode_read_bytes, format_bytes, policy_tokens_per_step
from labsupport.harness.validation import require_choice, require_int
from labsupport.lm.tasks import IGNORE_INDEX, TaskBatch
from labsupport.sparse.masks import bigbird_mask, causal_mask, dilated_mask
from labsupport.sparse.mixers import SparseAttention, decode_logits, set_static_mask
from labsupport.sparse.policies import CachePolicy

if TYPE_CHECKING:  # plotly is imported when a figure is drawn, so the package imports without it (GPU boxes)
    import plotly.graph_objects as go

__all__ = ["EXPLORER_PATTERNS", "ExplorerData", "explorer_data", "explorer_figure", "static_pattern_mask"]

#: What the explorer offers: static patterns (a mask in the parallel forward) and decode policies.
EXPLORER_PATTERNS = ("full", "window", "sinks", "dilated", "bigbird", "h2o", "tova", "quest")
_STATIC = ("dilated", "bigbird")


def static_pattern_mask(pattern: str, length: int, budget: int) -> torch.Tensor:
    """The causal mask of a static pattern with about ``budget`` keys per query.

    ``dilated``: ``budget`` keys, every 4th; ``bigbird``: blocks of 8 — its own block and the 2 before, the
    first block, and ``budget / 8 − 4`` random earlier blocks.
    """
    require_choice("pattern", pattern, _STATIC)
    budget = require_int("budget", budget, minimum=8)
    if pattern == "dilated":
        return dilated_mask(length, window=budget, dilation=4)
    return bigbird_mask(length, block=8, window_blocks=3, global_blocks=1, random_blocks=max(0, budget // 8 - 4),
                        causal=True)


@dataclass
class ExplorerData:
    """What the explorer shows for one pattern and budget (sequence 0 of the batch, one layer and head).

    Attributes:
        read: ``(L, L)`` bool, the positions each query reads.
        attention: ``(L, L)`` the model's dense attention probabilities (full cache) for that layer and head.
        density: fraction of causal (query, key) pairs read.
        tokens_per_step: keys read by the last decode step; bytes_per_step: what that costs for this model
            (every layer and head, float32), by :func:`labsupport.harness.costs.decode_read_bytes`.
        needle_position: where the needle's key sits; needle_read: whether the last query reads it.
        recall: accuracy on the whole batch under the pattern.
        layer, head: which layer and head ``read`` and ``attention`` show.
        mass: the share of that head's dense attention that falls on the positions read, averaged over the
            queries; last_mass: the same for the last query (the one that must find the needle).
    """

    pattern: str
    budget: int
    read: torch.Tensor
    attention: torch.Tensor
    density: float
    tokens_per_step: int
    bytes_per_step: int
    needle_position: int
    needle_read: bool
    recall: float
    layer: int = -1
    head: int = 0
    mass: float = 1.0
    last_mass: float = 1.0


def _recall(logits: torch.Tensor, batch: TaskBatch) -> float:
    scored = batch.targets != IGNORE_INDEX
    return float((logits.argmax(dim=-1)[scored] == batch.targets[scored]).float().mean())


@torch.no_grad()
def explorer_data(model: nn.Module, batch: TaskBatch, pattern: str, budget: int, *, layer: int = -1,
                  head: int = 0) -> ExplorerData:
    """Run ``model`` on ``batch`` (a needle batch: ``info["position"]`` is the needle) under ``pattern``."""
    require_choice("pattern", pattern, EXPLORER_PATTERNS)
    budget = require_int("budget", budget, minimum=8)
    layers = [m for m in model.modules() if isinstance(m, SparseAttention)]
    if not layers:
        raise ValueError("the model has no SparseAttention layer")
    chosen = layers[layer]
    head = require_int("head", head, minimum=0, maximum=chosen.n_heads - 1)
    length = batch.inputs.shape[1]
    for module in layers:
        module.record_attention = True
    try:
        model.eval()
        set_static_mask(model, None)
        model(batch.inputs[:1])
        attention = chosen.last_attention[0, head].clone()
        if pattern in _STATIC:
            mask = static_pattern_mask(pattern, length, budget)
            set_static_mask(model, mask)
            try:
                logits = model(batch.inputs)
            finally:
                set_static_mask(model, None)
            read = mask & causal_mask(length)
            tokens = int(read[-1].sum())
            pages = 0
        else:
            policy = {"full": CachePolicy("full"), "window": CachePolicy("window", budget=budget),
                      "sinks": CachePolicy("sinks", budget=budget, sinks=4),
                      "h2o": CachePolicy("h2o", budget=budget), "tova": CachePolicy("tova", budget=budget),
                      "quest": CachePolicy("quest", budget=budget, page=8)}[pattern]
            model_states = decode_logits(model, batch.inputs, policy)
            logits = model_states[0]
            read = torch.zeros(length, length, dtype=torch.bool)
            cache_log = _read_log(chosen)
            for t, row in enumerate(cache_log):
                read[t, : row.shape[1]] = row[head]
            tokens = int(read[-1].sum())
            pages = policy_tokens_per_step("quest", length, budget, page=8)["pages"] if pattern == "quest" else 0
    finally:
        for module in layers:
            module.record_attention = False
    causal_pairs = length * (length + 1) / 2
    position = int(batch.info.get("position", 0))
    captured = (attention * read.to(attention.dtype)).sum(dim=-1)  # (L,): each query's dense mass on what it reads
    return ExplorerData(
        pattern=pattern, budget=budget, read=read, attention=attention,
        density=float(read.sum()) / causal_pairs, tokens_per_step=tokens,
        bytes_per_step=decode_read_bytes(tokens, layers=len(layers), kv_heads=chosen.n_heads,
                                         head_dim=chosen.head_dim, bytes_per_element=4, pages=pages),
        needle_position=position, needle_read=bool(read[-1, position]), recall=_recall(logits, batch),
        layer=layers.index(chosen), head=head, mass=float(captured.mean()), last_mass=float(captured[-1]),
    )


def _read_log(layer: SparseAttention) -> list[torch.Tensor]:
    cache = getattr(layer, "_last_cache", None)
    return [] if cache is None else cache.read_log


def explorer_figure(data: ExplorerData) -> go.Figure:
    """Left: what each query reads (the needle's column marked). Right: the model's real attention map."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"positions read (layer {data.layer}, head {data.head})",
                                                        "real attention (full cache)"],
                        horizontal_spacing=0.08)
    fig.add_trace(go.Heatmap(z=data.read.to(torch.int8).tolist(), colorscale=[[0, "#f4f4f4"], [1, "#1f4e9c"]],
                             showscale=False, hovertemplate="query %{y}, key %{x}: %{z}<extra></extra>"), 1, 1)
    fig.add_trace(go.Heatmap(z=data.attention.sqrt().tolist(), colorscale="Viridis", showscale=False,
                             hovertemplate="query %{y}, key %{x}: √p = %{z:.2f}<extra></extra>"), 1, 2)
    for col in (1, 2):
        fig.add_vline(x=data.needle_position, line=dict(color="#d62728", dash="dot", width=1), row=1, col=col)
    verdict = "read ✓" if data.needle_read else "not read ✗"
    fig.update_layout(
        title=dict(text=f"{data.pattern}, budget {data.budget}: density {data.density:.1%}, last step reads "
                        f"{data.tokens_per_step} tokens ({format_bytes(data.bytes_per_step)})<br>"
                        f"<sup>needle at position {data.needle_position}: {verdict}; attention mass on what is read "
                        f"{data.mass:.0%} (last query {data.last_mass:.0%}); needle recall on the batch "
                        f"{data.recall:.0%}</sup>", font=dict(size=14)),
        height=430, template="plotly_white", margin=dict(t=90),
    )
    for col in (1, 2):
        fig.update_yaxes(autorange="reversed", title_text="query position" if col == 1 else None, row=1, col=col)
        fig.update_xaxes(title_text="key position", row=1, col=col)
    return fig
