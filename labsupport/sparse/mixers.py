"""Sparse attention plugged into the ``lm`` bench, and the decode loops that score a policy.

* :func:`rotate_half_rope` — rotary position embeddings (RoPE) at arbitrary positions, so a cache can
  assign positions itself (StreamingLLM).
* :class:`SparseAttention` — multi-head causal attention with RoPE. ``forward`` (training, parallel
  evaluation) is dense causal attention, optionally under a static mask shared by all heads or one mask
  per head; ``decode_step`` runs one token through a :class:`~labsupport.sparse.policies.PolicyKVCache`
  under the module's ``policy``. :func:`sparse_mixer` is its ``TinyLM`` factory.
* :func:`set_policy` / :func:`set_static_mask` — switch every sparse layer of a trained model.
* :func:`decode_logits` — step a model through a batch token by token under a policy (bounded caches),
  returning the logits of every position; :func:`policy_recall` and :func:`streaming_perplexity` score them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.validation import require_int, require_positive_int, require_tensor
from labsupport.lm.contracts import MixerFactory
from labsupport.lm.tasks import IGNORE_INDEX, TaskBatch
from labsupport.sparse.policies import CachePolicy, PolicyKVCache

__all__ = [
    "SparseAttention",
    "decode_logits",
    "policy_recall",
    "rotate_half_rope",
    "set_policy",
    "set_static_mask",
    "sparse_mixer",
    "streaming_perplexity",
]


def rotate_half_rope(x: torch.Tensor, positions: torch.Tensor, *, base: float = 10_000.0) -> torch.Tensor:
    """Rotary embedding: rotate pairs ``(x_i, x_{i + D/2})`` by ``position · base^(−2i/D)``.

    ``x (..., T, D)`` with even ``D``; ``positions`` broadcastable to ``(..., T)`` (int or float).
    """
    require_tensor("x", x)
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {d}")
    adt = torch.float64 if x.dtype == torch.float64 else torch.float32
    freqs = base ** (-torch.arange(0, d // 2, dtype=adt, device=x.device) * 2.0 / d)
    angles = positions.to(adt)[..., None] * freqs  # (..., T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SparseAttention(nn.Module):
    """Causal multi-head attention with RoPE whose decode cache follows a :class:`CachePolicy`.

    Attributes:
        policy: the decode-time policy (default: the full cache).
        static_mask: ``None`` (plain causal), a bool ``(L, L)`` mask, one per head ``(H, L, L)``, or one per
            sequence ``(B, H or 1, L, L)``, used by ``forward``; it is intersected with the causal mask. A callable
            ``length -> mask`` works too.
    """

    def __init__(self, d_model: int, n_heads: int, *, policy: CachePolicy | None = None, rope_base: float = 10_000.0) -> None:
        super().__init__()
        d_model, n_heads = require_positive_int("d_model", d_model), require_positive_int("n_heads", n_heads)
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model={d_model} must split into n_heads={n_heads} heads of an even size")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.rope_base = float(rope_base)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.policy = policy or CachePolicy("full")
        self.static_mask: torch.Tensor | Callable[[int], torch.Tensor] | None = None
        self.last_attention: torch.Tensor | None = None  # (B, H, L, L) when record_attention is True
        self.record_attention = False  # also makes decode caches log which positions each step reads
        self._last_cache: PolicyKVCache | None = None
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length, _ = x.shape
        q, k, v = self.qkv(x).split(self.d_model, dim=-1)
        return tuple(t.view(b, length, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, length, self.d_model))

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE through a cached cos/sin table (decoding calls this at every step)."""
        needed = int(positions.max()) + 1 if positions.numel() else 1
        table = self._rope_table
        if table is None or table[0].shape[0] < needed or table[0].dtype != x.dtype or table[0].device != x.device:
            size = max(needed, 2 * (table[0].shape[0] if table is not None else 256))
            adt = torch.float64 if x.dtype == torch.float64 else torch.float32
            freqs = self.rope_base ** (-torch.arange(0, self.head_dim // 2, dtype=adt, device=x.device) * 2.0 / self.head_dim)
            angles = torch.arange(size, dtype=adt, device=x.device)[:, None] * freqs
            table = self._rope_table = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        cos, sin = (t[positions] for t in table)
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def _mask(self, length: int, device: torch.device) -> torch.Tensor:
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask = self.static_mask(length) if callable(self.static_mask) else self.static_mask
        if mask is None:
            return causal
        mask = require_tensor("static_mask", mask)
        if mask.dtype != torch.bool or tuple(mask.shape[-2:]) != (length, length) or mask.dim() not in (2, 3, 4):
            raise ValueError(f"static_mask must be a bool (L, L), (H, L, L) or (B, H or 1, L, L) tensor for "
                             f"L={length}, got {mask.dtype} {tuple(mask.shape)}")
        return mask.to(device) & causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d_model) → (B, L, d_model)``: causal attention (under ``static_mask`` when set)."""
        q, k, v = self._split(x)
        positions = torch.arange(x.shape[1], device=x.device)
        q, k = self._rotate(q, positions), self._rotate(k, positions)
        mask = self._mask(x.shape[1], x.device)
        if self.record_attention:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            self.last_attention = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).detach()
        if self.static_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._merge(y)

    def decode_step(self, x: torch.Tensor, state: PolicyKVCache | None) -> tuple[torch.Tensor, PolicyKVCache]:
        """One token ``(B, 1, d_model)``; the cache follows ``self.policy`` (bounded for eviction policies)."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"decode_step expects one token, shape (batch, 1, d_model); got {tuple(x.shape)}")
        q, k, v = self._split(x)
        if state is None:
            state = PolicyKVCache(self.policy, x.shape[0], self.n_heads, self.head_dim, dtype=x.dtype, device=x.device,
                                  record=self.record_attention)
        y = state.attend(q, k, v, rotate=self._rotate)
        if self.record_attention:
            self._last_cache = state  # for the explorer: which positions each step read
        return self._merge(y), state

    def cache_bytes(self, state: PolicyKVCache) -> int:
        """Bytes of keys and values the cache holds."""
        return state.nbytes


def sparse_mixer(n_heads: int = 4, *, policy: CachePolicy | None = None) -> MixerFactory:
    """A ``TinyLM`` factory building :class:`SparseAttention` (RoPE; use ``positional="none"``) in every layer."""
    n_heads = require_positive_int("n_heads", n_heads)

    def build(d_model: int, layer_index: int) -> nn.Module:
        return SparseAttention(d_model, n_heads, policy=policy)
    return build


def _sparse_layers(model: nn.Module) -> list[SparseAttention]:
    layers = [m for m in model.modules() if isinstance(m, SparseAttention)]
    if not layers:
        raise ValueError("the model has no SparseAttention layer (build it with sequence_mixer=sparse_mixer(...))")
    return layers


def set_policy(model: nn.Module, policy: CachePolicy, *, dense_layers: int = 0) -> None:
    """Give every :class:`SparseAttention` layer of ``model`` the decode policy ``policy``.

    The first ``dense_layers`` layers keep the full cache instead (Quest leaves the first two layers of its
    models dense, where attention is least sparse).
    """
    if not isinstance(policy, CachePolicy):
        raise TypeError(f"policy must be a CachePolicy, got {type(policy).__name__}")
    layers = _sparse_layers(model)
    dense_layers = require_int("dense_layers", dense_layers, minimum=0, maximum=len(layers))
    for index, layer in enumerate(layers):
        layer.policy = CachePolicy("full") if index < dense_layers else policy


def set_static_mask(model: nn.Module, mask: torch.Tensor | Callable[[int], torch.Tensor] | None,
                    *, layer: int | None = None) -> None:
    """Set the ``forward`` mask of every sparse layer (or of layer number ``layer``); ``None`` restores causal."""
    layers = _sparse_layers(model)
    chosen = layers if layer is None else [layers[require_int("layer", layer, minimum=0, maximum=len(layers) - 1)]]
    for module in chosen:
        module.static_mask = mask


@torch.no_grad()
def decode_logits(model: nn.Module, tokens: torch.Tensor, policy: CachePolicy, *,
                  dense_layers: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Feed ``tokens (B, L)`` one at a time through ``model.decode_step`` under ``policy``.

    ``dense_layers``: the first layers keep the full cache (:func:`set_policy`). Returns the logits of every
    position ``(B, L, V)`` and the tokens each step of the last layer read.
    """
    tokens = require_tensor("tokens", tokens, ndim=2)
    set_policy(model, policy, dense_layers=dense_layers)
    model.eval()
    states: list = [None] * len(model.blocks)
    logits = []
    for t in range(tokens.shape[1]):
        step_logits, states = model.decode_step(tokens[:, t], states, t)
        logits.append(step_logits)
    cache = states[-1][1]
    return torch.stack(logits, dim=1), list(cache.tokens_read)


def policy_recall(model: nn.Module, batch: TaskBatch, policy: CachePolicy, *, dense_layers: int = 0) -> float:
    """Argmax accuracy at the scored positions of ``batch`` when decoding under ``policy`` (see :func:`decode_logits`)."""
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"policy_recall expects a TaskBatch, got {type(batch).__name__}")
    logits, _ = decode_logits(model, batch.inputs, policy, dense_layers=dense_layers)
    scored = batch.targets != IGNORE_INDEX
    return float((logits.argmax(dim=-1)[scored] == batch.targets[scored]).float().mean())


def streaming_perplexity(model: nn.Module, tokens: torch.Tensor, policy: CachePolicy, *, start: int = 0) -> float:
    """Perplexity of next-token predictions at positions ``≥ start`` of ``tokens (B, L)``, decoding under ``policy``."""
    tokens = require_tensor("tokens", tokens, ndim=2)
    start = require_int("start", start, minimum=0, maximum=tokens.shape[1] - 2)
    logits, _ = decode_logits(model, tokens[:, :-1], policy)
    loss = F.cross_entropy(logits[:, start:].reshape(-1, logits.shape[-1]), tokens[:, start + 1:].reshape(-1))
    return math.exp(float(loss))
