"""Chapter 03's mechanisms as sequence mixers for :class:`labsupport.lm.model.TinyLM`.

One module, :class:`LinearAttentionMixer`, covers every mechanism of the
chapter; they share the projections and differ in the feature map, the
forgetting and the writing rule:

============== ============================ ================================== ==========================
mechanism      q, k features                forget (per token)                 write
============== ============================ ================================== ==========================
linear         elu + 1, normalised output   nothing                            k vᵀ
retnet         q·D^-½, k                    fixed γ_h = 1 − 2^(−5−h)           k vᵀ
gla            q·D^-½, k                    α_t = σ(low-rank(x))^(1/16), per   k vᵀ
                                            key dimension
deltanet       L2-normalised silu           (I − β_t k kᵀ)                     β_t k vᵀ, β = σ(w·x)
gated_deltanet L2-normalised silu           α_t (I − β_t k kᵀ), α = σ(w·x + 5)  β_t k vᵀ
ttt            L2-normalised silu           one gradient step per mini-batch   (η_t, mini-batch 16)
============== ============================ ================================== ==========================

``forward`` uses the chunkwise forms (the ones that train fast); ``decode_step``
uses the recurrent step with a state of ``n_heads × D × D`` numbers that never
grows; ``prefill`` returns the output and the state after the prompt. The
tests prove that decoding token by token gives the same outputs as ``forward``.

Use :func:`linear_mixer` to get a factory for ``TinyLM``::

    model = TinyLM(vocab, d_model=64, sequence_mixer=linear_mixer("deltanet", n_heads=2))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.linear_attention import (
    delta_rule_chunkwise,
    delta_rule_step,
    linear_attention_chunkwise,
    recurrent_step,
    ttt_linear_minibatch,
)

__all__ = ["MIXER_MECHANISMS", "LinearAttentionMixer", "linear_mixer"]

MIXER_MECHANISMS = ("linear", "retnet", "gla", "deltanet", "gated_deltanet", "ttt")

_GLA_RANK = 16
_GLA_NORMALISER = 16.0
_ALPHA_OFFSET = 5.0


class LinearAttentionMixer(nn.Module):
    """A causal sequence mixer with a fixed-size matrix memory per head.

    Args:
        d_model: width of the residual stream.
        n_heads: heads; each holds a ``(D, D)`` state with ``D = d_model // n_heads``.
        mechanism: one of :data:`MIXER_MECHANISMS`.
        chunk_size: chunk length of the chunkwise forms.
        ttt_mini_batch: tokens per inner gradient step of ``ttt`` (TTT's default, 16). With a
            mini-batch as long as the sequence, every gradient is taken at the zero state and
            TTT-linear collapses to additive linear attention with write strength η.
        eps: normaliser epsilon of ``linear``.
    """

    def __init__(self, d_model: int, n_heads: int = 4, *, mechanism: str = "linear",
                 chunk_size: int = 64, ttt_mini_batch: int = 16, eps: float = 1e-6) -> None:
        super().__init__()
        if mechanism not in MIXER_MECHANISMS:
            raise ValueError(f"mechanism must be one of {MIXER_MECHANISMS}, got {mechanism!r}")
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("chunk_size", chunk_size),
                            ("ttt_mini_batch", ttt_mini_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.mechanism, self.chunk_size, self.eps = mechanism, chunk_size, eps
        self.ttt_mini_batch = ttt_mini_batch
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        # per-head output norm for the unnormalised mechanisms (RetNet's group norm)
        self.head_norm = nn.RMSNorm(self.head_dim) if mechanism != "linear" else None
        if mechanism == "retnet":
            gamma = 1.0 - 2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64))
            self.register_buffer("log_gamma", gamma.log().float(), persistent=False)
        if mechanism == "gla":
            self.gate = nn.Sequential(nn.Linear(d_model, _GLA_RANK, bias=False),
                                      nn.Linear(_GLA_RANK, d_model, bias=True))
        if mechanism in ("deltanet", "gated_deltanet", "ttt"):
            self.beta = nn.Linear(d_model, n_heads, bias=True)
        if mechanism == "gated_deltanet":
            self.alpha = nn.Linear(d_model, n_heads, bias=True)
        if mechanism == "ttt":
            self.base_lr = 1.0

    @property
    def state_numel(self) -> int:
        """Numbers in the recurrent state of one sequence (``n_heads × D × D``)."""
        return self.n_heads * self.head_dim * self.head_dim

    # ------------------------------------------------------------------ projections

    def _project(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features, values and per-token parameters, all ``(B, H, L, ·)``."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input (batch, length, {self.d_model}), got {tuple(x.shape)}")
        b, length, _ = x.shape
        q, k, v = self.qkv(x).split(self.d_model, dim=-1)
        q, k, v = (t.view(b, length, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        m = self.mechanism
        parts: dict[str, torch.Tensor] = {"v": v}
        if m == "linear":
            parts["q"], parts["k"] = F.elu(q) + 1.0, F.elu(k) + 1.0
        elif m in ("retnet", "gla"):
            parts["q"], parts["k"] = q / math.sqrt(self.head_dim), k
        else:
            parts["q"], parts["k"] = F.normalize(F.silu(q), dim=-1), F.normalize(F.silu(k), dim=-1)
        if m == "retnet":
            parts["log_decay"] = self.log_gamma.to(x.dtype)[None, :, None].expand(b, self.n_heads, length)
        if m == "gla":
            gate = F.logsigmoid(self.gate(x)) / _GLA_NORMALISER  # (B, L, d_model)
            parts["log_decay"] = gate.view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        if m in ("deltanet", "gated_deltanet", "ttt"):
            parts["beta"] = torch.sigmoid(self.beta(x)).transpose(1, 2)  # (B, H, L)
        if m == "gated_deltanet":
            # the offset starts α near σ(5) ≈ 0.993 (remember by default); TinyLM zeroes every bias at init
            parts["log_decay"] = F.logsigmoid(self.alpha(x) + _ALPHA_OFFSET).transpose(1, 2)
        return parts

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        if self.head_norm is not None:
            y = self.head_norm(y)
        b, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, length, self.d_model))

    # ------------------------------------------------------------------ sequence forms

    def _sequence(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        p = self._project(x)
        m = self.mechanism
        if m in ("linear", "retnet", "gla"):
            chunk = min(self.chunk_size, 16) if m == "gla" else self.chunk_size  # GLA's chunk holds C×C×D
            y, state = linear_attention_chunkwise(p["q"], p["k"], p["v"], p.get("log_decay"), chunk_size=chunk,
                                                  normalize=(m == "linear"), eps=self.eps, return_state=True)
        elif m in ("deltanet", "gated_deltanet"):
            y, state = delta_rule_chunkwise(p["q"], p["k"], p["v"], p["beta"], p.get("log_decay"),
                                            chunk_size=self.chunk_size, return_state=True)
        else:
            y, state = self._ttt_sequence(p)
        return self._merge(y), state

    def _ttt_sequence(self, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        length, mb = p["q"].shape[2], self.ttt_mini_batch
        eta = self.base_lr * p["beta"]
        full = (length // mb) * mb
        y, start = ttt_linear_minibatch(p["q"][:, :, :full], p["k"][:, :, :full], p["v"][:, :, :full],
                                        eta[:, :, :full], mini_batch=mb, return_state=True) if full else (
            p["v"][:, :, :0], None)
        state = (start, start, 0) if start is not None else None
        if full < length:  # a partial last mini-batch: continue token by token to get the decode state
            outs = [y]
            for t in range(full, length):
                o, state = self._ttt_token(state, p["q"][:, :, t], p["k"][:, :, t], p["v"][:, :, t], eta[:, :, t])
                outs.append(o[:, :, None])
            y = torch.cat(outs, dim=2)
        return y, state

    def _ttt_token(self, state: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   eta: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """One token of TTT-linear; the state is (S at the mini-batch start, S now, tokens into the batch)."""
        if state is None:
            zero = k.new_zeros(*k.shape, v.shape[-1])
            state = (zero, zero, 0)
        start, current, count = state
        error = (k[..., :, None] * start).sum(dim=-2) - v  # gradient taken at the mini-batch start
        current = current - k[..., :, None] * (eta[..., None] * error)[..., None, :]
        out = (q[..., :, None] * current).sum(dim=-2)
        count += 1
        if count == self.ttt_mini_batch:
            start, count = current, 0
        return out, (start, current, count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``, causal."""
        return self._sequence(x)[0]

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Process a prompt; return its output and the state ``decode_step`` continues from."""
        return self._sequence(x)

    def decode_step(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """One token ``(B, 1, d_model)``; the state has a fixed size whatever the context length."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"decode_step expects one token, shape (batch, 1, d_model); got {tuple(x.shape)}")
        p = {name: t[:, :, 0] for name, t in self._project(x).items()}
        m = self.mechanism
        if m == "ttt":
            y, state = self._ttt_token(state, p["q"], p["k"], p["v"], self.base_lr * p["beta"])
        elif m in ("deltanet", "gated_deltanet"):
            if state is None:
                state = x.new_zeros(x.shape[0], self.n_heads, self.head_dim, self.head_dim)
            if m == "gated_deltanet":
                state = p["log_decay"].exp()[..., None, None] * state
            state = delta_rule_step(state, p["k"], p["v"], p["beta"])
            y = (p["q"][..., :, None] * state).sum(dim=-2)
        else:
            v = p["v"]
            if m == "linear":  # the normaliser rides along as a column of ones
                v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
            if state is None:
                state = x.new_zeros(x.shape[0], self.n_heads, self.head_dim, v.shape[-1])
            y, state = recurrent_step(state, p["q"], p["k"], v, p.get("log_decay"))
            if m == "linear":
                y = y[..., :-1] / (y[..., -1:] + self.eps)
        return self._merge(y[:, :, None]), state


def linear_mixer(mechanism: str, n_heads: int = 4, *, chunk_size: int = 64,
                 ttt_mini_batch: int = 16) -> Callable[[int, int], nn.Module]:
    """A ``TinyLM`` sequence-mixer factory building a :class:`LinearAttentionMixer` in every layer."""
    if mechanism not in MIXER_MECHANISMS:
        raise ValueError(f"mechanism must be one of {MIXER_MECHANISMS}, got {mechanism!r}")

    def build(d_model: int, layer_index: int) -> nn.Module:
        return LinearAttentionMixer(d_model, n_heads, mechanism=mechanism, chunk_size=chunk_size,
                                    ttt_mini_batch=ttt_mini_batch)

    return build
