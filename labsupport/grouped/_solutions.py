"""Chapter 02's reference solutions of its core exercises: private, so a notebook's ``ga.<name>`` never shows one.

The checkers of :mod:`labsupport.grouped.exercises_core` compare a learner's function with these; the tests use
them as the right answer. A notebook imports ``labsupport.grouped`` as ``ga``, whose namespace holds none of them.
"""

from __future__ import annotations

import torch

from labsupport.harness.validation import require_float, require_float_tensor, require_positive_int

__all__ = ["absorbed_mla_decode_step", "mean_pool_kv", "naive_mla_decode_step", "quantize_dequantize"]


def mean_pool_kv(kv_weight: torch.Tensor, head_dim: int, n_kv_heads: int) -> torch.Tensor:
    """Mean-pool the fused key/value projection of an attention layer to ``n_kv_heads`` KV heads.

    Args:
        kv_weight: ``(2 · G · head_dim, d_model)``, the weight of the layer's ``kv`` ``nn.Linear``:
            first the key rows of KV heads ``0 … G−1`` (``head_dim`` rows each), then their value rows.
        head_dim: rows per head.
        n_kv_heads: the new number of KV heads ``G'``; it must divide ``G``. New head ``j`` replaces the
            ``G / G'`` consecutive old heads ``j · G/G' … (j+1) · G/G' − 1``.

    Returns:
        ``(2 · G' · head_dim, d_model)``, keys then values, each new head the mean of its group.
    """
    kv_weight = require_float_tensor("kv_weight", kv_weight, ndim=2)
    head_dim = require_positive_int("head_dim", head_dim)
    n_kv_heads = require_positive_int("n_kv_heads", n_kv_heads)
    rows, d_model = kv_weight.shape
    if rows % (2 * head_dim):
        raise ValueError(f"kv_weight must have 2 · G · head_dim rows (head_dim={head_dim}), got {rows}")
    old = rows // (2 * head_dim)
    if old % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} must divide the current number of KV heads ({old})")
    grouped = kv_weight.reshape(2, n_kv_heads, old // n_kv_heads, head_dim, d_model)
    return grouped.mean(dim=2).reshape(2 * n_kv_heads * head_dim, d_model)



def _require_mla_step(q_c: object, q_r: object, cache: object, w_uk: object, w_uv: object) -> None:
    q_c = require_float_tensor("q_c", q_c, ndim=4)
    q_r = require_float_tensor("q_r", q_r, ndim=4)
    cache = require_float_tensor("cache", cache, ndim=4)
    w_uk = require_float_tensor("w_uk", w_uk, ndim=3)
    w_uv = require_float_tensor("w_uv", w_uv, ndim=3)
    b, h, one, d_h = q_c.shape
    d_c = w_uk.shape[1]
    if one != 1 or q_r.shape[:3] != (b, h, 1):
        raise ValueError(f"q_c must be (B, H, 1, d_h) and q_r (B, H, 1, d_R); got {tuple(q_c.shape)}, {tuple(q_r.shape)}")
    if w_uk.shape != (h, d_c, d_h) or w_uv.shape != (h, d_c, d_h):
        raise ValueError(f"w_uk and w_uv must be (H, d_c, d_h) = ({h}, d_c, {d_h}); got {tuple(w_uk.shape)}, "
                         f"{tuple(w_uv.shape)}")
    if cache.shape[0] != b or cache.shape[1] != 1 or cache.shape[3] != d_c + q_r.shape[3]:
        raise ValueError(f"cache must be (B, 1, T, d_c + d_R) = ({b}, 1, T, {d_c + q_r.shape[3]}); "
                         f"got {tuple(cache.shape)}")


def absorbed_mla_decode_step(q_c: torch.Tensor, q_r: torch.Tensor, cache: torch.Tensor, w_uk: torch.Tensor,
                             w_uv: torch.Tensor, scale: float) -> torch.Tensor:
    """One MLA decode step in the absorbed form.

    Args:
        q_c: ``(B, H, 1, d_h)`` the newest token's content query per head.
        q_r: ``(B, H, 1, d_R)`` its (already rotated) RoPE query per head.
        cache: ``(B, 1, T, d_c + d_R)`` the cached rows ``[c_s, k^R_s]`` of every token so far (the newest
            included).
        w_uk, w_uv: ``(H, d_c, d_h)`` the up-projections, row-vector convention: head ``h``'s key of token
            ``s`` is ``c_s @ w_uk[h]``, its value ``c_s @ w_uv[h]``.
        scale: the score scale, ``1 / √(d_h + d_R)``.

    Returns:
        ``(B, H, 1, d_h)``: per head, ``Σ_s p_s v_{s,h}`` with
        ``p = softmax_s(scale · (q_c · k^C_{s,h} + q_r · k^R_s))`` — computed without up-projecting the cache.
    """
    _require_mla_step(q_c, q_r, cache, w_uk, w_uv)
    scale = require_float("scale", scale, positive=True)
    d_c = w_uk.shape[1]
    q = torch.cat([q_c @ w_uk.transpose(-1, -2), q_r], dim=-1)           # (B, H, 1, d_c + d_R)
    p = (scale * (q @ cache.transpose(-1, -2))).softmax(dim=-1)           # (B, H, 1, T): one shared set of rows
    return (p @ cache[..., :d_c]) @ w_uv                                  # (B, H, 1, d_h)


def naive_mla_decode_step(q_c: torch.Tensor, q_r: torch.Tensor, cache: torch.Tensor, w_uk: torch.Tensor,
                          w_uv: torch.Tensor, scale: float) -> torch.Tensor:
    """The same step in the naive form: up-project every cached latent to per-head keys and values.

    Equal to :func:`absorbed_mla_decode_step` up to rounding; kept as the independent reference of the
    tests and as the shortcut the checker must refuse.
    """
    _require_mla_step(q_c, q_r, cache, w_uk, w_uv)
    d_c = w_uk.shape[1]
    c, k_r = cache[..., :d_c], cache[..., d_c:]                          # (B, 1, T, d_c), (B, 1, T, d_R)
    keys, values = c @ w_uk, c @ w_uv                                     # (B, H, T, d_h) each
    scores = (q_c @ keys.transpose(-1, -2) + q_r @ k_r.transpose(-1, -2)) * scale
    return scores.softmax(dim=-1) @ values


def quantize_dequantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Exercise 1's answer written out: the asymmetric ``bits``-bit round trip, statistics over ``dim``.

    Equal to the library's :func:`labsupport.grouped.quantization.quantize_dequantize` (the tests prove it),
    which the exercise's checker refuses inside a learner's function; this copy is the checker's reference.
    """
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round((x - lo) / scale).clamp(0, 2**bits - 1) * scale + lo).to(x.dtype)
