"""A cache for semi-autoregressive decoding: keys and values of every position outside the current block.

A bidirectional denoiser has no exact KV cache: every position attends to every other, so when a token of the
current block is committed, the hidden states of *all* positions change a little. Block decoding makes an
approximation cheap (as in Fast-dLLM's "dual cache"): at the first step of a block, one full pass stores every
layer's keys and values; at the block's later steps only the block's own positions run through the network,
attending to the stored keys and values of the positions outside the block and to fresh ones inside it. The
positions outside the block are the finished blocks (which change only through their view of the rest) and
the still-masked future (all ``[MASK]``), so the stale part moves little; :func:`diffusion_sample` with
``cache=True`` uses it and the notebook measures what it costs in quality.

Right after :meth:`BlockKVCache.refresh`, :meth:`BlockKVCache.window` gives exactly the logits of a full pass
at the window's positions (a test holds it to float rounding): the only approximation is staleness.

BD3-LM (Arriola et al. 2025, arXiv:2503.09573) has an **exact** cache instead, because its attention is
*block-causal*: a position sees its own block and the blocks before it, never a later one
(:func:`block_causal_logits` is that forward, uncached). Then a finished block's keys and values depend only on
the finished blocks, so they never go stale. :class:`ExactBlockCache` keeps them: when a block is finished, one
pass over its **clean** (final) tokens computes and appends its keys and values (the ones computed at its noisy
steps are thrown away); each step of the next block runs only that block's positions against the cache. Its
logits equal the uncached block-causal forward's (a test holds it to float rounding). The price: a block-causal
model is not the bidirectional one — BD3-LM *trains* with this attention, and a denoiser trained bidirectionally
(the chapter's) is run off its training distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.diffusion.process import subs_logits
from labsupport.lm.layers import SoftmaxAttention
from labsupport.lm.model import TinyLM

__all__ = ["BlockKVCache", "ExactBlockCache", "block_causal_logits"]


def _require_denoiser(model: nn.Module, who: str) -> TinyLM:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, TinyLM) or backbone.causal:
        raise TypeError(f"{who} needs a MaskedDenoiser whose backbone is a bidirectional TinyLM")
    for i, block in enumerate(backbone.blocks):
        if not isinstance(block.mixer, SoftmaxAttention) or block.conv is not None:
            raise TypeError(f"layer {i}: {who} supports SoftmaxAttention mixers without a short "
                            f"convolution, got {type(block.mixer).__name__}")
    if backbone.pos is None:
        raise TypeError(f"{who} needs learned positions (positional='learned')")
    return backbone


def _segment(backbone: TinyLM, tokens: torch.Tensor, start: int, past: list[tuple[torch.Tensor, torch.Tensor]],
             attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Positions ``start ..`` holding ``tokens``, attending to ``past`` keys/values (per layer) and to themselves.

    Returns the backbone's logits and the segment's own keys and values per layer.
    """
    length = tokens.shape[1]
    x = backbone.embed(tokens) + backbone.pos(torch.arange(start, start + length, device=tokens.device))
    fresh = []
    for index, block in enumerate(backbone.blocks):
        mixer = block.mixer
        q, k, v = BlockKVCache._heads(mixer, block.norm1(x))
        fresh.append((k, v))
        if past:
            k = torch.cat([past[index][0], k], dim=2)
            v = torch.cat([past[index][1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + mixer.out(y.transpose(1, 2).reshape(x.shape[0], length, mixer.d_model))
        if block.channel_mixer is not None:
            x = x + block.channel_mixer(block.norm2(x))
    return backbone.head(backbone.norm(x)), fresh


def _block_ids(length: int, starts: list[int]) -> torch.Tensor:
    """Block index of each of ``length`` positions: the number of block starts at or before it."""
    bounds = torch.tensor(sorted(starts), dtype=torch.long)
    return torch.searchsorted(bounds, torch.arange(length), right=True)


@torch.no_grad()
def block_causal_logits(model: nn.Module, tokens: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """The uncached block-causal forward: SUBS logits ``(B, L, V)`` where position ``i`` sees position ``j`` iff
    ``j``'s block is not after ``i``'s.

    ``starts`` are the positions where blocks begin (block 0 — the prompt — begins at 0 implicitly): with a prompt of
    ``P`` and blocks of ``W``, ``[P, P + W, P + 2W, ...]``. Positions inside one block see each other both ways.
    """
    backbone = _require_denoiser(model, "block_causal_logits")
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
        raise ValueError("tokens must be int64 ids of shape (batch, length)")
    if any(not isinstance(s, int) or s <= 0 for s in starts):
        raise ValueError(f"starts must be positive int positions where blocks begin; got {starts}")
    ids = _block_ids(tokens.shape[1], starts)
    allowed = ids[None, :] <= ids[:, None]
    logits, _ = _segment(backbone, tokens, 0, [], attn_mask=allowed.to(tokens.device))
    return subs_logits(logits, tokens, model.mask_id)


class ExactBlockCache:
    """BD3-LM's exact block cache for block-causal decoding: keys and values of the finished blocks, ``(B, H, T, D)``.

    :meth:`append_clean` runs a finished block (or the prompt) with its final tokens against the cache and stores
    its keys and values; :meth:`block_logits` runs the current block against the cache without storing anything.
    Both equal :func:`block_causal_logits` at the same positions.
    """

    def __init__(self, model: nn.Module) -> None:
        self.backbone = _require_denoiser(model, "ExactBlockCache")
        self.model = model
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        """Positions cached (the prompt and the finished blocks)."""
        return self.keys[0].shape[2] if self.keys else 0

    def _past(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.keys, self.values))

    def _require(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
            raise ValueError("tokens must be int64 ids of shape (batch, block length)")
        if self.keys and tokens.shape[0] != self.keys[0].shape[0]:
            raise ValueError(f"batch {tokens.shape[0]} differs from the cached batch {self.keys[0].shape[0]}")
        if self.length + tokens.shape[1] > self.backbone.max_len:
            raise ValueError(f"positions up to {self.length + tokens.shape[1] - 1} exceed max_len="
                             f"{self.backbone.max_len}")

    @torch.no_grad()
    def append_clean(self, tokens: torch.Tensor) -> torch.Tensor:
        """A finished block's final tokens ``(B, W)`` at the next positions: store their keys and values."""
        self._require(tokens)
        if bool((tokens == self.model.mask_id).any()):
            raise ValueError("append_clean takes a finished block: its tokens must hold no mask_id")
        logits, fresh = _segment(self.backbone, tokens, self.length, self._past())
        self.keys = [k if not self.keys else torch.cat([self.keys[i], k], dim=2) for i, (k, _) in enumerate(fresh)]
        self.values = [v if not self.values else torch.cat([self.values[i], v], dim=2)
                       for i, (_, v) in enumerate(fresh)]
        return subs_logits(logits, tokens, self.model.mask_id)

    @torch.no_grad()
    def block_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """SUBS logits ``(B, W, V)`` of the current block ``tokens (B, W)`` right after the cached positions."""
        self._require(tokens)
        logits, _ = _segment(self.backbone, tokens, self.length, self._past())
        return subs_logits(logits, tokens, self.model.mask_id)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached keys and values."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class BlockKVCache:
    """Per-layer keys and values ``(B, H, L, D)`` of a bidirectional softmax-attention denoiser.

    Args:
        model: a :class:`~labsupport.diffusion.process.MaskedDenoiser` (its ``backbone`` a bidirectional
            ``TinyLM`` of :class:`~labsupport.lm.layers.SoftmaxAttention` blocks with learned positions).
    """

    def __init__(self, model: nn.Module) -> None:
        backbone = _require_denoiser(model, "BlockKVCache")
        self.model = model
        self.backbone = backbone
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @staticmethod
    def _heads(mixer: SoftmaxAttention, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length, _ = h.shape
        q, k, v = mixer.qkv(h).split(mixer.d_model, dim=-1)
        shape = (b, length, mixer.n_heads, mixer.head_dim)
        return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def _run(self, tokens: torch.Tensor, start: int, store: bool) -> torch.Tensor:
        lm = self.backbone
        length = tokens.shape[1]
        x = lm.embed(tokens) + lm.pos(torch.arange(start, start + length, device=tokens.device))
        for index, block in enumerate(lm.blocks):
            mixer = block.mixer
            q, k, v = self._heads(mixer, block.norm1(x))
            if store:
                self.keys.append(k)
                self.values.append(v)
            else:
                keys, values = self.keys[index], self.values[index]
                k = torch.cat([keys[:, :, :start], k, keys[:, :, start + length:]], dim=2)
                v = torch.cat([values[:, :, :start], v, values[:, :, start + length:]], dim=2)
            y = F.scaled_dot_product_attention(q, k, v)
            b = y.shape[0]
            x = x + mixer.out(y.transpose(1, 2).reshape(b, length, mixer.d_model))
            if block.channel_mixer is not None:
                x = x + block.channel_mixer(block.norm2(x))
        return lm.head(lm.norm(x))

    @torch.no_grad()
    def refresh(self, tokens: torch.Tensor) -> torch.Tensor:
        """A full pass over ``tokens (B, L)``: store every layer's keys and values; return the SUBS logits."""
        self.keys, self.values = [], []
        return subs_logits(self._run(tokens, 0, store=True), tokens, self.model.mask_id)

    @torch.no_grad()
    def window(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """SUBS logits ``(B, W, V)`` of the positions ``start .. start + W − 1`` holding ``tokens (B, W)``.

        The window's queries attend to its own fresh keys and values and to the cached ones elsewhere.
        """
        if not self.keys:
            raise RuntimeError("call refresh(tokens) before window(...)")
        total = self.keys[0].shape[2]
        if start < 0 or start + tokens.shape[1] > total or tokens.shape[0] != self.keys[0].shape[0]:
            raise ValueError(f"a window of {tuple(tokens.shape)} at {start} does not fit the cached "
                             f"(batch {self.keys[0].shape[0]}, length {total})")
        return subs_logits(self._run(tokens, start, store=False), tokens, self.model.mask_id)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached keys and values."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
