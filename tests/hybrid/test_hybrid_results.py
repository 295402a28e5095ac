"""Reading the grid's rows: the rate that won, MAD averages, the stacks' state."""

from __future__ import annotations

import pytest

from labsupport.hybrid.results import MAD_TASKS, mad_average, stack_state_numbers, summaries


def _row(design, task, length, lr, seed, score, metric="recall", width=64):
    return {"kind": "quality", "design": design, "task": task, "seq_len": length, "lr": lr, "seed": seed,
            "width": width, "metric": metric, "score": score}


def test_summaries_take_the_rate_run_on_every_seed_and_lower_perplexity_wins() -> None:
    rows = [_row("a", "mqar", 64, 3e-3, 0, 0.9), _row("a", "mqar", 64, 1e-2, 0, 0.5),
            _row("a", "mqar", 64, 1e-2, 1, 0.7), _row("a", "mqar", 64, 1e-2, 2, 0.6),
            _row("a", "char_lm", 128, 3e-3, 0, 5.0, "perplexity"), _row("a", "char_lm", 128, 1e-2, 0, 4.0,
                                                                          "perplexity"),
            {"kind": "quality", "design": "a", "task": "needle", "seq_len": 128, "lr": 1e-2, "seed": 0,
             "width": 64, "metric": "recall", "score": None, "failed": "boom"},
            {"kind": "cost", "design": "a"}]
    got = summaries(rows)
    s = got[("a", "mqar", 64, 64)]
    assert s.lr == 1e-2 and s.scores == (0.5, 0.7, 0.6) and abs(s.mean - 0.6) < 1e-12 and s.seeds == 3
    assert s.by_rate == {3e-3: 0.9, 1e-2: 0.5}
    assert got[("a", "char_lm", 128, 64)].lr == 1e-2
    assert ("a", "needle", 128, 64) not in got


def test_mad_average_needs_all_six_tasks() -> None:
    rows = [_row("h", t, L, 1e-2, s, 0.1 * (i + 1)) for i, (t, L) in enumerate(MAD_TASKS) for s in range(3)]
    results = summaries(rows)
    assert abs(mad_average(results, "h") - 0.35) < 1e-12
    assert mad_average(summaries(rows[3:]), "h") is None
    assert mad_average(results, "h", width=32) is None


def test_stack_state_counts_linear_heads_and_the_attention_cache() -> None:
    assert stack_state_numbers("stack:LLLL/h1", 4096, 64) == 4 * 64 * 64
    assert stack_state_numbers("stack:LLLL/h16", 10, 64) == 4 * 16 * 4 * 4
    assert stack_state_numbers("stack:ALLL/h1", 100, 64) == 2 * 64 * 100 + 3 * 64 * 64
    for bad in ("LLLA/h1", "stack:LLXA/h1", "stack:LLLA", "stack:LLLA/hx"):
        with pytest.raises(ValueError):
            stack_state_numbers(bad, 10, 64)
