"""Chapter 02's core exercises: the two ideas of the chapter done by the learner.

* :func:`mean_pool_kv` / :func:`check_mean_pool_kv` — the GQA paper's conversion of a
  multi-head checkpoint: average the key and value projections of each group of heads,
  working on the weight matrix as ``nn.Linear`` stores it.
* :func:`absorbed_mla_decode_step` / :func:`check_absorbed_mla_decode_step` — one MLA decode
  step in the absorbed form, attending over the latent cache without ever building per-head
  keys or values. Its checker also counts the multiply-adds per cached token
  (``torch.utils.flop_counter``), so the naive form — up-projecting the whole cache at every
  step, which gives the same numbers — is refused.

Hints come in two tiers: a failed check prints the idea only; the notebook keeps the formula
behind a second, folded hint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from labsupport.grouped.reference import latent_attention_core
from labsupport.harness.checking import STRICT_ENV_VAR, Case, CheckResult, check_function
from labsupport.harness.validation import require_float, require_float_tensor, require_positive_int

__all__ = [
    "absorbed_mla_decode_step",
    "check_absorbed_mla_decode_step",
    "check_mean_pool_kv",
    "mean_pool_kv",
]


# ----------------------------------------------------------------------------- mean-pool conversion


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


def _mean_pool_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(21)

    def weight(old: int, head_dim: int, d_model: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(2 * old * head_dim, d_model, generator=gen).to(dtype)

    return [
        Case("4 KV heads -> 2 (head_dim 3, d_model 5)", (weight(4, 3, 5), 3, 2)),
        Case("4 KV heads -> 1 (MQA)", (weight(4, 2, 6), 2, 1)),
        Case("8 KV heads -> 2: groups of 4 consecutive heads", (weight(8, 2, 4), 2, 2)),
        Case("6 KV heads -> 3: groups of 2", (weight(6, 4, 3), 4, 3)),
        Case("unchanged: 3 KV heads -> 3", (weight(3, 2, 5), 2, 3)),
        Case("float64, 4 -> 2", (weight(4, 5, 7, torch.float64), 5, 2)),
        Case("a weight stored transposed in memory (non-contiguous)",
             (torch.randn(6, 2 * 4 * 2, generator=gen).t(), 2, 2)),
    ]


def check_mean_pool_kv(fn: Callable[..., torch.Tensor], reveal: bool = False) -> CheckResult:
    """Check ``mean_pool_kv(kv_weight, head_dim, n_kv_heads)`` against :func:`mean_pool_kv`."""
    return check_function(
        fn, mean_pool_kv, _mean_pool_cases(), exercise="mean-pool conversion to GQA", atol=1e-6, rtol=1e-5,
        reveal=reveal,
        hint="give the rows their meaning first (keys or values, which KV head, which row of the head), then "
             "decide which old heads form one new head. Tiered hints are above the exercise.",
        recipe="view kv_weight as (2, G, head_dim, d_model); view G as (G', G // G'); mean over the G // G' axis "
               "(consecutive heads); reshape back to (2 · G' · head_dim, d_model).",
    )


# ----------------------------------------------------------------------------- absorbed MLA decode step


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
    q_latent = q_c @ w_uk.transpose(-1, -2)                               # (B, H, 1, d_c)
    attended = latent_attention_core(torch.cat([q_latent, q_r], dim=-1), cache, w_uk.shape[1], scale)
    return attended @ w_uv                                                # (B, H, 1, d_h)


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


def _mla_step_args(gen: torch.Generator, b: int, h: int, t: int, d_h: int, d_c: int, d_r: int,
                   dtype: torch.dtype = torch.float32) -> tuple:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return (randn(b, h, 1, d_h), randn(b, h, 1, d_r), randn(b, 1, t, d_c + d_r), randn(h, d_c, d_h) / 2,
            randn(h, d_c, d_h) / 2, 1.0 / math.sqrt(d_h + d_r))


def _mla_step_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(22)
    wide = _mla_step_args(gen, 1, 2, 5, 4, 6, 2)
    return [
        Case("B=1, 2 heads, 5 cached tokens, d_h=4, d_c=6, d_R=2", _mla_step_args(gen, 1, 2, 5, 4, 6, 2)),
        Case("B=2, 4 heads, 9 cached tokens, a latent narrower than the heads (d_c=3, d_h=8)",
             _mla_step_args(gen, 2, 4, 9, 8, 3, 4)),
        Case("one cached token (the newest)", _mla_step_args(gen, 1, 3, 1, 4, 5, 2)),
        Case("large scores (queries × 20)", (wide[0] * 20, wide[1] * 20, *wide[2:])),
        Case("float64, 3 heads, 12 cached tokens", _mla_step_args(gen, 2, 3, 12, 4, 6, 2, torch.float64)),
        Case("a cache that is a view into a longer buffer (non-contiguous)",
             (*_mla_step_args(gen, 1, 2, 7, 4, 6, 2)[:2], torch.randn(1, 1, 16, 8, generator=gen)[:, :, 3:10],
              *_mla_step_args(gen, 1, 2, 7, 4, 6, 2)[3:])),
    ]


def _matmul_flops(fn: Callable[..., object], args: tuple) -> int:
    """Multiply-add FLOPs of the matrix products ``fn(*args)`` runs (0 when it raises)."""
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            fn(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    except Exception:
        return 0
    return counter.get_total_flops()


def _fail(exercise: str, message: str) -> CheckResult:
    print(message)
    if os.environ.get(STRICT_ENV_VAR, "") == "1":
        raise AssertionError(message)
    return CheckResult(exercise, "failed", message)


def check_absorbed_mla_decode_step(fn: Callable[..., torch.Tensor], reveal: bool = False) -> CheckResult:
    """Check ``absorbed_mla_decode_step(q_c, q_r, cache, w_uk, w_uv, scale)``: values, then the work per token.

    After the values match, the learner's step runs on a cache of 512 tokens with 4 heads of 32, a latent
    of 8 and a RoPE part of 4. Up-projecting the cache costs ``2 · 2 · H · d_c · d_h`` = 4,096 FLOPs per cached
    token; the absorbed form needs ``2 · H · (2 d_c + d_R)`` = 160. An answer above a quarter of the naive
    count is refused, with the count in the message.
    """
    exercise = "absorbed MLA decode step"
    result = check_function(fn, absorbed_mla_decode_step, _mla_step_cases(), exercise=exercise, atol=1e-5,
                            rtol=1e-4, quiet=True, reveal=reveal,
                            hint="the cache is read as it is, never up-projected: ask where each of W_UK and W_UV "
                                 "can move instead. Tiered hints are above the exercise.",
                            recipe="q_latent = q_c @ w_ukᵀ (B, H, 1, d_c); scores = scale · ([q_latent, q_r] · "
                                   "cache rows) over the T cached rows, no up-projection; p = softmax over T; "
                                   "return (p @ cache[..., :d_c]) @ w_uv.",
                            checker="check_absorbed_mla_decode_step")
    if not result.passed:
        print(result.message)
        return result
    b, h, t, d_h, d_c, d_r = 1, 4, 512, 32, 8, 4
    args = _mla_step_args(torch.Generator().manual_seed(23), b, h, t, d_h, d_c, d_r)
    per_token = _matmul_flops(fn, args) / t
    naive_per_token = 2 * 2 * h * d_c * d_h
    if per_token > naive_per_token / 4:
        return _fail(exercise,
                     f"❌ {exercise}: the values are right, but on a cache of {t} tokens (4 heads of 32, d_c=8, "
                     f"d_R=4) your step did {per_token:,.0f} FLOPs of matrix products per cached token; "
                     f"up-projecting the cache costs {naive_per_token:,} and the absorbed form about "
                     f"{2 * h * (2 * d_c + d_r):,}.\n   hint    nothing of size T × H × d_h should be built: move "
                     f"W_UK onto the query and W_UV after the attention, so the cache is only read.")
    message = (f"✅ {exercise}: passed {result.cases_total} cases, and read the cache without up-projecting it "
               f"({per_token:,.0f} FLOPs per cached token; the naive form needs {naive_per_token:,}).")
    print(message)
    return CheckResult(exercise, "passed", message, result.cases_total, result.cases_total)
