"""Chapter 00 — where the time goes: reference solutions, cost model and checkers.

* :func:`causal_attention` — softmax attention written out from its definition.
* :func:`attention_decode_step` — one new query against a KV cache.
* :class:`TransformerShape` — FLOPs and bytes per token of a decoder, for
  prefill and for decode, and their ratio (arithmetic intensity).
* :data:`KV_PRESETS` — the attention shapes of published models, with which
  :func:`labsupport.harness.measuring.kv_cache_bytes` reproduces the Jamba paper's
  256K-context figures (arXiv:2403.19887, table 1).
* ``check_*`` — the chapter's exercise checkers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from labsupport.harness.costs import kv_cache_bytes
from labsupport.harness.checking import Case, CheckResult, check_function

__all__ = [
    "causal_attention",
    "attention_decode_step",
    "kv_cache_bytes_reference",
    "TransformerShape",
    "KV_PRESETS",
    "MODEL_PRESETS",
    "check_causal_attention",
    "check_attention_decode_step",
    "check_kv_cache_bytes",
    "decode_intensity_reference",
    "check_decode_intensity",
]


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a tensor of shape (batch, heads, length, head_dim); got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention, ``(B, H, L, D)`` each → ``(B, H, L, D)``.

    ``softmax(q kᵀ / √D + mask) v`` where the mask is −∞ above the diagonal,
    so position ``t`` reads only positions ``0..t``.
    """
    _check_qkv(q, k, v)
    length = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


def attention_decode_step(q_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One decoding step: the newest query ``(B, H, 1, D)`` attends to every cached key and value.

    The cache ``(B, H, T, D)`` already holds the new token's own key and value,
    so no mask is needed: every cached position lies in the past (or is now).
    """
    _check_qkv(q_new, k_cache, v_cache)
    if q_new.shape[-2] != 1:
        raise ValueError(f"q_new must hold one position, shape (B, H, 1, D); got {tuple(q_new.shape)}")
    scores = q_new @ k_cache.transpose(-1, -2) / math.sqrt(q_new.shape[-1])  # (B, H, 1, T)
    return scores.softmax(dim=-1) @ v_cache


def kv_cache_bytes_reference(layers: int, kv_heads: int, head_dim: int, context: int,
                             bytes_per_element: int) -> int:
    """Bytes of keys and values cached for one sequence: ``2 · layers · kv_heads · head_dim · context · bytes``.

    The positional form of :func:`labsupport.harness.measuring.kv_cache_bytes`, with
    the signature of the chapter's exercise.
    """
    return kv_cache_bytes(layers=layers, kv_heads=kv_heads, head_dim=head_dim, context=context,
                          bytes_per_element=bytes_per_element)


#: Attention shapes of published models (query heads, KV heads, head dim, attention layers).
KV_PRESETS: dict[str, dict[str, int]] = {
    "LLaMA-2-7B (MHA)": {"layers": 32, "q_heads": 32, "kv_heads": 32, "head_dim": 128},
    "Mistral-7B (GQA)": {"layers": 32, "q_heads": 32, "kv_heads": 8, "head_dim": 128},
    "Mixtral-8x7B (GQA)": {"layers": 32, "q_heads": 32, "kv_heads": 8, "head_dim": 128},
    "Jamba (4 attention layers of 32)": {"layers": 4, "q_heads": 32, "kv_heads": 8, "head_dim": 128},
}


@dataclass(frozen=True)
class TransformerShape:
    """The dimensions of a dense decoder, enough to count FLOPs and bytes per token.

    Counting conventions: a matrix product of an ``m × k`` by ``k × n`` costs
    ``2mkn`` FLOPs; weights are read once per forward pass whatever the batch;
    layer norms, softmax and activations are ignored (they are small).
    """

    layers: int
    d_model: int
    q_heads: int
    kv_heads: int
    head_dim: int
    d_ff: int
    vocab: int
    bytes_per_element: int = 2
    gated_mlp: bool = True

    def __post_init__(self) -> None:
        for name in ("layers", "d_model", "q_heads", "kv_heads", "head_dim", "d_ff", "vocab", "bytes_per_element"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"q_heads={self.q_heads} must be a multiple of kv_heads={self.kv_heads}")

    @property
    def params_per_layer(self) -> int:
        attn = self.d_model * self.head_dim * (2 * self.q_heads + 2 * self.kv_heads)
        mlp = (3 if self.gated_mlp else 2) * self.d_model * self.d_ff
        return attn + mlp

    @property
    def params(self) -> int:
        """Weights used per token: all layers plus the output projection (the input embedding is a lookup)."""
        return self.layers * self.params_per_layer + self.d_model * self.vocab

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache each token adds, over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_element

    def flops_per_token(self, context: int) -> float:
        """FLOPs to process one token that attends to ``context`` positions."""
        weights = 2 * self.params
        attention = 4 * self.layers * self.q_heads * self.head_dim * context  # q·k and p·v
        return float(weights + attention)

    def decode_step(self, context: int, batch: int = 1) -> tuple[float, float]:
        """(FLOPs, bytes moved) for one decode step of ``batch`` sequences at ``context``."""
        if context < 1 or batch < 1:
            raise ValueError(f"context and batch must be >= 1, got {context}, {batch}")
        flops = batch * self.flops_per_token(context)
        moved = self.params * self.bytes_per_element + batch * context * self.kv_bytes_per_token()
        return flops, float(moved)

    def prefill(self, length: int, batch: int = 1) -> tuple[float, float]:
        """(FLOPs, bytes moved) to prefill ``batch`` prompts of ``length`` tokens (causal: mean context L/2)."""
        if length < 1 or batch < 1:
            raise ValueError(f"length and batch must be >= 1, got {length}, {batch}")
        flops = batch * length * self.flops_per_token((length + 1) // 2)
        moved = self.params * self.bytes_per_element + 2 * batch * length * self.kv_bytes_per_token()
        return float(flops), float(moved)


#: Full shapes for the FLOPs-and-bytes estimate (from the models' published configs).
MODEL_PRESETS: dict[str, TransformerShape] = {
    "LLaMA-2-7B": TransformerShape(32, 4096, 32, 32, 128, 11008, 32000),
    "Mistral-7B": TransformerShape(32, 4096, 32, 8, 128, 14336, 32000),
}


# ----------------------------------------------------------------------------- checkers

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


def check_causal_attention(fn) -> CheckResult:
    """Check a learner's ``causal_attention(q, k, v)`` against :func:`causal_attention`."""
    return check_function(
        fn, causal_attention, _attention_cases(), exercise="causal attention",
        atol=1e-5, rtol=1e-4,
        hint="scale by 1/sqrt(head_dim), mask with -inf strictly above the diagonal "
             "(position t may read t itself), softmax over the last dimension.",
    )


def check_attention_decode_step(fn) -> CheckResult:
    """Check ``attention_decode_step(q_new, k_cache, v_cache)``, including that it matches the last row of full attention."""
    gen = torch.Generator().manual_seed(1)
    cases = []
    for b, h, t, d in ((1, 1, 1, 4), (2, 4, 9, 8), (1, 2, 33, 16)):
        q, k, v = (torch.randn(b, h, t, d, generator=gen) for _ in range(3))
        cases.append(Case(f"cache of {t} token{'s' if t > 1 else ''}, B={b}, H={h}, D={d}", (q[:, :, -1:], k, v)))
    big = torch.randn(1, 2, 5, 8, generator=gen) * 40
    cases.append(Case("large scores (× 40)", (big[:, :, -1:], big, big.flip(-2))))
    return check_function(
        fn, attention_decode_step, cases, exercise="decode step with a KV cache",
        atol=1e-5, rtol=1e-4,
        hint="scale the scores by 1/sqrt(head_dim) (q_new.shape[-1], not the cache length); the single query "
             "needs no mask, since every cached key is in its past; softmax over the cached positions (the last "
             "dimension). Careful: F.scaled_dot_product_attention(..., is_causal=True) aligns its mask to the "
             "top-left, so with one query it would see only the first key.",
    )


def check_kv_cache_bytes(fn) -> CheckResult:
    """Check ``kv_cache_bytes(layers, kv_heads, head_dim, context, bytes_per_element)``, Jamba's figures included."""
    cases = [
        Case("one layer, one head, one token, fp32", (1, 1, 1, 1, 4)),
        Case("LLaMA-2-7B at 256K, fp16 (paper: 128 GB)", (32, 32, 128, 262_144, 2)),
        Case("Mistral-7B at 256K, fp16 (paper: 32 GB)", (32, 8, 128, 262_144, 2)),
        Case("Jamba at 256K, fp16 (paper: 4 GB)", (4, 8, 128, 262_144, 2)),
        Case("int8 cache, 2K context", (24, 4, 64, 2048, 1)),
    ]
    return check_function(
        fn, kv_cache_bytes_reference, cases, exercise="KV-cache bytes", atol=0, rtol=0,
        hint="one key AND one value vector per layer, per KV head, per cached token; answer in bytes "
             "(not GB or GiB).",
    )


def decode_intensity_reference(shape: TransformerShape, context: int, batch: int) -> float:
    """FLOPs per byte moved of one decode step (see :meth:`TransformerShape.decode_step`)."""
    flops, moved = shape.decode_step(context, batch)
    return flops / moved


def check_decode_intensity(fn) -> CheckResult:
    """Check ``decode_intensity(shape, context, batch)`` = FLOPs / bytes of one decode step."""
    llama, mistral = MODEL_PRESETS["LLaMA-2-7B"], MODEL_PRESETS["Mistral-7B"]
    tiny = TransformerShape(layers=2, d_model=64, q_heads=4, kv_heads=2, head_dim=16, d_ff=256,
                            vocab=100, bytes_per_element=4, gated_mlp=False)
    cases = [
        Case("tiny fp32 model, context 1, batch 1", (tiny, 1, 1)),
        Case("tiny fp32 model, context 1000, batch 8", (tiny, 1000, 8)),
        Case("LLaMA-2-7B, context 1, batch 1", (llama, 1, 1)),
        Case("LLaMA-2-7B, context 4096, batch 64", (llama, 4096, 64)),
        Case("Mistral-7B (GQA), context 32768, batch 16", (mistral, 32768, 16)),
    ]
    return check_function(
        fn, decode_intensity_reference, cases, exercise="decode arithmetic intensity",
        atol=0, rtol=1e-6,
        hint="the weights are read once per step and shared by the whole batch; each sequence reads its "
             "own KV cache; every sequence in the batch does its own FLOPs.",
    )
