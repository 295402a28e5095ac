"""A tiny language model with a pluggable sequence mixer and channel mixer: the bench of every chapter.

Every chapter drops its mechanism into the same model, so recall and cost are
compared like for like. A block is pre-norm and residual::

    x = x + sequence_mixer(norm(conv(x)))  # mixes information across positions
    x = x + channel_mixer(norm(x))         # mixes features within a position (an MLP, experts), optional

What a plugged-in module must do is written in :mod:`labsupport.lm.contracts`.
A :class:`Block` prefills and decodes itself; :class:`TinyLM` only asks its
blocks. The model is causal (a decoder) unless built with ``causal=False``
(a bidirectional denoiser for masked diffusion), in which case every mixer
must be bidirectional too and token-by-token decoding is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from labsupport.harness.validation import require_choice, require_int, require_positive_int
from labsupport.lm.contracts import ChannelMixerFactory, CustomInit, DecodingMixer, MixerFactory, is_causal
from labsupport.lm.layers import MLP, ShortConv, attention_mixer

__all__ = ["Block", "TinyLM", "count_parameters"]


class Block(nn.Module):
    """Pre-norm residual block: optional short convolution, a sequence mixer, an optional channel mixer.

    The block's decoding state is ``(conv_state, mixer_state)``. A mixer whose attribute
    ``replaces_block_conv`` is true brings its own short convolution (Mamba's block, as Zoology builds it),
    so the block puts none in front of it even when ``short_conv`` asks for one.
    """

    def __init__(self, d_model: int, mixer: nn.Module, channel_mixer: nn.Module | None,
                 short_conv: int = 0) -> None:
        super().__init__()
        own_conv = bool(getattr(mixer, "replaces_block_conv", False))
        self.conv = ShortConv(d_model, short_conv) if short_conv and not own_conv else None
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model) if channel_mixer is not None else None
        self.channel_mixer = channel_mixer

    def _channel(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_mixer is None:
            return x
        return x + self.channel_mixer(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.conv is not None:
            h = self.conv(h)
        return self._channel(x + self.mixer(h))

    def can_decode(self) -> bool:
        """True when the sequence mixer is causal and implements ``decode_step``."""
        return is_causal(self.mixer) and callable(getattr(self.mixer, "decode_step", None))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[Any, Any]]:
        """A whole prompt ``(B, L, d_model)``: the block's output and its state after the last position.

        A mixer with ``prefill`` processes the prompt at once; one without is
        stepped through it position by position with ``decode_step``.
        """
        if not isinstance(self.mixer, DecodingMixer):
            state: Any = None
            outputs = []
            for t in range(x.shape[1]):
                y, state = self.decode_step(x[:, t : t + 1], state)
                outputs.append(y)
            return torch.cat(outputs, dim=1), state
        h = self.norm1(x)
        conv_state = None
        if self.conv is not None:
            h, conv_state = self.conv.prefill(h)
        y, mixer_state = self.mixer.prefill(h)
        return self._channel(x + y), (conv_state, mixer_state)

    def decode_step(self, x: torch.Tensor, state: tuple[Any, Any] | None) -> tuple[torch.Tensor, tuple[Any, Any]]:
        """One position ``(B, 1, d_model)``; ``state`` is ``(conv_state, mixer_state)``, ``None`` at the start."""
        conv_state, mixer_state = state if state is not None else (None, None)
        h = self.norm1(x)
        if self.conv is not None:
            h, conv_state = self.conv.decode_step(h, conv_state)
        y, mixer_state = self.mixer.decode_step(h, mixer_state)
        return self._channel(x + y), (conv_state, mixer_state)


class TinyLM(nn.Module):
    """A small language model with pluggable mixers: a decoder, or a bidirectional denoiser.

    Args:
        vocab_size: number of token ids.
        d_model: width of the residual stream.
        n_layers: number of blocks.
        max_len: longest sequence (size of the learned position table).
        sequence_mixer: ``"attention"`` or a factory ``(d_model, layer_index) -> nn.Module``
            (see :mod:`labsupport.lm.contracts`).
        channel_mixer: ``"mlp"`` for an MLP in every block, ``None`` for mixer-only
            blocks (as in Zoology's MQAR experiments), or a factory
            ``(d_model, layer_index) -> nn.Module`` (a mixture of experts, say).
        n_heads: heads of the default attention mixer.
        positional: ``"learned"`` absolute position embeddings, or ``"none"``
            for mixers that carry position themselves (recurrences, convolutions).
        short_conv: kernel size of a :class:`~labsupport.lm.layers.ShortConv` in front of
            every sequence mixer (0 for none; causal models only), except a mixer that says
            ``replaces_block_conv = True`` (it has its own; see :class:`Block`). A width of 3-4 lets a
            2-layer model learn associative recall in about a minute on a CPU.
        causal: ``True`` for a decoder (next-token prediction); ``False`` for a
            bidirectional model (every position sees every other), whose mixers
            must then all say ``causal = False``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        max_len: int = 256,
        sequence_mixer: str | MixerFactory = "attention",
        channel_mixer: str | ChannelMixerFactory | None = "mlp",
        *,
        n_heads: int = 4,
        positional: str = "learned",
        short_conv: int = 0,
        causal: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("n_layers", n_layers), ("max_len", max_len)):
            require_positive_int(name, value)
        require_choice("positional", positional, ("learned", "none"))
        short_conv = require_int("short_conv", short_conv, minimum=0)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        if short_conv and not causal:
            raise ValueError("short_conv is a causal convolution; a bidirectional model (causal=False) takes none")
        mixer_factory = self._mixer_factory(sequence_mixer, n_heads, causal)
        channel_factory = self._channel_factory(channel_mixer)
        self.vocab_size, self.d_model, self.max_len, self.causal = vocab_size, d_model, max_len, causal
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model) if positional == "learned" else None
        blocks = []
        for i in range(n_layers):
            mixer = self._built("sequence-mixer", mixer_factory(d_model, i))
            if is_causal(mixer) != causal:
                kind = "causal" if causal else "bidirectional"
                raise ValueError(f"layer {i}: a {kind} model needs {kind} mixers, but the factory built "
                                 f"{type(mixer).__name__} with causal={is_causal(mixer)}")
            channel = None if channel_factory is None else self._built("channel-mixer", channel_factory(d_model, i))
            blocks.append(Block(d_model, mixer, channel, short_conv))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        for module in self.modules():  # a module that needs a special start (a gate bias, a decay) sets it last
            if module is not self and isinstance(module, CustomInit):
                module.init_weights()

    @staticmethod
    def _mixer_factory(sequence_mixer: str | MixerFactory, n_heads: int, causal: bool) -> MixerFactory:
        if sequence_mixer == "attention":
            return attention_mixer(n_heads, causal=causal)
        if callable(sequence_mixer):
            return sequence_mixer
        raise ValueError(
            "sequence_mixer must be 'attention' or a factory (d_model, layer_index) -> nn.Module, "
            f"got {sequence_mixer!r}"
        )

    @staticmethod
    def _channel_factory(channel_mixer: str | ChannelMixerFactory | None) -> ChannelMixerFactory | None:
        if channel_mixer is None:
            return None
        if channel_mixer == "mlp":
            return lambda d_model, layer_index: MLP(d_model)
        if callable(channel_mixer):
            return channel_mixer
        raise ValueError(
            "channel_mixer must be 'mlp', None or a factory (d_model, layer_index) -> nn.Module, "
            f"got {channel_mixer!r}"
        )

    @staticmethod
    def _built(kind: str, module: object) -> nn.Module:
        if not isinstance(module, nn.Module):
            raise TypeError(f"the {kind} factory must return an nn.Module, got {type(module).__name__}")
        return module

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def _require_tokens(self, tokens: torch.Tensor, offset: int = 0) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = (f"{tokens.dtype} tensor of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor)
                   else type(tokens).__name__)
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
        """Token ids ``(B, L)`` to logits ``(B, L, vocab_size)`` (next-token logits for a causal model)."""
        self._require_tokens(tokens)
        x = self._embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def supports_decoding(self) -> bool:
        """True when every block can decode token by token (causal mixers with ``decode_step``)."""
        return all(block.can_decode() for block in self.blocks)

    def _require_decoding(self) -> None:
        if not self.causal:
            raise ValueError("a bidirectional model (causal=False) cannot decode token by token")
        if not self.supports_decoding():
            raise ValueError("every sequence mixer must implement decode_step to decode with states")

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        """Run a prompt once; return the logits of its last position and the per-layer states."""
        self._require_tokens(tokens)
        self._require_decoding()
        x = self._embed(tokens)
        states: list[Any] = []
        for block in self.blocks:
            x, state = block.prefill(x)
            states.append(state)
        return self.head(self.norm(x[:, -1])), states

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, states: list[Any], position: int) -> tuple[torch.Tensor, list[Any]]:
        """Feed one token per sequence (``(B,)`` ids) at ``position``; return logits ``(B, V)`` and new states."""
        if not isinstance(token, torch.Tensor) or token.dim() != 1:
            got = tuple(token.shape) if isinstance(token, torch.Tensor) else type(token).__name__
            raise ValueError(f"decode_step expects token ids of shape (batch,), got {got}")
        self._require_decoding()
        if len(states) != len(self.blocks):
            raise ValueError(f"expected one state per layer ({len(self.blocks)}), got {len(states)}")
        position = require_int("position", position, minimum=0)
        tokens = token[:, None]
        self._require_tokens(tokens, offset=position)
        x = self._embed(tokens, offset=position)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block.decode_step(x, state)
            new_states.append(state)
        return self.head(self.norm(x[:, -1])), new_states

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with cached states: returns ``(B, prompt_len + max_new_tokens)`` ids."""
        max_new_tokens = require_int("max_new_tokens", max_new_tokens, minimum=0)
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
