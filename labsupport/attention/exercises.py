"""Chapter 00 exercises: the ``check_*`` checkers and the cases they are graded on.

Each checker compares a learner's function with its answer (in the private
``_solutions`` module, or :mod:`labsupport.attention.reference` for causal
attention) through :func:`labsupport.harness.checking.check_function`.

Exercises whose answer is one library call refuse that call while they grade
(:class:`labsupport.harness.guards.LibraryCallRefused`): the decode step refuses
PyTorch's ``scaled_dot_product_attention``, the cost exercises
:class:`~labsupport.harness.costs.TransformerShape`'s own ``max_batch`` and
``decode_step`` (:func:`labsupport.harness.guards.refuse_calls`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from labsupport.attention import _solutions as _answers
from labsupport.attention.reference import causal_attention
from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.costs import MODEL_PRESETS, TransformerShape
from labsupport.harness.diagnosis import known_mistakes
from labsupport.harness.guards import LibraryCallRefused, refuse_calls

__all__ = [
    "check_attention_decode_step",
    "check_causal_attention",
    "check_decode_intensity",
    "check_kv_cache_bytes",
]


# ----------------------------------------------------------------------------- refusing the library's answer
# The cost exercises refuse TransformerShape's own one-call answers through the harness's call guard
# (labsupport.harness.guards.refuse_calls). PyTorch's attention kernel is a C function that guard cannot see, so
# the decode step refuses it with a torch-function mode that raises the same LibraryCallRefused.

_MAX_BATCH_REFUSED = {
    TransformerShape.max_batch: "shape.max_batch is the library's answer to this exercise: work the batch out from "
                                "shape.weight_bytes and shape.kv_bytes_per_token() (Hint 1 above the exercise)",
}
_DECODE_STEP_REFUSED = {
    TransformerShape.decode_step: "shape.decode_step is the library's answer to this exercise: count the FLOPs and "
                                  "the bytes yourself from shape.params, shape.bytes_per_element and "
                                  "shape.kv_bytes_per_token() (Hint 1 above the exercise)",
}


class _RefuseSdpa(TorchFunctionMode):
    """Refuses ``F.scaled_dot_product_attention`` while a learner's decode step runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func is F.scaled_dot_product_attention or getattr(func, "__name__", "") == "scaled_dot_product_attention":
            raise LibraryCallRefused(
                "F.scaled_dot_product_attention is PyTorch's fused kernel, which section 2 borrowed until now; "
                "this exercise asks for the step written from its formula (Hint 1 above the exercise)")
        return func(*args, **(kwargs or {}))


def _without_sdpa(fn: Callable[..., Any]) -> Callable[..., Any]:
    if not callable(fn):
        return fn  # the engine explains what a non-function is

    @functools.wraps(fn)
    def graded(*args: Any, **kwargs: Any) -> Any:
        with _RefuseSdpa():
            return fn(*args, **kwargs)

    return graded


def _attention_cases(seed: int = 0) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)

    def qkv(b: int, h: int, length: int, d: int, dtype: torch.dtype = torch.float32):
        return tuple(torch.randn(b, h, length, d, generator=gen).to(dtype) for _ in range(3))

    q, k, v = qkv(1, 2, 8, 4)
    transposed = torch.randn(2, 3, 4, 7, generator=gen).transpose(-1, -2)  # (2, 3, 7, 4), a transposed view
    return [
        Case("one position (B=1, H=1, L=1, D=4)", qkv(1, 1, 1, 4)),
        Case("B=2, H=3, L=5, D=8", qkv(2, 3, 5, 8)),
        Case("large scores (inputs × 30)", tuple(t * 30 for t in (q, k, v))),
        Case("q stored transposed in memory (non-contiguous)", (transposed, *qkv(2, 3, 7, 4)[1:])),
        Case("float64, L=16", qkv(1, 2, 16, 8, torch.float64)),
    ]


def _decode_step_cases(seed: int = 1) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for b, h, t, d in ((1, 1, 1, 4), (2, 4, 9, 8), (1, 2, 33, 16)):
        q, k, v = (torch.randn(b, h, t, d, generator=gen) for _ in range(3))
        cases.append(Case(f"cache of {t} token{'s' if t > 1 else ''}, B={b}, H={h}, D={d}", (q[:, :, -1:], k, v)))
    big = torch.randn(1, 2, 5, 8, generator=gen) * 40
    cases.append(Case("large scores (× 40)", (big[:, :, -1:], big, big.flip(-2))))
    q_all = torch.randn(2, 3, 6, 8, generator=gen)
    k_t = torch.randn(2, 3, 8, 6, generator=gen).transpose(-1, -2)
    cases.append(Case("q_new a slice of a longer tensor, k_cache stored transposed (both non-contiguous)",
                      (q_all[:, :, -1:], k_t, torch.randn(2, 3, 6, 8, generator=gen))))
    return cases


def _kv_cache_cases() -> list[Case]:
    return [
        Case("one layer, one head, one token, fp32", (1, 1, 1, 1, 4)),
        Case("LLaMA-2-7B at 256K, fp16 (paper: 128 GB)", (32, 32, 128, 262_144, 2)),
        Case("Mistral-7B at 256K, fp16 (paper: 32 GB)", (32, 8, 128, 262_144, 2)),
        Case("Jamba at 256K, fp16 (paper: 4 GB)", (4, 8, 128, 262_144, 2)),
        Case("int8 cache, 2K context", (24, 4, 64, 2048, 1)),
    ]


def _decode_intensity_cases() -> list[Case]:
    llama, mistral = MODEL_PRESETS["LLaMA-2-7B"], MODEL_PRESETS["Mistral-7B"]
    tiny = TransformerShape(layers=2, d_model=64, q_heads=4, kv_heads=2, head_dim=16, d_ff=256,
                            vocab=100, bytes_per_element=4, gated_mlp=False)
    return [
        Case("tiny fp32 model, context 1, batch 1", (tiny, 1, 1)),
        Case("tiny fp32 model, context 1000, batch 8", (tiny, 1000, 8)),
        Case("LLaMA-2-7B, context 1, batch 1", (llama, 1, 1)),
        Case("LLaMA-2-7B, context 4096, batch 64", (llama, 4096, 64)),
        Case("Mistral-7B (GQA), context 32768, batch 16", (mistral, 32768, 16)),
    ]


# ----------------------------------------------------------------------------- what a wrong answer did
# Written-out wrong answers: when a learner's output equals one of these on the failing case, the check says so.


def _attention(q, k, v, *, scale: float | None, hide_diagonal: bool = False, causal: bool = True,
               softmax_dim: int = -1, top_left: bool = False):
    scores = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if causal:
        lq, lk = scores.shape[-2], scores.shape[-1]
        offset = 0 if top_left else lk - lq
        hidden = torch.ones(lq, lk, dtype=torch.bool).triu(offset + (0 if hide_diagonal else 1))
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores.softmax(dim=softmax_dim).nan_to_num(0.0) @ v


_ATTENTION_MISTAKES = known_mistakes({
    "your output matches attention without the 1/√d scale on the scores":
        lambda q, k, v: _attention(q, k, v, scale=1.0),
    "your mask also hides the diagonal: position t must read itself":
        lambda q, k, v: _attention(q, k, v, scale=None, hide_diagonal=True),
    "your output matches attention with no causal mask: position t reads later positions":
        lambda q, k, v: _attention(q, k, v, scale=None, causal=False),
    "your softmax normalises over the queries (dim=-2), not over the keys each query reads":
        lambda q, k, v: _attention(q, k, v, scale=None, softmax_dim=-2),
}, atol=1e-5, rtol=1e-4)

_DECODE_MISTAKES = known_mistakes({
    "your output matches attention without the 1/√d scale on the scores":
        lambda q, k, v: _attention(q, k, v, scale=1.0, causal=False),
    "your scale uses the cache length, not the head dimension":
        lambda q, k, v: _attention(q, k, v, scale=1 / math.sqrt(k.shape[-2]), causal=False),
    "your new token reads only the first cached key: a causal mask aligned top-left (as "
    "F.scaled_dot_product_attention(is_causal=True) does with one query) hides the rest of the cache":
        lambda q, k, v: _attention(q, k, v, scale=None, top_left=True),
    "your softmax normalises over the wrong axis: the new token's weights over the cache must sum to 1":
        lambda q, k, v: _attention(q, k, v, scale=None, causal=False, softmax_dim=-2),
}, atol=1e-5, rtol=1e-4)


def _kv_bytes_diagnosis(case: Case, expected: object, got: object) -> str | None:
    if not isinstance(expected, (int, float)) or not isinstance(got, (int, float)) or not expected:
        return None
    ratio = float(got) / float(expected)
    for value, text in ((0.5, "your count is half the answer: keys OR values, where the cache holds both"),
                        (2**-30, "your answer is in GiB; the exercise asks for bytes"),
                        (1e-9, "your answer is in GB; the exercise asks for bytes")):
        if math.isclose(ratio, value, rel_tol=1e-6):
            return text
    layers, kv_heads, head_dim, context, width = case.args
    if math.isclose(float(got), 2 * layers * kv_heads * head_dim * context, rel_tol=1e-9) and width != 1:
        return "your count is in elements: multiply by the bytes each element takes"
    return None


def _intensity_diagnosis(case: Case, expected: object, got: object) -> str | None:
    shape, context, batch = case.args
    flops, _ = TransformerShape.decode_step(shape, context, batch)
    weights, cache = shape.params * shape.bytes_per_element, batch * context * shape.kv_bytes_per_token()
    for moved, text in ((batch * weights + cache, "you read the weights once per sequence; one step reads them "
                                                  "once for the whole batch"),
                        (weights + context * shape.kv_bytes_per_token(), "you read one KV cache; every sequence "
                                                                          "in the batch reads its own"),
                        (weights, "your bytes leave out the KV caches")):
        if isinstance(got, (int, float)) and math.isclose(float(got), flops / moved, rel_tol=1e-6):
            return text
    if isinstance(got, (int, float)) and batch > 1 and math.isclose(float(got), flops / batch / (weights + cache),
                                                                     rel_tol=1e-6):
        return "your FLOPs are one sequence's; every sequence in the batch does its own"
    return None


def check_causal_attention(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check a learner's ``causal_attention(q, k, v)`` against :func:`causal_attention` (``reveal=True``: the recipe)."""
    return check_function(
        fn, causal_attention, _attention_cases(), exercise="causal attention",
        atol=1e-5, rtol=1e-4, diagnose=_ATTENTION_MISTAKES, reveal=reveal,
        hint="compare the case's sizes with your scale, your mask and the axis your softmax normalises; "
             "the tiered hints are above the exercise; start with Hint 1.",
        recipe="scores = q kᵀ / sqrt(head_dim); set the scores strictly above the diagonal to -inf (position t "
               "reads 0..t, itself included); softmax over the last dimension; multiply by v.",
    )


def check_attention_decode_step(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check ``attention_decode_step(q_new, k_cache, v_cache)``: the last row of full attention, from its formula.

    ``F.scaled_dot_product_attention`` is refused while it runs (``LibraryCallRefused``).
    """
    return check_function(
        _without_sdpa(fn), _answers.decode_step_answer, _decode_step_cases(), exercise="decode step with a KV cache",
        atol=1e-5, rtol=1e-4, diagnose=_DECODE_MISTAKES, reveal=reveal,
        hint="this is the last row of the causal attention of section 1: which keys may the newest token read? "
             "Tiered hints are above the exercise.",
        recipe="scores = q_new k_cacheᵀ / sqrt(head_dim) (1 × T per head, no mask: the newest token reads every "
               "cached one); softmax over the cache axis; multiply by v_cache.",
    )


def check_kv_cache_bytes(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check ``kv_cache_bytes(layers, kv_heads, head_dim, context, bytes_per_element)``, Jamba's figures included."""
    return check_function(
        fn, _answers.kv_cache_bytes_answer, _kv_cache_cases(), exercise="KV-cache bytes", atol=0, rtol=0,
        diagnose=_kv_bytes_diagnosis, reveal=reveal,
        hint="list what one cached token stores, in one layer and one KV head, then count; the answer is in "
             "bytes. Tiered hints are above the exercise.",
        recipe="2 (a key and a value) × layers × kv_heads × head_dim × context × bytes_per_element.",
    )


def check_decode_intensity(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check ``decode_intensity(shape, context, batch)`` = FLOPs / bytes of one decode step.

    ``shape.decode_step``, the library's one-call answer, is refused while it runs.
    """
    return check_function(
        refuse_calls(fn, _DECODE_STEP_REFUSED), _answers.decode_intensity_answer, _decode_intensity_cases(), exercise="decode arithmetic intensity",
        atol=0, rtol=1e-6, diagnose=_intensity_diagnosis, reveal=reveal,
        hint="ask, for each of the FLOPs, the weights and the KV caches, whether it grows with the batch. Tiered "
             "hints are above the exercise.",
        recipe="FLOPs = batch × shape.flops_per_token(context); bytes = shape.params × bytes_per_element (read "
               "once per step, shared) + batch × context × shape.kv_bytes_per_token(); return FLOPs / bytes.",
    )
