"""Dynamic selection at decode time: Quest's page bound and NSA's three branches.

* Quest (Tang et al., arXiv:2406.10774): the cache is cut into pages of ``page`` tokens; each page keeps the
  element-wise minimum and maximum of its keys. For a query ``q``, ``Σ_i max(q_i·max_i, q_i·min_i)`` is an
  upper bound of ``q·k`` for every key ``k`` of the page (:func:`page_upper_bound`), so the pages with the
  largest bounds are the only ones that can hold the largest scores. :func:`quest_token_mask` keeps the top
  pages (always the newest one) and hides the rest.
* NSA (Yuan et al., arXiv:2502.11089): one query attends through three branches — compressed blocks
  (here mean-pooled keys of ``compress_block`` tokens every ``compress_stride``; the paper learns the
  compression with a small MLP), the top-``n`` selected blocks of ``select_block`` tokens ranked by the
  compressed branch's attention, and a sliding window — mixed by gates (:func:`nsa_decode`).
  :func:`nsa_token_counts` counts what one decode step reads.
* :func:`block_select_mask` — NSA's selection branch in its simplest form, as MoBA (Lu et al.,
  arXiv:2502.13189) does it: each block of keys is represented by the mean of its keys, the query reads the
  ``top_n`` blocks with the largest ``q · mean`` and always its own (newest) block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from labsupport.harness.costs import nsa_tokens_per_step
from labsupport.harness.numerics import accumulation_dtype, masked_softmax
from labsupport.harness.validation import require_float_tensor, require_positive_int, require_qkv

__all__ = [
    "NSAResult",
    "block_select_mask",
    "nsa_decode",
    "nsa_token_counts",
    "page_bounds",
    "page_upper_bound",
    "quest_token_mask",
]


def page_bounds(keys: torch.Tensor, page: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise minimum and maximum of the keys of each page: ``(kmin, kmax)``, each ``(..., n_pages, D)``.

    Args:
        keys: ``(..., T, D)``, in page order (token ``t`` belongs to page ``t // page``; the last page may
            be ragged).
        valid: optional ``(..., T)`` bool; invalid tokens do not count (a page with none gets ``±inf``
            bounds, which :func:`page_upper_bound` turns into ``−inf``).
    """
    keys = require_float_tensor("keys", keys)
    page = require_positive_int("page", page)
    t, d = keys.shape[-2], keys.shape[-1]
    n_pages = -(-t // page)
    pad = n_pages * page - t
    keys_p = torch.nn.functional.pad(keys, (0, 0, 0, pad))
    ok = torch.ones(keys.shape[:-1], dtype=torch.bool, device=keys.device) if valid is None else valid
    ok = torch.nn.functional.pad(ok, (0, pad), value=False)[..., None]
    shape = (*keys.shape[:-2], n_pages, page, d)
    kmax = torch.where(ok, keys_p, float("-inf")).reshape(shape).amax(dim=-2)
    kmin = torch.where(ok, keys_p, float("inf")).reshape(shape).amin(dim=-2)
    return kmin, kmax


def page_upper_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's page score ``Σ_i max(q_i·kmax_i, q_i·kmin_i)``: ``q (..., D)``, bounds ``(..., P, D)`` → ``(..., P)``.

    For every key ``k`` with ``kmin ≤ k ≤ kmax`` element-wise, ``q·k ≤`` this score: each term
    ``q_i k_i`` is largest at one end of ``[kmin_i, kmax_i]`` (which end depends on the sign of ``q_i``).
    A page without a valid key (bounds ``±inf``) scores ``−inf``.
    """
    q = require_float_tensor("q", q)
    kmin = require_float_tensor("kmin", kmin)
    kmax = require_float_tensor("kmax", kmax)
    if kmin.shape != kmax.shape or kmin.shape[-1] != q.shape[-1]:
        raise ValueError(f"kmin and kmax must share a shape (..., P, D) with D = {q.shape[-1]}; got "
                         f"{tuple(kmin.shape)} and {tuple(kmax.shape)}")
    empty = torch.isinf(kmax).all(dim=-1)
    qe = q[..., None, :]
    bound = torch.maximum(qe * torch.nan_to_num(kmax), qe * torch.nan_to_num(kmin)).sum(dim=-1)
    return bound.masked_fill(empty, float("-inf"))


def quest_token_mask(q: torch.Tensor, keys: torch.Tensor, page: int, n_pages: int,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Which cached tokens a Quest decode step reads: those in the ``n_pages`` pages with the largest bounds.

    ``q (..., D)`` is one query, ``keys (..., T, D)`` the cache in position order; the page holding the
    last token is always read (it is still being filled). Returns a bool ``(..., T)``.
    """
    page = require_positive_int("page", page)
    n_pages = require_positive_int("n_pages", n_pages)
    q = require_float_tensor("q", q)
    keys = require_float_tensor("keys", keys)
    if keys.shape[:-2] != q.shape[:-1] or keys.shape[-1] != q.shape[-1]:
        raise ValueError(f"q (..., D) and keys (..., T, D) must agree; got {tuple(q.shape)} and {tuple(keys.shape)}")
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool
                              or valid.shape != keys.shape[:-1]):
        got = tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be a bool tensor (..., T) = {tuple(keys.shape[:-1])}, one flag per key; got {got}")
    kmin, kmax = page_bounds(keys, page, valid)
    scores = page_upper_bound(q, kmin, kmax)  # (..., P)
    scores[..., -1] = float("inf")  # the newest page is always read
    top = scores.topk(min(n_pages, scores.shape[-1]), dim=-1).indices
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    chosen &= torch.isfinite(scores) | (scores > 0)
    t = keys.shape[-2]
    token_mask = chosen.repeat_interleave(page, dim=-1)[..., :t]
    return token_mask if valid is None else token_mask & valid


# --------------------------------------------------------------------------- block selection (MoBA / NSA)


def block_select_mask(q: torch.Tensor, keys: torch.Tensor, block: int, top_n: int) -> torch.Tensor:
    """The keys one decode query reads under block selection: a bool ``(..., T)``.

    ``q (..., D)`` is the newest query, ``keys (..., T, D)`` the cache in position order, cut into blocks of
    ``block`` tokens (the last one may be ragged). Each block is scored by ``q · (mean of its keys)``; the query
    reads its own block (the newest) and the ``top_n − 1`` other blocks with the largest scores, ties going
    to the earlier block. ``top_n`` at least the number of blocks reads everything.
    """
    q = require_float_tensor("q", q)
    keys = require_float_tensor("keys", keys)
    block = require_positive_int("block", block)
    top_n = require_positive_int("top_n", top_n)
    if keys.dim() < 2 or keys.shape[:-2] != q.shape[:-1] or keys.shape[-1] != q.shape[-1]:
        raise ValueError(f"q (..., D) and keys (..., T, D) must agree; got {tuple(q.shape)} and {tuple(keys.shape)}")
    t = keys.shape[-2]
    n_blocks = -(-t // block)
    pad = n_blocks * block - t
    summed = torch.nn.functional.pad(keys, (0, 0, 0, pad)).reshape(*keys.shape[:-2], n_blocks, block, keys.shape[-1]).sum(-2)
    sizes = torch.full((n_blocks,), float(block), dtype=keys.dtype, device=keys.device)
    sizes[-1] = t - (n_blocks - 1) * block
    means = summed / sizes[:, None]
    scores = (means @ q[..., :, None])[..., 0]  # (..., n_blocks)
    scores[..., -1] = float("inf")  # the query's own block is always read
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : min(top_n, n_blocks)]
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)
    return chosen.repeat_interleave(block, dim=-1)[..., :t]


# --------------------------------------------------------------------------- NSA


def nsa_token_counts(context: int, *, compress_block: int = 32, compress_stride: int = 16, select_block: int = 64,
                     n_selected: int = 16, window: int = 512) -> dict[str, int]:
    """Tokens one NSA decode step reads, by branch: :func:`labsupport.harness.costs.nsa_tokens_per_step`."""
    return nsa_tokens_per_step(context, compress_block=compress_block, compress_stride=compress_stride,
                               select_block=select_block, n_selected=n_selected, window=window)


@dataclass
class NSAResult:
    """One NSA decode step: the gated output, each branch's output and which selection blocks were read."""

    out: torch.Tensor
    branches: dict[str, torch.Tensor]
    selected_blocks: torch.Tensor
    counts: dict[str, int]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    scores = (q[..., None, :] @ k.transpose(-1, -2))[..., 0, :] * scale  # (..., T)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    p = masked_softmax(scores, dim=-1)  # the course's convention for a row that sees no key: zeros, not NaN
    return (p[..., None, :] @ v)[..., 0, :], p


def nsa_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    *,
    compress_block: int = 32,
    compress_stride: int = 16,
    select_block: int = 64,
    n_selected: int = 16,
    window: int = 512,
    scale: float | None = None,
) -> NSAResult:
    """One NSA decode step for the newest query: compressed + selected + window branches, mixed by ``gates``.

    Args:
        q: ``(..., D)``, the query of the last position; k, v: ``(..., T, D)``, the whole cache.
        gates: ``(..., 3)`` in ``[0, 1]`` (sigmoid outputs), for (compressed, selected, window).

    The selection scores of a block are the compressed branch's attention probabilities summed over the
    compression blocks that overlap it (with ``compress_stride`` dividing ``select_block``, as in the paper).
    """
    q3, k, v = require_qkv(q[..., None, :], k, v, ndim=None)
    gates = require_float_tensor("gates", gates)
    if gates.shape != (*q.shape[:-1], 3):
        raise ValueError(f"gates must have shape {(*q.shape[:-1], 3)}, got {tuple(gates.shape)}")
    for name, value in (("compress_block", compress_block), ("compress_stride", compress_stride),
                        ("select_block", select_block), ("n_selected", n_selected), ("window", window)):
        require_positive_int(name, value)
    if select_block % compress_stride:
        raise ValueError(f"select_block ({select_block}) must be a multiple of compress_stride ({compress_stride})")
    cdt = accumulation_dtype(q.dtype)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    t = k.shape[-2]
    counts = nsa_token_counts(t, compress_block=compress_block, compress_stride=compress_stride,
                              select_block=select_block, n_selected=n_selected, window=window)
    n_select_blocks = -(-t // select_block)
    branches: dict[str, torch.Tensor] = {}
    if counts["compressed"]:
        starts = torch.arange(counts["compressed"]) * compress_stride
        idx = starts[:, None] + torch.arange(compress_block)[None, :]  # (C, block)
        k_c, v_c = k[..., idx, :].mean(dim=-2), v[..., idx, :].mean(dim=-2)
        branches["compressed"], p_c = _attend(q, k_c, v_c, None, s)
        # importance of selection block b: compressed blocks overlapping it, weighted by their probability
        overlap = torch.zeros(counts["compressed"], n_select_blocks, dtype=cdt)
        for c, start in enumerate(starts.tolist()):
            first, last = start // select_block, (start + compress_block - 1) // select_block
            overlap[c, first:last + 1] = 1.0
        importance = p_c @ overlap.to(q.device)
    else:
        branches["compressed"] = torch.zeros_like(q)
        importance = torch.zeros(*q.shape[:-1], n_select_blocks, dtype=cdt, device=q.device)
    importance[..., 0] = float("inf")  # the paper always keeps the first block and the local ones
    importance[..., -2:] = float("inf")
    top = importance.topk(min(n_selected, n_select_blocks), dim=-1).indices
    chosen = torch.zeros_like(importance, dtype=torch.bool).scatter_(-1, top, True)
    token_sel = chosen.repeat_interleave(select_block, dim=-1)[..., :t]
    branches["selected"], _ = _attend(q, k, v, token_sel, s)
    in_window = torch.arange(t, device=q.device) >= t - window
    branches["window"], _ = _attend(q, k, v, in_window.expand(*q.shape[:-1], t), s)
    g = gates.to(cdt)
    out = g[..., 0:1] * branches["compressed"] + g[..., 1:2] * branches["selected"] + g[..., 2:3] * branches["window"]
    return NSAResult(out, branches, chosen, counts)

