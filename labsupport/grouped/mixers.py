"""Chapter 02's sequence mixers for :class:`~labsupport.lm.model.TinyLM`: GQA/MQA and MLA, with their caches.

* :class:`GroupedQueryAttention` (factory :func:`grouped_mixer`) — causal attention with
  ``n_kv_heads`` key/value heads, prefill and a cached decode step that does not copy the cache,
  optionally with a KIVI-style quantised cache; :func:`mean_pool_kv_heads` converts an MHA
  checkpoint to GQA the way the GQA paper's uptraining starts (mean of the K and V heads in each group).
* :class:`LatentAttention` (factory :func:`latent_mixer`) — multi-head latent attention (MLA,
  DeepSeek-V2, arXiv:2405.04434): a low-rank joint KV latent ``c_KV`` of size ``d_c`` plus a
  decoupled RoPE key of size ``d_h^R``, cached in a :class:`LatentCache`; ``forward`` is the naive
  form (up-project, then attend), ``decode_step`` the absorbed form that caches only ``[c_KV, k^R]``.

Both implement the ``lm`` contracts (:mod:`labsupport.lm.contracts`): ``DecodingMixer``
(``prefill``, ``decode_step``) and ``CacheReport`` (``cache_bytes(state)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.grouped.quantization import QuantizedKVCache, QuantSpec, quantized_cache_attention
from labsupport.grouped.reference import grouped_decode_step, latent_attention_core, repeat_kv, rotary
from labsupport.harness.costs import cache_elements_per_token, mla_elements_per_token
from labsupport.harness.validation import require_int, require_positive_int
from labsupport.lm.contracts import MixerFactory
from labsupport.lm.layers import KVCache

__all__ = [
    "GroupedQueryAttention",
    "LatentAttention",
    "LatentCache",
    "grouped_mixer",
    "latent_mixer",
    "mean_pool_kv_heads",
]

#: ``scaled_dot_product_attention(..., enable_gqa=True)`` exists from torch 2.5 on.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _require_one_token(x: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"decode_step expects one token, shape (batch, 1, d_model); got {tuple(x.shape)}")


def _require_activations(x: torch.Tensor, d_model: int) -> None:
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"expected input (batch, length, {d_model}), got {tuple(x.shape)}")


def _require_divides(n_kv_heads: int, n_heads: int) -> None:
    if n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")


# ----------------------------------------------------------------------------- MHA / GQA / MQA

class GroupedQueryAttention(nn.Module):
    """Causal attention with ``n_kv_heads`` key/value heads shared by ``n_heads`` query heads.

    ``n_kv_heads = n_heads`` is MHA, ``1`` is MQA, anything in between that divides ``n_heads``
    is GQA. The cache holds ``2 · n_kv_heads · head_dim`` numbers per token.

    Set :attr:`kv_quant` to a :class:`~labsupport.grouped.quantization.QuantSpec` to run with a
    KIVI-style quantised cache (inference only): ``forward`` then simulates exactly what
    ``decode_step`` computes with a :class:`~labsupport.grouped.quantization.QuantizedKVCache`
    (the tests prove it), so recall and perplexity can be measured in one forward pass.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *, bias: bool = False) -> None:
        super().__init__()
        d_model = require_positive_int("d_model", d_model)
        n_heads = require_positive_int("n_heads", n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else require_positive_int("n_kv_heads", n_kv_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        _require_divides(n_kv_heads, n_heads)
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.kv = nn.Linear(d_model, 2 * n_kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.kv_quant: QuantSpec | None = None

    @property
    def cache_elements_per_token(self) -> int:
        """Numbers cached per token in this layer: ``2 · n_kv_heads · head_dim``."""
        return cache_elements_per_token(self.n_kv_heads, self.head_dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, L, d_model)`` → q ``(B, H, L, D)``, k and v ``(B, G, L, D)``."""
        _require_activations(x, self.d_model)
        b, length, _ = x.shape
        q = self.q(x).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, length, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, length, self.n_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kv_quant is not None:
            return quantized_cache_attention(q, k, v, self.kv_quant)
        if self.n_kv_heads != self.n_heads and not _SDPA_HAS_GQA:  # torch < 2.5: repeat the KV heads instead
            n_rep = self.n_heads // self.n_kv_heads
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        extra = {"enable_gqa": True} if self.n_kv_heads != self.n_heads and _SDPA_HAS_GQA else {}
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``, causal."""
        return self._merge(self._attend(*self.project(x)))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, KVCache | QuantizedKVCache]:
        """Process a prompt; return its output and the filled cache (quantised when :attr:`kv_quant` is set)."""
        q, k, v = self.project(x)
        cache = self._empty_cache(x, capacity=max(16, x.shape[1]))
        cache.append(k, v)
        return self._merge(self._attend(q, k, v)), cache

    def _empty_cache(self, x: torch.Tensor, capacity: int = 16) -> KVCache | QuantizedKVCache:
        if self.kv_quant is not None:
            return QuantizedKVCache(self.kv_quant)
        return KVCache.empty(x.shape[0], self.n_kv_heads, self.head_dim, capacity=capacity,
                             dtype=x.dtype, device=x.device)

    def decode_step(self, x: torch.Tensor, state: KVCache | QuantizedKVCache | None
                    ) -> tuple[torch.Tensor, KVCache | QuantizedKVCache]:
        """One new token ``(B, 1, d_model)`` attends to the cache (``None`` at the first token)."""
        _require_one_token(x)
        q, k, v = self.project(x)
        if state is None:
            state = self._empty_cache(x)
        state.append(k, v)
        keys, values = state.view()
        return self._merge(grouped_decode_step(q, keys, values)), state

    def cache_bytes(self, state: KVCache | QuantizedKVCache) -> int:
        """Bytes held in ``state``: keys and values, or packed codes, scales and the full-precision window."""
        if not isinstance(state, (KVCache, QuantizedKVCache)):
            raise TypeError(f"state must be a KVCache or a QuantizedKVCache, got {type(state).__name__}")
        return state.nbytes


def grouped_mixer(n_heads: int, n_kv_heads: int | None = None) -> MixerFactory:
    """A :class:`~labsupport.lm.model.TinyLM` factory building :class:`GroupedQueryAttention` in every layer."""
    require_positive_int("n_heads", n_heads)
    if n_kv_heads is not None:
        _require_divides(require_positive_int("n_kv_heads", n_kv_heads), n_heads)

    def build(d_model: int, layer_index: int) -> nn.Module:
        return GroupedQueryAttention(d_model, n_heads, n_kv_heads)
    return build


@torch.no_grad()
def mean_pool_kv_heads(attention: GroupedQueryAttention, n_kv_heads: int) -> GroupedQueryAttention:
    """A new :class:`GroupedQueryAttention` with ``n_kv_heads`` KV heads, each the mean of its group.

    The GQA paper's conversion of a multi-head checkpoint: the key (and value) projection of
    each new KV head is the average of the projections of the heads it replaces; queries and the
    output projection are copied. ``attention`` may itself be grouped; its KV-head count must be
    a multiple of ``n_kv_heads``.
    """
    if not isinstance(attention, GroupedQueryAttention):
        raise TypeError(f"attention must be a GroupedQueryAttention, got {type(attention).__name__}")
    n_kv_heads = require_positive_int("n_kv_heads", n_kv_heads)
    old = attention.n_kv_heads
    if old % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} must divide the current number of KV heads ({old})")
    has_bias = attention.q.bias is not None
    new = GroupedQueryAttention(attention.d_model, attention.n_heads, n_kv_heads, bias=has_bias)
    new.to(device=attention.q.weight.device, dtype=attention.q.weight.dtype)
    new.q.load_state_dict(attention.q.state_dict())
    new.out.load_state_dict(attention.out.state_dict())
    d, pool = attention.head_dim, old // n_kv_heads
    w = attention.kv.weight.view(2, n_kv_heads, pool, d, attention.d_model).mean(dim=2)
    new.kv.weight.copy_(w.reshape(2 * n_kv_heads * d, attention.d_model))
    if has_bias:
        new.kv.bias.copy_(attention.kv.bias.view(2, n_kv_heads, pool, d).mean(dim=2).reshape(-1))
    new.kv_quant = attention.kv_quant
    return new


# ----------------------------------------------------------------------------- MLA

class LatentCache:
    """The MLA cache: ``[c_KV, k^R]`` of every token, ``(B, 1, T, d_c + d_R)``, growing by doubling."""

    def __init__(self, batch: int, width: int, *, dtype: torch.dtype, device: torch.device | str,
                 capacity: int = 16) -> None:
        self.data = torch.empty(batch, 1, capacity, width, dtype=dtype, device=device)
        self.length = 0

    def append(self, rows: torch.Tensor) -> None:
        """Append ``(B, 1, new, d_c + d_R)``."""
        needed = self.length + rows.shape[2]
        if needed > self.data.shape[2]:
            self.data = F.pad(self.data, (0, 0, 0, max(needed, 2 * self.data.shape[2]) - self.data.shape[2]))
        self.data[:, :, self.length:needed] = rows
        self.length = needed

    def view(self) -> torch.Tensor:
        """The filled part, ``(B, 1, T, d_c + d_R)``."""
        return self.data[:, :, : self.length]

    @property
    def nbytes(self) -> int:
        """Bytes held by the filled part of the cache."""
        t = self.view()
        return t.numel() * t.element_size()


class LatentAttention(nn.Module):
    """Multi-head latent attention (MLA) with a decoupled RoPE key, as in DeepSeek-V2.

    Per token: ``c = x W_DKV`` (``d_c``), keys ``k_h = [c W_UK,h ; rope(x W_KR)]`` (the RoPE part
    shared by all heads), values ``v_h = c W_UV,h``, queries ``q_h = [x W_Q,h ; rope(x W_QR,h)]``,
    scores scaled by ``1/√(d_h + d_R)``. As in DeepSeek-V2, ``c`` is RMS-normalised before it is
    cached (without it, the two small-initialised factors ``W_DKV W_UK`` make keys tiny and training
    slow). DeepSeek-V2 also compresses the queries; that does not change the cache and is left out.

    ``forward`` and ``prefill`` use the naive form: up-project every cached latent to per-head keys
    and values, then attend. ``decode_step`` uses the absorbed form (``absorbed=False`` to compare):
    the query is mapped into latent space by ``W_UK,h``, attends over the cached ``[c, k^R]``
    directly — a multi-query attention with key width ``d_c + d_R`` and value width ``d_c`` — and
    ``W_UV,h`` is applied to the attended latent. The cache holds ``d_c + d_R`` numbers per token.
    """

    def __init__(self, d_model: int, n_heads: int, latent_dim: int, rope_dim: int, *,
                 head_dim: int | None = None) -> None:
        super().__init__()
        d_model = require_positive_int("d_model", d_model)
        n_heads = require_positive_int("n_heads", n_heads)
        latent_dim = require_positive_int("latent_dim", latent_dim)
        rope_dim = require_int("rope_dim", rope_dim, minimum=0)
        if rope_dim % 2:
            raise ValueError(f"rope_dim must be even (RoPE rotates pairs), got {rope_dim}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads} (or pass head_dim)")
            head_dim = d_model // n_heads
        head_dim = require_positive_int("head_dim", head_dim)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.latent_dim, self.rope_dim = latent_dim, rope_dim
        self.absorbed = True
        self.w_dkv = nn.Linear(d_model, latent_dim, bias=False)              # down-projection to c_KV
        self.latent_norm = nn.RMSNorm(latent_dim)                           # as DeepSeek-V2: c_KV is normalised
        self.w_uk = nn.Linear(latent_dim, n_heads * head_dim, bias=False)    # latent -> per-head keys
        self.w_uv = nn.Linear(latent_dim, n_heads * head_dim, bias=False)    # latent -> per-head values
        self.w_q = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.w_qr = nn.Linear(d_model, n_heads * rope_dim, bias=False) if rope_dim else None
        self.w_kr = nn.Linear(d_model, rope_dim, bias=False) if rope_dim else None
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=False)

    @property
    def cache_elements_per_token(self) -> int:
        """Numbers cached per token in this layer: ``d_c + d_R``."""
        return mla_elements_per_token(self.latent_dim, self.rope_dim)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim + self.rope_dim)

    def _heads(self, t: torch.Tensor, width: int) -> torch.Tensor:
        b, length, _ = t.shape
        return t.view(b, length, self.n_heads, width).transpose(1, 2)

    def _project(self, x: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Queries ``(q_C, q_R)`` per head and the cache rows ``[c, k^R]`` ``(B, 1, L, d_c + d_R)``."""
        _require_activations(x, self.d_model)
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        q_c = self._heads(self.w_q(x), self.head_dim)                        # (B, H, L, d_h)
        latent = self.latent_norm(self.w_dkv(x))[:, None]                    # (B, 1, L, d_c)
        q_r = None
        if self.rope_dim:
            q_r = rotary(self._heads(self.w_qr(x), self.rope_dim), positions)  # (B, H, L, d_R)
            k_r = rotary(self.w_kr(x)[:, None], positions)                      # (B, 1, L, d_R)
            latent = torch.cat([latent, k_r], dim=-1)
        return q_c, latent, q_r

    def _naive(self, q_c: torch.Tensor, q_r: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """Up-project the cached rows to per-head keys and values, then attend (bottom-right causal)."""
        c, k_r = rows[..., : self.latent_dim], rows[..., self.latent_dim:]
        k = self._heads(self.w_uk(c[:, 0]), self.head_dim)                  # (B, H, T, d_h)
        v = self._heads(self.w_uv(c[:, 0]), self.head_dim)
        q = q_c
        if q_r is not None:
            q = torch.cat([q_c, q_r], dim=-1)
            k = torch.cat([k, k_r.expand(-1, self.n_heads, -1, -1)], dim=-1)
        lq, lk = q.shape[-2], k.shape[-2]
        if lq == lk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _absorbed(self, q_c: torch.Tensor, q_r: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """Attend in latent space over the cached rows; apply ``W_UV`` after attention."""
        w_uk = self.w_uk.weight.view(self.n_heads, self.head_dim, self.latent_dim)   # (H, d_h, d_c)
        w_uv = self.w_uv.weight.view(self.n_heads, self.head_dim, self.latent_dim)
        q_latent = q_c @ w_uk                                               # (B, H, Lq, d_c)
        q = q_latent if q_r is None else torch.cat([q_latent, q_r], dim=-1)
        return latent_attention_core(q, rows, self.latent_dim, self.scale) @ w_uv.transpose(-1, -2)  # (B, H, Lq, d_h)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, length, self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, *, absorbed: bool = False) -> torch.Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``, causal; naive form unless ``absorbed=True``."""
        q_c, rows, q_r = self._project(x, 0)
        return self._merge((self._absorbed if absorbed else self._naive)(q_c, q_r, rows))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, LatentCache]:
        """Process a prompt (naive form, the fast one for many queries); return output and latent cache."""
        q_c, rows, q_r = self._project(x, 0)
        cache = LatentCache(x.shape[0], self.cache_elements_per_token, dtype=x.dtype, device=x.device,
                            capacity=max(16, x.shape[1]))
        cache.append(rows)
        return self._merge(self._naive(q_c, q_r, rows)), cache

    def decode_step(self, x: torch.Tensor, state: LatentCache | None) -> tuple[torch.Tensor, LatentCache]:
        """One token ``(B, 1, d_model)``; absorbed form unless :attr:`absorbed` is False."""
        _require_one_token(x)
        if state is None:
            state = LatentCache(x.shape[0], self.cache_elements_per_token, dtype=x.dtype, device=x.device)
        q_c, rows, q_r = self._project(x, state.length)
        state.append(rows)
        attend = self._absorbed if self.absorbed else self._naive
        return self._merge(attend(q_c, q_r, state.view())), state

    def cache_bytes(self, state: LatentCache) -> int:
        """Bytes held in ``state``: the cached ``[c_KV, k^R]`` rows."""
        if not isinstance(state, LatentCache):
            raise TypeError(f"state must be a LatentCache, got {type(state).__name__}")
        return state.nbytes


def latent_mixer(n_heads: int, latent_dim: int, rope_dim: int, *, head_dim: int | None = None) -> MixerFactory:
    """A :class:`~labsupport.lm.model.TinyLM` factory building :class:`LatentAttention` in every layer."""
    require_positive_int("n_heads", n_heads)
    require_positive_int("latent_dim", latent_dim)
    require_int("rope_dim", rope_dim, minimum=0)
    if head_dim is not None:
        require_positive_int("head_dim", head_dim)

    def build(d_model: int, layer_index: int) -> nn.Module:
        return LatentAttention(d_model, n_heads, latent_dim, rope_dim, head_dim=head_dim)
    return build
