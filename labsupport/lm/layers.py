"""The layers of the ``lm`` bench: softmax attention with its KV cache, the MLP, the short convolution.

* :class:`KVCache` — keys and values of the tokens seen so far, growing by doubling.
* :class:`SoftmaxAttention` — multi-head softmax attention (causal by default, bidirectional
  with ``causal=False``), the baseline sequence mixer; :func:`attention_mixer` is its factory.
* :class:`MLP` — the default channel mixer.
* :class:`ShortConv` — a depthwise causal convolution in front of a sequence mixer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.validation import require_int, require_positive_int
from labsupport.lm.contracts import MixerFactory

__all__ = ["KVCache", "MLP", "ShortConv", "SoftmaxAttention", "attention_mixer"]


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, ``(batch, heads, capacity, head_dim)``.

    Storage grows by doubling, so appending a token costs O(1) amortised and
    reading the cache costs O(length): the per-token decode cost grows with the
    context, which is what chapter 00 measures.
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, *, capacity: int = 16,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        shape = (batch, heads, capacity, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device),
                   torch.empty(shape, dtype=dtype, device=device), 0)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``(batch, heads, new, head_dim)`` keys and values."""
        new = k.shape[2]
        needed = self.length + new
        if needed > self.keys.shape[2]:
            capacity = max(needed, 2 * self.keys.shape[2])
            grow = capacity - self.keys.shape[2]
            pad = (0, 0, 0, grow)
            self.keys = F.pad(self.keys, pad)
            self.values = F.pad(self.values, pad)
        self.keys[:, :, self.length:needed] = k
        self.values[:, :, self.length:needed] = v
        self.length = needed

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part: keys and values of shape ``(batch, heads, length, head_dim)``."""
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    @property
    def nbytes(self) -> int:
        """Bytes held by the filled part of the cache (keys and values)."""
        k, v = self.view()
        return k.numel() * k.element_size() + v.numel() * v.element_size()


class SoftmaxAttention(nn.Module):
    """Multi-head causal softmax attention: the baseline sequence mixer.

    ``forward`` uses PyTorch's ``scaled_dot_product_attention``; chapter 00
    builds the same computation by hand and checks it against this module.
    ``decode_step`` attends from one new token to a growing :class:`KVCache`.
    """

    def __init__(self, d_model: int, n_heads: int, *, bias: bool = False, causal: bool = True) -> None:
        super().__init__()
        d_model, n_heads = require_positive_int("d_model", d_model), require_positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.causal = bool(causal)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SoftmaxAttention expects activations (batch, length, d_model={self.d_model}), got {shape}")
        b, length, _ = x.shape
        q, k, v = self.qkv(x).split(self.d_model, dim=-1)
        shape = (b, length, self.n_heads, self.head_dim)
        return (t.view(shape).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, length, self.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``, causal unless built with ``causal=False``."""
        q, k, v = self._split(x)
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=self.causal))

    def _require_causal(self) -> None:
        if not self.causal:
            raise ValueError("a bidirectional SoftmaxAttention (causal=False) cannot decode token by token")

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """Process a whole prompt and return its output and the filled KV cache."""
        self._require_causal()
        q, k, v = self._split(x)
        cache = KVCache.empty(x.shape[0], self.n_heads, self.head_dim,
                              capacity=max(16, x.shape[1]), dtype=x.dtype, device=x.device)
        cache.append(k, v)
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)), cache

    def decode_step(self, x: torch.Tensor, state: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """One new token ``(B, 1, d_model)`` attends to every cached token and itself."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"decode_step expects one token, shape (batch, 1, d_model); got {tuple(x.shape)}")
        self._require_causal()
        q, k, v = self._split(x)
        if state is None:
            state = KVCache.empty(x.shape[0], self.n_heads, self.head_dim, dtype=x.dtype, device=x.device)
        state.append(k, v)
        keys, values = state.view()
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, 1, T)
        y = scores.softmax(dim=-1) @ values
        return self._merge(y), state

    def cache_bytes(self, state: KVCache) -> int:
        """Bytes of keys and values held in ``state``."""
        return state.nbytes


def attention_mixer(n_heads: int = 4, *, causal: bool = True) -> MixerFactory:
    """A factory for :class:`~labsupport.lm.model.TinyLM` that builds :class:`SoftmaxAttention` in every layer."""
    n_heads = require_positive_int("n_heads", n_heads)

    def build(d_model: int, layer_index: int) -> nn.Module:
        return SoftmaxAttention(d_model, n_heads, causal=causal)
    return build


class MLP(nn.Module):
    """The channel mixer: ``Linear -> GELU -> Linear`` with hidden width ``expansion * d_model``."""

    def __init__(self, d_model: int, expansion: int = 4) -> None:
        super().__init__()
        d_model, expansion = require_positive_int("d_model", d_model), require_positive_int("expansion", expansion)
        self.up = nn.Linear(d_model, expansion * d_model)
        self.down = nn.Linear(expansion * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class ShortConv(nn.Module):
    """A depthwise causal convolution over the last ``kernel_size`` positions.

    Used (as in H3, Mamba, Based, GLA and DeltaNet) in front of the sequence
    mixer: it lets each position see its immediate predecessors, which makes
    "find the token that came after this key" learnable in minutes instead of
    hours. Its decode state is the last ``kernel_size - 1`` inputs.
    """

    def __init__(self, d_model: int, kernel_size: int = 4) -> None:
        super().__init__()
        kernel_size = require_int("kernel_size", kernel_size, minimum=2)
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d) -> (B, L, d)``, position t mixes inputs t-kernel_size+1 .. t."""
        length = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :length].transpose(1, 2)

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole prompt ``(B, L, d)``: the output and the state (its last ``kernel_size - 1`` inputs, zero-padded)."""
        keep = self.kernel_size - 1
        tail = x[:, -keep:]
        state = torch.cat([x.new_zeros(x.shape[0], keep - tail.shape[1], x.shape[2]), tail], dim=1)
        return self(x), state

    def decode_step(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One position ``(B, 1, d)``; the state holds the previous ``kernel_size - 1`` inputs."""
        if state is None:
            state = x.new_zeros(x.shape[0], self.kernel_size - 1, x.shape[2])
        window = torch.cat([state, x], dim=1)  # (B, K, d)
        weight = self.conv.weight[:, 0, :].t()  # (K, d)
        y = (window * weight).sum(dim=1, keepdim=True) + self.conv.bias
        return y, window[:, 1:]
