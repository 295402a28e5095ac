"""Chapter 00 exercises: the ``check_*`` checkers and the cases they are graded on.

Each checker compares a learner's function with its reference in
:mod:`labsupport.attention.reference` through
:func:`labsupport.harness.checking.check_function`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from labsupport.attention.reference import (
    attention_decode_step,
    causal_attention,
    decode_intensity_reference,
    kv_cache_bytes_reference,
)
from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.costs import MODEL_PRESETS, TransformerShape

__all__ = [
    "check_attention_decode_step",
    "check_causal_attention",
    "check_decode_intensity",
    "check_kv_cache_bytes",
]


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


def check_causal_attention(fn: Callable[..., object]) -> CheckResult:
    """Check a learner's ``causal_attention(q, k, v)`` against :func:`causal_attention`."""
    return check_function(
        fn, causal_attention, _attention_cases(), exercise="causal attention",
        atol=1e-5, rtol=1e-4,
        hint="scale by 1/sqrt(head_dim), mask with -inf strictly above the diagonal "
             "(position t may read t itself), softmax over the last dimension.",
    )


def check_attention_decode_step(fn: Callable[..., object]) -> CheckResult:
    """Check ``attention_decode_step(q_new, k_cache, v_cache)``, including that it matches the last row of full attention."""
    return check_function(
        fn, attention_decode_step, _decode_step_cases(), exercise="decode step with a KV cache",
        atol=1e-5, rtol=1e-4,
        hint="this is the last row of the causal attention of section 1; the usual slips are the scale (it "
             "depends on the head dimension, not on the cache length) and the axis the softmax normalises. "
             "F.scaled_dot_product_attention(..., is_causal=True) aligns its mask to the top-left, so with one "
             "query it would see only the first key. Tiered hints are above the exercise.",
    )


def check_kv_cache_bytes(fn: Callable[..., object]) -> CheckResult:
    """Check ``kv_cache_bytes(layers, kv_heads, head_dim, context, bytes_per_element)``, Jamba's figures included."""
    return check_function(
        fn, kv_cache_bytes_reference, _kv_cache_cases(), exercise="KV-cache bytes", atol=0, rtol=0,
        hint="one key AND one value vector per layer, per KV head, per cached token; answer in bytes "
             "(not GB or GiB).",
    )


def check_decode_intensity(fn: Callable[..., object]) -> CheckResult:
    """Check ``decode_intensity(shape, context, batch)`` = FLOPs / bytes of one decode step."""
    return check_function(
        fn, decode_intensity_reference, _decode_intensity_cases(), exercise="decode arithmetic intensity",
        atol=0, rtol=1e-6,
        hint="the weights are read once per step and shared by the whole batch; each sequence reads its "
             "own KV cache; every sequence in the batch does its own FLOPs.",
    )
