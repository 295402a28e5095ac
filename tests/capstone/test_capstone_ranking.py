"""Designs ranked on a workload's bottleneck: the terms from the registry, the frontier's evidence, the order."""

from __future__ import annotations

import json

import pytest

from labsupport import capstone as cap
from labsupport.capstone import ranking
from labsupport.harness import results


@pytest.fixture(autouse=True)
def empty_results(tmp_path, monkeypatch):
    monkeypatch.setenv(results.ENV_VAR, str(tmp_path / "r.json"))


def test_attention_in_a_multi_head_model_gives_the_workloads_own_terms():
    for name in ("RAG over long documents", "on-device", "batch summarisation"):
        w = cap.PROFILES[name]
        assert cap.design_terms(("attention",), w).tolist() == pytest.approx(cap.workload_terms(w).tolist(),
                                                                               rel=1e-12)


def test_a_hybrids_long_context_memory_is_its_attention_share():
    w = cap.PROFILES["long-running agent"]
    weights = w.shape.weight_bytes / 2**30
    full = cap.design_terms(("attention",), w)[3] - weights
    jamba_like = cap.design_terms(("mamba",) * 7 + ("attention",), w)[3] - weights
    assert float(jamba_like / full) == pytest.approx(1 / 8, rel=0.01)  # Mamba's fixed state is tiny beside it
    window = cap.design_terms(("sliding_window",), w)[3] - weights
    # batch · window · 2d · bf16 · layers
    assert float(window) * 2**30 == pytest.approx(4 * 32 * 2 * 4096 * 2 * 32, rel=1e-9)


def test_gqa_cuts_decode_bytes_but_not_prefill_flops():
    w = cap.PROFILES["RAG over long documents"]
    attention, gqa = cap.design_terms(("attention",), w), cap.design_terms(("gqa",), w)
    assert gqa[0] == attention[0]  # prefill is compute-bound: the queries still attend to every key
    assert float(gqa[1]) == pytest.approx(float(attention[1]) / 2, rel=1e-9)  # half the KV heads: half the cache reads


def test_load_frontier_reads_every_hybrid_file_at_the_majority_width(tmp_path):
    rows = [{"kind": "quality", "design": d, "task": "mqar", "seq_len": 64, "lr": 0.01, "seed": s, "width": 32,
             "layer_names": [d, d], "metric": "recall", "score": score}
            for d, score in (("attention", 0.9), ("mamba", 0.2)) for s in range(3)]
    rows.append({**rows[0], "width": 64, "score": 0.1})
    (tmp_path / "hybrid_a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]))
    (tmp_path / "hybrid_grid_new.jsonl").write_text("\n".join(json.dumps(r) for r in rows[3:]))
    frontier = cap.load_frontier([tmp_path])
    assert frontier.width == 32 and "hybrid_grid_new.jsonl" in frontier.source
    assert {p.design: round(p.recall, 6) for p in frontier.points} == {"attention": 0.9, "mamba": 0.2}


def test_without_files_the_shipped_table_is_used_and_named(tmp_path):
    frontier = cap.load_frontier([tmp_path])
    assert "shipped inside labsupport" in frontier.source
    assert len(frontier.points) == len(ranking._FALLBACK)


def test_ranking_puts_fitting_low_risk_designs_first_and_uses_the_readers_recall(tmp_path):
    w = cap.PROFILES["long-running agent"]
    frontier = cap.load_frontier([tmp_path])  # the shipped table: deterministic
    bottleneck, ranked = cap.rank_designs(w, frontier)
    assert bottleneck == "cache memory"
    order = [(not c.fits, {"low": 0, "untested": 1, "high": 2}[c.risk], c.metric) for c in ranked]
    assert order == sorted(order)
    attention = next(c for c in ranked if c.design == "attention")
    assert not attention.fits and "ch 07 shipped, 3 seeds" in attention.recall_source
    window = next(c for c in ranked if c.design == "sliding_window")
    assert window.bounded_state and window.risk in ("untested", "high")
    results.record("07", ranking.recall_key("attention"), 0.99, "recall")
    _, ranked = cap.rank_designs(w, frontier)
    attention = next(c for c in ranked if c.design == "attention")
    assert attention.recall == 0.99 and "your chapter 07 run" in attention.recall_source
    assert "recall 99%" in attention.evidence("cache memory")


def test_eviction_policies_are_untested_beyond_their_exact_length(tmp_path):
    _, ranked = cap.rank_designs(cap.PROFILES["the Transformer works but costs too much"],
                                 cap.load_frontier([tmp_path]))
    quest = next(c for c in ranked if c.design == "quest")
    assert quest.bounded_state  # its score is the dense forward pass; decoding evicts past 32 tokens


def test_rank_refuses_a_non_workload():
    with pytest.raises(TypeError, match="Workload"):
        cap.rank_designs("RAG")
