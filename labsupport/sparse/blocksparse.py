"""Block-sparse attention: chapter 01's tiled loop that never touches an empty tile.

Two implementations of one computation, both equal to :func:`~labsupport.sparse.reference.masked_attention`:

* :func:`block_sparse_forward` — the readable tile loop. For each block of queries it visits only the key
  blocks its :class:`~labsupport.sparse.masks.BlockLayout` marks *partial* or *full*, applies the mask only
  on partial tiles, and folds each tile in with the online softmax. Work and memory traffic are proportional
  to the tiles visited, not to ``Lq · Lk``.
* :func:`block_sparse_attention` — the same skip arranged for a CPU: the visible key blocks of every query
  block are gathered into one padded list, so a whole group of query blocks runs as a few batched matrix
  products (Python overhead per group, not per tile). This is the one the chapter times against density.
"""

from __future__ import annotations

import torch

from labsupport.harness.numerics import accumulation_dtype
from labsupport.harness.validation import require_positive_int, require_qkv
from labsupport.sparse.masks import EMPTY, FULL, PARTIAL, BlockLayout, WindowPattern, block_layout
from labsupport.sparse.reference import _scale, online_softmax_step, require_mask

__all__ = ["block_sparse_attention", "block_sparse_forward", "gathered_block_indices"]


def _require_mask_or_pattern(mask: object, lq: int, lk: int, where: str) -> torch.Tensor | WindowPattern:
    if isinstance(mask, WindowPattern):
        return mask
    mask = require_mask(mask, lq, lk)
    if mask.dim() != 2:
        raise ValueError(f"{where} takes one (Lq, Lk) mask shared by all heads, got {tuple(mask.shape)}")
    return mask


def _layout_for(mask: torch.Tensor | WindowPattern, layout: BlockLayout | None, block_q: int, block_k: int,
                lq: int, lk: int) -> BlockLayout:
    if layout is None:
        if isinstance(mask, WindowPattern):
            return mask.layout(lq, lk, block_q, block_k)
        return block_layout(mask, block_q, block_k)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout (from block_layout), got {type(layout).__name__}")
    if (layout.lq, layout.lk) != (lq, lk):
        raise ValueError(f"layout is for a {layout.lq}×{layout.lk} mask, the attention is {lq}×{lk}")
    if (layout.block_q, layout.block_k) != (block_q, block_k):
        raise ValueError(f"layout has tiles {layout.block_q}×{layout.block_k}, the call asks for {block_q}×{block_k}: "
                         "build it with block_layout(mask, block_q, block_k) using the same sizes")
    return layout


def block_sparse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
    layout: BlockLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled attention under a 2-D boolean ``mask`` (or a :class:`WindowPattern`) that skips empty tiles.

    Returns ``(out, lse)``.
    ``layout`` (from :func:`~labsupport.sparse.masks.block_layout` with the same block sizes) may be passed
    to avoid recomputing it. Rows that see no key give zeros and ``lse = −inf``.
    """
    q, k, v = require_qkv(q, k, v, ndim=None, same_value_dim=False)
    block_q = require_positive_int("block_q", block_q)
    block_k = require_positive_int("block_k", block_k)
    lq, lk = q.shape[-2], k.shape[-2]
    mask = _require_mask_or_pattern(mask, lq, lk, "block_sparse_forward")
    layout = _layout_for(mask, layout, block_q, block_k, lq, lk)
    s = _scale(q, scale)
    cdt = accumulation_dtype(q.dtype)
    if isinstance(mask, torch.Tensor):
        mask = mask.to(q.device)
    batch = q.shape[:-2]
    out = torch.zeros(*batch, lq, v.shape[-1], dtype=cdt, device=q.device)
    lse = torch.full((*batch, lq), float("-inf"), dtype=cdt, device=q.device)
    for row in range(layout.kinds.shape[0]):
        q0, q1 = row * block_q, min((row + 1) * block_q, lq)
        qi = q[..., q0:q1, :].to(cdt)
        m = torch.full((*batch, q1 - q0), float("-inf"), dtype=cdt, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(*batch, q1 - q0, v.shape[-1], dtype=cdt, device=q.device)
        for col in range(layout.kinds.shape[1]):
            kind = int(layout.kinds[row, col])
            if kind == EMPTY:  # the whole point: this tile is never read
                continue
            k0, k1 = col * block_k, min((col + 1) * block_k, k.shape[-2])
            scores = (qi @ k[..., k0:k1, :].to(cdt).transpose(-1, -2)) * s
            if kind != FULL:
                if isinstance(mask, WindowPattern):
                    tile = mask.mask_mod(torch.arange(q0, q1, device=q.device)[:, None],
                                         torch.arange(k0, k1, device=q.device)[None, :], lq, lk)
                else:
                    tile = mask[q0:q1, k0:k1]
                scores = scores.masked_fill(~tile, float("-inf"))
            m, l, acc = online_softmax_step(m, l, acc, scores, v[..., k0:k1, :].to(cdt))
        seen = l > 0
        safe = torch.where(seen, l, torch.ones_like(l))
        out[..., q0:q1, :] = acc / safe[..., None]
        lse[..., q0:q1] = torch.where(seen, m + torch.log(safe), torch.full_like(m, float("-inf")))
    return out.to(q.dtype), lse


def gathered_block_indices(layout: BlockLayout, *, ragged_is_partial: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query block, the key blocks it visits, padded: ``(indices, valid)`` of shape ``(n_q, width)``.

    Partial blocks come first (so a mask is needed only on the leading columns), then full ones, each in
    order. ``width`` is the largest number of visible key blocks in any row; padding points at block 0 and is
    marked invalid. With ``ragged_is_partial``, a full tile in a ragged last key block counts as partial (its
    padded keys must be masked).
    """
    kinds = _masking_kinds(layout) if ragged_is_partial else layout.kinds
    visible = kinds != EMPTY
    width = max(1, int(visible.sum(dim=1).max()))
    rank = torch.where(kinds == PARTIAL, 0, torch.where(kinds == FULL, 1, 2)).to(torch.int8)
    order = torch.sort(rank, dim=1, stable=True).indices[:, :width]
    valid = visible.gather(1, order)
    return torch.where(valid, order, torch.zeros_like(order)), valid


def _masking_kinds(layout: BlockLayout) -> torch.Tensor:
    kinds = layout.kinds.clone()
    if layout.lk % layout.block_k:
        last = kinds[:, -1]
        last[last == FULL] = PARTIAL
    return kinds


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
    layout: BlockLayout | None = None,
    max_scores: int = 1 << 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with gathered key blocks (the CPU-friendly arrangement); returns ``(out, lse)``.

    Query blocks are processed in groups; each group gathers its visible key and value blocks (and the
    matching mask tiles) into padded ``(group, width · block_k)`` lists and runs one batched
    ``softmax(Q Kᵀ) V``. ``max_scores`` caps the score elements a group holds (per batch×head), bounding
    memory at long lengths. Work is proportional to ``width``, the largest number of visible tiles in a row.

    Differentiable: when autograd records (an input requires grad), the scores are updated out of place, so
    the backward pass is autograd's through the gathered products (it keeps every group's probabilities, not
    a recomputation as chapter 01's backward does); without autograd they are updated in place.
    """
    q, k, v = require_qkv(q, k, v, ndim=None, same_value_dim=False)
    block_q = require_positive_int("block_q", block_q)
    block_k = require_positive_int("block_k", block_k)
    max_scores = require_positive_int("max_scores", max_scores)
    mask = _require_mask_or_pattern(mask, q.shape[-2], k.shape[-2], "block_sparse_attention")
    layout = _layout_for(mask, layout, block_q, block_k, q.shape[-2], k.shape[-2])
    s = _scale(q, scale)
    cdt = accumulation_dtype(q.dtype)
    batch, lq, lk, d, dv = q.shape[:-2], q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    nq, nk = layout.kinds.shape
    pad_q, pad_k = nq * block_q - lq, nk * block_k - lk
    qb = (torch.nn.functional.pad(q, (0, 0, 0, pad_q)).to(cdt) * s).reshape(*batch, nq, block_q, d)
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad_k)).to(cdt).reshape(*batch, nk, block_k, d)
    vb = torch.nn.functional.pad(v, (0, 0, 0, pad_k)).to(cdt).reshape(*batch, nk, block_k, dv)
    pattern = mask if isinstance(mask, WindowPattern) else None
    if pattern is None:
        mask = mask.to(q.device)
        if pad_q or pad_k:
            mask = torch.nn.functional.pad(mask, (0, pad_k, 0, pad_q))
        mask_tiles = mask.view(nq, block_q, nk, block_k).permute(0, 2, 1, 3)  # (nq, nk, bq, bk), a view
    in_place = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    index, valid = gathered_block_indices(layout, ragged_is_partial=True)
    n_partial = (_masking_kinds(layout) == PARTIAL).sum(dim=1)  # tiles that need a mask lead each row's list
    index, valid = index.to(q.device), valid.to(q.device)
    width = index.shape[1]
    group = max(1, max_scores // (block_q * width * block_k))
    out = torch.empty(*batch, nq, block_q, dv, dtype=cdt, device=q.device)
    lse = torch.empty(*batch, nq, block_q, dtype=cdt, device=q.device)
    for r0 in range(0, nq, group):
        rows = slice(r0, min(r0 + group, nq))
        idx = index[rows]  # (g, width)
        g = idx.shape[0]
        keys = kb.index_select(-3, idx.flatten()).reshape(*batch, g, width * block_k, d)
        values = vb.index_select(-3, idx.flatten()).reshape(*batch, g, width * block_k, dv)
        scores = qb[..., rows, :, :] @ keys.transpose(-1, -2)  # (..., g, bq, width·bk), scale folded into q
        pw = int(n_partial[rows].max())
        if pw:  # the mask only on the leading (partial) tiles; full tiles need none
            lead = idx[:, :pw]
            if pattern is not None:  # evaluate the rule on the gathered absolute indices
                cols = (lead[:, :, None] * block_k + torch.arange(block_k, device=q.device)).reshape(g, 1, -1)
                query_rows = torch.arange(r0 * block_q, (r0 + g) * block_q, device=q.device).view(g, block_q, 1)
                tile_mask = pattern.mask_mod(query_rows, cols, lq, lk)
            else:
                tile_mask = mask_tiles[torch.arange(r0, r0 + g, device=q.device)[:, None], lead]  # (g, pw, bq, bk)
                tile_mask = tile_mask.permute(0, 2, 1, 3).reshape(g, block_q, pw * block_k)
            if in_place:
                scores[..., : pw * block_k].masked_fill_(~tile_mask, float("-inf"))
            else:
                rest = torch.zeros(*tile_mask.shape[:-1], scores.shape[-1] - pw * block_k, dtype=torch.bool,
                                   device=q.device)
                scores = scores.masked_fill(torch.cat([~tile_mask, rest], dim=-1), float("-inf"))
        if not bool(valid[rows].all()):  # padding slots of rows with fewer visible tiles
            padding = ~valid[rows].repeat_interleave(block_k, dim=1)[:, None, :]
            scores = scores.masked_fill_(padding, float("-inf")) if in_place else scores.masked_fill(padding, float("-inf"))
        m = scores.amax(dim=-1, keepdim=True).detach()  # any shift gives the same softmax: no gradient needed
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows that see nothing: exp(−inf − 0) = 0
        p = scores.sub_(m).exp_() if in_place else torch.exp(scores - m)
        total = p.sum(dim=-1, keepdim=True)
        seen = total > 0
        out[..., rows, :, :] = (p @ values) / torch.where(seen, total, torch.ones_like(total))
        lse[..., rows, :] = torch.where(seen, m + torch.log(total), torch.full_like(m, float("-inf")))[..., 0]
    out = out.reshape(*batch, nq * block_q, dv)[..., :lq, :]
    return out.to(q.dtype), lse.reshape(*batch, nq * block_q)[..., :lq]
