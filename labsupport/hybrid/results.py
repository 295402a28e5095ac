"""Reading the frontier grid's rows (``benchmarks/hybrid_grid.py``): one summary per configuration, MAD averages,
and the decode state of the grid's attention-fraction stacks.

* :func:`summaries` — JSONL rows → ``{(design, task, seq_len, width): Summary}``: the rate that won the seed-0
  search (or the one fixed rate), the scores of every seed run at it, their mean;
* :func:`mad_average` — a design's mean recall over the six MAD-style tasks (``None`` until all six are in);
* :func:`stack_state_numbers` — numbers a ``stack:PATTERN/hH`` design of the grid holds per sequence (``L`` is
  linear attention with ``H`` heads, state ``d²/H``; ``A`` attention, ``2·d`` per token).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from labsupport.harness.costs import mixer_state_numbers
from labsupport.harness.validation import require_int, require_positive_int

__all__ = ["MAD_TASKS", "Summary", "mad_average", "stack_state_numbers", "summaries"]

#: The six MAD-style tasks of the grid as (task, seq_len); MQAR stands for MAD's in-context recall.
MAD_TASKS: tuple[tuple[str, int], ...] = (("mqar", 64), ("fuzzy_recall", 64), ("noisy_recall", 64),
                                          ("selective_copy", 64), ("compression", 32), ("memorization", 64))


@dataclass(frozen=True)
class Summary:
    """One configuration's result: ``mean`` of ``scores`` (one per seed) at rate ``lr``; ``by_rate`` holds the
    seed-0 score of every rate tried."""

    mean: float
    scores: tuple[float, ...]
    lr: float
    metric: str
    by_rate: Mapping[float, float]

    @property
    def seeds(self) -> int:
        return len(self.scores)


def summaries(rows: Iterable[dict]) -> dict[tuple[str, str, int, int], Summary]:
    """One :class:`Summary` per (design, task, seq_len, width) with a scored ``quality`` row.

    The rate is the one run on the most seeds (the grid searches rates on seed 0 and then runs the winner on
    seeds 1 and 2); among rates with as many seeds, the best mean (higher recall, lower perplexity).
    """
    groups: dict[tuple[str, str, int, int], dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("kind") == "quality" and r.get("score") is not None:
            groups[(r["design"], r["task"], r["seq_len"], r["width"])][r["lr"]].append(r)
    out = {}
    for config, by_lr in groups.items():
        metric = next(iter(by_lr.values()))[0]["metric"]
        sign = 1.0 if metric == "recall" else -1.0
        most = max(len(runs) for runs in by_lr.values())
        lr = max((x for x, runs in by_lr.items() if len(runs) == most),
                 key=lambda x: sign * statistics.fmean(r["score"] for r in by_lr[x]))
        scores = tuple(r["score"] for r in sorted(by_lr[lr], key=lambda r: r["seed"]))
        first = {x: next((r["score"] for r in runs if r["seed"] == 0), runs[0]["score"]) for x, runs in by_lr.items()}
        out[config] = Summary(statistics.fmean(scores), scores, lr, metric, first)
    return out


def mad_average(results: Mapping[tuple[str, str, int, int], Summary], design: str, width: int = 64
                ) -> float | None:
    """Mean recall of ``design`` over :data:`MAD_TASKS` at ``width``; ``None`` if a task is missing."""
    hits = [results.get((design, task, length, width)) for task, length in MAD_TASKS]
    if any(h is None for h in hits):
        return None
    return statistics.fmean(h.mean for h in hits)  # type: ignore[union-attr]


def stack_state_numbers(design: str, context: int, d_model: int) -> int:
    """Numbers a grid stack ``stack:PATTERN/hH`` holds for one sequence after ``context`` tokens.

    >>> stack_state_numbers("stack:LLLA/h16", 1024, 64)   # 3 × 64²/16 + 2·64·1024
    131840
    """
    if not isinstance(design, str) or not design.startswith("stack:") or "/h" not in design:
        raise ValueError(f"expected a design 'stack:PATTERN/hH' (e.g. 'stack:LLLA/h16'), got {design!r}")
    pattern, heads_text = design[len("stack:"):].split("/h")
    if not pattern or set(pattern) - {"L", "A"} or not heads_text.isdigit():
        raise ValueError(f"{design!r}: the pattern uses L and A only and H is a whole number")
    context = require_int("context", context, minimum=0)
    d_model = require_positive_int("d_model", d_model)
    heads = require_positive_int("H", int(heads_text))
    linear = mixer_state_numbers("linear", context=context, heads=heads, d_k=d_model // heads, d_v=d_model // heads)
    attention = mixer_state_numbers("attention", context=context, kv_width=2 * d_model)
    return sum(attention if c == "A" else linear for c in pattern)
