"""Workloads, hardware, and the bottleneck each workload hits, computed from the roofline.

A :class:`Workload` says what is served: a model shape (:class:`~labsupport.harness.costs.TransformerShape`),
prompt and output lengths, how many sequences run together (``batch``), the recall it needs (a fraction of
MQAR-style lookups answered), a memory budget, a deadline for the whole batch, and the :class:`Hardware`.

:func:`workload_terms` turns it into four numbers with the roofline of :mod:`labsupport.harness.costs`:

* ``prefill_s`` — prefilling the ``batch`` prompts, ``max(FLOPs / peak, bytes / bandwidth)``;
* ``decode_kv_s`` and ``decode_weights_s`` — the ``output`` decode steps (each at the mean context
  ``prompt + output / 2``), split by the bytes a step reads: the KV cache's share and the weights' share;
* ``memory_gib`` — the weights plus every sequence's KV cache at the end (``prompt + output`` tokens), in GiB.

:func:`name_bottleneck` names the one that binds: **cache memory** when the memory does not fit the budget
(nothing runs); else, when the batch misses its deadline, the largest of **prefill compute**, **decode
bandwidth** (reading the KV cache) and **sequential decoding** (re-reading the weights once per output token:
no sequence mixer changes that); else **recall** — the model runs in budget and on time, so what a cheaper design
must not lose is the recall the workload needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from labsupport.harness.costs import TransformerShape, MODEL_PRESETS, format_bytes, roofline_seconds
from labsupport.harness.results import lookup
from labsupport.harness.validation import require_float, require_positive_int

__all__ = [
    "BOTTLENECKS",
    "HARDWARE",
    "MODELS",
    "PROFILES",
    "REFERENCE_CPU",
    "Hardware",
    "Workload",
    "cpu_hardware",
    "GiB",
    "name_bottleneck",
    "pressures",
    "reference_workload_terms",
    "workload_terms",
]

#: The five bottlenecks, in the order :func:`workload_terms` reports the cost terms (recall last: it is not a cost).
BOTTLENECKS = ("prefill compute", "decode bandwidth", "sequential decoding", "cache memory", "recall")

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    """Peak rates and memory of a machine: ``flops_per_s`` (dense matmul), ``bytes_per_s`` (memory bandwidth).

    ``source`` says where the numbers come from (a spec sheet, the reader's own measurement, the shipped
    reference of the course's dev machine).
    """

    name: str
    flops_per_s: float
    bytes_per_s: float
    memory_bytes: float
    source: str

    def __post_init__(self) -> None:
        for attr in ("flops_per_s", "bytes_per_s", "memory_bytes"):
            require_float(attr, getattr(self, attr), positive=True)

    def describe(self) -> str:
        """One line: peaks, memory and where they come from."""
        return (f"{self.name}: {self.flops_per_s / 1e12:.3g} TFLOP/s, {self.bytes_per_s / 1e9:.3g} GB/s, "
                f"{format_bytes(self.memory_bytes)} ({self.source})")


#: The course's dev machine, one torch thread (2-vCPU AMD EPYC, torch 2.13.0+cpu): fp32 matmul 1024³ and a
#: 256 MB copy through ``labsupport.harness.hardware.profile_machine``, in two runs of chapter 10 on 2026-12-07
#: (76–88 GFLOP/s, 17.5–18.8 GB/s; the machine was shared), rounded.
REFERENCE_CPU = {"gflops": 80.0, "bandwidth_gbs": 18.0}


def cpu_hardware(memory_bytes: float = 4 * GiB) -> Hardware:
    """This CPU on one thread: the peaks chapter 00 recorded on the reader's machine, else the shipped reference."""
    flops, bandwidth = lookup("00", "matmul_gflops_1thread"), lookup("00", "copy_bandwidth_gbs_1thread")
    if flops is not None and bandwidth is not None:
        return Hardware("this CPU", flops.value * 1e9, bandwidth.value * 1e9, memory_bytes,
                        f"your machine, measured by chapter 00 on {flops.when[:10]} (one thread)")
    return Hardware("this CPU", REFERENCE_CPU["gflops"] * 1e9, REFERENCE_CPU["bandwidth_gbs"] * 1e9, memory_bytes,
                    "shipped reference: the course's 2-core dev machine, one thread (run chapter 00 to use yours)")


def _hardware() -> dict[str, Hardware]:
    return {
        "this CPU": cpu_hardware(),
        # An RTX 4060-class laptop GPU: 8 GiB of GDDR6 on a 128-bit bus at 16 Gb/s = 256 GB/s; bf16 tensor-core
        # rate estimated from its 24 SMs at ~2.4 GHz (dense, fp32 accumulation): about 30 TFLOP/s.
        "laptop GPU": Hardware("laptop GPU", 30e12, 256e9, 8 * GiB, "spec sheet, RTX 4060 Laptop class (rounded)"),
        # H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 80 GiB.
        "H100": Hardware("H100", 989e12, 3.35e12, 80 * GiB, "NVIDIA's H100 SXM data sheet (dense bf16)"),
    }


#: The hardware a profile can name (``"this CPU"`` is re-read from the results file by :func:`hardware`).
HARDWARE: dict[str, Hardware] = _hardware()

#: Model shapes: the two published 7B presets of :mod:`labsupport.harness.costs` and a 1B-class decoder
#: (illustrative: 16 layers of width 2048, multi-head attention, as an on-device model might be).
MODELS: dict[str, TransformerShape] = {
    "LLaMA-2-7B": MODEL_PRESETS["LLaMA-2-7B"],
    "Mistral-7B": MODEL_PRESETS["Mistral-7B"],
    "1B (MHA)": TransformerShape(16, 2048, 16, 16, 128, 5632, 32000),
}


@dataclass(frozen=True)
class Workload:
    """What is served, on what, and what it must meet (see the module's docstring)."""

    name: str
    model: str
    hardware: str
    prompt: int
    output: int
    batch: int
    recall_need: float
    deadline_s: float
    memory_budget: float | None = None
    note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}; got {self.model!r}")
        if self.hardware not in HARDWARE:
            raise ValueError(f"hardware must be one of {', '.join(HARDWARE)}; got {self.hardware!r}")
        for attr in ("prompt", "output", "batch"):
            require_positive_int(attr, getattr(self, attr))
        require_float("recall_need", self.recall_need, minimum=0.0, maximum=1.0)
        require_float("deadline_s", self.deadline_s, positive=True)
        if self.memory_budget is not None:
            require_float("memory_budget", self.memory_budget, positive=True)

    @property
    def shape(self) -> TransformerShape:
        """The model's shape."""
        return MODELS[self.model]

    @property
    def machine(self) -> Hardware:
        """The hardware (``"this CPU"`` re-read, so a fresh chapter-00 record is used)."""
        return cpu_hardware() if self.hardware == "this CPU" else HARDWARE[self.hardware]

    @property
    def budget(self) -> float:
        """The memory the workload may use: its own budget, never more than the hardware holds."""
        held = self.machine.memory_bytes
        return held if self.memory_budget is None else min(held, self.memory_budget)

    def with_(self, **changes: object) -> Workload:
        """A copy with some fields changed (the widget's sliders)."""
        return replace(self, **changes)  # type: ignore[arg-type]


#: The seven workloads of the chapter. Deadlines are for the whole batch: prefill plus every decode step.
PROFILES: dict[str, Workload] = {w.name: w for w in (
    Workload("RAG over long documents", "LLaMA-2-7B", "H100", prompt=131072, output=64, batch=1, recall_need=0.9,
             deadline_s=6.0, note="a 128K-token prompt of retrieved documents, a short answer that must quote them"),
    Workload("long-running agent", "LLaMA-2-7B", "H100", prompt=131072, output=512, batch=4, recall_need=0.8,
             deadline_s=120.0, note="four agents, each with a 128K-token history of tool calls kept in cache"),
    Workload("real-time chat / voice", "LLaMA-2-7B", "H100", prompt=4096, output=256, batch=1, recall_need=0.5,
             deadline_s=1.0, note="one conversation, about 4 ms per spoken token"),
    Workload("on-device", "1B (MHA)", "this CPU", prompt=16384, output=256, batch=1, recall_need=0.5,
             deadline_s=600.0, memory_budget=3 * GiB, note="a 1B model reading a 16K-token document in 3 GiB, "
             "on this machine's CPU"),
    Workload("batch summarisation", "LLaMA-2-7B", "H100", prompt=8192, output=1024, batch=12, recall_need=0.6,
             deadline_s=15.0, note="12 documents at once; throughput is what counts"),
    Workload("structured generation", "1B (MHA)", "laptop GPU", prompt=1024, output=1024, batch=1,
             recall_need=0.7, deadline_s=5.0, note="a long JSON record from a short form, on a laptop GPU"),
    Workload("the Transformer works but costs too much", "LLaMA-2-7B", "H100", prompt=2048, output=256, batch=8,
             recall_need=0.8, deadline_s=10.0, note="it meets every target; the question is what to give up"),
)}


def reference_workload_terms(workload: Workload) -> torch.Tensor:
    """``(4,)`` float64: prefill seconds, decode seconds reading the KV cache, decode seconds reading the
    weights, memory in GiB — the roofline's cost terms of ``workload`` (see the module's docstring)."""
    shape, hw = workload.shape, workload.machine
    flops, moved = shape.prefill(workload.prompt, workload.batch)
    prefill = roofline_seconds(flops, moved, flops_per_s=hw.flops_per_s, bytes_per_s=hw.bytes_per_s)
    context = workload.prompt + workload.output // 2
    step_flops, step_bytes = shape.decode_step(context, workload.batch)
    step = roofline_seconds(step_flops, step_bytes, flops_per_s=hw.flops_per_s, bytes_per_s=hw.bytes_per_s)
    kv_share = (step_bytes - shape.weight_bytes) / step_bytes
    decode = workload.output * step
    memory = shape.weight_bytes + workload.batch * (workload.prompt + workload.output) * shape.kv_bytes_per_token()
    return torch.tensor([prefill, decode * kv_share, decode * (1 - kv_share), memory / GiB], dtype=torch.float64)


def workload_terms(workload: Workload) -> torch.Tensor:
    """The library's :func:`reference_workload_terms` (the exercise's answer, once written, equals it)."""
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a Workload, got {type(workload).__name__}")
    return reference_workload_terms(workload)


def name_bottleneck(terms: torch.Tensor, workload: Workload) -> str:
    """The bottleneck that ``terms`` (:func:`workload_terms`'s four numbers) imply for ``workload``."""
    if not isinstance(terms, torch.Tensor) or terms.shape != (4,):
        raise ValueError(f"terms must be a tensor of 4 numbers (prefill s, decode KV s, decode weights s, memory "
                         f"GiB), got {terms!r}")
    prefill, kv, weights, memory = (float(t) for t in terms)
    if memory * GiB > workload.budget:
        return "cache memory"
    if prefill + kv + weights > workload.deadline_s:
        return BOTTLENECKS[max(range(3), key=lambda i: (prefill, kv, weights)[i])]
    return "recall"


def pressures(terms: torch.Tensor, workload: Workload) -> dict[str, float]:
    """Each cost term against its limit: times over the deadline, memory over the budget (1 = exactly at it)."""
    prefill, kv, weights, memory = (float(t) for t in terms)
    return {"prefill compute": prefill / workload.deadline_s, "decode bandwidth": kv / workload.deadline_s,
            "sequential decoding": weights / workload.deadline_s, "cache memory": memory * GiB / workload.budget}
