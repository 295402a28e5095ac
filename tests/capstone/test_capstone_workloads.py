"""Chapter 10's workloads: the roofline terms, the bottleneck each profile names, and this CPU's numbers."""

from __future__ import annotations

import pytest
import torch

from labsupport import capstone as cap
from labsupport.capstone.workloads import REFERENCE_CPU, GiB
from labsupport.harness import results
from labsupport.harness.costs import MODEL_PRESETS


@pytest.fixture
def empty_results(tmp_path, monkeypatch):
    monkeypatch.setenv(results.ENV_VAR, str(tmp_path / "r.json"))


def test_every_profile_names_the_bottleneck_its_numbers_give(empty_results):
    named = {name: cap.name_bottleneck(cap.workload_terms(w), w) for name, w in cap.PROFILES.items()}
    assert named == {
        "RAG over long documents": "prefill compute",
        "long-running agent": "cache memory",
        "real-time chat / voice": "sequential decoding",
        "on-device": "cache memory",
        "batch summarisation": "decode bandwidth",
        "structured generation": "sequential decoding",
        "the Transformer works but costs too much": "recall",
    }
    assert set(named.values()) == set(cap.BOTTLENECKS)  # all five appear


def test_terms_by_hand_for_a_7b_decode():
    w = cap.Workload("t", "LLaMA-2-7B", "H100", prompt=1000, output=2, batch=1, recall_need=0.5, deadline_s=1.0)
    shape = MODEL_PRESETS["LLaMA-2-7B"]
    kv = 1001 * shape.kv_bytes_per_token()
    step = (shape.weight_bytes + kv) / 3.35e12  # memory-bound at batch 1
    t = cap.workload_terms(w)
    assert t.dtype == torch.float64 and t.shape == (4,)
    assert t[1].item() == pytest.approx(2 * step * kv / (shape.weight_bytes + kv), rel=1e-12)
    assert t[2].item() == pytest.approx(2 * step * shape.weight_bytes / (shape.weight_bytes + kv), rel=1e-12)
    assert t[3].item() == (shape.weight_bytes + 1002 * shape.kv_bytes_per_token()) / 2**30


def test_the_naming_rule_memory_first_then_the_largest_time_then_recall():
    w = cap.PROFILES["the Transformer works but costs too much"]
    terms = torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=torch.float64)
    assert cap.name_bottleneck(terms, w) == "recall"  # 6 s < 10 s deadline, memory tiny
    assert cap.name_bottleneck(terms * torch.tensor([1, 1, 1, 1e3]), w) == "cache memory"
    assert cap.name_bottleneck(terms * torch.tensor([6.0, 1, 1, 1]), w) == "prefill compute"
    assert cap.name_bottleneck(terms * torch.tensor([1, 4.0, 1, 1]), w) == "decode bandwidth"
    with pytest.raises(ValueError, match="4 numbers"):
        cap.name_bottleneck(torch.zeros(3), w)


def test_this_cpu_uses_the_readers_record_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(results.ENV_VAR, str(tmp_path / "r.json"))
    shipped = cap.cpu_hardware()
    assert shipped.flops_per_s == REFERENCE_CPU["gflops"] * 1e9 and "shipped reference" in shipped.source
    results.record("00", "matmul_gflops_1thread", 20.0, "GFLOP/s")
    results.record("00", "copy_bandwidth_gbs_1thread", 5.0, "GB/s")
    mine = cap.cpu_hardware()
    assert mine.flops_per_s == 20e9 and mine.bytes_per_s == 5e9 and "your machine" in mine.source
    assert cap.PROFILES["on-device"].machine.bytes_per_s == 5e9  # a profile re-reads it


def test_budget_is_the_smaller_of_the_profile_and_the_hardware():
    w = cap.PROFILES["structured generation"]
    assert w.budget == 8 * GiB
    assert w.with_(memory_budget=2 * GiB).budget == 2 * GiB


@pytest.mark.parametrize("changes, error, match", [
    ({"model": "GPT-9"}, ValueError, "model must be one of"),
    ({"hardware": "TPU"}, ValueError, "hardware must be one of"),
    ({"prompt": 0}, ValueError, "prompt"),
    ({"recall_need": 1.5}, ValueError, "recall_need"),
    ({"batch": 2.0}, TypeError, "batch"),
])
def test_bad_workloads_are_refused(changes, error, match):
    with pytest.raises(error, match=match):
        cap.PROFILES["on-device"].with_(**changes)
    with pytest.raises(TypeError, match="Workload"):
        cap.workload_terms("RAG")
