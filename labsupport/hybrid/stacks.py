"""Hybrids built from the registry: inter-layer stacks from a pattern string, and intra-layer head splits.

* :func:`pattern_factory` — a layer-pattern string such as ``"MMMA"`` and a legend ``{"M": "mamba",
  "A": "attention"}`` give a ``TinyLM`` factory that builds layer ``i`` from the registry row named by
  ``pattern[i % len(pattern)]``: the layer index chooses the mixer, as Zoology's ``Hybrid`` does, so a pattern
  shorter than the model repeats.
* :data:`PRESETS` — the published ratios at laptop scale (:class:`HybridPreset`): Jamba's 1 attention : 7 Mamba,
  Qwen3-Next's and Kimi Linear's 3 linear : 1 full, Gemma 3's 5 local : 1 global, gpt-oss's 1 : 1, MiniMax-01's
  7 linear : 1 softmax.
* :class:`HeadSplitMixer` — Hymba's intra-layer hybrid: attention heads and SSM (or linear) heads read the same
  input in parallel; each branch's output is normalised, scaled by a learned vector and the two are averaged.
* :func:`stack_state_numbers` / :func:`stack_bytes_per_token` — a hybrid's decode state, layer type by layer type
  (a window layer keeps its window, an SSM layer its fixed state, an attention layer its whole cache), as vLLM's
  hybrid KV-cache manager sizes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from labsupport.harness.validation import require_int, require_positive_int
from labsupport.hybrid import registry
from labsupport.lm.contracts import MixerFactory

__all__ = [
    "PRESETS",
    "HeadSplitMixer",
    "HybridPreset",
    "head_split_factory",
    "layer_names",
    "pattern_factory",
    "stack_bytes_per_token",
    "stack_state_numbers",
]


def _check_pattern(pattern: str, legend: Mapping[str, str]) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty string of legend letters, got {pattern!r}")
    if not isinstance(legend, Mapping) or not legend:
        raise TypeError(f"legend must map pattern letters to registry names, got {type(legend).__name__}")
    unknown = sorted(set(pattern) - set(legend))
    if unknown:
        raise ValueError(f"pattern {pattern!r} uses {unknown}, which the legend {dict(legend)} does not define")
    for letter, name in legend.items():
        if name not in registry.names():
            raise KeyError(f"legend letter {letter!r} names {name!r}, which is not registered "
                           f"(registered: {', '.join(registry.names())})")


def layer_names(pattern: str, legend: Mapping[str, str], n_layers: int) -> list[str]:
    """The registry name of each of ``n_layers`` layers: layer ``i`` takes ``pattern[i % len(pattern)]``."""
    _check_pattern(pattern, legend)
    n_layers = require_positive_int("n_layers", n_layers)
    return [legend[pattern[i % len(pattern)]] for i in range(n_layers)]


def pattern_factory(pattern: str, legend: Mapping[str, str]) -> MixerFactory:
    """A ``TinyLM`` factory: layer ``i`` is built by the registry row ``legend[pattern[i % len(pattern)]]``."""
    _check_pattern(pattern, legend)
    builders = {letter: registry.get(name).build for letter, name in legend.items()}

    def build(d_model: int, layer_index: int) -> nn.Module:
        layer_index = require_int("layer_index", layer_index, minimum=0)
        return builders[pattern[layer_index % len(pattern)]](d_model, layer_index)
    return build


def stack_state_numbers(names: Sequence[str], context: int, d_model: int) -> int:
    """Numbers a stack of registry mixers holds for one sequence after ``context`` tokens: the sum, layer by layer."""
    context = require_int("context", context, minimum=0)
    return sum(int(registry.get(name).state_numbers(context, d_model)) for name in names)


def stack_bytes_per_token(names: Sequence[str], context: int, d_model: int, *, bytes_per_element: int = 2) -> float:
    """Decode-state bytes per token of context: the stack's state at ``context`` divided by ``context``.

    A pure attention stack stays flat (every token costs the same); a fixed state falls as ``1/context``;
    a hybrid sits at its attention layers' share of the attention line once the context is long.
    """
    context = require_positive_int("context", context)
    return stack_state_numbers(names, context, d_model) * require_positive_int("bytes_per_element",
                                                                               bytes_per_element) / context


@dataclass(frozen=True)
class HybridPreset:
    """A published hybrid's layer ratio at laptop scale: its pattern, legend, and what it stands for."""

    name: str
    pattern: str
    legend: Mapping[str, str]
    model: str
    note: str

    def factory(self) -> MixerFactory:
        return pattern_factory(self.pattern, self.legend)

    def layer_names(self, n_layers: int | None = None) -> list[str]:
        return layer_names(self.pattern, self.legend, n_layers or len(self.pattern))

    @property
    def positional(self) -> str:
        """``"learned"`` if any layer wants learned positions, else ``"none"``."""
        wanted = {registry.get(n).positional for n in self.legend.values()}
        return "learned" if "learned" in wanted else "none"


PRESETS: dict[str, HybridPreset] = {p.name: p for p in (
    HybridPreset("jamba", "MMMMAMMM", {"M": "mamba", "A": "attention"}, "Jamba (arXiv:2403.19887)",
                 "1 attention : 7 Mamba, attention in the middle of each 8-layer block (no MoE here)"),
    HybridPreset("qwen3_next", "DDDA", {"D": "gated_deltanet", "A": "attention"}, "Qwen3-Next",
                 "3 gated DeltaNet : 1 attention (Qwen3-Next's attention is output-gated and its FFNs are MoE: "
                 "neither here)"),
    HybridPreset("kimi_linear", "DDDM", {"D": "gated_deltanet", "M": "mla"}, "Kimi Linear (arXiv:2510.26692)",
                 "3 delta-rule layers : 1 MLA without RoPE, as Kimi's (its KDA has a per-channel gate and its own "
                 "chunked algorithm; gated DeltaNet stands in; no MoE here)"),
    HybridPreset("gemma3", "WWWWWA", {"W": "sliding_window", "A": "attention"}, "Gemma 3 (arXiv:2503.19786)",
                 "5 local (window 32 here, 1024 in Gemma 3) : 1 global"),
    HybridPreset("gpt_oss", "WA", {"W": "sliding_window", "A": "attention"}, "gpt-oss",
                 "alternating banded (sliding-window: 32 here, 128 in gpt-oss) and dense layers, 1 : 1; no MoE here"),
    HybridPreset("minimax01", "LLLLLLLA", {"L": "linear", "A": "attention"}, "MiniMax-01 (arXiv:2501.08313)",
                 "7 linear (lightning) attention : 1 softmax; chapter 03's linear row stands in for lightning, "
                 "which is a tiled kernel for a decayed linear attention; no MoE here"),
)}


# --------------------------------------------------------------------------- Hymba-style head split


class HeadSplitMixer(nn.Module):
    """Two mixers side by side on the same input (Hymba, arXiv:2411.13676): ``(β₁·norm(a(x)) + β₂·norm(m(x))) / 2``.

    ``a`` and ``m`` are any two registry rows (attention heads and SSM heads in Hymba); each branch keeps its
    own decode state, so the layer's state is the pair. Hymba's meta tokens are left out.
    """

    def __init__(self, d_model: int, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.d_model = require_positive_int("d_model", d_model)
        self.first, self.second = first, second
        self.norm_first, self.norm_second = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.beta_first = nn.Parameter(torch.ones(d_model))
        self.beta_second = nn.Parameter(torch.ones(d_model))

    def _combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.beta_first * self.norm_first(a) + self.beta_second * self.norm_second(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d) → (B, L, d)``: both branches on ``x``, normalised, scaled and averaged."""
        return self._combine(self.first(x), self.second(x))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[Any, Any]]:
        """Both branches prefill; the state is the pair of their states."""
        a, state_a = _prefill(self.first, x)
        b, state_b = _prefill(self.second, x)
        return self._combine(a, b), (state_a, state_b)

    def decode_step(self, x: torch.Tensor, state: tuple[Any, Any] | None) -> tuple[torch.Tensor, tuple[Any, Any]]:
        """One token through both branches."""
        state_a, state_b = state if state is not None else (None, None)
        a, state_a = self.first.decode_step(x, state_a)
        b, state_b = self.second.decode_step(x, state_b)
        return self._combine(a, b), (state_a, state_b)

    def cache_bytes(self, state: tuple[Any, Any]) -> int:
        """Bytes of both branches' states."""
        return registry.held_bytes(self.first, state[0]) + registry.held_bytes(self.second, state[1])


def _prefill(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    if callable(getattr(module, "prefill", None)):
        return module.prefill(x)
    state, outputs = None, []
    for t in range(x.shape[1]):
        y, state = module.decode_step(x[:, t:t + 1], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


def head_split_factory(first: str, second: str) -> MixerFactory:
    """A ``TinyLM`` factory of :class:`HeadSplitMixer` layers from two registry names (e.g. attention + mamba).

    Each branch is the registry row at ``d_model``; the state of a layer is the sum of its branches'
    (:func:`stack_state_numbers` of ``[first, second]`` per layer).
    """
    spec_a, spec_b = registry.get(first), registry.get(second)

    def build(d_model: int, layer_index: int) -> nn.Module:
        return HeadSplitMixer(d_model, spec_a.build(d_model, layer_index), spec_b.build(d_model, layer_index))
    return build
