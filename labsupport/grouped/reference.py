"""The readable reference math of chapter 02: grouped-query attention, its decode step, RoPE, absorbed MLA.

* :func:`repeat_kv`, :func:`grouped_attention`, :func:`grouped_decode_step` — multi-head (MHA),
  grouped-query (GQA, arXiv:2305.13245) and multi-query (MQA, arXiv:1911.02150) attention as one
  function: ``n_kv_heads`` key/value heads, each shared by ``n_heads // n_kv_heads`` query heads.
  Query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``.
* :func:`rotary` — rotary position embedding (RoPE, arXiv:2104.09864), the decoupled key of MLA.
* :func:`latent_attention_core` — absorbed multi-head latent attention (MLA, DeepSeek-V2,
  arXiv:2405.04434) over the cached ``[c_KV, k^R]`` rows; :func:`absorb_mla_weights` folds
  ``W_UK`` into the queries and ``W_UV`` into the output.

Shapes: attention tensors are ``(B, H, L, D)``.
"""

from __future__ import annotations

import math

import torch

from labsupport.harness.numerics import accumulation_dtype, masked_softmax
from labsupport.harness.validation import (
    require_float,
    require_float_tensor,
    require_int,
    require_positive_int,
    require_qkv,
    require_tensor,
)

__all__ = [
    "absorb_mla_weights",
    "grouped_attention",
    "grouped_decode_step",
    "latent_attention_core",
    "repeat_kv",
    "rotary",
]


def _require_grouped(q: object, k: object, v: object) -> int:
    """Validate q ``(B, H, Lq, D)``, k and v ``(B, G, T, D)`` with ``G`` dividing ``H``; return ``H // G``."""
    q, k, _ = require_qkv(q, k, v, grouped=True)
    return q.shape[1] // k.shape[1]


# ----------------------------------------------------------------------------- MHA / GQA / MQA

def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, G, T, D) -> (B, G * n_rep, T, D)``: each KV head repeated for its ``n_rep`` query heads.

    Head ``g`` becomes heads ``g * n_rep .. g * n_rep + n_rep - 1`` (``repeat_interleave``, not
    ``repeat``). This copies memory; :func:`grouped_decode_step` shows how to avoid the copy.
    """
    require_tensor("x", x, ndim=4)
    n_rep = require_positive_int("n_rep", n_rep)
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
    """Grouped-query softmax attention: q ``(B, H, L, D)``, k and v ``(B, G, L, D)`` → ``(B, H, L, D)``.

    ``G = H`` is multi-head attention, ``G = 1`` multi-query attention. Computed from the
    definition (scores, mask, softmax) with the KV heads repeated for their query heads.
    The causal mask is bottom-right aligned (query ``i`` of ``Lq`` sits at position
    ``Lk − Lq + i``); with ``Lq > Lk`` the first rows see no key and give zeros.
    fp16/bf16 inputs are computed in float32 and returned in their dtype.
    """
    n_rep = _require_grouped(q, k, v)
    cdt = accumulation_dtype(q.dtype)
    k, v = repeat_kv(k, n_rep).to(cdt), repeat_kv(v, n_rep).to(cdt)
    scores = q.to(cdt) @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        # query i sits at absolute position lk - lq + i (bottom-right aligned, as in a decode step)
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(lk - lq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return (masked_softmax(scores, dim=-1) @ v).to(q.dtype)


def grouped_decode_step(q_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One decode step of grouped-query attention, without copying the cache.

    Args:
        q_new: ``(B, H, 1, D)`` the newest token's queries.
        k_cache, v_cache: ``(B, G, T, D)``, already holding the newest token's key and value.

    Returns:
        ``(B, H, 1, D)``. The ``H // G`` query heads of a group are stacked as ``H // G`` "query
        positions" of one KV head, so each cached key is read once per group, not once per head.
    """
    n_rep = _require_grouped(q_new, k_cache, v_cache)
    if q_new.shape[-2] != 1:
        raise ValueError(f"q_new must hold one position, shape (B, H, 1, D); got {tuple(q_new.shape)}")
    b, heads, _, d = q_new.shape
    groups = k_cache.shape[1]
    cdt = accumulation_dtype(q_new.dtype)                               # fp16/bf16: in float32
    q = q_new.reshape(b, groups, n_rep, d).to(cdt)                       # (B, G, H/G, D)
    scores = q @ k_cache.to(cdt).transpose(-1, -2) / math.sqrt(d)        # (B, G, H/G, T)
    out = scores.softmax(dim=-1) @ v_cache.to(cdt)                       # (B, G, H/G, D)
    return out.reshape(b, heads, 1, d).to(q_new.dtype)


# ----------------------------------------------------------------------------- MLA

def rotary(x: torch.Tensor, positions: torch.Tensor, *, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoPE) on the last dimension of ``x`` (``(..., L, D)``, D even).

    Pairs ``(x_i, x_{i + D/2})`` are rotated by the angle ``position · base^(−2i/D)``, so that
    ``rotary(q, m) · rotary(k, n)`` depends on ``m − n`` only.
    """
    require_float_tensor("x", x)
    base = require_float("base", base, positive=True)
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"rotary needs x of shape (..., L, D) with even D, got shape {tuple(x.shape)}")
    require_tensor("positions", positions, ndim=1)
    if positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be integer or real token positions, got a {positions.dtype} tensor")
    if positions.shape[0] != x.shape[-2]:
        raise ValueError(f"positions must have shape (L,) = ({x.shape[-2]},), got {tuple(positions.shape)}")
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angle = positions.to(torch.float64)[:, None] * freq[None, :]           # (L, D/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def latent_attention_core(q: torch.Tensor, rows: torch.Tensor, latent_dim: int, scale: float) -> torch.Tensor:
    """Absorbed MLA attention over the cache: q ``(B, H, Lq, d_c + d_R)``, rows ``(B, 1, T, d_c + d_R)``.

    Every head reads the same cached rows (a multi-query attention with key width ``d_c + d_R``
    and value width ``d_c``); the heads and query positions are stacked as rows of one matrix
    product so the cache is read once, not once per head. Causal, bottom-right aligned.
    Returns the attended latents ``(B, H, Lq, d_c)``. With ``Lq > T`` the first rows see no
    cached row and give zeros; fp16/bf16 are computed in float32 and returned in their dtype.
    """
    require_float_tensor("q", q, ndim=4)
    require_float_tensor("rows", rows, ndim=4)
    b, h, lq, width = q.shape
    if rows.shape[0] != b or rows.shape[1] != 1 or rows.shape[-1] != width or rows.dtype != q.dtype:
        raise ValueError(f"expected rows (B, 1, T, d_c + d_R) = ({b}, 1, T, {width}) of q's dtype {q.dtype}; got "
                         f"{tuple(rows.shape)} {rows.dtype}")
    latent_dim = require_int("latent_dim", latent_dim, minimum=1, maximum=width)
    scale = require_float("scale", scale, positive=True)
    lk = rows.shape[-2]
    cdt = accumulation_dtype(q.dtype)
    rows_c = rows.to(cdt)
    scores = (q.to(cdt).reshape(b, 1, h * lq, width) @ rows_c.transpose(-1, -2)).view(b, h, lq, lk) * scale
    if lq > 1:
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(lk - lq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    p = masked_softmax(scores, dim=-1).reshape(b, 1, h * lq, lk)
    return (p @ rows_c[..., :latent_dim]).view(b, h, lq, latent_dim).to(q.dtype)


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
        require_tensor(name, t, ndim=3)
    if not (w_q.shape[0] == w_uk.shape[0] == w_uv.shape[0] == w_o.shape[0]):
        raise ValueError("all four weights must have the same number of heads (first dimension), got "
                         f"{w_q.shape[0]}, {w_uk.shape[0]}, {w_uv.shape[0]}, {w_o.shape[0]}")
    if w_uk.shape != w_uv.shape or w_q.shape[2] != w_uk.shape[2] or w_o.shape[1] != w_uv.shape[2]:
        raise ValueError(f"incompatible shapes w_q {tuple(w_q.shape)}, w_uk {tuple(w_uk.shape)}, "
                         f"w_uv {tuple(w_uv.shape)}, w_o {tuple(w_o.shape)}")
    return w_q @ w_uk.transpose(-1, -2), w_uv @ w_o
