"""A KIVI-style (arXiv:2402.02750) quantised KV cache: b-bit keys per channel, values per token.

* :func:`quantize_asymmetric`, :func:`dequantize`, :func:`quantize_dequantize` — asymmetric
  ``bits``-bit quantisation with one (scale, minimum) per slice, and its round trip.
* :func:`fake_quantize` — the round trip with statistics over groups of entries.
* :class:`QuantSpec` — bits, key group, full-precision window, value group.
* :class:`QuantizedKVCache` — quantised old tokens and a full-precision window of recent ones;
  :func:`quantized_cache_attention` computes in one pass what decoding with it computes.

The byte arithmetic (bits plus scales per element) is
:func:`labsupport.harness.costs.quantized_bytes_per_element`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labsupport.grouped.reference import _require_grouped, repeat_kv
from labsupport.harness.costs import quantized_bytes_per_element
from labsupport.harness.validation import (
    require_float_tensor,
    require_int,
    require_positive_int,
    require_tensor,
)

__all__ = [
    "QuantSpec",
    "QuantizedKVCache",
    "dequantize",
    "fake_quantize",
    "quantize_asymmetric",
    "quantize_dequantize",
    "quantized_cache_attention",
]


def _require_bits(bits: object) -> int:
    bits = require_positive_int("bits", bits)
    if bits > 8:
        raise ValueError(f"bits must be between 1 and 8 (codes are stored in uint8), got {bits}")
    return bits


def quantize_asymmetric(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric ``bits``-bit quantisation with one (scale, minimum) per slice along ``dim``.

    The statistics are taken over ``dim`` (``keepdim``): ``minimum = min``, ``scale = (max − min)
    / (2^bits − 1)``; codes are ``round((x − minimum) / scale)`` in ``0 .. 2^bits − 1`` (uint8).
    A constant slice (``max = min``) gets scale 1 and is reproduced exactly.
    Every element then satisfies ``|x − dequantize(...)| ≤ scale / 2`` (up to float rounding).
    """
    require_float_tensor("x", x)
    bits = _require_bits(bits)
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    levels = 2**bits - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - lo) / scale).clamp_(0, levels).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """``codes · scale + minimum``, in the dtype of ``scale``."""
    return codes.to(scale.dtype) * scale + minimum


def quantize_dequantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Round trip of :func:`quantize_asymmetric` (statistics over ``dim``): what the cache gives back."""
    return dequantize(*quantize_asymmetric(x, bits, dim))


def fake_quantize(x: torch.Tensor, bits: int, dim: int, group: int) -> torch.Tensor:
    """Quantise and dequantise ``x`` with statistics over groups of ``group`` entries along ``dim``.

    ``x.shape[dim]`` must be a multiple of ``group``. Keys in KIVI: ``dim`` = tokens (per
    channel); values: ``dim`` = channels (per token).
    """
    require_tensor("x", x)
    group = require_positive_int("group", group)
    dim = dim % x.dim()
    n = x.shape[dim]
    if n % group:
        raise ValueError(f"size {n} along dim {dim} is not a multiple of group={group}")
    shape = x.shape[:dim] + (n // group, group) + x.shape[dim + 1:]
    return quantize_dequantize(x.reshape(shape), bits, dim + 1).reshape(x.shape)


@dataclass(frozen=True)
class QuantSpec:
    """How a KIVI-style cache quantises.

    Attributes:
        bits: bits per key/value element (1–8).
        group: tokens per key group (keys are quantised per channel over ``group`` tokens).
        residual: the newest tokens kept in full precision. Tokens older than that are
            quantised a whole key group at a time, so between ``residual`` and
            ``residual + group − 1`` of the newest tokens stay full precision.
        value_group: channels per value group (values are quantised per token); ``None`` = the
            whole head.
    """

    bits: int
    group: int = 16
    residual: int = 16
    value_group: int | None = None

    def __post_init__(self) -> None:
        _require_bits(self.bits)
        require_positive_int("group", self.group)
        require_int("residual", self.residual, minimum=0)
        if self.value_group is not None:
            require_positive_int("value_group", self.value_group)

    def quantized_length(self, length: int) -> int:
        """How many of the oldest ``length`` tokens are held quantised."""
        return max(0, (length - self.residual) // self.group * self.group)

    def bytes_per_element(self, head_dim: int, scale_bytes: int = 2) -> float:
        """Average bytes of a quantised element, counting one fp16 (scale, minimum) pair per group."""
        keys = quantized_bytes_per_element(self.bits, self.group, scale_bytes)
        values = quantized_bytes_per_element(self.bits, self.value_group or head_dim, scale_bytes)
        return (keys + values) / 2


def _value_group(spec: QuantSpec, head_dim: int) -> int:
    group = spec.value_group or head_dim
    if head_dim % group:
        raise ValueError(f"value_group={group} must divide head_dim={head_dim}")
    return group


def quantized_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Causal grouped attention in which every query sees the cache as :class:`QuantizedKVCache` would hold it.

    Query ``t`` reads the oldest ``spec.quantized_length(t + 1)`` keys and values dequantised and
    the rest in full precision — exactly what token-by-token decoding with the quantised cache
    computes, in one pass.
    """
    n_rep = _require_grouped(q, k, v)
    length = k.shape[-2]
    padded = -(-length // spec.group) * spec.group
    pad = padded - length
    k_pad = F.pad(k, (0, 0, 0, pad)) if pad else k
    k_hat = fake_quantize(k_pad, spec.bits, -2, spec.group)[..., :length, :]
    v_hat = fake_quantize(v, spec.bits, -1, _value_group(spec, v.shape[-1]))
    positions = torch.arange(length, device=q.device)
    quantized = torch.tensor([spec.quantized_length(t + 1) for t in range(length)], device=q.device)
    use_hat = positions[None, :] < quantized[:, None]                      # (Lq, T): key s quantised for query t
    k_eff = [repeat_kv(t, n_rep) for t in (k, k_hat)]
    v_eff = [repeat_kv(t, n_rep) for t in (v, v_hat)]
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.where(use_hat, q @ k_eff[1].transpose(-1, -2), q @ k_eff[0].transpose(-1, -2)) * scale
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    p = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return (p * use_hat) @ v_eff[1] + (p * ~use_hat) @ v_eff[0]


class QuantizedKVCache:
    """A KIVI-style cache: quantised old tokens, a full-precision window of recent ones.

    Keys are quantised per channel over each completed group of ``spec.group`` tokens, values
    per token over ``spec.value_group`` channels. Codes are kept as uint8 (a real kernel would
    pack 2- and 4-bit codes; :attr:`nbytes` counts the packed size).
    """

    def __init__(self, spec: QuantSpec) -> None:
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.key_blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.value_blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.recent_k: torch.Tensor | None = None
        self.recent_v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``(B, G, new, D)`` keys and values; quantise whole groups that leave the window."""
        require_float_tensor("k", k, ndim=4)
        require_float_tensor("v", v, ndim=4)
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        self.recent_k = k if self.recent_k is None else torch.cat([self.recent_k, k], dim=2)
        self.recent_v = v if self.recent_v is None else torch.cat([self.recent_v, v], dim=2)
        self.length += k.shape[2]
        spec = self.spec
        move = spec.quantized_length(self.length) - self.quantized_length
        if move > 0:
            old_k, self.recent_k = self.recent_k[:, :, :move], self.recent_k[:, :, move:]
            old_v, self.recent_v = self.recent_v[:, :, :move], self.recent_v[:, :, move:]
            b, g, _, d = old_k.shape
            gk = old_k.reshape(b, g, move // spec.group, spec.group, d)
            self.key_blocks.append(quantize_asymmetric(gk, spec.bits, dim=3))
            vg = _value_group(spec, d)
            gv = old_v.reshape(b, g, move, d // vg, vg)
            self.value_blocks.append(quantize_asymmetric(gv, spec.bits, dim=4))

    @property
    def quantized_length(self) -> int:
        """How many of the oldest tokens are held quantised."""
        return sum(block[0].shape[2] * block[0].shape[3] for block in self.key_blocks)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, G, T, D)`` as attention sees them: old ones dequantised."""
        if self.recent_k is None or self.recent_v is None:
            raise ValueError("the cache is empty: append keys and values before reading it")
        b, g, _, d = self.recent_k.shape
        keys = [dequantize(*blk).reshape(b, g, -1, d) for blk in self.key_blocks] + [self.recent_k]
        values = [dequantize(*blk).reshape(b, g, -1, d) for blk in self.value_blocks] + [self.recent_v]
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    @property
    def nbytes(self) -> int:
        """Bytes with codes packed to ``bits`` and fp16 scales and minima, plus the full-precision window."""
        total = 0.0
        for codes, scale, lo in self.key_blocks + self.value_blocks:
            total += codes.numel() * self.spec.bits / 8 + (scale.numel() + lo.numel()) * 2
        if self.recent_k is not None and self.recent_v is not None:
            total += (self.recent_k.numel() + self.recent_v.numel()) * self.recent_k.element_size()
        return int(math.ceil(total))
