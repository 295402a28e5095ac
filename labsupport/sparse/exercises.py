"""Chapter 05's exercises: the reference solutions and their checkers.

* exercise 1 — :func:`check_sink_window_mask`: StreamingLLM's mask (sinks + a sliding window, bottom-right causal);
* exercise 2 — :func:`check_page_upper_bound`: Quest's page bound;
* exercise 3 — :func:`check_h2o_evict`: one H2O eviction;
* exercise 4 — :func:`check_block_sparse_loop`: the tiled loop that skips empty tiles.

Each checker runs the learner's function against the library's on seeded cases through
:func:`labsupport.harness.checking.check_function`. Exercise 4's cases poison the key blocks that no query
may read with NaN, so a dense answer (which multiplies them by zero probabilities) fails; a NaN logsumexp
where ``−inf`` belongs fails too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.numerics import seeded_randn
from labsupport.sparse.blocksparse import block_sparse_forward
from labsupport.sparse.masks import EMPTY, block_layout, sink_window_mask, sliding_window_mask
from labsupport.sparse.policies import h2o_victim
from labsupport.sparse.selection import page_upper_bound

__all__ = [
    "block_sparse_loop",
    "check_block_sparse_loop",
    "check_h2o_evict",
    "check_page_upper_bound",
    "check_sink_window_mask",
    "h2o_evict",
]


# --------------------------------------------------------------------------- exercise 1: the mask


def _mask_reference(lq: int, lk: int, sinks: int, window: int) -> torch.Tensor:
    return sink_window_mask(lq, lk, sinks=sinks, window=window)


def check_sink_window_mask(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(lq, lk, sinks, window) -> bool (lq, lk)`` against :func:`~labsupport.sparse.masks.sink_window_mask`."""
    cases = [
        Case("square, 12 tokens, 2 sinks, window 4", (12, 12, 2, 4)),
        Case("one decode query over 20 cached keys (lq = 1)", (1, 20, 3, 5)),
        Case("more queries than keys: the first rows see nothing", (10, 6, 1, 2)),
        Case("no sinks: a plain sliding window", (9, 9, 0, 3)),
        Case("window of 1 (each query sees itself and the sinks)", (8, 8, 2, 1)),
        Case("more sinks than keys", (5, 5, 8, 2)),
    ]
    return check_function(fn, _mask_reference, cases, exercise="sink_window_mask",
                          hint="query i sits at position p = i + (lk − lq); key j is visible when j ≤ p and "
                               "(p − j < window or j < sinks). Return a torch.bool tensor.")


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


def check_page_upper_bound(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(q (..., D), kmin (..., P, D), kmax (..., P, D)) -> (..., P)`` against Quest's bound."""
    return check_function(fn, page_upper_bound, _bound_cases(), exercise="page_upper_bound", atol=1e-5, rtol=1e-6,
                          hint="each term q_i·k_i is largest at one end of [kmin_i, kmax_i]; which end depends on "
                               "the sign of q_i. Sum over i; keep one score per page.")


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


def check_h2o_evict(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(accumulated, positions, incoming, recent) -> new positions`` against :func:`h2o_evict`."""
    return check_function(fn, h2o_evict, _evict_cases(), exercise="h2o_evict",
                          hint="candidates are filled slots (position ≥ 0) with position ≤ incoming − recent; pick "
                               "the smallest accumulated attention among them (argmin after hiding the others with "
                               "+inf); if there is none, the oldest filled slot. Set its position to −1.")


# --------------------------------------------------------------------------- exercise 4: the tile loop


def block_sparse_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference answer of exercise 4: :func:`~labsupport.sparse.blocksparse.block_sparse_forward`."""
    return block_sparse_forward(q, k, v, mask, block_q=block_q, block_k=block_k)


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
    return cases


def check_block_sparse_loop(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(q, k, v, mask, block_q, block_k) -> (out, lse)``: equal to dense attention, never reading an empty tile."""
    learner: Any = fn
    if callable(fn):
        def learner(q, k, v, mask, block_q, block_k):  # noqa: ANN001, ANN202 - the learner's own signature
            return _comparable(fn(q, k, v, mask, block_q, block_k))

    def reference(q, k, v, mask, block_q, block_k):  # noqa: ANN001, ANN202
        return _comparable(block_sparse_loop(q, k, v, mask, block_q, block_k))

    return check_function(
        learner, reference, _loop_cases(), exercise="block_sparse_loop", atol=1e-5, rtol=1e-4,
        hint="classify each tile of the mask: skip it when no entry is visible (its keys may be NaN: never "
             "read them), mask it when only some are, fold it in with sparse.online_softmax_step; rows that saw "
             "no key get zeros and lse = −inf.",
        output_names=("out", "lse"),
    )
