"""Chapter 10, exercises: a workload's cost terms (to name its bottleneck), and the cheapest design that meets a
recall bar and a memory budget.

* ``bottleneck_terms(workload)`` — the roofline's four terms (prefill seconds, decode seconds reading the KV
  cache, decode seconds reading the weights, memory in GiB). The checker refuses a roofline that adds the compute
  and memory times instead of taking the larger, one that counts only FLOPs, a decode timed at the final context
  instead of the mean one, and a memory total without the batch.
* ``cheapest_design(costs, recalls, memory, recall_bar, memory_budget)`` — the index of the cheapest design that
  meets both constraints (ties: the higher recall; none: ``-1``). The checker refuses the best-recall pick, the
  cheapest pick that ignores a constraint, and a strict bar (a design exactly at the bar meets it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from labsupport.capstone.workloads import GiB, Workload, reference_workload_terms
from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.diagnosis import known_mistakes

__all__ = ["EXERCISE_WORKLOADS", "check_bottleneck_terms", "check_cheapest_design", "reference_cheapest_design"]

#: The three workloads of exercise 1 (the notebook prints their bottlenecks from the learner's terms).
EXERCISE_WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("code assistant", "Mistral-7B", "H100", prompt=32768, output=128, batch=1, recall_need=0.9,
             deadline_s=0.5, note="a whole repository in the prompt, a short completion"),
    Workload("manuals assistant on a laptop", "1B (MHA)", "laptop GPU", prompt=32768, output=256, batch=2,
             recall_need=0.8, deadline_s=60.0, note="two users asking about a 32K-token manual, on an 8 GiB GPU"),
    Workload("translation service", "Mistral-7B", "H100", prompt=512, output=512, batch=256, recall_need=0.6,
             deadline_s=5.0, note="256 short documents translated together"),
)}


def _roofline_variant(workload: Workload, *, combine: str = "max", context: str = "mean",
                      batch_in_memory: bool = True) -> torch.Tensor:
    """The reference with one slip: ``combine`` ``"sum"`` (compute + memory time) or ``"flops"`` (compute only),
    the decode ``context`` ``"final"``, or the memory without the batch."""
    shape, hw = workload.shape, workload.machine

    def time(flops: float, moved: float) -> float:
        if combine == "sum":
            return flops / hw.flops_per_s + moved / hw.bytes_per_s
        if combine == "flops":
            return flops / hw.flops_per_s
        return max(flops / hw.flops_per_s, moved / hw.bytes_per_s)

    prefill = time(*shape.prefill(workload.prompt, workload.batch))
    at = workload.prompt + (workload.output if context == "final" else workload.output // 2)
    step_flops, step_bytes = shape.decode_step(at, workload.batch)
    decode = workload.output * time(step_flops, step_bytes)
    share = (step_bytes - shape.weight_bytes) / step_bytes
    sequences = workload.batch if batch_in_memory else 1
    memory = shape.weight_bytes + sequences * (workload.prompt + workload.output) * shape.kv_bytes_per_token()
    return torch.tensor([prefill, decode * share, decode * (1 - share), memory / GiB], dtype=torch.float64)


_TERMS_MISTAKES = known_mistakes({
    "your times add the compute time and the memory time; the roofline takes the larger of the two (they "
    "overlap)": lambda w: _roofline_variant(w, combine="sum"),
    "your times count only FLOPs: a decode step that reads gigabytes to do little arithmetic is timed by its "
    "bytes": lambda w: _roofline_variant(w, combine="flops"),
    "your decode steps all attend to the final context; on average a step sees prompt + output/2 tokens":
        lambda w: _roofline_variant(w, context="final"),
    "your memory holds one sequence's KV cache; every sequence of the batch keeps its own":
        lambda w: _roofline_variant(w, batch_in_memory=False),
}, rtol=1e-9, atol=0.0)


def check_bottleneck_terms(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(workload) -> (4,) float64``: prefill s, decode s reading the KV cache, decode s reading the
    weights, memory GiB (see :mod:`labsupport.capstone.workloads`)."""
    cases = [Case(f"{name}: {w.model} on {w.hardware}, prompt {w.prompt}, output {w.output}, batch {w.batch}", (w,))
             for name, w in EXERCISE_WORKLOADS.items()]
    cases.append(Case("a 1B model on this CPU, 4K prompt, 64 tokens out",
                      (Workload("CPU check", "1B (MHA)", "this CPU", prompt=4096, output=64, batch=1,
                                recall_need=0.5, deadline_s=60.0, memory_budget=4 * GiB),)))
    return check_function(
        fn, reference_workload_terms, cases, exercise="bottleneck_terms", atol=0.0, rtol=1e-6,
        diagnose=_TERMS_MISTAKES, reveal=reveal,
        output_names=None,
        hint="entries: [prefill s, decode s reading the KV cache, decode s reading the weights, memory GiB "
             "(2**30 bytes)]. Each time is the roofline's (which resource runs out first), a decode step sits at the mean context, and "
             "the memory holds every sequence. Tiered hints are above the exercise.",
        recipe="shape, hw = workload.shape, workload.machine; t(F, B) = max(F / hw.flops_per_s, B / hw.bytes_per_s); "
               "prefill = t(*shape.prefill(prompt, batch)); F, B = shape.decode_step(prompt + output // 2, batch); "
               "decode = output · t(F, B); share = (B − shape.weight_bytes) / B; memory = shape.weight_bytes + "
               "batch · (prompt + output) · shape.kv_bytes_per_token(); return float64 [prefill, decode · share, "
               "decode · (1 − share), memory / 2**30].",
    )


# --------------------------------------------------------------------------- 2. the cheapest design that qualifies


def reference_cheapest_design(costs: torch.Tensor, recalls: torch.Tensor, memory: torch.Tensor, recall_bar: float,
                              memory_budget: float) -> int:
    """Index of the lowest ``costs`` among rows with ``recalls >= recall_bar`` and ``memory <= memory_budget``;
    ties go to the higher recall, then the lower index; ``-1`` when no row qualifies."""
    ok = (recalls >= recall_bar) & (memory <= memory_budget)
    if not bool(ok.any()):
        return -1
    rows = [i for i in range(len(costs)) if bool(ok[i])]
    return min(rows, key=lambda i: (float(costs[i]), -float(recalls[i]), i))


def _pick(costs, recalls, memory, bar, budget, *, use_recall=True, use_memory=True, strict=False, by="cost",
          tie="recall"):
    ok = torch.ones_like(costs, dtype=torch.bool)
    if use_recall:
        ok &= (recalls > bar) if strict else (recalls >= bar)
    if use_memory:
        ok &= memory <= budget
    rows = [i for i in range(len(costs)) if bool(ok[i])]
    if not rows:
        return -1
    if by == "recall":
        return max(rows, key=lambda i: (float(recalls[i]), -float(costs[i])))
    if tie == "first":
        return min(rows, key=lambda i: (float(costs[i]), i))
    return min(rows, key=lambda i: (float(costs[i]), -float(recalls[i]), i))


_PICK_MISTAKES = known_mistakes({
    "your bar is strict: a design whose recall equals the bar meets it":
        lambda c, r, m, bar, budget: _pick(c, r, m, bar, budget, strict=True),
    "you picked the design with the best recall among those that qualify; the exercise asks for the cheapest":
        lambda c, r, m, bar, budget: _pick(c, r, m, bar, budget, by="recall"),
    "your pick ignores the memory budget: it does not fit":
        lambda c, r, m, bar, budget: _pick(c, r, m, bar, budget, use_memory=False),
    "your pick ignores the recall bar": lambda c, r, m, bar, budget: _pick(c, r, m, bar, budget, use_recall=False),
    "your tie between equal costs went to the lower recall (or the first row); equal costs go to the higher "
    "recall": lambda c, r, m, bar, budget: _pick(c, r, m, bar, budget, tie="first"),
}, atol=0.0, rtol=0.0)


def _table(*rows: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    costs, recalls, memory = zip(*rows)
    return (torch.tensor(costs, dtype=torch.float64), torch.tensor(recalls, dtype=torch.float64),
            torch.tensor(memory, dtype=torch.float64))


def check_cheapest_design(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(costs (n,), recalls (n,), memory (n,), recall_bar, memory_budget) -> int``."""
    gen = torch.Generator().manual_seed(1010)
    frontier = _table((1.00, 0.28, 60.0), (0.34, 0.69, 12.0), (0.61, 0.51, 40.0), (1.00, 0.97, 61.0),
                      (0.35, 0.84, 13.0), (0.20, 0.05, 12.0))
    ties = _table((2.0, 0.7, 5.0), (1.0, 0.8, 5.0), (1.0, 0.9, 5.0), (3.0, 0.95, 5.0))
    at_bar = _table((1.0, 0.79, 1.0), (2.0, 0.8, 1.0), (3.0, 0.95, 1.0))
    tight = _table((1.0, 0.9, 90.0), (2.0, 0.92, 70.0), (4.0, 0.99, 20.0))
    n = 12
    random = (torch.rand(n, generator=gen, dtype=torch.float64) * 10,
              torch.rand(n, generator=gen, dtype=torch.float64),
              torch.rand(n, generator=gen, dtype=torch.float64) * 100)
    cases = [
        Case("a frontier table (cost × attention's, recall, GiB), bar 0.8, budget 64 GiB", (*frontier, 0.8, 64.0)),
        Case("equal costs: the higher recall wins", (*ties, 0.75, 10.0)),
        Case("a recall exactly at the bar meets it", (*at_bar, 0.8, 10.0)),
        Case("the cheap designs do not fit the memory budget", (*tight, 0.5, 50.0)),
        Case("no design qualifies", (*tight, 0.995, 50.0)),
        Case("12 random designs, bar 0.5, budget 60", (*random, 0.5, 60.0)),
    ]
    return check_function(
        fn, reference_cheapest_design, cases, exercise="cheapest_design", atol=0.0, rtol=0.0,
        diagnose=_PICK_MISTAKES, reveal=reveal,
        hint="keep the rows that meet both constraints (recall at or above the bar, memory within the budget), "
             "then take the lowest cost; equal costs go to the higher recall; no row left means -1. Tiered hints "
             "are above the exercise.",
        recipe="ok = (recalls >= recall_bar) & (memory <= memory_budget); if not ok.any(): return -1; "
               "return min((i for i in range(len(costs)) if ok[i]), key=lambda i: (float(costs[i]), "
               "-float(recalls[i]), i)).",
    )
