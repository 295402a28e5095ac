"""Chapter 02's exercise checkers, each with its case builder.

* :func:`check_grouped_decode_step` — the GQA decode step against a grouped cache (MHA, GQA, MQA shapes).
* :func:`check_absorb_mla_weights` — folding ``W_UK`` into the queries and ``W_UV`` into the output.
* :func:`check_quantize_dequantize` — the asymmetric b-bit round trip, statistics over one dimension.

Each is a thin wrapper over :func:`labsupport.harness.checking.check_function` with the
references of :mod:`labsupport.grouped.reference` and :mod:`labsupport.grouped.quantization`. Those are
library functions the chapter uses; the quantiser's checker refuses an answer that calls the library's own
quantisers (:func:`labsupport.harness.guards.refuse_calls`), which section 4 uses before the exercise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from labsupport.grouped import _solutions
from labsupport.grouped.quantization import dequantize, fake_quantize, quantize_asymmetric, quantize_dequantize
from labsupport.grouped.reference import absorb_mla_weights, grouped_decode_step
from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.diagnosis import known_mistakes
from labsupport.harness.guards import refuse_calls

# The library's quantisers, refused inside the learner's function: section 4 uses them before the exercise, so
# calling one would pass the exercise without doing it.
_LIBRARY_QUANTISE = {f: f"ga.{f.__name__} is the library's quantiser that section 4 used: this exercise is to "
                        "write the round trip yourself with torch operations"
                     for f in (quantize_dequantize, quantize_asymmetric, dequantize, fake_quantize)}

__all__ = ["check_absorb_mla_weights", "check_grouped_decode_step", "check_quantize_dequantize"]


def _decode_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(2)

    def case(b: int, h: int, g: int, t: int, d: int, dtype: torch.dtype = torch.float32) -> tuple:
        return (torch.randn(b, h, 1, d, generator=gen).to(dtype), torch.randn(b, g, t, d, generator=gen).to(dtype),
                torch.randn(b, g, t, d, generator=gen).to(dtype))

    big = case(1, 4, 2, 6, 8)
    nc_k = torch.randn(2, 2, 8, 11, generator=gen).transpose(-1, -2)       # (2, 2, 11, 8), non-contiguous
    return [
        Case("MHA: 4 query heads, 4 KV heads, 7 cached tokens", case(1, 4, 4, 7, 8)),
        Case("GQA: 8 query heads share 2 KV heads (4 each), B=2", case(2, 8, 2, 9, 4)),
        Case("MQA: 6 query heads share 1 KV head", case(1, 6, 1, 5, 8)),
        Case("one cached token", case(1, 4, 2, 1, 4)),
        Case("large scores (× 30)", tuple(t * 30 for t in big)),
        Case("cache stored transposed in memory (non-contiguous)", (torch.randn(2, 6, 1, 8, generator=gen), nc_k,
                                                                     torch.randn(2, 2, 11, 8, generator=gen))),
        Case("float64, 12 query heads, 3 KV heads", case(1, 12, 3, 10, 8, torch.float64)),
        Case("8 query heads share 2 KV heads over 64 cached tokens (the cache must not be copied per query head)",
             case(1, 8, 2, 64, 16), max_elements=8 * 64 * 16 // 2,
             max_elements_note="(the cache itself is 2 × 64 × 16 numbers per tensor; a copy for every query head "
                               "is 8 × 64 × 16, which is the memory traffic GQA exists to save)"),
    ]


def _grouped_with_tiled_heads(q, k, v):
    """Query head h reading KV head h % G (``tensor.repeat``): the usual slip."""
    reps = q.shape[1] // k.shape[1]
    k, v = k.repeat(1, reps, 1, 1), v.repeat(1, reps, 1, 1)
    return ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(dim=-1) @ v


_GROUPED_MISTAKES = known_mistakes({
    "your query head h reads KV head h % G (heads tiled, as tensor.repeat does); consecutive query heads share "
    "a KV head": _grouped_with_tiled_heads,
    "your output matches attention without the 1/√d scale":
        lambda q, k, v: _grouped_with_tiled_heads(q * q.shape[-1] ** 0.5, k.repeat_interleave(
            q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)),
}, atol=1e-5, rtol=1e-4)


def _quantise_with_levels(x, bits, dim, levels):
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round((x - lo) / scale).clamp(0, 2**bits - 1) * scale + lo


_QUANTISE_MISTAKES = known_mistakes({
    "your grid divides the range into 2**bits steps: 2**bits levels from min to max leave 2**bits − 1 steps "
    "between them": lambda x, bits, dim: _quantise_with_levels(x, bits, dim, 2**bits),
}, atol=1e-5, rtol=1e-5)


def check_grouped_decode_step(fn: Callable[..., torch.Tensor], reveal: bool = False) -> CheckResult:
    """Check ``grouped_decode_step(q_new, k_cache, v_cache)`` for MHA, GQA and MQA shapes."""
    return check_function(
        fn, grouped_decode_step, _decode_cases(), exercise="GQA decode step", atol=1e-5, rtol=1e-4,
        diagnose=_GROUPED_MISTAKES, reveal=reveal,
        hint="which KV head does each query head read? Check it on the MHA case first (G = H), then the others. "
             "Tiered hints are above the exercise.",
        recipe="query head h reads KV head h // (H // G): k.repeat_interleave(H // G, dim=1) (same for v), or "
               "reshape q to (B, G, H // G, D) against k of (B, G, T, D); then softmax(q kᵀ / sqrt(D)) v over "
               "the cached positions.",
    )


def _absorb_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(3)

    def weights(h: int, d_model: int, d_c: int, d_h: int, dtype: torch.dtype = torch.float32) -> tuple:
        return tuple(torch.randn(*shape, generator=gen).to(dtype) for shape in
                     ((h, d_model, d_h), (h, d_c, d_h), (h, d_c, d_h), (h, d_h, d_model)))

    return [
        Case("1 head, d_model=6, d_c=3, d_h=2", weights(1, 6, 3, 2)),
        Case("4 heads, d_model=16, d_c=8, d_h=4", weights(4, 16, 8, 4)),
        Case("latent wider than the model: d_model=8, d_c=12, d_h=4", weights(2, 8, 12, 4)),
        Case("float64, 3 heads", weights(3, 10, 5, 6, torch.float64)),
        Case("w_uk and w_o stored transposed in memory (non-contiguous)",
             (torch.randn(2, 8, 4, generator=gen), torch.randn(2, 4, 6, generator=gen).transpose(-1, -2),
              torch.randn(2, 6, 4, generator=gen), torch.randn(2, 8, 4, generator=gen).transpose(-1, -2))),
    ]


def check_absorb_mla_weights(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], reveal: bool = False
                             ) -> CheckResult:
    """Check ``absorb_mla_weights(w_q, w_uk, w_uv, w_o)`` → ``(w_q_absorbed, w_o_absorbed)``."""
    return check_function(
        fn, absorb_mla_weights, _absorb_cases(), exercise="MLA weight absorption", atol=1e-5, rtol=1e-4,
        output_names=("w_q_absorbed", "w_o_absorbed"), reveal=reveal,
        hint="write the score and head h's output as chains of products and regroup them, as section 3 did on "
             "activations; the results are (H, d_model, d_c) and (H, d_c, d_model). Tiered hints are above the "
             "exercise.",
        recipe="w_q_absorbed[h] = w_q[h] @ w_uk[h]ᵀ; w_o_absorbed[h] = w_uv[h] @ w_o[h] (batched over h with "
               "matmul / einsum).",
    )


def _quantize_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(1, 2, 16, 8, generator=gen)
    keys[..., 3] *= 20                                                     # an outlier channel, as KIVI observes
    values = torch.randn(1, 2, 16, 8, generator=gen)
    const = torch.full((2, 5), 0.75)
    return [
        Case("keys per channel (dim=-2), 2 bits", (keys, 2, -2)),
        Case("values per token (dim=-1), 4 bits", (values, 4, -1)),
        Case("8 bits, dim=1 of a (3, 10) matrix", (torch.randn(3, 10, generator=gen) * 5 + 2, 8, 1)),
        Case("a constant slice (max = min) must come back exactly", (const, 2, -1)),
        Case("1 bit, float64", (torch.randn(4, 6, generator=gen, dtype=torch.float64), 1, 0)),
        Case("non-contiguous input", (torch.randn(8, 5, generator=gen).t(), 3, -1)),
    ]


def check_quantize_dequantize(fn: Callable[..., torch.Tensor], reveal: bool = False) -> CheckResult:
    """Check ``quantize_dequantize(x, bits, dim)``: asymmetric b-bit round trip, statistics over ``dim``."""
    return check_function(
        refuse_calls(fn, _LIBRARY_QUANTISE), _solutions.quantize_dequantize, _quantize_cases(),
        exercise="asymmetric quantise/dequantise", atol=1e-5, rtol=1e-5,
        diagnose=_QUANTISE_MISTAKES, reveal=reveal,
        hint="each slice along `dim` has its own grid from its minimum to its maximum; compare your scale, "
             "rounding and clamp with the exercise's statement, and check that a constant slice comes back "
             "exactly. Tiered hints are above the exercise.",
        recipe="lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True); scale = (hi − lo) / (2**bits − 1) "
               "(1 where hi = lo); q = round((x − lo) / scale).clamp(0, 2**bits − 1); return q · scale + lo.",
    )
