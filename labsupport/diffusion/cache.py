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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.diffusion.process import subs_logits
from labsupport.lm.layers import SoftmaxAttention
from labsupport.lm.model import TinyLM

__all__ = ["BlockKVCache"]


class BlockKVCache:
    """Per-layer keys and values ``(B, H, L, D)`` of a bidirectional softmax-attention denoiser.

    Args:
        model: a :class:`~labsupport.diffusion.process.MaskedDenoiser` (its ``backbone`` a bidirectional
            ``TinyLM`` of :class:`~labsupport.lm.layers.SoftmaxAttention` blocks with learned positions).
    """

    def __init__(self, model: nn.Module) -> None:
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, TinyLM) or backbone.causal:
            raise TypeError("BlockKVCache needs a MaskedDenoiser whose backbone is a bidirectional TinyLM")
        for i, block in enumerate(backbone.blocks):
            if not isinstance(block.mixer, SoftmaxAttention) or block.conv is not None:
                raise TypeError(f"layer {i}: BlockKVCache supports SoftmaxAttention mixers without a short "
                                f"convolution, got {type(block.mixer).__name__}")
        if backbone.pos is None:
            raise TypeError("BlockKVCache needs learned positions (positional='learned')")
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
