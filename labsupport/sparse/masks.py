"""Static sparse patterns as boolean masks, and as block layouts that a tiled loop can skip.

A *mask* is a boolean ``(Lq, Lk)`` tensor, ``True`` where query ``i`` may read key ``j``. Every causal
pattern is aligned to the *bottom right*, as in chapter 01: query ``i`` of ``Lq`` sits at absolute position
``p = i + (Lk − Lq)`` and may only read keys ``j ≤ p``. A row that reads no key is allowed (it happens with
``Lq > Lk``, or with patterns that leave a query alone): attention gives it zeros and a logsumexp of ``−inf``.

* :func:`sliding_window_mask` — the last ``window`` keys (the query itself included).
* :func:`sink_window_mask` — the first ``sinks`` keys plus a sliding window (StreamingLLM's pattern).
* :func:`dilated_mask` — every ``dilation``-th key, ``window`` of them.
* :func:`global_token_mask` — a few global tokens that read everything and are read by everyone.
* :func:`random_block_mask` — BigBird's random key blocks, a fixed number per query block.
* :func:`bigbird_mask` — global + sliding (in blocks) + random blocks.

A :class:`BlockLayout` (:func:`block_layout`) sorts the ``(block_q × block_k)`` tiles of a mask into
*empty* (skip it), *partial* (compute it and apply the mask) and *full* (compute it, no mask needed).

At long lengths a dense ``(L, L)`` mask does not fit (``L = 65,536`` is 4 GiB of booleans). A
:class:`WindowPattern` describes sinks + a sliding window by a rule instead — ``mask_mod(rows, cols)``, as
FlexAttention's ``mask_mod`` does — and computes its block layout from tile corners without forming the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labsupport.harness.validation import require_int, require_positive_int, require_tensor

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "BlockLayout",
    "WindowPattern",
    "bigbird_mask",
    "block_layout",
    "causal_mask",
    "dilated_mask",
    "global_token_mask",
    "mask_density",
    "random_block_mask",
    "sink_window_mask",
    "sliding_window_mask",
]

#: Tile kinds of a :class:`BlockLayout`.
EMPTY, PARTIAL, FULL = 0, 1, 2


def _lengths(lq: int, lk: int | None) -> tuple[int, int]:
    lq = require_positive_int("lq", lq)
    lk = lq if lk is None else require_positive_int("lk", lk)
    return lq, lk


def _offsets(lq: int, lk: int) -> torch.Tensor:
    """``p − j`` for every (query, key): how far key ``j`` lies behind query ``i``'s absolute position ``p``."""
    p = torch.arange(lq)[:, None] + (lk - lq)
    return p - torch.arange(lk)[None, :]


def causal_mask(lq: int, lk: int | None = None) -> torch.Tensor:
    """Bottom-right causal mask: key ``j`` is visible to query ``i`` when ``j ≤ i + (lk − lq)``."""
    lq, lk = _lengths(lq, lk)
    return _offsets(lq, lk) >= 0


def sliding_window_mask(lq: int, lk: int | None = None, *, window: int, causal: bool = True) -> torch.Tensor:
    """The ``window`` most recent keys, the query's own position included (``0 ≤ p − j < window``).

    With ``causal=False`` the window is symmetric: ``|p − j| < window``.
    """
    lq, lk = _lengths(lq, lk)
    window = require_positive_int("window", window)
    d = _offsets(lq, lk)
    return (d >= 0) & (d < window) if causal else d.abs() < window


def sink_window_mask(lq: int, lk: int | None = None, *, sinks: int, window: int) -> torch.Tensor:
    """StreamingLLM's pattern: the first ``sinks`` keys plus the ``window`` most recent, causal."""
    lq, lk = _lengths(lq, lk)
    sinks = require_int("sinks", sinks, minimum=0)
    window = require_positive_int("window", window)
    d = _offsets(lq, lk)
    return (d >= 0) & ((d < window) | (torch.arange(lk)[None, :] < sinks))


def dilated_mask(length: int, *, window: int, dilation: int, causal: bool = True) -> torch.Tensor:
    """Every ``dilation``-th key: offsets ``0, dilation, …, (window − 1)·dilation`` (both sides unless causal)."""
    length = require_positive_int("length", length)
    window = require_positive_int("window", window)
    dilation = require_positive_int("dilation", dilation)
    d = _offsets(length, length)
    reach = d.abs() if not causal else d
    return (reach >= 0) & (reach % dilation == 0) & (reach < window * dilation)


def global_token_mask(length: int, *, global_tokens: int, causal: bool = True) -> torch.Tensor:
    """The first ``global_tokens`` positions read every key and are read by every query.

    Causal: a global query still reads only its past, and a global key is read by the queries after it.
    This is the global part only; combine it with a window (``|``) for a usable pattern.
    """
    length = require_positive_int("length", length)
    global_tokens = require_int("global_tokens", global_tokens, minimum=0, maximum=length)
    is_global = torch.arange(length) < global_tokens
    mask = is_global[:, None] | is_global[None, :]
    return mask & causal_mask(length) if causal else mask


def random_block_mask(length: int, *, block: int, per_row: int, seed: int = 0, causal: bool = True,
                      exclude: torch.Tensor | None = None) -> torch.Tensor:
    """BigBird's random part: each query block reads ``per_row`` key blocks drawn at random.

    Causal: drawn among the blocks strictly before the diagonal (fewer when there are fewer), and the
    result is intersected with the causal mask. ``exclude`` (a bool ``(n_blocks, n_blocks)``) names blocks a
    row must not draw (BigBird draws outside its window and global blocks). Deterministic for a given ``seed``.
    """
    length = require_positive_int("length", length)
    block = require_positive_int("block", block)
    per_row = require_int("per_row", per_row, minimum=0)
    gen = torch.Generator().manual_seed(require_int("seed", seed))
    n_blocks = -(-length // block)
    if exclude is not None and (not isinstance(exclude, torch.Tensor) or exclude.shape != (n_blocks, n_blocks)):
        raise ValueError(f"exclude must be a bool tensor ({n_blocks}, {n_blocks}), one flag per block pair")
    chosen = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    for r in range(n_blocks):
        candidates = torch.arange(r) if causal else torch.arange(n_blocks)
        if exclude is not None:
            candidates = candidates[~exclude[r, candidates]]
        if len(candidates) == 0:
            continue
        take = candidates[torch.randperm(len(candidates), generator=gen)[:per_row]]
        chosen[r, take] = True
    mask = chosen.repeat_interleave(block, 0).repeat_interleave(block, 1)[:length, :length]
    return mask & causal_mask(length) if causal else mask


def bigbird_mask(length: int, *, block: int = 64, window_blocks: int = 3, random_blocks: int = 3,
                 global_blocks: int = 1, seed: int = 0, causal: bool = False) -> torch.Tensor:
    """BigBird: ``global_blocks`` global blocks, a sliding window of ``window_blocks`` blocks, random blocks.

    The window is counted in blocks around the query's block (``window_blocks = 3``: its own block and
    one on each side; causal: its own block and the ``window_blocks − 1`` before it). The random blocks are
    drawn outside the window and global blocks, as BigBird's code does, so each adds keys of its own.
    """
    block = require_positive_int("block", block)
    window_blocks = require_positive_int("window_blocks", window_blocks)
    length = require_positive_int("length", length)
    global_blocks = require_int("global_blocks", global_blocks, minimum=0)
    blocks = torch.arange(length) // block
    gap = blocks[:, None] - blocks[None, :]
    if causal:
        window = (gap >= 0) & (gap < window_blocks)
    else:
        window = gap.abs() <= window_blocks // 2
    n_blocks = -(-length // block)
    b = torch.arange(n_blocks)
    block_gap = b[:, None] - b[None, :]
    taken = ((block_gap >= 0) & (block_gap < window_blocks)) if causal else (block_gap.abs() <= window_blocks // 2)
    taken |= (b[None, :] < global_blocks) | (b[:, None] < global_blocks)
    mask = window | global_token_mask(length, global_tokens=min(length, global_blocks * block), causal=causal)
    mask |= random_block_mask(length, block=block, per_row=random_blocks, seed=seed, causal=causal, exclude=taken)
    return mask & causal_mask(length) if causal else mask


def mask_density(mask: torch.Tensor) -> float:
    """Fraction of (query, key) pairs a mask keeps."""
    mask = require_tensor("mask", mask, ndim=2)
    return float(mask.float().mean())


@dataclass(frozen=True)
class BlockLayout:
    """The tiles of a mask, sorted by what a tiled loop must do with them.

    Attributes:
        kinds: ``(n_query_blocks, n_key_blocks)`` int8 tensor of :data:`EMPTY`, :data:`PARTIAL`, :data:`FULL`.
        block_q, block_k: tile sizes; the last row/column of tiles may be ragged.
        lq, lk: the mask's shape.
    """

    kinds: torch.Tensor
    block_q: int
    block_k: int
    lq: int
    lk: int

    @property
    def tiles(self) -> int:
        """Number of tiles in the grid."""
        return self.kinds.numel()

    @property
    def tiles_visited(self) -> int:
        """Tiles a block-sparse loop computes (partial + full)."""
        return int((self.kinds != EMPTY).sum())

    @property
    def tile_density(self) -> float:
        """Fraction of tiles computed: what a block-sparse kernel's work is proportional to."""
        return self.tiles_visited / self.tiles

    def visible_blocks(self, row: int) -> list[int]:
        """Key-block indices that query block ``row`` must visit, in order."""
        return torch.nonzero(self.kinds[row] != EMPTY).flatten().tolist()

    def __repr__(self) -> str:
        counts = [int((self.kinds == kind).sum()) for kind in (EMPTY, PARTIAL, FULL)]
        return (f"BlockLayout({self.lq}×{self.lk} in {self.block_q}×{self.block_k} tiles: "
                f"{counts[2]} full, {counts[1]} partial, {counts[0]} empty; tile density {self.tile_density:.3f})")


def block_layout(mask: torch.Tensor, block_q: int = 64, block_k: int = 64) -> BlockLayout:
    """Classify every ``block_q × block_k`` tile of ``mask`` as empty, partial or full."""
    mask = require_tensor("mask", mask, ndim=2)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = visible), got {mask.dtype}")
    block_q = require_positive_int("block_q", block_q)
    block_k = require_positive_int("block_k", block_k)
    lq, lk = mask.shape
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    padded = torch.zeros(nq * block_q, nk * block_k, dtype=torch.int32)
    inside = torch.zeros_like(padded)
    padded[:lq, :lk] = mask.to(torch.int32).cpu()
    inside[:lq, :lk] = 1
    tiles = lambda t: t.view(nq, block_q, nk, block_k).sum(dim=(1, 3))  # noqa: E731
    visible, size = tiles(padded), tiles(inside)
    kinds = torch.full((nq, nk), PARTIAL, dtype=torch.int8)
    kinds[visible == 0] = EMPTY
    kinds[visible == size] = FULL
    return BlockLayout(kinds, block_q, block_k, lq, lk)


@dataclass(frozen=True)
class WindowPattern:
    """Sinks + a causal sliding window, described by a rule instead of a stored mask.

    Key ``j`` is visible to query ``i`` (absolute position ``p = i + lk − lq``) when ``0 ≤ p − j`` and
    (``p − j < window`` or ``j < sinks``): :func:`sink_window_mask` (``sinks = 0``: :func:`sliding_window_mask`).
    """

    window: int
    sinks: int = 0

    def __post_init__(self) -> None:
        require_positive_int("window", self.window)
        require_int("sinks", self.sinks, minimum=0)

    def mask_mod(self, rows: torch.Tensor, cols: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
        """Visibility of key indices ``cols`` to query indices ``rows`` (broadcast together)."""
        d = rows + (lk - lq) - cols
        return (d >= 0) & ((d < self.window) | (cols < self.sinks)) & (cols < lk) & (rows < lq)

    def mask(self, lq: int, lk: int | None = None) -> torch.Tensor:
        """The dense boolean mask (small lengths only)."""
        return sink_window_mask(lq, lk, sinks=self.sinks, window=self.window)

    def layout(self, lq: int, lk: int | None, block_q: int = 64, block_k: int = 64) -> BlockLayout:
        """The block layout from tile corners: ``O(tiles)`` work, no ``(Lq, Lk)`` mask formed."""
        lq, lk = _lengths(lq, lk)
        block_q, block_k = require_positive_int("block_q", block_q), require_positive_int("block_k", block_k)
        nq, nk = -(-lq // block_q), -(-lk // block_k)
        q0 = torch.arange(nq)[:, None] * block_q
        q1 = torch.clamp(q0 + block_q, max=lq)
        k0 = torch.arange(nk)[None, :] * block_k
        k1 = torch.clamp(k0 + block_k, max=lk)
        off = lk - lq
        d_min, d_max = q0 + off - (k1 - 1), (q1 - 1) + off - k0  # p − j takes every value in between
        any_window = (d_max >= 0) & (d_min < self.window)
        any_sink = (k0 < self.sinks) & (d_max >= 0)
        # full: every key is in the past, and every non-sink key is inside the window
        first_plain = torch.clamp(k0, min=self.sinks)
        plain_in_window = (k1 <= self.sinks) | ((q1 - 1) + off - first_plain < self.window)
        kinds = torch.full((nq, nk), PARTIAL, dtype=torch.int8)
        kinds[~(any_window | any_sink)] = EMPTY
        kinds[(d_min >= 0) & plain_in_window] = FULL
        return BlockLayout(kinds, block_q, block_k, lq, lk)
