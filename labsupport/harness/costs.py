"""Every byte and FLOP formula of the course, in one place.

Memory of what a model keeps per sequence:

* :func:`kv_cache_bytes` — keys and values of softmax attention (grows with the context).
* :func:`cache_elements_per_token`, :func:`mla_elements_per_token`, :func:`equivalent_kv_groups`,
  :func:`quantized_bytes_per_element` — what GQA/MQA, MLA and a quantised cache store per token.
* :func:`recurrent_state_bytes` — the fixed-size state of a linear-attention or state-space layer.
* :func:`mamba_state_bytes` — a Mamba layer's decoding state: its SSM state and its convolution window.
* :func:`mixer_state_numbers` — one layer's decode state in numbers, by kind, in Based's conventions
  (attention ``2·d·L``, window ``2·d·w``, SSM ``2·d·N``, linear attention ``heads·d_k·d_v``): chapter 07's frontier.

Work:

* :class:`TransformerShape` — FLOPs and bytes moved per token of a dense decoder, for prefill and decode.
* :func:`chunkwise_flops` — matmul FLOPs of chunkwise linear attention.
* :func:`moe_parameters` — total and active (per-token) parameters of a mixture-of-experts layer.
* :func:`expert_parallel_bytes` — bytes an expert-parallel all-to-all moves between processes.
* :func:`nsa_tokens_per_step`, :func:`policy_tokens_per_step`, :func:`decode_read_bytes` — what one decode
  step of sparse attention reads (NSA's branches, a KV policy's budget, bytes with page metadata).
* :func:`denoising_work`, :func:`autoregressive_work` — sequential network calls and positions processed to
  generate tokens with a masked-diffusion sampler (tokens per step, blocks, block cache) or with a KV cache.

And :func:`format_bytes` to print any of them. :data:`KV_PRESETS` and :data:`MODEL_PRESETS`
hold the shapes of published models.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from labsupport.harness.validation import require_float, require_int, require_positive_int

__all__ = [
    "KV_PRESETS",
    "MODEL_PRESETS",
    "TransformerShape",
    "autoregressive_work",
    "denoising_work",
    "cache_elements_per_token",
    "decode_read_bytes",
    "chunkwise_flops",
    "equivalent_kv_groups",
    "expert_parallel_bytes",
    "format_bytes",
    "kv_cache_bytes",
    "mla_elements_per_token",
    "moe_parameters",
    "nsa_tokens_per_step",
    "policy_tokens_per_step",
    "quantized_bytes_per_element",
    "mamba_state_bytes",
    "recurrent_state_bytes",
    "mixer_state_numbers",
    "image_tokens",
    "encoder_layer_flops",
    "mixer_token_flops",
    "roofline_seconds",
]


# --------------------------------------------------------------------------- KV-cache arithmetic


def kv_cache_bytes(
    *,
    layers: int,
    kv_heads: int,
    head_dim: int,
    context: int,
    bytes_per_element: int = 2,
    batch: int = 1,
) -> int:
    """Bytes of the key/value cache: ``2 · layers · kv_heads · head_dim · context · bytes · batch``.

    The leading 2 counts keys and values. ``bytes_per_element`` is 2 for fp16/bf16,
    1 for int8, 4 for fp32. Example: LLaMA-2-7B (32 layers, 32 KV heads of
    dimension 128, fp16) at 256K tokens holds 2**37 bytes, which
    ``format_bytes`` shows as ``"128 GiB"`` — the "128GB" of the Jamba paper.
    """
    layers = require_int("layers", layers, minimum=1)
    kv_heads = require_int("kv_heads", kv_heads, minimum=1)
    head_dim = require_int("head_dim", head_dim, minimum=1)
    context = require_int("context", context, minimum=0)
    bytes_per_element = require_int("bytes_per_element", bytes_per_element, minimum=1)
    batch = require_int("batch", batch, minimum=1)
    return 2 * layers * kv_heads * head_dim * context * bytes_per_element * batch


_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def format_bytes(n: int | float, *, binary: bool = True, digits: int = 3) -> str:
    """Human-readable byte count.

    Args:
        n: a non-negative number of bytes.
        binary: ``True`` (default) uses powers of 1024 with IEC names (KiB, MiB,
            GiB); ``False`` uses powers of 1000 with SI names (kB, MB, GB).
            Papers usually write "GB" for what are binary gigabytes: the Jamba
            paper's "128GB" KV cache for LLaMA-2-7B at 256K tokens is 2**37 bytes
            = ``"128 GiB"`` here, which would read ``"137 GB"`` in decimal units.
        digits: significant digits shown (trailing zeros dropped).

    Examples: ``format_bytes(2**37) == "128 GiB"``, ``format_bytes(2**37, binary=False) == "137 GB"``,
    ``format_bytes(1536) == "1.5 KiB"``, ``format_bytes(10) == "10 B"``.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"n must be a number of bytes, got {type(n).__name__} ({n!r})")
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"n must be a finite non-negative number of bytes, got {n}")
    if not isinstance(binary, bool):
        raise TypeError(f"binary must be a bool, got {type(binary).__name__}")
    digits = require_int("digits", digits, minimum=1)
    base = 1024.0 if binary else 1000.0
    units = _BINARY_UNITS if binary else _DECIMAL_UNITS
    value = float(n)
    unit_index = 0
    # Promote to the next unit when the *shown* number reaches the base, so that
    # 1023.9 KiB reads "1 MiB" and never "1024 KiB".
    while unit_index < len(units) - 1 and float(_significant(value, digits)) >= base:
        value /= base
        unit_index += 1
    if unit_index == 0:
        return f"{int(round(value))} B"
    return f"{_significant(value, digits)} {units[unit_index]}"


def _significant(value: float, digits: int) -> str:
    """``value`` with ``digits`` significant digits, never in exponent form, trailing zeros dropped."""
    if value >= 10 ** (digits - 1):
        return f"{value:.0f}"
    decimals = digits - 1 - math.floor(math.log10(value)) if value > 0 else 0
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# --------------------------------------------------------------------------- what a layer keeps per token


def cache_elements_per_token(n_kv_heads: int, head_dim: int) -> int:
    """Cached numbers per token per layer for MHA/GQA/MQA: ``2 · n_kv_heads · head_dim``."""
    return 2 * require_positive_int("n_kv_heads", n_kv_heads) * require_positive_int("head_dim", head_dim)


def mla_elements_per_token(latent_dim: int, rope_dim: int) -> int:
    """Cached numbers per token per layer for MLA: ``d_c + d_h^R``."""
    return require_positive_int("latent_dim", latent_dim) + require_int("rope_dim", rope_dim, minimum=0)


def equivalent_kv_groups(elements_per_token: float, head_dim: int) -> float:
    """The number of GQA groups whose cache is as big: ``elements / (2 · head_dim)``."""
    elements = require_float("elements_per_token", elements_per_token, positive=True)
    return elements / (2 * require_positive_int("head_dim", head_dim))


def quantized_bytes_per_element(bits: int, group: float, scale_bytes: int = 2) -> float:
    """Average bytes per element: ``bits/8`` plus one (scale, minimum) pair per ``group`` elements."""
    bits = require_int("bits", bits, minimum=1, maximum=8)
    group = require_float("group", group, positive=True)
    return bits / 8 + 2 * require_positive_int("scale_bytes", scale_bytes) / group


def recurrent_state_bytes(layers: int, heads: int, d_k: int, d_v: int, *,
                          bytes_per_element: int = 2, batch: int = 1) -> int:
    """Bytes of the recurrent state of a model: ``layers × heads × D_k × D_v`` elements per sequence.

    Unlike a KV cache it does not depend on the context length.
    """
    values = {"layers": layers, "heads": heads, "d_k": d_k, "d_v": d_v,
              "bytes_per_element": bytes_per_element, "batch": batch}
    total = 1
    for name, value in values.items():
        total *= require_positive_int(name, value)
    return total


def mamba_state_bytes(layers: int, d_inner: int, d_state: int, d_conv: int = 4, *,
                      bytes_per_element: int = 2, batch: int = 1) -> int:
    """Bytes of a Mamba model's decoding state: ``layers × d_inner × (d_state + d_conv − 1)`` elements.

    Each layer keeps the SSM state ``(d_inner, d_state)`` and the last ``d_conv − 1``
    inputs of its causal convolution; neither depends on the context length.
    """
    layers, d_inner, d_state = (require_positive_int(n, v) for n, v in (("layers", layers), ("d_inner", d_inner),
                                                                        ("d_state", d_state)))
    d_conv = require_positive_int("d_conv", d_conv)
    bytes_per_element, batch = require_positive_int("bytes_per_element", bytes_per_element), \
        require_positive_int("batch", batch)
    return layers * d_inner * (d_state + d_conv - 1) * bytes_per_element * batch


# --------------------------------------------------------------------------- work


def chunkwise_flops(batch: int, heads: int, length: int, d_k: int, d_v: int, chunk_size: int) -> dict[str, int]:
    """Matmul FLOPs of chunkwise linear attention without decay (2 per multiply-add).

    Per chunk of ``C`` tokens: ``Q Kᵀ`` (``2 C² D_k``, computed in full even
    though the causal mask zeroes half), ``scores · V`` (``2 C² D_v``),
    ``Kᵀ V`` (``2 C D_k D_v``) and ``Q S`` (``2 C D_k D_v``). Returns the
    ``executed`` count (what the code multiplies, the last chunk padded), and
    ``useful``: the same with only the causal half (plus diagonal) of the
    intra-chunk products and the unpadded length. Element-wise work (masking,
    the cumulative sum of states) is not counted.
    """
    batch, heads, length = (require_positive_int(n, v) for n, v in (("batch", batch), ("heads", heads),
                                                                   ("length", length)))
    d_k, d_v, c = (require_positive_int(n, v) for n, v in (("d_k", d_k), ("d_v", d_v), ("chunk_size", chunk_size)))
    padded = -(-length // c) * c
    executed = batch * heads * (padded * 2 * c * (d_k + d_v) + padded * 4 * d_k * d_v)
    useful = batch * heads * (length * (c + 1) * (d_k + d_v) + length * 4 * d_k * d_v)
    return {"executed": executed, "useful": useful}


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
            require_positive_int(name, getattr(self, name))
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
        context, batch = require_positive_int("context", context), require_positive_int("batch", batch)
        flops = batch * self.flops_per_token(context)
        moved = self.params * self.bytes_per_element + batch * context * self.kv_bytes_per_token()
        return flops, float(moved)

    def prefill(self, length: int, batch: int = 1) -> tuple[float, float]:
        """(FLOPs, bytes moved) to prefill ``batch`` prompts of ``length`` tokens (causal: mean context L/2)."""
        length, batch = require_positive_int("length", length), require_positive_int("batch", batch)
        flops = batch * length * self.flops_per_token((length + 1) // 2)
        moved = self.params * self.bytes_per_element + 2 * batch * length * self.kv_bytes_per_token()
        return float(flops), float(moved)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights used per token (:attr:`params` × ``bytes_per_element``)."""
        return self.params * self.bytes_per_element

    def flops_split(self, context: int) -> dict[str, float]:
        """FLOPs of one token attending to ``context`` positions, split three ways.

        * ``"attention"``: the scores ``q·k`` and the weighted sum ``p·v``, ``4 · layers · q_heads · head_dim · context``;
        * ``"weight matmuls"``: every weight matrix, ``2 × params`` (projections, MLP, output head);
        * ``"the rest"``: elementwise work, estimated at a few FLOPs per element: softmax (5 per score),
          layer norms (5 per element, two per layer and one final), the MLP's activation (5 per hidden
          unit) and residual adds (2 per layer).

        For a whole causal prefill of ``L`` tokens, the mean context is ``(L + 1) / 2`` and attention's
        FLOPs are linear in the context, so ``flops_split((L + 1) // 2)`` gives the prefill's split.
        """
        context = require_positive_int("context", context)
        attention = 4 * self.layers * self.q_heads * self.head_dim * context
        weights = 2 * self.params
        rest = self.layers * (5 * self.q_heads * context + 12 * self.d_model + 5 * self.d_ff) + 5 * self.d_model
        return {"attention": float(attention), "weight matmuls": float(weights), "the rest": float(rest)}

    def max_batch(self, memory_bytes: int | float, context: int) -> int:
        """The most sequences of ``context`` tokens whose KV caches fit in ``memory_bytes`` beside the weights.

        ``(memory − weight bytes) // (context × KV bytes per token)``, and 0 when the weights alone do not
        fit. Activations, the framework's workspace and fragmentation are not counted: a real server fits
        somewhat fewer.
        """
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, (int, float)) or not memory_bytes > 0:
            raise ValueError(f"memory_bytes must be a positive number, got {memory_bytes!r}")
        context = require_positive_int("context", context)
        spare = memory_bytes - self.weight_bytes
        return 0 if spare <= 0 else int(spare // (context * self.kv_bytes_per_token()))


#: Full shapes for the FLOPs-and-bytes estimate (from the models' published configs).
MODEL_PRESETS: dict[str, TransformerShape] = {
    "LLaMA-2-7B": TransformerShape(32, 4096, 32, 32, 128, 11008, 32000),
    "Mistral-7B": TransformerShape(32, 4096, 32, 8, 128, 14336, 32000),
}


# --------------------------------------------------------------------------- mixture of experts


def moe_parameters(d_model: int, expert_hidden: int, n_experts: int, top_k: int, *,
                   n_shared: int = 0, bias: bool = True) -> dict[str, int]:
    """Parameters of a mixture-of-experts layer of MLP experts (``d → h → d``): ``total`` and ``active``.

    ``active`` counts what one token uses: the router (``d · E``), the shared experts
    and ``top_k`` routed experts. A dense MLP of hidden width ``top_k · h`` has the
    same active parameters (up to biases) and the same FLOPs per token, ``2 ×``
    the active weights.
    """
    d = require_positive_int("d_model", d_model)
    h = require_positive_int("expert_hidden", expert_hidden)
    e = require_positive_int("n_experts", n_experts)
    k = require_int("top_k", top_k, minimum=1, maximum=e)
    shared = require_int("n_shared", n_shared, minimum=0)
    per_expert = 2 * d * h + ((h + d) if bias else 0)
    shared_params = 0 if shared == 0 else 2 * d * shared * h + ((shared * h + d) if bias else 0)
    router = d * e
    return {"total": router + shared_params + e * per_expert,
            "active": router + shared_params + k * per_expert,
            "per_expert": per_expert}


def expert_parallel_bytes(tokens: int, d_model: int, top_k: int, world_size: int, *,
                          bytes_per_element: int = 2) -> int:
    """Bytes of token vectors one process sends to others per MoE layer, dispatch and combine, under uniform routing.

    Each of its ``tokens · top_k`` assignments lands on another process with
    probability ``(W − 1)/W`` and crosses twice (there and back), ``d_model``
    elements each way: ``2 · tokens · k · d · b · (W − 1)/W``.
    """
    tokens = require_int("tokens", tokens, minimum=0)
    d = require_positive_int("d_model", d_model)
    k = require_positive_int("top_k", top_k)
    w = require_positive_int("world_size", world_size)
    b = require_positive_int("bytes_per_element", bytes_per_element)
    return 2 * tokens * k * d * b * (w - 1) // w


# --------------------------------------------------------------------------- sparse attention at decode time


def nsa_tokens_per_step(context: int, *, compress_block: int = 32, compress_stride: int = 16, select_block: int = 64,
                        n_selected: int = 16, window: int = 512) -> dict[str, int]:
    """Tokens one NSA decode step reads at ``context`` tokens, by branch (defaults: the NSA paper's settings).

    ``compressed`` = number of compression blocks ``⌊(context − block)/stride⌋ + 1`` (0 below one block),
    ``selected`` = ``min(context, n_selected · select_block)``, ``window`` = ``min(window, context)``.
    The paper's figure (2,048 / 2,560 / 3,584 / 5,632 at 8K–64K) is ``context/16 + 1,536``, one more
    than this count of compression blocks.
    """
    context = require_positive_int("context", context)
    block = require_positive_int("compress_block", compress_block)
    stride = require_positive_int("compress_stride", compress_stride)
    chosen = require_positive_int("n_selected", n_selected) * require_positive_int("select_block", select_block)
    window = require_positive_int("window", window)
    compressed = 0 if context < block else (context - block) // stride + 1
    selected, sliding = min(context, chosen), min(window, context)
    return {"compressed": compressed, "selected": selected, "window": sliding,
            "total": compressed + selected + sliding}


def decode_read_bytes(tokens: int, *, layers: int, kv_heads: int, head_dim: int, bytes_per_element: int = 2,
                      pages: int = 0, batch: int = 1) -> int:
    """Bytes of cache one decode step reads: keys and values of ``tokens`` tokens, plus page metadata.

    ``2 · layers · kv_heads · head_dim · bytes · (tokens + pages) · batch``: each of ``pages`` pages
    costs a key-sized minimum and maximum (Quest), the same as one token's key and value.
    """
    tokens = require_int("tokens", tokens, minimum=0)
    pages = require_int("pages", pages, minimum=0)
    per_token = 2 * require_positive_int("layers", layers) * require_positive_int("kv_heads", kv_heads)
    per_token *= require_positive_int("head_dim", head_dim) * require_positive_int("bytes_per_element", bytes_per_element)
    return per_token * (tokens + pages) * require_positive_int("batch", batch)


def policy_tokens_per_step(policy: str, context: int, budget: int, *, page: int = 16) -> dict[str, int]:
    """Tokens a decode step reads (and pages of metadata it scans) at ``context`` tokens under a KV policy.

    ``full``: every token. ``window``, ``sinks``, ``h2o``, ``tova``: ``min(budget, context)`` (the cache
    is bounded). ``quest``: the top ``budget / page`` pages, after scanning the minimum/maximum of every
    page (``⌈context / page⌉`` pages); the newest page, always among them, holds only the tokens written so
    far (``context − page · (⌈context / page⌉ − 1)``).
    """
    if policy not in ("full", "window", "sinks", "h2o", "tova", "quest"):
        raise ValueError(f"policy must be one of full, window, sinks, h2o, tova, quest; got {policy!r}")
    context = require_positive_int("context", context)
    budget = require_int("budget", budget, minimum=0)
    page = require_positive_int("page", page)
    if policy == "full":
        return {"tokens": context, "pages": 0}
    if policy == "quest":
        pages = -(-context // page)
        read = min(max(1, budget // page), pages)
        newest = context - page * (pages - 1)
        return {"tokens": (read - 1) * page + newest, "pages": pages}
    return {"tokens": min(budget, context), "pages": 0}


def denoising_work(prompt: int, new_tokens: int, tokens_per_step: int, *, block_length: int | None = None,
                   cached: bool = False) -> dict[str, int]:
    """Work of a masked-diffusion sampler that writes ``new_tokens`` after ``prompt`` given positions.

    Every step is one call of the network on the whole canvas of ``prompt + new_tokens`` positions;
    ``ceil(new_tokens / tokens_per_step)`` steps in all. With blocks (of ``block_length`` positions counted from
    the end of the prompt, the last one possibly shorter), those steps are shared out over the blocks as
    ``labsupport.diffusion.diffusion_sample`` shares them: equal shares, the remainder to the first blocks. With
    ``cached`` (blocks only), a block's first step is a full pass and its later steps run only the block's
    positions.

    Returns ``{"steps": sequential network calls, "positions": positions processed, summed over calls}``.
    """
    prompt = require_int("prompt", prompt, minimum=0)
    new = require_positive_int("new_tokens", new_tokens)
    per_step = require_positive_int("tokens_per_step", tokens_per_step)
    if cached and block_length is None:
        raise ValueError("cached=True needs block_length (the cache holds what lies outside the current block)")
    canvas = prompt + new
    steps = -(-new // per_step)
    if block_length is None:
        return {"steps": steps, "positions": steps * canvas}
    block = require_positive_int("block_length", block_length)
    sizes = [min(block, new - start) for start in range(0, new, block)]
    if steps < len(sizes):
        raise ValueError(f"{steps} steps cannot give each of the {len(sizes)} blocks a step; "
                         f"use tokens_per_step ≤ block_length")
    base, extra = divmod(steps, len(sizes))
    positions = 0
    for index, size in enumerate(sizes):
        block_steps = base + (index < extra)
        positions += canvas + (block_steps - 1) * (size if cached else canvas)
    return {"steps": steps, "positions": positions}


def autoregressive_work(prompt: int, new_tokens: int) -> dict[str, int]:
    """Work of KV-cached greedy decoding: one prefill call over the prompt, then one call per further token.

    Returns ``{"steps": sequential network calls, "positions": positions processed}`` (``prompt + new − 1``:
    the last token is never fed back).
    """
    prompt = require_positive_int("prompt", prompt)
    new = require_positive_int("new_tokens", new_tokens)
    return {"steps": new, "positions": prompt + new - 1}


# --------------------------------------------------------------------------- one layer's state, by kind (chapter 07)


def mixer_state_numbers(kind: str, *, context: int, kv_width: int = 0, window: int | None = None,
                        d_inner: int = 0, d_state: int = 0, heads: int = 0, d_k: int = 0, d_v: int = 0) -> int:
    """Numbers one sequence-mixer layer keeps for one sequence after ``context`` tokens (Based's conventions).

    * ``"attention"`` — ``kv_width · context``: ``kv_width`` numbers cached per token (``2·d`` for multi-head
      attention, ``2 · n_kv_heads · head_dim`` for GQA/MQA, ``d_c + d_R`` for MLA);
    * ``"window"`` — ``kv_width · min(context, window)``: a sliding window (sinks included in ``window``), or
      any policy whose cache is bounded by ``window`` tokens;
    * ``"ssm"`` — ``d_inner · d_state`` (Mamba's ``2·d·N`` with ``d_inner = 2d``), whatever the context;
    * ``"linear"`` — ``heads · d_k · d_v``, whatever the context.

    Multiply by the bytes per element (2 for bf16) for bytes. Small context-independent extras (a convolution
    window, a normaliser row) are left out, as Based leaves them out.
    """
    if kind not in ("attention", "window", "ssm", "linear"):
        raise ValueError(f"kind must be one of 'attention', 'window', 'ssm', 'linear'; got {kind!r}")
    context = require_int("context", context, minimum=0)
    if kind == "attention":
        return require_positive_int("kv_width", kv_width) * context
    if kind == "window":
        if window is None:
            raise ValueError("kind='window' needs window= (the most tokens the cache holds)")
        return require_positive_int("kv_width", kv_width) * min(context, require_positive_int("window", window))
    if kind == "ssm":
        return require_positive_int("d_inner", d_inner) * require_positive_int("d_state", d_state)
    return require_positive_int("heads", heads) * require_positive_int("d_k", d_k) * require_positive_int("d_v", d_v)
# --------------------------------------------------------------------------- images as tokens (chapter 09)


def image_tokens(height: int, width: int, patch: int) -> int:
    """Patch tokens of an ``height × width`` image cut into ``patch × patch`` squares: ``(H/p)·(W/p)``."""
    height, width = require_positive_int("height", height), require_positive_int("width", width)
    patch = require_positive_int("patch", patch)
    if height % patch or width % patch:
        raise ValueError(f"image {height}×{width} is not divisible by patch {patch}")
    return (height // patch) * (width // patch)


def encoder_layer_flops(tokens: int, d_model: int, *, mlp_ratio: int = 4) -> dict[str, int]:
    """Matmul FLOPs of one transformer layer over ``N`` tokens (2 per multiply-add).

    ``projections``: Q, K, V and output, ``8 N d²``; ``attention``: scores ``Q Kᵀ`` and ``P V``, ``4 N² d``;
    ``mlp``: two matmuls through width ``mlp_ratio·d``, ``4 · mlp_ratio · N d²``; and their ``total``. The
    attention term is the only one quadratic in ``N``; it overtakes the rest at ``N = (2 + mlp_ratio) · d``.
    """
    n = require_int("tokens", tokens, minimum=0)
    d, ratio = require_positive_int("d_model", d_model), require_positive_int("mlp_ratio", mlp_ratio)
    parts = {"projections": 8 * n * d * d, "attention": 4 * n * n * d, "mlp": 4 * ratio * n * d * d}
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------- choosing by bottleneck (chapter 10)


def mixer_token_flops(kind: str, *, d_model: int, attended: int = 0, state_numbers: int = 0) -> int:
    """Mixing FLOPs of one token in one sequence-mixer layer (projections not counted: they are weights).

    * ``"attention"`` — ``4 · d_model · attended``: the scores ``q·k`` and the sum ``p·v`` over ``attended``
      positions (the whole context for full attention, at most the window for a window), as
      :meth:`TransformerShape.flops_per_token` counts them;
    * ``"state"`` — ``4 · state_numbers``: a fixed-state layer (linear attention, an SSM) writes every number of
      its state once and reads it once per token, a multiply and an add each.
    """
    if kind not in ("attention", "state"):
        raise ValueError(f"kind must be 'attention' or 'state', got {kind!r}")
    d_model = require_positive_int("d_model", d_model)
    if kind == "attention":
        return 4 * d_model * require_int("attended", attended, minimum=0)
    return 4 * require_int("state_numbers", state_numbers, minimum=0)


def roofline_seconds(flops: float, bytes_moved: float, *, flops_per_s: float, bytes_per_s: float) -> float:
    """The roofline's time: ``max(flops / peak FLOP/s, bytes / bandwidth)`` (whichever resource runs out first)."""
    flops = require_float("flops", flops, minimum=0.0)
    bytes_moved = require_float("bytes_moved", bytes_moved, minimum=0.0)
    peak = require_float("flops_per_s", flops_per_s, positive=True)
    bandwidth = require_float("bytes_per_s", bytes_per_s, positive=True)
    return max(flops / peak, bytes_moved / bandwidth)
