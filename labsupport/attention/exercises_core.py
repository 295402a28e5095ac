"""Chapter 00's second-edition exercise: the largest batch that fits in an accelerator's memory.

* :func:`check_largest_batch` — the checker, over published shapes, a GQA model, weights that do not fit
  at all, and a memory size exactly on a boundary. ``shape.max_batch``, the library's one-call answer, is
  refused while the learner's function runs (:func:`labsupport.harness.guards.refuse_calls`); the answer
  itself is in the private ``_solutions`` module.

Kept apart from :mod:`labsupport.attention.exercises` (the first edition's checkers).
"""

from __future__ import annotations

from collections.abc import Callable

from labsupport.attention import _solutions as _answers
from labsupport.attention.exercises import _MAX_BATCH_REFUSED
from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.costs import MODEL_PRESETS, TransformerShape
from labsupport.harness.diagnosis import known_mistakes
from labsupport.harness.guards import refuse_calls

__all__ = ["check_largest_batch"]

GiB = 2**30  # a "24 GB" or "80 GB" accelerator holds 24 or 80 GiB


def _cases() -> list[Case]:
    llama, mistral = MODEL_PRESETS["LLaMA-2-7B"], MODEL_PRESETS["Mistral-7B"]
    tiny = TransformerShape(layers=2, d_model=64, q_heads=4, kv_heads=2, head_dim=16, d_ff=256,
                            vocab=100, bytes_per_element=4, gated_mlp=False)
    boundary = tiny.weight_bytes + 3 * 1000 * tiny.kv_bytes_per_token()
    return [
        Case("LLaMA-2-7B, 24 GiB, 4K context", (llama, 24 * GiB, 4096)),
        Case("LLaMA-2-7B, 80 GiB, 32K context", (llama, 80 * GiB, 32768)),
        Case("Mistral-7B (GQA, 4x smaller cache), 80 GiB, 32K context", (mistral, 80 * GiB, 32768)),
        Case("LLaMA-2-7B on an 8 GiB card: the weights alone do not fit", (llama, 8 * GiB, 1024)),
        Case("tiny fp32 model, memory = weights + exactly 3 caches of 1000 tokens", (tiny, boundary, 1000)),
        Case("tiny fp32 model, one byte short of that", (tiny, boundary - 1, 1000)),
    ]


_BATCH_MISTAKES = known_mistakes({
    "your batch counts the weights once per sequence; they are stored once, whatever the batch":
        lambda shape, memory, context: max(0, int(memory // (shape.weight_bytes + context * shape.kv_bytes_per_token()))),
    "your batch ignores the weights: they take their share of the memory first":
        lambda shape, memory, context: int(memory // (context * shape.kv_bytes_per_token())),
    "your batch rounds up: part of a sequence's cache does not fit":
        lambda shape, memory, context: max(0, -int(-(memory - shape.weight_bytes) // (context * shape.kv_bytes_per_token()))),
    "your batch is negative where the weights alone do not fit: such a model serves no sequence (0)":
        lambda shape, memory, context: int((memory - shape.weight_bytes) // (context * shape.kv_bytes_per_token())),
}, atol=0, rtol=0)


def check_largest_batch(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check ``largest_batch(shape, memory_bytes, context) -> int`` (``shape.max_batch`` is refused)."""
    return check_function(
        refuse_calls(fn, _MAX_BATCH_REFUSED), _answers.largest_batch_answer, _cases(), exercise="largest batch that fits", atol=0, rtol=0,
        diagnose=_BATCH_MISTAKES, reveal=reveal,
        hint="list what the memory holds once and what it holds per sequence, and what happens at the edges "
             "(a partial sequence, weights that do not fit). Tiered hints are above the exercise.",
        recipe="spare = memory_bytes − shape.weight_bytes; 0 if spare ≤ 0, else "
               "spare // (context × shape.kv_bytes_per_token()).",
    )
