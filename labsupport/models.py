"""A tiny decoder language model with a pluggable sequence mixer and channel mixer.

Every chapter drops its mechanism into the same model, so recall and cost are
compared like for like. A block is pre-norm and residual::

    x = x + sequence_mixer(norm(x))      # mixes information across positions (causal)
    x = x + channel_mixer(norm(x))       # mixes features within a position (an MLP), optional

**The sequence-mixer contract.** ``TinyLM`` calls ``sequence_mixer(d_model,
layer_index)`` once per layer; the returned ``nn.Module`` maps a tensor of shape
``(batch, length, d_model)`` to the same shape and must be causal (position
``t`` may only read positions ``<= t``). For token-by-token decoding a mixer may
also define ``decode_step(x, state) -> (y, state)`` with ``x`` of shape
``(batch, 1, d_model)`` and ``state`` ``None`` at the first token; the state is
whatever the mixer carries forward (a KV cache for attention, a fixed-size
matrix for a recurrence). A mixer without ``decode_step`` is decoded by
re-running the whole prefix, which is correct but slow.

``TinyLM`` initialises every linear and embedding weight from N(0, 0.02²) and
every bias to zero. A mixer that needs a different start (a gate bias, a decay
rate) defines ``init_weights()``; the model calls it after its own
initialisation, so the mixer's choice wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KVCache",
    "SoftmaxAttention",
    "MLP",
    "Block",
    "ShortConv",
    "TinyLM",
    "MixerFactory",
    "attention_mixer",
    "count_parameters",
]

MixerFactory = Callable[[int, int], nn.Module]


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

    def __init__(self, d_model: int, n_heads: int, *, bias: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length, _ = x.shape
        q, k, v = self.qkv(x).split(self.d_model, dim=-1)
        shape = (b, length, self.n_heads, self.head_dim)
        return (t.view(shape).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, length, self.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``, causal."""
        q, k, v = self._split(x)
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """Process a whole prompt and return its output and the filled KV cache."""
        q, k, v = self._split(x)
        cache = KVCache.empty(x.shape[0], self.n_heads, self.head_dim,
                              capacity=max(16, x.shape[1]), dtype=x.dtype, device=x.device)
        cache.append(k, v)
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)), cache

    def decode_step(self, x: torch.Tensor, state: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """One new token ``(B, 1, d_model)`` attends to every cached token and itself."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"decode_step expects one token, shape (batch, 1, d_model); got {tuple(x.shape)}")
        q, k, v = self._split(x)
        if state is None:
            state = KVCache.empty(x.shape[0], self.n_heads, self.head_dim, dtype=x.dtype, device=x.device)
        state.append(k, v)
        keys, values = state.view()
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, 1, T)
        y = scores.softmax(dim=-1) @ values
        return self._merge(y), state


def attention_mixer(n_heads: int = 4) -> MixerFactory:
    """A factory for :class:`TinyLM` that builds :class:`SoftmaxAttention` in every layer."""
    def build(d_model: int, layer_index: int) -> nn.Module:
        return SoftmaxAttention(d_model, n_heads)
    return build


class MLP(nn.Module):
    """The channel mixer: ``Linear -> GELU -> Linear`` with hidden width ``expansion * d_model``."""

    def __init__(self, d_model: int, expansion: int = 4) -> None:
        super().__init__()
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
        if kernel_size < 2:
            raise ValueError(f"kernel_size must be at least 2, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d) -> (B, L, d)``, position t mixes inputs t-kernel_size+1 .. t."""
        length = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :length].transpose(1, 2)

    def decode_step(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One position ``(B, 1, d)``; the state holds the previous ``kernel_size - 1`` inputs."""
        if state is None:
            state = x.new_zeros(x.shape[0], self.kernel_size - 1, x.shape[2])
        window = torch.cat([state, x], dim=1)  # (B, K, d)
        weight = self.conv.weight[:, 0, :].t()  # (K, d)
        y = (window * weight).sum(dim=1, keepdim=True) + self.conv.bias
        return y, window[:, 1:]


class Block(nn.Module):
    """Pre-norm residual block: optional short convolution, a sequence mixer, an optional channel mixer."""

    def __init__(self, d_model: int, mixer: nn.Module, channel_mixer: nn.Module | None,
                 short_conv: int = 0) -> None:
        super().__init__()
        self.conv = ShortConv(d_model, short_conv) if short_conv else None
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model) if channel_mixer is not None else None
        self.channel_mixer = channel_mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.conv is not None:
            h = self.conv(h)
        x = x + self.mixer(h)
        if self.channel_mixer is not None:
            x = x + self.channel_mixer(self.norm2(x))
        return x

    def decode_step(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """One position; ``state`` is ``(conv_state, mixer_state)`` (``None`` at the start)."""
        conv_state, mixer_state = state if state is not None else (None, None)
        h = self.norm1(x)
        if self.conv is not None:
            h, conv_state = self.conv.decode_step(h, conv_state)
        y, mixer_state = self.mixer.decode_step(h, mixer_state)
        x = x + y
        if self.channel_mixer is not None:
            x = x + self.channel_mixer(self.norm2(x))
        return x, (conv_state, mixer_state)


class TinyLM(nn.Module):
    """A small decoder-only language model with pluggable mixers.

    Args:
        vocab_size: number of token ids.
        d_model: width of the residual stream.
        n_layers: number of blocks.
        max_len: longest sequence (size of the learned position table).
        sequence_mixer: ``"attention"`` or a factory ``(d_model, layer_index) -> nn.Module``
            (see the module docstring for the contract).
        channel_mixer: ``"mlp"`` for an MLP in every block, or ``None`` for
            mixer-only blocks (as in Zoology's MQAR experiments).
        n_heads: heads of the default attention mixer.
        positional: ``"learned"`` absolute position embeddings, or ``"none"``
            for mixers that carry position themselves (recurrences, convolutions).
        short_conv: kernel size of a :class:`ShortConv` in front of every
            sequence mixer (0 for none). A width of 3-4 lets a 2-layer model
            learn associative recall in about a minute on a CPU.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        max_len: int = 256,
        sequence_mixer: str | MixerFactory = "attention",
        channel_mixer: str | None = "mlp",
        *,
        n_heads: int = 4,
        positional: str = "learned",
        short_conv: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("n_layers", n_layers), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if positional not in ("learned", "none"):
            raise ValueError(f"positional must be 'learned' or 'none', got {positional!r}")
        if channel_mixer not in ("mlp", None):
            raise ValueError(f"channel_mixer must be 'mlp' or None, got {channel_mixer!r}")
        if sequence_mixer == "attention":
            factory: MixerFactory = attention_mixer(n_heads)
        elif callable(sequence_mixer):
            factory = sequence_mixer
        else:
            raise ValueError(
                "sequence_mixer must be 'attention' or a factory (d_model, layer_index) -> nn.Module, "
                f"got {sequence_mixer!r}"
            )
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model) if positional == "learned" else None
        blocks = []
        for i in range(n_layers):
            mixer = factory(d_model, i)
            if not isinstance(mixer, nn.Module):
                raise TypeError(f"the sequence-mixer factory must return an nn.Module, got {type(mixer).__name__}")
            blocks.append(Block(d_model, mixer, MLP(d_model) if channel_mixer == "mlp" else None, short_conv))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # a mixer that needs a special start (a gate bias, a decay) sets it last
            custom_init = getattr(block.mixer, "init_weights", None)
            if callable(custom_init):
                custom_init()

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def _check_tokens(self, tokens: torch.Tensor, offset: int = 0) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = f"{tokens.dtype} tensor of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"expected token ids: an int64 tensor of shape (batch, length); got {got}")
        if self.pos is not None and offset + tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence of length {offset + tokens.shape[1]} exceeds max_len={self.max_len}")

    def _embed(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.embed(tokens)
        if self.pos is not None:
            positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
            x = x + self.pos(positions)
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, L)`` to next-token logits ``(B, L, vocab_size)``."""
        self._check_tokens(tokens)
        x = self._embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def supports_decoding(self) -> bool:
        """True when every sequence mixer implements ``decode_step``."""
        return all(hasattr(block.mixer, "decode_step") for block in self.blocks)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        """Run a prompt once; return the logits of its last position and the per-layer states."""
        self._check_tokens(tokens)
        if not self.supports_decoding():
            raise ValueError("every sequence mixer must implement decode_step to decode with states")
        x = self._embed(tokens)
        states: list[Any] = []
        for block in self.blocks:
            if hasattr(block.mixer, "prefill"):
                h = block.norm1(x)
                conv_state = None
                if block.conv is not None:
                    k = block.conv.kernel_size - 1
                    tail = h[:, -k:]
                    conv_state = torch.cat([h.new_zeros(h.shape[0], max(0, k - tail.shape[1]), h.shape[2]), tail], 1)
                    h = block.conv(h)
                y, mixer_state = block.mixer.prefill(h)
                state = (conv_state, mixer_state)
                x = x + y
                if block.channel_mixer is not None:
                    x = x + block.channel_mixer(block.norm2(x))
            else:  # build the state token by token
                state, outs = None, []
                for t in range(x.shape[1]):
                    out, state = block.decode_step(x[:, t : t + 1], state)
                    outs.append(out)
                x = torch.cat(outs, dim=1)
            states.append(state)
        return self.head(self.norm(x[:, -1])), states

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, states: list[Any], position: int) -> tuple[torch.Tensor, list[Any]]:
        """Feed one token per sequence (``(B,)`` ids) at ``position``; return logits ``(B, V)`` and new states."""
        if token.dim() != 1:
            raise ValueError(f"decode_step expects token ids of shape (batch,), got {tuple(token.shape)}")
        tokens = token[:, None]
        self._check_tokens(tokens, offset=position)
        x = self._embed(tokens, offset=position)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block.decode_step(x, state)
            new_states.append(state)
        return self.head(self.norm(x[:, -1])), new_states

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with cached states: returns ``(B, prompt_len + max_new_tokens)`` ids."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        logits, states = self.prefill(prompt)
        out = [prompt]
        position = prompt.shape[1]
        for _ in range(max_new_tokens):
            token = logits.argmax(dim=-1)
            out.append(token[:, None])
            if len(out) - 1 == max_new_tokens:
                break
            logits, states = self.decode_step(token, states, position)
            position += 1
        return torch.cat(out, dim=1)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
