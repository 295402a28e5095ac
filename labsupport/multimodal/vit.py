"""A tiny ViT that can merge tokens (ToMe) and a tiny vision-language decoder that can prune them (FastV).

* :class:`SizedAttention` — ``lm.layers.SoftmaxAttention`` plus two things the chapter needs: proportional
  attention (``+ log size`` on every key's score) and, on request, the attention probabilities and the keys
  averaged over heads. With all sizes 1 it is exactly the ``lm`` layer.
* :class:`ToMeViT` — patch tokens, pre-norm blocks (attention, then a ToMe merge of ``r`` tokens, then the
  MLP, as in the paper), a size-weighted mean pool and a linear head. ``forward(images, r=0)`` is a plain ViT;
  ``r > 0`` merges ``r`` tokens in every block, off the shelf (no retraining).
* :class:`TinyVLM` — a causal decoder over ``[image tokens, question token]`` that answers at the last
  position; ``forward(images, questions, prune_layer=K, keep=k)`` runs FastV: after block ``K`` it keeps only
  the ``k`` image tokens that received the most attention in that block (:func:`fastv_keep`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.validation import require_int, require_positive_int, require_tensor
from labsupport.lm.layers import MLP, SoftmaxAttention
from labsupport.multimodal.images import patchify
from labsupport.multimodal.models import init_encoder, square_patch_embedding
from labsupport.multimodal.merging import bipartite_matches, merge_sources, merge_tokens

__all__ = ["MergeTrace", "SizedAttention", "TinyVLM", "ToMeViT", "fastv_keep"]


class SizedAttention(SoftmaxAttention):
    """Softmax attention with proportional attention: scores ``q·k/√d + log size`` (``size`` per key).

    ``forward(x, size=None, need_weights=False)`` returns ``(y, keys, probs)``: ``keys (B, N, head_dim)`` the
    keys averaged over heads (ToMe's similarity metric) and ``probs (B, H, N, N)`` only when asked (else None).
    """

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None,  # type: ignore[override]
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        q, k, v = self._split(x)
        length = x.shape[1]
        bias = None
        if size is not None:
            size = require_tensor("size", size, ndim=2)
            bias = size.to(q.dtype).log()[:, None, None, :].expand(-1, 1, length, -1)
        if self.causal:
            causal = torch.full((length, length), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
            bias = causal if bias is None else bias + causal
        if need_weights:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if bias is not None:
                scores = scores + bias
            probs = scores.softmax(dim=-1)
            y = probs @ v
        else:
            probs = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self._merge(y), k.mean(dim=1), probs


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, causal: bool, mlp_expansion: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SizedAttention(d_model, n_heads, causal=causal)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_expansion)


@dataclass
class MergeTrace:
    """What ToMe did in one forward pass: per block, the tokens left and the patch → token map."""

    tokens: list[int] = field(default_factory=list)
    sources: list[torch.Tensor] = field(default_factory=list)


class ToMeViT(nn.Module):
    """``images (B, C, H, W) -> logits``; a bidirectional encoder that merges ``r`` tokens per block when asked."""

    def __init__(self, *, image_size: int, patch: int, channels: int, d_model: int, n_layers: int, n_heads: int,
                 n_classes: int, mlp_expansion: int = 2) -> None:
        super().__init__()
        self.embed, self.patch, grid = square_patch_embedding(image_size, patch, channels, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, False, mlp_expansion)
                                    for _ in range(require_positive_int("n_layers", n_layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, require_positive_int("n_classes", n_classes))
        init_encoder(self)

    def _schedule(self, r: int | list[int], n: int) -> list[int]:
        rs = [r] * len(self.blocks) if isinstance(r, int) else list(r)
        if len(rs) != len(self.blocks):
            raise ValueError(f"r must be an int or one value per block ({len(self.blocks)}), got {r!r}")
        out = []
        for value in rs:
            value = min(require_int("r", value, minimum=0), n // 2)  # ToMe's rule: never more than half
            out.append(value)
            n -= value
        return out

    def forward(self, images: torch.Tensor, r: int | list[int] = 0, trace: MergeTrace | None = None
                ) -> torch.Tensor:
        """Logits ``(B, n_classes)``; ``r`` tokens merged in each block (capped at half the tokens left)."""
        x = self.embed(patchify(images, self.patch))
        b, n, _ = x.shape
        size = x.new_ones(b, n)
        source = torch.arange(n, device=x.device).expand(b, n)
        for block, r_block in zip(self.blocks, self._schedule(r, n)):
            h, keys, _ = block.attn(block.norm1(x), size if r_block or (size != 1).any() else None)
            x = x + h
            if r_block:
                src, dst = bipartite_matches(keys, r_block)
                if trace is not None:
                    source = merge_sources(source, src, dst, x.shape[1])
                x, size = merge_tokens(x, size, src, dst)
            x = x + block.mlp(block.norm2(x))
            if trace is not None:
                trace.tokens.append(x.shape[1])
                trace.sources.append(source.clone())
        x = self.norm(x)
        pooled = (x * size[..., None]).sum(dim=1) / size.sum(dim=1, keepdim=True)  # the mean over patches
        return self.head(pooled)


def fastv_keep(attn: torch.Tensor, image_start: int, image_end: int, keep: int) -> torch.Tensor:
    """FastV's keep set: ``(B, keep)`` positions of the image tokens that received the most attention, ascending.

    ``attn (B, H, L, L)`` are one layer's attention probabilities (rows: queries, columns: keys). A token's
    score is the attention it *receives*, averaged over heads and over all ``L`` query positions.
    Image tokens occupy positions ``image_start .. image_end − 1``.
    """
    attn = require_tensor("attn", attn, ndim=4)
    length = attn.shape[-1]
    image_start = require_int("image_start", image_start, minimum=0)
    image_end = require_int("image_end", image_end, minimum=image_start + 1, maximum=length)
    keep = require_int("keep", keep, minimum=0, maximum=image_end - image_start)
    received = attn.mean(dim=1).mean(dim=1)[:, image_start:image_end]           # (B, n_image)
    top = received.topk(keep, dim=-1).indices
    return top.sort(dim=-1).values + image_start


class TinyVLM(nn.Module):
    """A causal decoder over ``[image patches…, question]`` that answers with one token at the last position."""

    def __init__(self, *, image_size: int, patch: int, channels: int, d_model: int, n_layers: int, n_heads: int,
                 n_questions: int, n_answers: int, mlp_expansion: int = 2) -> None:
        super().__init__()
        self.embed, self.patch, grid = square_patch_embedding(image_size, patch, channels, d_model)
        self.n_image = grid * grid
        self.question = nn.Embedding(require_positive_int("n_questions", n_questions), d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, True, mlp_expansion)
                                    for _ in range(require_positive_int("n_layers", n_layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, require_positive_int("n_answers", n_answers))
        init_encoder(self)

    def forward(self, images: torch.Tensor, questions: torch.Tensor, *, prune_layer: int | None = None,
                keep: int | None = None, kept: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Answer logits ``(B, n_answers)``. With ``prune_layer=K, keep=k``: FastV after block ``K`` (1-based).

        ``kept``, if a list, receives the kept image positions ``(B, k)``.
        """
        questions = require_tensor("questions", questions, ndim=1)
        x = torch.cat([self.embed(patchify(images, self.patch)), self.question(questions)[:, None]], dim=1)
        if prune_layer is not None:
            prune_layer = require_int("prune_layer", prune_layer, minimum=1, maximum=len(self.blocks))
            keep = require_int("keep", keep, minimum=0, maximum=self.n_image)
        for index, block in enumerate(self.blocks, start=1):
            prune_here = prune_layer == index
            h, _, probs = block.attn(block.norm1(x), need_weights=prune_here)
            x = x + h
            x = x + block.mlp(block.norm2(x))
            if prune_here:
                chosen = fastv_keep(probs, 0, self.n_image, keep)
                if kept is not None:
                    kept.append(chosen)
                text = torch.arange(self.n_image, x.shape[1], device=x.device).expand(x.shape[0], -1)
                index_all = torch.cat([chosen, text], dim=1)
                x = x.gather(1, index_all[..., None].expand(-1, -1, x.shape[-1]))
        return self.head(self.norm(x[:, -1]))
