"""Chapter 02 — KV cache and grouped attention: reference solutions, mixers, cost model and checkers.

Everything here shrinks the KV cache that a decode step must read:

* :func:`repeat_kv`, :func:`grouped_attention`, :func:`grouped_decode_step` — multi-head (MHA),
  grouped-query (GQA, arXiv:2305.13245) and multi-query (MQA, arXiv:1911.02150) attention as one
  function: ``n_kv_heads`` key/value heads, each shared by ``n_heads // n_kv_heads`` query heads.
  Query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``.
* :class:`GroupedQueryAttention` — the same as a :class:`~labsupport.lm.model.TinyLM` sequence mixer
  with prefill and a cached decode step; :func:`mean_pool_kv_heads` converts an MHA checkpoint to
  GQA the way the GQA paper's uptraining starts (mean of the K and V heads in each group).
* :class:`LatentAttention` — multi-head latent attention (MLA, DeepSeek-V2, arXiv:2405.04434): a
  low-rank joint KV latent ``c_KV`` of size ``d_c`` plus a decoupled RoPE key of size ``d_h^R``;
  ``forward`` is the naive form (up-project, then attend), ``decode_step`` the absorbed form that
  caches only ``[c_KV, k^R]``; :func:`absorb_mla_weights` folds ``W_UK`` into the queries and
  ``W_UV`` into the output.
* :func:`quantize_asymmetric`, :func:`fake_quantize`, :class:`QuantSpec`,
  :class:`QuantizedKVCache` — a KIVI-style (arXiv:2402.02750) b-bit cache: keys quantised per
  channel over groups of tokens, values per token over groups of channels, the newest tokens in
  full precision.
* :func:`cache_elements_per_token` and friends — the published per-token cache sizes.
* ``check_*`` — the chapter's exercise checkers.

Shapes: attention tensors are ``(B, H, L, D)``; model activations ``(B, L, d_model)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.lm.contracts import MixerFactory
from labsupport.lm.layers import KVCache

__all__ = [
    "repeat_kv",
    "grouped_attention",
    "grouped_decode_step",
    "GroupedQueryAttention",
    "grouped_mixer",
    "mean_pool_kv_heads",
    "rotary",
    "LatentCache",
    "LatentAttention",
    "latent_attention_core",
    "latent_mixer",
    "absorb_mla_weights",
    "QuantSpec",
    "quantize_asymmetric",
    "dequantize",
    "fake_quantize",
    "quantize_dequantize",
    "QuantizedKVCache",
    "cache_elements_per_token",
    "mla_elements_per_token",
    "equivalent_kv_groups",
    "quantized_bytes_per_element",
    "check_grouped_decode_step",
    "check_absorb_mla_weights",
    "check_quantize_dequantize",
]


#: ``scaled_dot_product_attention(..., enable_gqa=True)`` exists from torch 2.5 on.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

# ----------------------------------------------------------------------------- validation

def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _tensor4(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a tensor of shape (batch, heads, length, head_dim); got {got}")
    return t


def _check_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate q (B, H, Lq, D), k and v (B, G, T, D) with G dividing H; return H // G."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor4(name, t)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim")
    heads, groups = q.shape[1], k.shape[1]
    if groups == 0 or heads % groups:
        raise ValueError(f"the number of KV heads ({groups}) must divide the number of query heads ({heads})")
    return heads // groups


# ----------------------------------------------------------------------------- MHA / GQA / MQA

def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, G, T, D) -> (B, G * n_rep, T, D)``: each KV head repeated for its ``n_rep`` query heads.

    Head ``g`` becomes heads ``g * n_rep .. g * n_rep + n_rep - 1`` (``repeat_interleave``, not
    ``repeat``). This copies memory; :func:`grouped_decode_step` shows how to avoid the copy.
    """
    _tensor4("x", x)
    n_rep = _positive_int("n_rep", n_rep)
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
    """Grouped-query softmax attention: q ``(B, H, L, D)``, k and v ``(B, G, L, D)`` → ``(B, H, L, D)``.

    ``G = H`` is multi-head attention, ``G = 1`` multi-query attention. Computed from the
    definition (scores, mask, softmax) with the KV heads repeated for their query heads.
    """
    n_rep = _check_grouped(q, k, v)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        # query i sits at absolute position lk - lq + i (bottom-right aligned, as in a decode step)
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(lk - lq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


def grouped_decode_step(q_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One decode step of grouped-query attention, without copying the cache.

    Args:
        q_new: ``(B, H, 1, D)`` the newest token's queries.
        k_cache, v_cache: ``(B, G, T, D)``, already holding the newest token's key and value.

    Returns:
        ``(B, H, 1, D)``. The ``H // G`` query heads of a group are stacked as ``H // G`` "query
        positions" of one KV head, so each cached key is read once per group, not once per head.
    """
    n_rep = _check_grouped(q_new, k_cache, v_cache)
    if q_new.shape[-2] != 1:
        raise ValueError(f"q_new must hold one position, shape (B, H, 1, D); got {tuple(q_new.shape)}")
    b, heads, _, d = q_new.shape
    groups = k_cache.shape[1]
    q = q_new.reshape(b, groups, n_rep, d)                               # (B, G, H/G, D)
    scores = q @ k_cache.transpose(-1, -2) / math.sqrt(d)                # (B, G, H/G, T)
    out = scores.softmax(dim=-1) @ v_cache                               # (B, G, H/G, D)
    return out.reshape(b, heads, 1, d)


class GroupedQueryAttention(nn.Module):
    """Causal attention with ``n_kv_heads`` key/value heads shared by ``n_heads`` query heads.

    ``n_kv_heads = n_heads`` is MHA, ``1`` is MQA, anything in between that divides ``n_heads``
    is GQA. The cache holds ``2 · n_kv_heads · head_dim`` numbers per token.

    Set :attr:`kv_quant` to a :class:`QuantSpec` to run with a KIVI-style quantised cache
    (inference only): ``forward`` then simulates exactly what ``decode_step`` computes with a
    :class:`QuantizedKVCache` (the tests prove it), so recall and perplexity can be measured in
    one forward pass.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *, bias: bool = False) -> None:
        super().__init__()
        d_model = _positive_int("d_model", d_model)
        n_heads = _positive_int("n_heads", n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else _positive_int("n_kv_heads", n_kv_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.kv = nn.Linear(d_model, 2 * n_kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.kv_quant: QuantSpec | None = None

    @property
    def cache_elements_per_token(self) -> int:
        """Numbers cached per token in this layer: ``2 · n_kv_heads · head_dim``."""
        return 2 * self.n_kv_heads * self.head_dim

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, L, d_model)`` → q ``(B, H, L, D)``, k and v ``(B, G, L, D)``."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input (batch, length, {self.d_model}), got {tuple(x.shape)}")
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
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"decode_step expects one token, shape (batch, 1, d_model); got {tuple(x.shape)}")
        q, k, v = self.project(x)
        if state is None:
            state = self._empty_cache(x)
        state.append(k, v)
        keys, values = state.view()
        return self._merge(grouped_decode_step(q, keys, values)), state


def grouped_mixer(n_heads: int, n_kv_heads: int | None = None) -> MixerFactory:
    """A :class:`~labsupport.lm.model.TinyLM` factory building :class:`GroupedQueryAttention` in every layer."""
    _positive_int("n_heads", n_heads)
    if n_kv_heads is not None:
        _positive_int("n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")

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
    n_kv_heads = _positive_int("n_kv_heads", n_kv_heads)
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

def rotary(x: torch.Tensor, positions: torch.Tensor, *, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoPE) on the last dimension of ``x`` (``(..., L, D)``, D even).

    Pairs ``(x_i, x_{i + D/2})`` are rotated by the angle ``position · base^(−2i/D)``, so that
    ``rotary(q, m) · rotary(k, n)`` depends on ``m − n`` only.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"rotary needs a tensor (..., L, D) with even D, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if positions.dim() != 1 or positions.shape[0] != x.shape[-2]:
        raise ValueError(f"positions must have shape (L,) = ({x.shape[-2]},), got {tuple(positions.shape)}")
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angle = positions.to(torch.float64)[:, None] * freq[None, :]           # (L, D/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


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
        t = self.view()
        return t.numel() * t.element_size()


def latent_attention_core(q: torch.Tensor, rows: torch.Tensor, latent_dim: int, scale: float) -> torch.Tensor:
    """Absorbed MLA attention over the cache: q ``(B, H, Lq, d_c + d_R)``, rows ``(B, 1, T, d_c + d_R)``.

    Every head reads the same cached rows (a multi-query attention with key width ``d_c + d_R``
    and value width ``d_c``); the heads and query positions are stacked as rows of one matrix
    product so the cache is read once, not once per head. Causal, bottom-right aligned.
    Returns the attended latents ``(B, H, Lq, d_c)``.
    """
    b, h, lq, width = q.shape
    lk = rows.shape[-2]
    scores = (q.reshape(b, 1, h * lq, width) @ rows.transpose(-1, -2)).view(b, h, lq, lk) * scale
    if lq > 1:
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(lk - lq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    p = scores.softmax(dim=-1).reshape(b, 1, h * lq, lk)
    return (p @ rows[..., :latent_dim]).view(b, h, lq, latent_dim)


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
        d_model = _positive_int("d_model", d_model)
        n_heads = _positive_int("n_heads", n_heads)
        latent_dim = _positive_int("latent_dim", latent_dim)
        rope_dim = _positive_int("rope_dim", rope_dim, minimum=0)
        if rope_dim % 2:
            raise ValueError(f"rope_dim must be even (RoPE rotates pairs), got {rope_dim}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads} (or pass head_dim)")
            head_dim = d_model // n_heads
        head_dim = _positive_int("head_dim", head_dim)
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
        return self.latent_dim + self.rope_dim

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim + self.rope_dim)

    def _heads(self, t: torch.Tensor, width: int) -> torch.Tensor:
        b, length, _ = t.shape
        return t.view(b, length, self.n_heads, width).transpose(1, 2)

    def _project(self, x: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Queries ``(q_C, q_R)`` per head and the cache rows ``[c, k^R]`` ``(B, 1, L, d_c + d_R)``."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input (batch, length, {self.d_model}), got {tuple(x.shape)}")
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
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"decode_step expects one token, shape (batch, 1, d_model); got {tuple(x.shape)}")
        if state is None:
            state = LatentCache(x.shape[0], self.cache_elements_per_token, dtype=x.dtype, device=x.device)
        q_c, rows, q_r = self._project(x, state.length)
        state.append(rows)
        attend = self._absorbed if self.absorbed else self._naive
        return self._merge(attend(q_c, q_r, state.view())), state


def latent_mixer(n_heads: int, latent_dim: int, rope_dim: int, *, head_dim: int | None = None) -> MixerFactory:
    """A :class:`~labsupport.lm.model.TinyLM` factory building :class:`LatentAttention` in every layer."""
    _positive_int("n_heads", n_heads)
    _positive_int("latent_dim", latent_dim)
    _positive_int("rope_dim", rope_dim, minimum=0)

    def build(d_model: int, layer_index: int) -> nn.Module:
        return LatentAttention(d_model, n_heads, latent_dim, rope_dim, head_dim=head_dim)
    return build


def absorb_mla_weights(w_q: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, w_o: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold MLA's up-projections into the query and output matrices.

    Args (row-vector convention, ``y = x @ W``):
        w_q: ``(H, d_model, d_h)`` per-head query projection.
        w_uk: ``(H, d_c, d_h)`` latent → key, per head.
        w_uv: ``(H, d_c, d_h)`` latent → value, per head.
        w_o: ``(H, d_h, d_model)`` per-head slice of the output projection.

    Returns:
        ``(w_q_absorbed (H, d_model, d_c), w_o_absorbed (H, d_c, d_model))`` with
        ``q_h · k_h = (x @ w_q_absorbed[h]) · c`` and ``Σ_h (p_h c) @ w_uv[h] @ w_o[h] =
        Σ_h (p_h c) @ w_o_absorbed[h]``.
    """
    for name, t in (("w_q", w_q), ("w_uk", w_uk), ("w_uv", w_uv), ("w_o", w_o)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-d tensor (heads, ·, ·), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (w_q.shape[0] == w_uk.shape[0] == w_uv.shape[0] == w_o.shape[0]):
        raise ValueError("all four weights must have the same number of heads (first dimension)")
    if w_uk.shape != w_uv.shape or w_q.shape[2] != w_uk.shape[2] or w_o.shape[1] != w_uv.shape[2]:
        raise ValueError(f"incompatible shapes w_q {tuple(w_q.shape)}, w_uk {tuple(w_uk.shape)}, "
                         f"w_uv {tuple(w_uv.shape)}, w_o {tuple(w_o.shape)}")
    return w_q @ w_uk.transpose(-1, -2), w_uv @ w_o


# ----------------------------------------------------------------------------- KIVI quantisation

def _check_bits(bits: object) -> int:
    bits = _positive_int("bits", bits)
    if bits > 8:
        raise ValueError(f"bits must be between 1 and 8 (codes are stored in uint8), got {bits}")
    return bits


def quantize_asymmetric(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric ``bits``-bit quantisation with one (scale, minimum) per slice along ``dim``.

    The statistics are taken over ``dim`` (``keepdim``): ``minimum = min``, ``scale = (max − min)
    / (2^bits − 1)``; codes are ``round((x − minimum) / scale)`` in ``0 .. 2^bits − 1`` (uint8).
    A constant slice (``max = min``) gets scale 1 and is reproduced exactly.
    Every element then satisfies ``|x − dequantize(...)| ≤ scale / 2`` (up to float rounding).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    bits = _check_bits(bits)
    if x.numel() == 0:
        raise ValueError("x must not be empty")
    levels = 2**bits - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - lo) / scale).clamp_(0, levels).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """``codes · scale + minimum``, in the dtype of ``scale``."""
    return codes.to(scale.dtype) * scale + minimum


def quantize_dequantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Round trip of :func:`quantize_asymmetric` (statistics over ``dim``): what the cache gives back."""
    return dequantize(*quantize_asymmetric(x, bits, dim))


def fake_quantize(x: torch.Tensor, bits: int, dim: int, group: int) -> torch.Tensor:
    """Quantise and dequantise ``x`` with statistics over groups of ``group`` entries along ``dim``.

    ``x.shape[dim]`` must be a multiple of ``group``. Keys in KIVI: ``dim`` = tokens (per
    channel); values: ``dim`` = channels (per token).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    group = _positive_int("group", group)
    dim = dim % x.dim()
    n = x.shape[dim]
    if n % group:
        raise ValueError(f"size {n} along dim {dim} is not a multiple of group={group}")
    shape = x.shape[:dim] + (n // group, group) + x.shape[dim + 1:]
    return quantize_dequantize(x.reshape(shape), bits, dim + 1).reshape(x.shape)


@dataclass(frozen=True)
class QuantSpec:
    """How a KIVI-style cache quantises.

    Attributes:
        bits: bits per key/value element (1–8).
        group: tokens per key group (keys are quantised per channel over ``group`` tokens).
        residual: the newest tokens kept in full precision. Tokens older than that are
            quantised a whole key group at a time, so between ``residual`` and
            ``residual + group − 1`` of the newest tokens stay full precision.
        value_group: channels per value group (values are quantised per token); ``None`` = the
            whole head.
    """

    bits: int
    group: int = 16
    residual: int = 16
    value_group: int | None = None

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _positive_int("group", self.group)
        _positive_int("residual", self.residual, minimum=0)
        if self.value_group is not None:
            _positive_int("value_group", self.value_group)

    def quantized_length(self, length: int) -> int:
        """How many of the oldest ``length`` tokens are held quantised."""
        return max(0, (length - self.residual) // self.group * self.group)

    def bytes_per_element(self, head_dim: int, scale_bytes: int = 2) -> float:
        """Average bytes of a quantised element, counting one fp16 (scale, minimum) pair per group."""
        keys = quantized_bytes_per_element(self.bits, self.group, scale_bytes)
        values = quantized_bytes_per_element(self.bits, self.value_group or head_dim, scale_bytes)
        return (keys + values) / 2


def _value_group(spec: QuantSpec, head_dim: int) -> int:
    group = spec.value_group or head_dim
    if head_dim % group:
        raise ValueError(f"value_group={group} must divide head_dim={head_dim}")
    return group


def quantized_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Causal grouped attention in which every query sees the cache as :class:`QuantizedKVCache` would hold it.

    Query ``t`` reads the oldest ``spec.quantized_length(t + 1)`` keys and values dequantised and
    the rest in full precision — exactly what token-by-token decoding with the quantised cache
    computes, in one pass.
    """
    n_rep = _check_grouped(q, k, v)
    length = k.shape[-2]
    padded = -(-length // spec.group) * spec.group
    pad = padded - length
    k_pad = F.pad(k, (0, 0, 0, pad)) if pad else k
    k_hat = fake_quantize(k_pad, spec.bits, -2, spec.group)[..., :length, :]
    v_hat = fake_quantize(v, spec.bits, -1, _value_group(spec, v.shape[-1]))
    positions = torch.arange(length, device=q.device)
    quantized = torch.tensor([spec.quantized_length(t + 1) for t in range(length)], device=q.device)
    use_hat = positions[None, :] < quantized[:, None]                      # (Lq, T): key s quantised for query t
    k_eff = [repeat_kv(t, n_rep) for t in (k, k_hat)]
    v_eff = [repeat_kv(t, n_rep) for t in (v, v_hat)]
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.where(use_hat, q @ k_eff[1].transpose(-1, -2), q @ k_eff[0].transpose(-1, -2)) * scale
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    p = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return (p * use_hat) @ v_eff[1] + (p * ~use_hat) @ v_eff[0]


class QuantizedKVCache:
    """A KIVI-style cache: quantised old tokens, a full-precision window of recent ones.

    Keys are quantised per channel over each completed group of ``spec.group`` tokens, values
    per token over ``spec.value_group`` channels. Codes are kept as uint8 (a real kernel would
    pack 2- and 4-bit codes; :attr:`nbytes` counts the packed size).
    """

    def __init__(self, spec: QuantSpec) -> None:
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.key_blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.value_blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.recent_k: torch.Tensor | None = None
        self.recent_v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``(B, G, new, D)`` keys and values; quantise whole groups that leave the window."""
        _tensor4("k", k)
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        self.recent_k = k if self.recent_k is None else torch.cat([self.recent_k, k], dim=2)
        self.recent_v = v if self.recent_v is None else torch.cat([self.recent_v, v], dim=2)
        self.length += k.shape[2]
        spec = self.spec
        move = spec.quantized_length(self.length) - self.quantized_length
        if move > 0:
            old_k, self.recent_k = self.recent_k[:, :, :move], self.recent_k[:, :, move:]
            old_v, self.recent_v = self.recent_v[:, :, :move], self.recent_v[:, :, move:]
            b, g, _, d = old_k.shape
            gk = old_k.reshape(b, g, move // spec.group, spec.group, d)
            self.key_blocks.append(quantize_asymmetric(gk, spec.bits, dim=3))
            vg = _value_group(spec, d)
            gv = old_v.reshape(b, g, move, d // vg, vg)
            self.value_blocks.append(quantize_asymmetric(gv, spec.bits, dim=4))

    @property
    def quantized_length(self) -> int:
        return sum(block[0].shape[2] * block[0].shape[3] for block in self.key_blocks)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, G, T, D)`` as attention sees them: old ones dequantised."""
        assert self.recent_k is not None and self.recent_v is not None, "the cache is empty"
        b, g, _, d = self.recent_k.shape
        keys = [dequantize(*blk).reshape(b, g, -1, d) for blk in self.key_blocks] + [self.recent_k]
        values = [dequantize(*blk).reshape(b, g, -1, d) for blk in self.value_blocks] + [self.recent_v]
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    @property
    def nbytes(self) -> int:
        """Bytes with codes packed to ``bits`` and fp16 scales and minima, plus the full-precision window."""
        total = 0.0
        for codes, scale, lo in self.key_blocks + self.value_blocks:
            total += codes.numel() * self.spec.bits / 8 + (scale.numel() + lo.numel()) * 2
        if self.recent_k is not None and self.recent_v is not None:
            total += (self.recent_k.numel() + self.recent_v.numel()) * self.recent_k.element_size()
        return int(math.ceil(total))


# ----------------------------------------------------------------------------- cost model

def cache_elements_per_token(n_kv_heads: int, head_dim: int) -> int:
    """Cached numbers per token per layer for MHA/GQA/MQA: ``2 · n_kv_heads · head_dim``."""
    return 2 * _positive_int("n_kv_heads", n_kv_heads) * _positive_int("head_dim", head_dim)


def mla_elements_per_token(latent_dim: int, rope_dim: int) -> int:
    """Cached numbers per token per layer for MLA: ``d_c + d_h^R``."""
    return _positive_int("latent_dim", latent_dim) + _positive_int("rope_dim", rope_dim, minimum=0)


def equivalent_kv_groups(elements_per_token: float, head_dim: int) -> float:
    """The number of GQA groups whose cache is as big: ``elements / (2 · head_dim)``."""
    if isinstance(elements_per_token, bool) or not isinstance(elements_per_token, numbers.Real) or elements_per_token <= 0:
        raise ValueError(f"elements_per_token must be a positive number, got {elements_per_token!r}")
    return elements_per_token / (2 * _positive_int("head_dim", head_dim))


def quantized_bytes_per_element(bits: int, group: float, scale_bytes: int = 2) -> float:
    """Average bytes per element: ``bits/8`` plus one (scale, minimum) pair per ``group`` elements."""
    bits = _check_bits(bits)
    if isinstance(group, bool) or not isinstance(group, numbers.Real) or group <= 0:
        raise ValueError(f"group must be a positive number, got {group!r}")
    return bits / 8 + 2 * scale_bytes / group


# ----------------------------------------------------------------------------- checkers

def check_grouped_decode_step(fn) -> CheckResult:
    """Check ``grouped_decode_step(q_new, k_cache, v_cache)`` for MHA, GQA and MQA shapes."""
    gen = torch.Generator().manual_seed(2)

    def case(b: int, h: int, g: int, t: int, d: int, dtype: torch.dtype = torch.float32) -> tuple:
        return (torch.randn(b, h, 1, d, generator=gen).to(dtype), torch.randn(b, g, t, d, generator=gen).to(dtype),
                torch.randn(b, g, t, d, generator=gen).to(dtype))

    big = case(1, 4, 2, 6, 8)
    nc_k = torch.randn(2, 2, 8, 11, generator=gen).transpose(-1, -2)       # (2, 2, 11, 8), non-contiguous
    cases = [
        Case("MHA: 4 query heads, 4 KV heads, 7 cached tokens", case(1, 4, 4, 7, 8)),
        Case("GQA: 8 query heads share 2 KV heads (4 each), B=2", case(2, 8, 2, 9, 4)),
        Case("MQA: 6 query heads share 1 KV head", case(1, 6, 1, 5, 8)),
        Case("one cached token", case(1, 4, 2, 1, 4)),
        Case("large scores (× 30)", tuple(t * 30 for t in big)),
        Case("cache stored transposed in memory (non-contiguous)", (torch.randn(2, 6, 1, 8, generator=gen), nc_k,
                                                                     torch.randn(2, 2, 11, 8, generator=gen))),
        Case("float64, 12 query heads, 3 KV heads", case(1, 12, 3, 10, 8, torch.float64)),
    ]
    return check_function(
        fn, grouped_decode_step, cases, exercise="GQA decode step", atol=1e-5, rtol=1e-4,
        hint="query head h reads KV head h // (H // G): consecutive query heads share a KV head "
             "(repeat_interleave, or reshape q to (B, G, H // G, D); not .repeat, which interleaves the other "
             "way); scale by 1/sqrt(D); softmax over the cached positions; return (B, H, 1, D).",
    )


def check_absorb_mla_weights(fn) -> CheckResult:
    """Check ``absorb_mla_weights(w_q, w_uk, w_uv, w_o)`` → ``(w_q_absorbed, w_o_absorbed)``."""
    gen = torch.Generator().manual_seed(3)

    def weights(h: int, d_model: int, d_c: int, d_h: int, dtype: torch.dtype = torch.float32) -> tuple:
        return tuple(torch.randn(*shape, generator=gen).to(dtype) for shape in
                     ((h, d_model, d_h), (h, d_c, d_h), (h, d_c, d_h), (h, d_h, d_model)))

    cases = [
        Case("1 head, d_model=6, d_c=3, d_h=2", weights(1, 6, 3, 2)),
        Case("4 heads, d_model=16, d_c=8, d_h=4", weights(4, 16, 8, 4)),
        Case("latent wider than the model: d_model=8, d_c=12, d_h=4", weights(2, 8, 12, 4)),
        Case("float64, 3 heads", weights(3, 10, 5, 6, torch.float64)),
    ]
    return check_function(
        fn, absorb_mla_weights, cases, exercise="MLA weight absorption", atol=1e-5, rtol=1e-4,
        output_names=("w_q_absorbed", "w_o_absorbed"),
        hint="the score q·k = (x W_Q,h)(c W_UK,h)ᵀ = x (W_Q,h W_UK,hᵀ) cᵀ, so w_q_absorbed[h] = w_q[h] @ w_uk[h]ᵀ "
             "(H, d_model, d_c); the output (p c) W_UV,h W_O,h gives w_o_absorbed[h] = w_uv[h] @ w_o[h] (H, d_c, d_model). "
             "Batched matmul over the head dimension does every head at once.",
    )


def check_quantize_dequantize(fn) -> CheckResult:
    """Check ``quantize_dequantize(x, bits, dim)``: asymmetric b-bit round trip, statistics over ``dim``."""
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(1, 2, 16, 8, generator=gen)
    keys[..., 3] *= 20                                                     # an outlier channel, as KIVI observes
    values = torch.randn(1, 2, 16, 8, generator=gen)
    const = torch.full((2, 5), 0.75)
    cases = [
        Case("keys per channel (dim=-2), 2 bits", (keys, 2, -2)),
        Case("values per token (dim=-1), 4 bits", (values, 4, -1)),
        Case("8 bits, dim=1 of a (3, 10) matrix", (torch.randn(3, 10, generator=gen) * 5 + 2, 8, 1)),
        Case("a constant slice (max = min) must come back exactly", (const, 2, -1)),
        Case("1 bit, float64", (torch.randn(4, 6, generator=gen, dtype=torch.float64), 1, 0)),
        Case("non-contiguous input", (torch.randn(8, 5, generator=gen).t(), 3, -1)),
    ]
    return check_function(
        fn, quantize_dequantize, cases, exercise="asymmetric quantise/dequantise", atol=1e-5, rtol=1e-5,
        hint="take min and max over `dim` with keepdim=True; scale = (max - min) / (2**bits - 1) (use 1 where it is "
             "0); codes = round((x - min) / scale) clamped to [0, 2**bits - 1]; return codes * scale + min in x's dtype.",
    )
