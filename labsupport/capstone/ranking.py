"""Candidate designs ranked on a workload's bottleneck, each with its evidence and where that evidence comes from.

The candidates are the designs of chapter 07's frontier: every mixer of :mod:`labsupport.hybrid.registry` and the
hybrids, read from the frontier's JSONL rows through :func:`labsupport.hybrid.widget.frontier_points` (so rows a
newer grid adds are picked up). Each design's layer pattern is repeated over the workload model's depth, and its
cost terms are the roofline's (:func:`design_terms`), with every layer's state and the bytes a decode step reads
taken from its registry row at the model's width.

Quality risk comes from the frontier's recall (MQAR, 64 tokens): the reader's own chapter 07 run where it was
recorded in the local results file (:mod:`labsupport.harness.results`), else the shipped rows (mean of 3 seeds),
else a small table shipped in this module (for an install without ``benchmarks/``). Every number says which.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from labsupport.capstone.workloads import BOTTLENECKS, GiB, Workload, name_bottleneck, workload_terms
from labsupport.harness.costs import format_bytes, mixer_token_flops, roofline_seconds
from labsupport.harness.results import lookup
from labsupport.hybrid import registry
from labsupport.hybrid.widget import FrontierPoint, frontier_points

__all__ = ["Candidate", "FrontierEvidence", "design_terms", "load_frontier", "rank_designs", "recall_key"]

#: Chapter 07's laptop grid (benchmarks/results/hybrid_frontier_laptop.jsonl: MQAR-64, width 32, 2 layers or the
#: preset's pattern, 400 steps, lr 1e-2), the recall of each seed: used only when no JSONL rows can be found.
_FALLBACK = {
    "attention": (("attention",), (0.219, 0.404, 0.208)),
    "gqa": (("gqa",), (0.15, 0.777, 0.18)),
    "mqa": (("mqa",), (0.648, 0.34, 0.103)),
    "mla": (("mla",), (0.051, 0.029, 0.033)),
    "sliding_window": (("sliding_window",), (0.706, 0.756, 0.424)),
    "sinks": (("sinks",), (0.729, 0.884, 0.455)),
    "h2o": (("h2o",), (0.876, 0.989, 0.665)),
    "tova": (("tova",), (0.844, 0.918, 0.654)),
    "quest": (("quest",), (0.879, 0.988, 0.665)),
    "linear": (("linear",), (0.213, 0.246, 0.227)),
    "retnet": (("retnet",), (0.243, 0.262, 0.222)),
    "gla": (("gla",), (0.24, 0.293, 0.354)),
    "deltanet": (("deltanet",), (0.658, 0.703, 0.959)),
    "gated_deltanet": (("gated_deltanet",), (0.229, 0.51, 0.344)),
    "ttt": (("ttt",), (0.366, 0.517, 0.947)),
    "mamba": (("mamba",), (0.032, 0.051, 0.05)),
    "s4d": (("s4d",), (0.07, 0.038, 0.044)),
    "ssd": (("ssd",), (0.157, 0.131, 0.145)),
    "hymba_attention+mamba": (("hymba_attention+mamba",), (0.962, 0.967, 0.969)),
    "hymba_sliding_window+mamba": (("hymba_sliding_window+mamba",), (0.816, 0.746, 0.839)),
    "qwen3_next": (("gated_deltanet", "gated_deltanet", "gated_deltanet", "attention"), (0.727, 0.47, 0.324)),
    "kimi_linear": (("gated_deltanet", "gated_deltanet", "gated_deltanet", "mla"), (0.767, 0.229, 0.248)),
    "gemma3": (("sliding_window",) * 5 + ("attention",), (0.181, 0.159, 0.221)),
    "gpt_oss": (("sliding_window", "attention"), (0.19, 0.222, 0.163)),
    "minimax01": (("linear",) * 7 + ("attention",), (0.407, 0.381, 0.197)),
}


def recall_key(design: str) -> str:
    """The key under which chapter 07 records the reader's own MQAR-64 recall of ``design``."""
    return f"mqar64_recall/{design}"


@dataclass(frozen=True)
class FrontierEvidence:
    """Chapter 07's frontier as the capstone reads it: the points and a sentence saying where they come from."""

    points: tuple[FrontierPoint, ...]
    source: str
    width: int | None


def _result_folders() -> list[Path]:
    here = Path(__file__).resolve()
    return [here.parents[2] / "benchmarks" / "results", Path.cwd().parent / "benchmarks" / "results",
            Path.cwd() / "benchmarks" / "results"]


def load_frontier(folders: Sequence[Path | str] | None = None) -> FrontierEvidence:
    """Chapter 07's frontier on MQAR-64 from every ``hybrid_*.jsonl`` in the first results folder that has some.

    The width most MQAR-64 runs used is kept (as chapter 07 does). Without any file, the table shipped in this
    module is used, and :attr:`FrontierEvidence.source` says so.
    """
    for folder in ([Path(f) for f in folders] if folders is not None else _result_folders()):
        files = sorted(folder.glob("hybrid_*.jsonl")) if folder.is_dir() else []
        rows = []
        for file in files:
            rows += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        widths = Counter(r.get("width") for r in rows
                         if r.get("kind") == "quality" and r.get("task") == "mqar" and r.get("seq_len") == 64)
        if widths:
            width = widths.most_common(1)[0][0]
            points = frontier_points(rows, task="mqar", seq_len=64, width=width)
            names = ", ".join(f.name for f in files)
            return FrontierEvidence(tuple(points), f"chapter 07's shipped frontier ({names}; MQAR-64, width {width}, "
                                                   "mean over seeds at the best learning rate)", width)
    points = []
    for design, (layers, seeds) in _FALLBACK.items():
        if all(n in registry.names() for n in layers):
            families = {registry.get(n).family for n in layers}
            points.append(FrontierPoint(design, families.pop() if len(families) == 1 else "hybrid", layers,
                                        statistics.fmean(seeds), seeds, 1e-2, 0.0, None))
    return FrontierEvidence(tuple(points), "chapter 07's laptop grid as shipped inside labsupport (no JSONL rows "
                                           "found; MQAR-64, width 32, 3 seeds)", 32)


def _mixing_flops(spec: registry.MixerSpec, context: int, d_model: int) -> int:
    """A layer's mixing FLOPs per token at ``context``: attention over what it attends to, plus a fixed state."""
    one, huge = spec.state_numbers(1, d_model), spec.state_numbers(1 << 30, d_model)
    dense = spec.grows_with_context or spec.exact_until is not None  # an eviction policy prefills densely
    if dense:
        attended, fixed = context, max(0, one - 2 * d_model)
    elif huge != one:  # a window: 2·d numbers per token up to its length
        window = (huge - one) // (2 * d_model) + 1
        attended, fixed = min(context, window), max(0, one - 2 * d_model)
    else:
        attended, fixed = 0, one
    return (mixer_token_flops("attention", d_model=d_model, attended=attended)
            + mixer_token_flops("state", d_model=d_model, state_numbers=fixed))


def design_terms(layers: Sequence[str], workload: Workload) -> torch.Tensor:
    """``(4,)`` float64, as :func:`~labsupport.capstone.workloads.workload_terms`, for the workload's model with
    its sequence mixers replaced by ``layers`` (registry names; the pattern repeats over the model's depth).

    The weights (and their FLOPs) stay the model's; each layer's state, the bytes a decode step reads and the
    mixing FLOPs come from its registry row at the model's width (bf16). With ``layers=("attention",)`` and a
    multi-head model this equals ``workload_terms``.
    """
    shape, hw = workload.shape, workload.machine
    d = shape.d_model
    specs = [registry.get(layers[i % len(layers)]) for i in range(shape.layers)]
    b, p, n = workload.batch, workload.prompt, workload.output
    bpe = shape.bytes_per_element

    def state(context: int) -> int:
        return sum(s.state_bytes(context, d, bytes_per_element=bpe) for s in specs)

    def mixing(context: int) -> int:
        return sum(_mixing_flops(s, context, d) for s in specs)

    weight_flops = 2 * shape.params
    prefill = roofline_seconds(b * p * (weight_flops + mixing((p + 1) // 2)), shape.weight_bytes + 2 * b * state(p),
                               flops_per_s=hw.flops_per_s, bytes_per_s=hw.bytes_per_s)
    context = p + n // 2
    read = b * sum(s.read_bytes(context, d, bytes_per_element=bpe) for s in specs)
    step_bytes = shape.weight_bytes + read
    step = roofline_seconds(b * (weight_flops + mixing(context)), step_bytes, flops_per_s=hw.flops_per_s,
                            bytes_per_s=hw.bytes_per_s)
    kv_share = read / step_bytes
    memory = shape.weight_bytes + b * state(p + n)
    return torch.tensor([prefill, n * step * kv_share, n * step * (1 - kv_share), memory / GiB],
                        dtype=torch.float64)


@dataclass(frozen=True)
class Candidate:
    """One design on one workload: its cost terms, its recall and where each number comes from."""

    design: str
    family: str
    layers: tuple[str, ...]
    terms: tuple[float, float, float, float]
    metric: float
    recall: float
    recall_range: tuple[float, float]
    recall_source: str
    fits: bool
    meets_recall: bool
    bounded_state: bool

    @property
    def risk(self) -> str:
        """``"low"`` (meets the bar, sees every token), ``"untested"`` (meets it at 64 tokens, but its state is
        bounded, or it decodes under an eviction policy that the frontier's forward-pass score never ran: a long
        context may hold what the state cannot), ``"high"`` (below the bar)."""
        if not self.meets_recall:
            return "high"
        return "untested" if self.bounded_state else "low"

    def evidence(self, bottleneck: str) -> str:
        """The numbers behind the rank, each with its chapter."""
        prefill, kv, weights, memory_gib = self.terms
        recall = (f"recall {self.recall:.0%} (range {self.recall_range[0]:.0%}–{self.recall_range[1]:.0%}; "
                  f"{self.recall_source})")
        return (f"prefill {prefill:.3g} s, decode {kv + weights:.3g} s ({kv:.3g} s reading state), memory "
                f"{format_bytes(memory_gib * GiB)} [roofline: ch 00; state per layer: ch 07 registry]; {recall}")


_METRIC = {"prefill compute": lambda t: t[0], "decode bandwidth": lambda t: t[1] + t[2],
           "sequential decoding": lambda t: t[1] + t[2], "cache memory": lambda t: t[3],
           "recall": lambda t: t[0] + t[1] + t[2]}
_RISK_ORDER = {"low": 0, "untested": 1, "high": 2}


def rank_designs(workload: Workload, frontier: FrontierEvidence | None = None) -> tuple[str, list[Candidate]]:
    """The workload's bottleneck and every frontier design ranked on it.

    Order: designs that fit the memory budget first; among them, lower quality risk first (``low``, then
    ``untested``, then ``high``); then the bottleneck's own number (prefill seconds, decode seconds, memory GiB;
    for ``"recall"``, where every design runs in budget, the total time). A design's recall is the reader's
    chapter 07 run where recorded, else the frontier's.
    """
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a Workload, got {type(workload).__name__}")
    frontier = frontier if frontier is not None else load_frontier()
    bottleneck = name_bottleneck(workload_terms(workload), workload)
    metric = _METRIC[bottleneck]
    context = workload.prompt + workload.output
    candidates = []
    for point in frontier.points:
        if not all(n in registry.names() for n in point.layers):
            continue
        terms = tuple(float(t) for t in design_terms(point.layers, workload))
        mine = lookup("07", recall_key(point.design))
        if mine is not None:
            recall, low, high = mine.value, mine.value, mine.value
            source = f"your chapter 07 run, 1 seed, {mine.when[:10]}"
        else:
            recall, low, high = point.recall, min(point.seed_scores), max(point.seed_scores)
            source = f"ch 07 shipped, {len(point.seed_scores)} seeds"
        specs = [registry.get(n) for n in point.layers]
        bounded = context > 64 and (not any(s.grows_with_context for s in specs)
                                    or any(s.exact_until is not None and context > s.exact_until for s in specs))
        candidates.append(Candidate(point.design, point.family, point.layers, terms, float(metric(terms)), recall,
                                    (low, high), source, terms[3] * GiB <= workload.budget,
                                    recall >= workload.recall_need, bounded))
    candidates.sort(key=lambda c: (not c.fits, _RISK_ORDER[c.risk], c.metric, -c.recall))
    return bottleneck, candidates


assert set(_METRIC) == set(BOTTLENECKS)
