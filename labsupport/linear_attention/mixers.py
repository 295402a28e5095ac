"""Chapter 03's mechanisms as sequence mixers for :class:`labsupport.lm.model.TinyLM`.

One module, :class:`LinearAttentionMixer`, covers every row of
:data:`~labsupport.linear_attention.mechanisms.MECHANISMS`: the rows share the
projections and differ in what the row says — the feature map, the gates
(a fixed decay per head, a data-dependent gate per key dimension or per head,
a writing strength ``β``), the sequence form and the step form.

``forward`` uses the row's sequence form (the chunkwise forms, which train
fast); ``decode_step`` its step form, with a state of ``n_heads × D × D``
numbers that never grows; ``prefill`` returns the output and the state after
the prompt. The tests prove that decoding token by token gives the same
outputs as ``forward``, for every row.

Use :func:`linear_mixer` to get a factory for ``TinyLM``::

    model = TinyLM(vocab, d_model=64, sequence_mixer=linear_mixer("deltanet", n_heads=2))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.validation import require_positive_int
from labsupport.linear_attention.mechanisms import FormOptions, MemoryInputs, get_mechanism
from labsupport.linear_attention.reference import retnet_log_decay

__all__ = ["LinearAttentionMixer", "linear_mixer"]

_GLA_RANK = 16
_GLA_NORMALISER = 16.0
_ALPHA_OFFSET = 5.0


class LinearAttentionMixer(nn.Module):
    """A causal sequence mixer with a fixed-size matrix memory per head.

    Args:
        d_model: width of the residual stream.
        n_heads: heads; each holds a ``(D, D)`` state with ``D = d_model // n_heads``.
        mechanism: a key of :data:`~labsupport.linear_attention.mechanisms.MECHANISMS`.
        chunk_size: chunk length of the chunkwise forms (capped by the row's ``max_chunk``).
        ttt_mini_batch: tokens per inner gradient step of ``ttt`` (TTT's default, 16). With a
            mini-batch as long as the sequence, every gradient is taken at the zero state and
            TTT-linear collapses to additive linear attention with write strength η.
        eps: normaliser epsilon of ``linear``.

    The gates' parameters, by the row's ``decay`` and ``beta``:

    * ``fixed``: a buffer ``log_gamma`` (RetNet's ``γ_h = 1 − 2^(−5−h)``), not learned;
    * ``vector_gate``: ``gate``, a rank-16 projection; ``α_t = σ(gate(x))^(1/16)`` per key dimension;
    * ``beta``: ``beta``, one ``β_t = σ(w·x)`` per head;
    * ``scalar_gate``: ``alpha``, one ``α_t = σ(w·x + 5)`` per head (starts near 0.993: remember by default).
    """

    def __init__(self, d_model: int, n_heads: int = 4, *, mechanism: str = "linear",
                 chunk_size: int = 64, ttt_mini_batch: int = 16, eps: float = 1e-6) -> None:
        super().__init__()
        spec = get_mechanism(mechanism)
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("chunk_size", chunk_size),
                            ("ttt_mini_batch", ttt_mini_batch)):
            require_positive_int(name, value)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.spec = spec
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.mechanism, self.chunk_size, self.eps = mechanism, chunk_size, eps
        self.ttt_mini_batch = ttt_mini_batch
        self.options = FormOptions(
            chunk_size=chunk_size if spec.max_chunk is None else min(chunk_size, spec.max_chunk),
            mini_batch=ttt_mini_batch, normalize=spec.normalize, eps=eps)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        # per-head output norm for the mechanisms without the normaliser (RetNet's group norm)
        self.head_norm = None if spec.normalize else nn.RMSNorm(self.head_dim)
        if spec.decay == "fixed":
            self.register_buffer("log_gamma", retnet_log_decay(n_heads, 1)[0, :, 0].float(), persistent=False)
        if spec.decay == "vector_gate":
            self.gate = nn.Sequential(nn.Linear(d_model, _GLA_RANK, bias=False),
                                      nn.Linear(_GLA_RANK, d_model, bias=True))
        if spec.beta:
            self.beta = nn.Linear(d_model, n_heads, bias=True)
        if spec.decay == "scalar_gate":
            self.alpha = nn.Linear(d_model, n_heads, bias=True)

    @property
    def state_numel(self) -> int:
        """Numbers in the recurrent state of one sequence (``n_heads × D × D``)."""
        return self.n_heads * self.head_dim * self.head_dim

    # ------------------------------------------------------------------ projections

    def _project(self, x: torch.Tensor) -> MemoryInputs:
        """Features, values and gates, all ``(B, H, L, ·)``."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input (batch, length, {self.d_model}), got {tuple(x.shape)}")
        b, length, _ = x.shape
        q, k, v = self.qkv(x).split(self.d_model, dim=-1)
        q, k, v = (t.view(b, length, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.spec.features(q, k)
        beta = torch.sigmoid(self.beta(x)).transpose(1, 2) if self.spec.beta else None  # (B, H, L)
        return MemoryInputs(q, k, v, self._log_decay(x), beta)

    def _log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        """``log α``: ``None``, ``(B, H, L)`` (fixed or a scalar gate) or ``(B, H, L, D)`` (a gate per dimension)."""
        b, length, _ = x.shape
        decay = self.spec.decay
        if decay == "fixed":
            return self.log_gamma.to(x.dtype)[None, :, None].expand(b, self.n_heads, length)
        if decay == "vector_gate":
            gate = F.logsigmoid(self.gate(x)) / _GLA_NORMALISER  # (B, L, d_model)
            return gate.view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        if decay == "scalar_gate":
            # the offset starts α near σ(5) ≈ 0.993 (remember by default); TinyLM zeroes every bias at init
            return F.logsigmoid(self.alpha(x) + _ALPHA_OFFSET).transpose(1, 2)
        return None

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        if self.head_norm is not None:
            y = self.head_norm(y)
        b, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, length, self.d_model))

    # ------------------------------------------------------------------ the two forms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``, causal."""
        return self.prefill(x)[0]

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Process a prompt; return its output and the state ``decode_step`` continues from."""
        y, state = self.spec.sequence_form(self._project(x), self.options)
        return self._merge(y), state

    def decode_step(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """One token ``(B, 1, d_model)``; the state has a fixed size whatever the context length."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"decode_step expects one token, shape (batch, 1, d_model); got {tuple(x.shape)}")
        y, state = self.spec.step_form(state, self._project(x).token(0), self.options)
        return self._merge(y[:, :, None]), state


def linear_mixer(mechanism: str, n_heads: int = 4, *, chunk_size: int = 64,
                 ttt_mini_batch: int = 16) -> Callable[[int, int], nn.Module]:
    """A ``TinyLM`` sequence-mixer factory building a :class:`LinearAttentionMixer` in every layer."""
    get_mechanism(mechanism)
    for name, value in (("n_heads", n_heads), ("chunk_size", chunk_size), ("ttt_mini_batch", ttt_mini_batch)):
        require_positive_int(name, value)

    def build(d_model: int, layer_index: int) -> nn.Module:
        return LinearAttentionMixer(d_model, n_heads, mechanism=mechanism, chunk_size=chunk_size,
                                    ttt_mini_batch=ttt_mini_batch)

    return build
