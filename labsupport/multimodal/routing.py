"""Routing image tokens past a block: Mixture-of-Depths (Raposo et al. 2024, arXiv:2404.02258).

A Mixture-of-Depths block has a learned scalar **router** score per token. Only the top ``capacity`` fraction
of the tokens (by score) go through the block — attention among themselves, then the MLP; the others skip it
through the residual stream unchanged. A chosen token's update is multiplied by its router weight
(``sigmoid(score)`` here), which puts the router on the gradient path: without it, top-k selection alone is not
differentiable and the router would never learn.

* :func:`mod_route` — the routing step for any residual update ``f``: ``x_i + g_i · f(x_S)_i`` for the chosen
  set ``S``, ``x_i`` for the rest.
* :class:`MoDBlock` — a pre-norm bidirectional block (``SizedAttention`` + ``lm`` MLP) behind a router.
* :class:`MoDViT` — the chapter's digits ViT with every block routed; ``forward(images, capacity=None)``.

What is built, against the paper: per-block top-k routing with a router-weighted update, on a bidirectional
encoder. Not built: the paper's causal-sampling fix (an auxiliary predictor, because top-k over a sequence looks
at future tokens — harmless for an image encoder, which sees the whole image anyway), routing only every other
block, and the mixture-of-depths-and-experts variant.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from labsupport.harness.validation import require_positive_int, require_tensor
from labsupport.lm.layers import MLP
from labsupport.multimodal.images import patchify
from labsupport.multimodal.models import init_encoder, square_patch_embedding
from labsupport.multimodal.vit import SizedAttention

__all__ = ["MoDBlock", "MoDViT", "kept_count", "mod_route"]


def kept_count(n_tokens: int, capacity: float) -> int:
    """Tokens routed through a block: ``round(capacity · n_tokens)``, at least 1."""
    n_tokens = require_positive_int("n_tokens", n_tokens)
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not 0.0 < capacity <= 1.0:
        raise ValueError(f"capacity must be a number in (0, 1], got {capacity!r}")
    return max(1, round(capacity * n_tokens))


def mod_route(x: torch.Tensor, scores: torch.Tensor, capacity: float,
              update: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One Mixture-of-Depths step. Returns ``(out (B, N, D), chosen (B, k))``, ``chosen`` ascending.

    ``scores (B, N)`` are the router's raw scores; the top ``k = kept_count(N, capacity)`` tokens are gathered
    (in their original order), ``update`` maps them ``(B, k, D) -> (B, k, D)`` (a residual update, not
    ``x + …``), and ``out_i = x_i + sigmoid(score_i) · update_i`` for chosen tokens, ``out_i = x_i`` otherwise.
    """
    x = require_tensor("x", x, ndim=3)
    scores = require_tensor("scores", scores, ndim=2)
    if scores.shape != x.shape[:2]:
        raise ValueError(f"scores must be (batch, tokens) = {tuple(x.shape[:2])}, got {tuple(scores.shape)}")
    k = kept_count(x.shape[1], capacity)
    chosen = scores.topk(k, dim=-1).indices.sort(dim=-1).values               # (B, k)
    index = chosen[..., None].expand(-1, -1, x.shape[-1])
    picked = x.gather(1, index)
    gate = torch.sigmoid(scores.gather(1, chosen))[..., None]
    return x.scatter(1, index, picked + gate * update(picked)), chosen


class MoDBlock(nn.Module):
    """A pre-norm bidirectional block (attention, then MLP) that only the top ``capacity`` of tokens go through."""

    def __init__(self, d_model: int, n_heads: int, capacity: float = 1.0, mlp_expansion: int = 2) -> None:
        super().__init__()
        kept_count(1, capacity)                                              # validates capacity
        self.capacity = capacity
        self.router = nn.Linear(d_model, 1)
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SizedAttention(d_model, n_heads, causal=False)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_expansion)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The plain block's residual update ``block(x) − x`` over the tokens given (they attend only to each other)."""
        h = x + self.attn(self.norm1(x))[0]
        h = h + self.mlp(self.norm2(h))
        return h - x

    def forward(self, x: torch.Tensor, capacity: float | None = None,
                chosen: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``(B, N, D) -> (B, N, D)``; ``capacity`` overrides the block's own; ``chosen`` (a list) gets the routed set."""
        scores = self.router(x).squeeze(-1)
        out, picked = mod_route(x, scores, self.capacity if capacity is None else capacity, self.update)
        if chosen is not None:
            chosen.append(picked)
        return out


class MoDViT(nn.Module):
    """``images (B, C, H, W) -> logits``: patch tokens, ``n_layers`` routed blocks, mean pool, linear head."""

    def __init__(self, *, image_size: int, patch: int, channels: int, d_model: int, n_layers: int, n_heads: int,
                 n_classes: int, capacity: float = 1.0, mlp_expansion: int = 2) -> None:
        super().__init__()
        self.embed, self.patch, grid = square_patch_embedding(image_size, patch, channels, d_model)
        self.blocks = nn.ModuleList(MoDBlock(d_model, n_heads, capacity, mlp_expansion)
                                    for _ in range(require_positive_int("n_layers", n_layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, require_positive_int("n_classes", n_classes))
        init_encoder(self)

    def forward(self, images: torch.Tensor, capacity: float | None = None,
                chosen: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits ``(B, n_classes)``; ``capacity`` (if given) overrides every block's; ``chosen`` collects routed sets."""
        x = self.embed(patchify(images, self.patch))
        for block in self.blocks:
            x = block(x, capacity, chosen)
        return self.head(self.norm(x).mean(dim=1))
