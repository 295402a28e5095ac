"""Chapter 05's exercises: the reference solutions and their checkers.

* exercise 1 — :func:`check_sink_window_mask`: StreamingLLM's mask (sinks + a sliding window, bottom-right causal);
* exercise 2 — :func:`check_page_upper_bound`: Quest's page bound;
* exercise 3 — :func:`check_h2o_evict`: one H2O eviction;
* exercise 4 — :func:`check_block_sparse_loop`: the tiled loop that skips empty tiles;
* :func:`check_streaming_step`: StreamingLLM's cache step — evict the oldest non-sink, write the new token, then
  number the kept tokens inside the cache;
* :func:`check_block_select`: MoBA / NSA-style block selection (mean-pooled block keys, top-n, own block);
* :func:`check_tova_evict`: one TOVA eviction, averaged over the layer's heads as in its paper.

(The notebook uses the last four and the H2O step; the mask and Quest-bound checkers stay for the
library's tests and older workspaces.)

Each checker runs the learner's function against the library's on seeded cases through
:func:`labsupport.harness.checking.check_function`. Exercise 4's cases poison the key blocks that no query
may read with NaN, so a dense answer (which multiplies them by zero probabilities) fails; a NaN logsumexp
where ``−inf`` belongs fails too; and one case caps the largest tensor the answer may create below the
``Lq × Lk`` score matrix, so a dense answer that cleans the NaN away fails as well. No hint prints a formula:
the tiered hints in the notebook do; every checker prints the full recipe when called with ``reveal=True``,
and a failure that matches a known mistake says so (``found``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.diagnosis import known_mistakes
from labsupport.harness.numerics import seeded_randn
from labsupport.sparse.blocksparse import block_sparse_forward
from labsupport.sparse.masks import EMPTY, FULL, PARTIAL, BlockLayout, block_layout, sink_window_mask, sliding_window_mask
from labsupport.sparse.policies import h2o_victim, tova_victim
from labsupport.sparse.selection import block_select_mask, page_upper_bound

__all__ = [
    "block_sparse_loop",
    "check_block_select",
    "check_block_sparse_loop",
    "check_h2o_evict",
    "check_page_upper_bound",
    "check_sink_window_mask",
    "check_streaming_step",
    "check_tova_evict",
    "h2o_evict",
]


# --------------------------------------------------------------------------- exercise 1: the mask


def _mask_reference(lq: int, lk: int, sinks: int, window: int) -> torch.Tensor:
    return sink_window_mask(lq, lk, sinks=sinks, window=window)


_MASK_MISTAKES = known_mistakes({
    "your mask has no sinks: it is a plain sliding window": lambda lq, lk, sinks, window: sink_window_mask(
        lq, lk, sinks=0, window=window),
    "your mask aligns the queries top-left: when lq < lk the queries are the last lk positions (bottom-right)":
        lambda lq, lk, sinks, window: sink_window_mask(lk, lk, sinks=sinks, window=window)[:lq],
})


def check_sink_window_mask(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(lq, lk, sinks, window) -> bool (lq, lk)`` against :func:`~labsupport.sparse.masks.sink_window_mask`."""
    cases = [
        Case("square, 12 tokens, 2 sinks, window 4", (12, 12, 2, 4)),
        Case("one decode query over 20 cached keys (lq = 1)", (1, 20, 3, 5)),
        Case("more queries than keys: the first rows see nothing", (10, 6, 1, 2)),
        Case("no sinks: a plain sliding window", (9, 9, 0, 3)),
        Case("window of 1 (each query sees itself and the sinks)", (8, 8, 2, 1)),
        Case("more sinks than keys", (5, 5, 8, 2)),
    ]
    return check_function(fn, _mask_reference, cases, exercise="sink_window_mask", diagnose=_MASK_MISTAKES,
                          reveal=reveal,
                          recipe="i = arange(lq)[:, None] + (lk − lq) (bottom-right), j = arange(lk)[None]; "
                                 "visible = (j <= i) & ((i − j < window) | (j < sinks)), a torch.bool (lq, lk).",
                          hint="mind the alignment when lq < lk (queries are the last positions) and causality of "
                               "the sinks themselves; return a torch.bool tensor. Tiered hints are above the exercise.")


# --------------------------------------------------------------------------- exercise 2: Quest's bound


def _bound_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(505)
    cases = []
    for name, batch, pages, d, dtype in (("one query, 6 pages of 8-dim keys", (), 6, 8, torch.float64),
                                         ("(B=2, H=3) queries, 5 pages", (2, 3), 5, 16, torch.float64),
                                         ("float32, large scores", (4,), 7, 32, torch.float32)):
        q = seeded_randn(gen, *batch, d, dtype=dtype) * (10.0 if dtype == torch.float32 else 1.0)
        a = seeded_randn(gen, *batch, pages, d, dtype=dtype)
        b = seeded_randn(gen, *batch, pages, d, dtype=dtype)
        cases.append(Case(name, (q, torch.minimum(a, b), torch.maximum(a, b))))
    q = seeded_randn(gen, 8)
    q[::2] = 0.0
    kmin = -torch.rand(3, 8, generator=gen, dtype=torch.float64)
    cases.append(Case("half the query's entries zero, pages straddling 0", (q, kmin, kmin + 1.0)))
    return cases


_BOUND_MISTAKES = known_mistakes({
    "your bound uses kmax for every entry: where q_i < 0 the largest q_i·k_i is at kmin_i":
        lambda q, kmin, kmax: (q[..., None, :] * kmax).sum(-1),
    "your bound is the score of the box's centre, which real keys can exceed":
        lambda q, kmin, kmax: (q[..., None, :] * (kmin + kmax) / 2).sum(-1),
})


def check_page_upper_bound(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(q (..., D), kmin (..., P, D), kmax (..., P, D)) -> (..., P)`` against Quest's bound."""
    return check_function(fn, page_upper_bound, _bound_cases(), exercise="page_upper_bound", atol=1e-5, rtol=1e-6,
                          diagnose=_BOUND_MISTAKES, reveal=reveal,
                          recipe="qe = q[..., None, :]; bound = torch.maximum(qe · kmax, qe · kmin).sum(-1).",
                          hint="the bound must hold for every key inside the box, whatever the sign of each query "
                               "entry; one score per page. Tiered hints are above the exercise.")


# --------------------------------------------------------------------------- exercise 3: H2O eviction


def h2o_evict(accumulated: torch.Tensor, positions: torch.Tensor, incoming: int, recent: int) -> torch.Tensor:
    """One H2O eviction: ``positions`` with the victim's entry set to ``−1`` (a new tensor; inputs untouched).

    The victim, per ``(batch, head)``: among filled slots (``position ≥ 0``) older than the recent window
    (``position ≤ incoming − recent``), the one with the least accumulated attention; the oldest filled slot
    when every filled slot is recent.
    """
    victim = h2o_victim(accumulated, positions, incoming, recent)
    return positions.scatter(-1, victim[..., None], -1)


def _evict_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(606)
    cases = []
    # a full cache of 8 slots filled in order, incoming token 8, recent window 3
    acc = torch.rand(2, 3, 8, generator=gen, dtype=torch.float64)
    pos = torch.arange(8).expand(2, 3, 8).clone()
    cases.append(Case("full cache of 8, slots in text order, recent 3", (acc, pos, 8, 3)))
    # slots out of order (earlier evictions were refilled), the lowest score sits in the recent window
    pos = torch.stack([torch.randperm(10, generator=gen) + 5 for _ in range(4)]).view(2, 2, 10)
    acc = torch.rand(2, 2, 10, generator=gen, dtype=torch.float64)
    acc = torch.where(pos >= 12, acc * 0.01, acc)  # recent tokens have the smallest sums: they must stay
    cases.append(Case("slots out of order; the lowest sums are recent and protected", (acc, pos, 15, 3)))
    # empty slots (capacity above the budget): their accumulated attention is 0 but they hold nothing
    pos = torch.tensor([[[0, 1, -1, 3, 4, -1, 6]]])
    acc = torch.tensor([[[0.5, 0.3, 0.0, 0.2, 0.9, 0.0, 0.1]]], dtype=torch.float64)
    cases.append(Case("empty slots (position −1) must not be chosen", (acc, pos, 7, 2)))
    # every filled slot is recent: evict the oldest
    pos = torch.tensor([[[4, 2, 3]]])
    acc = torch.tensor([[[0.1, 0.8, 0.4]]], dtype=torch.float64)
    cases.append(Case("every token is recent: the oldest goes", (acc, pos, 5, 4)))
    # float32 sums
    acc = torch.rand(1, 4, 16, generator=gen)
    pos = torch.arange(16).expand(1, 4, 16).clone()
    cases.append(Case("float32 sums, 4 heads, recent 1 (only the incoming token)", (acc, pos, 16, 1)))
    return cases


def _h2o_with(accumulated: torch.Tensor, positions: torch.Tensor, incoming: int, recent: int, *,
              hide_empty: bool = True, protect_recent: bool = True) -> torch.Tensor:
    filled = positions >= 0
    candidate = (filled if hide_empty else torch.ones_like(filled)) & (
        positions <= incoming - recent if protect_recent else torch.ones_like(filled))
    by_score = torch.where(candidate, accumulated, torch.full_like(accumulated, math.inf)).argmin(-1)
    oldest = torch.where(filled, positions, torch.full_like(positions, torch.iinfo(torch.int64).max)).argmin(-1)
    victim = torch.where(candidate.any(-1), by_score, oldest)
    return positions.scatter(-1, victim[..., None], -1)


_H2O_MISTAKES = known_mistakes({
    "your victim can be an empty slot (its accumulated attention is 0, the smallest of all): hide empty slots":
        lambda a, p, i, r: _h2o_with(a, p, i, r, hide_empty=False),
    "your victim can be a recent token: positions above incoming − recent are protected":
        lambda a, p, i, r: _h2o_with(a, p, i, r, protect_recent=False),
})


def check_h2o_evict(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(accumulated, positions, incoming, recent) -> new positions`` against :func:`h2o_evict`."""
    return check_function(fn, h2o_evict, _evict_cases(), exercise="h2o_evict", diagnose=_H2O_MISTAKES,
                          reveal=reveal,
                          recipe="candidate = (positions >= 0) & (positions <= incoming − recent); by_score = argmin of "
                                 "accumulated with non-candidates at +inf; oldest = argmin of positions with empty slots "
                                 "at int64 max; victim = where(candidate.any(-1), by_score, oldest); "
                                 "return positions.scatter(-1, victim[..., None], −1).",
                          hint="look at which slots may be evicted at all: empty slots and the recent window are not "
                               "candidates, and a cache whose tokens are all recent still must free one. Tiered "
                               "hints are above the exercise.")


# --------------------------------------------------------------------------- exercise 4: the tile loop


def block_sparse_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference answer of exercise 4: :func:`~labsupport.sparse.blocksparse.block_sparse_forward`.

    Its layout is classified tile by tile here, so that the reference itself never holds a tensor of the mask's
    size (the checker's tiling guard caps the largest tensor an answer creates).
    """
    lq, lk = mask.shape
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    kinds = torch.full((nq, nk), PARTIAL, dtype=torch.int8)
    for row in range(nq):
        for col in range(nk):
            tile = mask[row * block_q:(row + 1) * block_q, col * block_k:(col + 1) * block_k]
            kinds[row, col] = EMPTY if not bool(tile.any()) else FULL if bool(tile.all()) else PARTIAL
    layout = BlockLayout(kinds, block_q, block_k, lq, lk)
    return block_sparse_forward(q, k, v, mask, block_q=block_q, block_k=block_k, layout=layout)


_NO_KEY = -1e30  # what a −inf logsumexp is compared as, so that NaN there is caught


def _comparable(output: Any) -> Any:
    if isinstance(output, tuple) and len(output) == 2 and all(isinstance(t, torch.Tensor) for t in output):
        out, lse = output
        if lse.is_floating_point():
            lse = torch.where(torch.isneginf(lse), torch.full_like(lse, _NO_KEY), lse)
        return out, lse
    return output


def _poisoned(gen: torch.Generator, mask: torch.Tensor, block_q: int, block_k: int, dtype: torch.dtype,
              heads: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lq, lk = mask.shape
    q = seeded_randn(gen, 1, heads, lq, 8, dtype=dtype)
    k = seeded_randn(gen, 1, heads, lk, 8, dtype=dtype)
    v = seeded_randn(gen, 1, heads, lk, 8, dtype=dtype)
    never = (block_layout(mask, block_q, block_k).kinds == EMPTY).all(dim=0)  # key blocks no query block reads
    for col in torch.nonzero(never).flatten().tolist():
        k[..., col * block_k:(col + 1) * block_k, :] = float("nan")
        v[..., col * block_k:(col + 1) * block_k, :] = float("nan")
    return q, k, v


GUARD_L, GUARD_BLOCK = 256, 32  # the tiling guard: a dense answer's scores (1 × 1 × 256 × 256) exceed the cap


def _loop_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(707)
    gap = (torch.arange(64) // 8 != 2)[None, :]  # key block 2 (of 8) is read by nobody
    specs = [
        ("sliding window 10, L = 40, tiles 8×8", sliding_window_mask(40, window=10), 8, 8, torch.float64),
        ("sinks 2 + window 6 with a key block nobody reads (NaN there)",
         sink_window_mask(64, sinks=2, window=6) & gap, 16, 8, torch.float64),
        ("ragged tiles: L = 37, tiles 16×8", sink_window_mask(37, sinks=3, window=9), 16, 8, torch.float64),
        ("more queries than keys: rows that see nothing (lse = −inf)", sliding_window_mask(24, 12, window=4), 8, 4,
         torch.float64),
        ("float32", sliding_window_mask(48, window=12), 16, 16, torch.float32),
    ]
    cases = []
    for name, mask, bq, bk, dtype in specs:
        q, k, v = _poisoned(gen, mask, bq, bk, dtype)
        cases.append(Case(name, (q, k, v, mask, bq, bk)))
    q, k, v = cases[-1].args[:3]
    cases.append(Case("non-contiguous q (a transposed view)",
                      (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, specs[-1][1], 16, 16)))
    guard = sink_window_mask(GUARD_L, sinks=4, window=28)
    q, k, v = _poisoned(gen, guard, GUARD_BLOCK, GUARD_BLOCK, torch.float32, heads=1)
    cases.append(Case(f"tiling guard: sinks 4 + window 28, L = {GUARD_L}, {GUARD_BLOCK}-wide tiles", (q, k, v, guard,
                      GUARD_BLOCK, GUARD_BLOCK), max_elements=GUARD_L * GUARD_L // 4,
                      max_elements_note=(f"A block-sparse loop holds one {GUARD_BLOCK} × {GUARD_BLOCK} tile of scores "
                                         f"at a time, never the {GUARD_L} × {GUARD_L} score matrix (nor a mask-sized "
                                         "float copy of it).")))
    return cases


def _loop_without_scale(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, block_q: int,
                        block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _comparable(block_sparse_loop(q * math.sqrt(q.shape[-1]), k, v, mask, block_q, block_k))


_LOOP_MISTAKES = known_mistakes({
    "your scores are not scaled by 1/√D": _loop_without_scale,
})


def check_block_sparse_loop(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(q, k, v, mask, block_q, block_k) -> (out, lse)``: equal to dense attention, never reading an empty tile."""
    learner: Any = fn
    if callable(fn):
        def learner(q, k, v, mask, block_q, block_k):  # noqa: ANN001, ANN202 - the learner's own signature
            return _comparable(fn(q, k, v, mask, block_q, block_k))
        learner.__name__ = getattr(fn, "__name__", "learner")  # the name the failure message quotes

    def reference(q, k, v, mask, block_q, block_k):  # noqa: ANN001, ANN202
        return _comparable(block_sparse_loop(q, k, v, mask, block_q, block_k))

    return check_function(
        learner, reference, _loop_cases(), exercise="block_sparse_loop", atol=1e-5, rtol=1e-4,
        diagnose=_LOOP_MISTAKES, reveal=reveal, checker="check_block_sparse_loop",
        recipe="per query block: m = −inf, l = 0, acc = 0; per key block: tile = mask[q0:q1, k0:k1]; skip when not "
               "tile.any(); scores = q_tile @ k_tileᵀ / √D, masked_fill(~tile, −inf) unless tile.all(); "
               "m, l, acc = online_softmax_step(m, l, acc, scores, v_tile). At the end out = acc / l and "
               "lse = m + log l where l > 0; zeros and −inf where l = 0.",
        hint="a tile with no visible entry must never be read (its keys may be NaN), the answer may hold one "
             "tile of scores at a time, not the whole score matrix, and a row that saw no key is zeros with "
             "lse = −inf. Tiered hints are above the exercise.",
        output_names=("out", "lse"),
    )


# --------------------------------------------------------------------------- StreamingLLM's cache step


def streaming_step(positions: torch.Tensor, incoming: int, sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of a sinks + window cache: ``(positions after the step, positions inside the cache)``.

    ``positions (..., C)`` int64 holds each slot's token position in the text, ``−1`` for an empty slot. When no
    slot is empty, the oldest token that is not a sink (position ``≥ sinks``) is evicted. The token at position
    ``incoming`` is written into the first empty slot (lowest index). The second output numbers the filled slots
    ``0, 1, …`` in text order (their rank; ``−1`` for an empty slot): the positions the model sees.
    """
    big = torch.iinfo(torch.int64).max
    positions = positions.clone()
    full = (positions >= 0).all(dim=-1, keepdim=True)
    age = positions.masked_fill((positions < 0) | (positions < sinks), big)
    victim = age.argmin(dim=-1, keepdim=True)
    positions = torch.where(full, positions.scatter(-1, victim, -1), positions)
    free = (positions < 0).to(torch.int8).argmax(dim=-1, keepdim=True)
    positions = positions.scatter(-1, free, incoming)
    filled = positions >= 0
    rank = torch.where(filled, positions, big).argsort(dim=-1).argsort(dim=-1)
    return positions, torch.where(filled, rank, torch.full_like(rank, -1))


def _streaming_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(808)
    cases = [
        Case("cache of 6 filling up: two empty slots, nothing to evict", (torch.tensor([[0, 1, 2, 3, -1, -1]]), 4, 2)),
        Case("full cache of 6 in text order, 2 sinks", (torch.tensor([[0, 1, 2, 3, 4, 5]]), 6, 2)),
    ]
    # a cache that has been running for a while: slots hold positions out of text order
    rows = []
    for _ in range(6):
        recent = torch.randperm(6, generator=gen) + 40
        rows.append(torch.cat([torch.tensor([0, 1]), recent])[torch.randperm(8, generator=gen)])
    cases.append(Case("(B=2, H=3) caches after 46 tokens, slots out of order, 2 sinks",
                      (torch.stack(rows).view(2, 3, 8), 46, 2)))
    cases.append(Case("no sinks: a plain window", (torch.tensor([[7, 5, 6, 8]]), 9, 0)))
    cases.append(Case("4 sinks in shuffled slots", (torch.tensor([[12, 2, 0, 13, 3, 11, 1, 14]]), 15, 4)))
    cases.append(Case("one sequence full, the other still filling",
                      (torch.tensor([[[3, 4, 0, 5]], [[0, 1, -1, -1]]]), 6, 1)))
    return cases


_STREAMING_MISTAKES = [
    known_mistakes({"your cache positions are the text positions: the model sees each kept token's rank 0, 1, 2, "
                    "… in text order": lambda p, i, s: (None, streaming_step(p, i, s)[0])}, output=1),
    known_mistakes({"your step evicted a sink: the first `sinks` positions of the text are never evicted":
                    lambda p, i, s: (streaming_step(p, i, 0)[0], None)}, output=0),
]


def check_streaming_step(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(positions, incoming, sinks) -> (positions, cache_positions)`` against :func:`streaming_step`."""
    return check_function(fn, streaming_step, _streaming_cases(), exercise="streaming_step",
                          output_names=("positions", "cache_positions"), diagnose=_STREAMING_MISTAKES,
                          reveal=reveal,
                          recipe="big = int64 max; full = (positions >= 0).all(-1, keepdim=True); age = positions with "
                                 "empty slots and sinks (< sinks) at big; victim = age.argmin(-1, keepdim=True); "
                                 "positions = where(full, positions.scatter(-1, victim, −1), positions); free = "
                                 "(positions < 0).to(int8).argmax(-1, keepdim=True); write incoming there; rank = "
                                 "where(filled, positions, big).argsort(-1).argsort(-1), −1 for empty slots.",
                          hint="evict only when no slot is empty, never a sink; the new token goes to the first "
                               "empty slot; the model's positions are ranks in text order, not slot indices nor "
                               "text positions. Tiered hints are above the exercise.")


# --------------------------------------------------------------------------- block selection (MoBA / NSA)


def block_select(q: torch.Tensor, keys: torch.Tensor, block: int, top_n: int) -> torch.Tensor:
    """The reference answer: :func:`~labsupport.sparse.selection.block_select_mask`."""
    return block_select_mask(q, keys, block, top_n)


def _select_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(909)
    cases = []
    for name, batch, t, d, block, top_n in (("one query, 32 keys in blocks of 8, top 2", (), 32, 8, 8, 2),
                                            ("(B=2, H=2), ragged last block (30 keys, blocks of 8), top 3",
                                             (2, 2), 30, 16, 8, 3),
                                            ("top_n larger than the number of blocks: read everything",
                                             (3,), 20, 8, 4, 9),
                                            ("top 1: only the query's own block", (2,), 24, 8, 6, 1)):
        q = seeded_randn(gen, *batch, d, dtype=torch.float64)
        keys = seeded_randn(gen, *batch, t, d, dtype=torch.float64)
        cases.append(Case(name, (q, keys, block, top_n)))
    # one block whose single key is huge but whose mean is small: max-pooling would pick it, mean-pooling not
    q = torch.ones(8, dtype=torch.float64)
    keys = torch.full((24, 8), 0.1, dtype=torch.float64)
    keys[8:16] = -0.5
    keys[9] = 3.0
    keys[0:8] = 0.2
    cases.append(Case("a block with one large key but a small mean", (q, keys, 8, 2)))
    return cases


def _select_with(q: torch.Tensor, keys: torch.Tensor, block: int, top_n: int, *, pool: str = "mean",
                 own: bool = True) -> torch.Tensor:
    t = keys.shape[-2]
    n_blocks = -(-t // block)
    blocks = [keys[..., b * block:(b + 1) * block, :] for b in range(n_blocks)]
    if pool == "mean":
        scores = (torch.stack([b.mean(-2) for b in blocks], dim=-2) @ q[..., :, None])[..., 0]
    else:
        scores = torch.stack([(b @ q[..., :, None])[..., 0].amax(-1) for b in blocks], dim=-1)
    if own:
        scores[..., -1] = math.inf
    top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :min(top_n, n_blocks)]
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True)
    return chosen.repeat_interleave(block, -1)[..., :t]


_SELECT_MISTAKES = known_mistakes({
    "your blocks are scored by their largest key (max-pooling), not by their mean key":
        lambda q, keys, block, top_n: _select_with(q, keys, block, top_n, pool="max"),
    "your selection does not force the query's own (newest) block in":
        lambda q, keys, block, top_n: _select_with(q, keys, block, top_n, own=False),
})


def check_block_select(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(q (..., D), keys (..., T, D), block, top_n) -> bool (..., T)`` against :func:`block_select_mask`."""
    return check_function(fn, block_select, _select_cases(), exercise="block_select", diagnose=_SELECT_MISTAKES,
                          reveal=reveal,
                          recipe="pad keys to n_blocks·block; means = padded.reshape(..., n_blocks, block, D).sum(-2) / "
                                 "(real keys per block); scores = (means @ q[..., :, None])[..., 0]; scores[..., −1] = "
                                 "inf; top = torch.sort(scores, -1, descending=True, stable=True).indices[..., :top_n]; "
                                 "scatter True into a (..., n_blocks) bool, repeat_interleave(block, -1)[..., :T].",
                          hint="represent each block by one summary key (which summary does the statement name?), "
                               "always include the query's own block, and return one flag per key. Tiered hints "
                               "are above the exercise.")


# --------------------------------------------------------------------------- TOVA


def tova_evict(attention: torch.Tensor, positions: torch.Tensor, newest: int) -> torch.Tensor:
    """One TOVA eviction: ``positions`` with the victim's entry set to ``−1`` in every head (a new tensor)."""
    victim = tova_victim(attention, positions, newest)
    return positions.scatter(-1, victim[..., None], -1)


def _tova_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(1010)
    cases = []
    pos = torch.arange(6).expand(1, 2, 6).clone()
    att = torch.tensor([[[0.02, 0.20, 0.30, 0.18, 0.10, 0.20], [0.40, 0.05, 0.25, 0.10, 0.05, 0.15]]],
                       dtype=torch.float64)
    cases.append(Case("2 heads that disagree: the head average decides", (att, pos, 5)))
    att = torch.softmax(seeded_randn(gen, 2, 4, 8, dtype=torch.float64) * 2, dim=-1)
    order = torch.stack([torch.randperm(8, generator=gen) + 10 for _ in range(2)])
    cases.append(Case("(B=2, H=4), slots out of text order", (att, order[:, None].expand(2, 4, 8).clone(), 17)))
    pos = torch.tensor([[[0, 1, -1, 3, 4, -1]]]).expand(1, 3, 6).clone()
    att = torch.tensor([0.3, 0.2, 0.0, 0.25, 0.25, 0.0], dtype=torch.float64).expand(1, 3, 6).clone()
    cases.append(Case("empty slots (position −1) are not tokens", (att, pos, 4)))
    pos = torch.arange(5).expand(1, 2, 5).clone()
    att = torch.tensor([[[0.3, 0.3, 0.2, 0.19, 0.01], [0.3, 0.3, 0.2, 0.19, 0.01]]])
    cases.append(Case("the newest token has the least attention but stays (float32)", (att, pos, 4)))
    return cases


_TOVA_MISTAKES = known_mistakes({
    "your heads each evict their own token: TOVA averages the attention over the layer's heads and drops one "
    "token from every head": lambda a, p, newest: p.scatter(-1, tova_victim(a, p, newest, per_head=True)[..., None],
                                                            -1),
})


def check_tova_evict(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(attention (B, H, C), positions (B, H, C), newest) -> positions`` against :func:`tova_evict`."""
    return check_function(fn, tova_evict, _tova_cases(), exercise="tova_evict", diagnose=_TOVA_MISTAKES,
                          reveal=reveal,
                          recipe="mean = attention.mean(dim=1); set +inf where positions[:, 0] < 0 or == newest; "
                                 "victim = mean.argmin(-1); positions.scatter(-1, victim[:, None, None].expand(-1, H, 1), "
                                 "−1).",
                          hint="TOVA's paper makes one choice per layer, not per head; empty slots and the newest "
                               "token are never the victim. Tiered hints are above the exercise.")
