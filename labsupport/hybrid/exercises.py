"""Chapter 07, exercises: the checkers for the pattern builder, a hybrid's bytes per token, the Pareto set, and
registering one's own mixer.

Each checker runs the learner's function on fixed cases against a reference and prints one line (pass, not done
yet) or a short explanation, through :func:`labsupport.harness.checking.check_function`. The shortcuts each
refuses:

* ``pattern_builder`` — handing the sub-factory the position in the pattern instead of the layer's real index,
  ignoring the layer index, or not repeating a short pattern;
* ``hybrid_bytes_per_token`` — charging a window layer its whole window before the context fills it, charging it
  the whole context, or forgetting the bytes per element;
* ``pareto_front`` — dropping a point that ties another exactly (both lie on the front), or keeping a point that
  is beaten on one axis and tied on the other;
* ``register_gqa`` — a state formula that counts query heads, forgets the keys-and-values factor of 2, or does
  not grow with the context: the checker measures the state the registered mixer really holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.costs import mixer_state_numbers
from labsupport.hybrid import registry

__all__ = [
    "check_hybrid_bytes_per_token",
    "check_pareto_front",
    "check_pattern_builder",
    "check_register_gqa",
    "reference_pareto_front",
]


# --------------------------------------------------------------------------- 1. pattern -> factory


class _Tagged(nn.Module):
    """What the checker's toy factories build: it remembers its letter, d_model and layer index."""

    def __init__(self, letter: str, d_model: int, layer_index: int) -> None:
        super().__init__()
        self.letter, self.d_model, self.layer_index = letter, d_model, layer_index


def _toy_legend(letters: str) -> dict[str, Callable[[int, int], nn.Module]]:
    return {c: (lambda c: lambda d, i: _Tagged(c, d, i))(c) for c in letters}


def _layers_built(builder: Callable[..., Any], pattern: str, letters: str, n_layers: int, d_model: int
                  ) -> torch.Tensor:
    """``(n_layers, 3)``: for each layer, the letter (as a code point), the d_model and the layer index it got."""
    factory = builder(pattern, _toy_legend(letters))
    if not callable(factory):
        raise TypeError(f"pattern_builder must return a factory (d_model, layer_index) -> module, "
                        f"got {type(factory).__name__}")
    rows = []
    for i in range(n_layers):
        module = factory(d_model, i)
        if not isinstance(module, _Tagged):
            raise TypeError(f"layer {i}: the factory returned {type(module).__name__}, not what the legend built")
        rows.append([ord(module.letter), module.d_model, module.layer_index])
    return torch.tensor(rows, dtype=torch.int64)


def _reference_builder(pattern: str, legend: dict[str, Callable[[int, int], nn.Module]]
                       ) -> Callable[[int, int], nn.Module]:
    def build(d_model: int, layer_index: int) -> nn.Module:
        return legend[pattern[layer_index % len(pattern)]](d_model, layer_index)
    return build


def check_pattern_builder(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(pattern, legend) -> factory``: layer ``i`` is ``legend[pattern[i % len(pattern)]](d_model, i)``."""
    cases = [
        Case("Jamba's block 'MMMMAMMM', 8 layers", ("MMMMAMMM", "MA", 8, 64)),
        Case("Qwen3-Next 'DDDA' repeated over 12 layers", ("DDDA", "DA", 12, 32)),
        Case("Gemma 3 'WWWWWA' over 7 layers (the pattern does not divide the depth)", ("WWWWWA", "WA", 7, 48)),
        Case("one letter 'A', 3 layers", ("A", "A", 3, 16)),
        Case("gpt-oss 'WA', 5 layers", ("WA", "WA", 5, 64)),
    ]

    def learner(pattern: str, letters: str, n_layers: int, d_model: int) -> torch.Tensor:
        return _layers_built(fn, pattern, letters, n_layers, d_model)

    def reference(pattern: str, letters: str, n_layers: int, d_model: int) -> torch.Tensor:
        return _layers_built(_reference_builder, pattern, letters, n_layers, d_model)

    learner.__name__ = getattr(fn, "__name__", "pattern_builder")
    if not callable(fn):
        return check_function(fn, reference, cases, exercise="pattern_builder")
    return check_function(
        learner, reference, cases, exercise="pattern_builder",
        hint="each row of the output is (letter code, d_model, layer_index) as the legend's factory received them; "
             "the layer index picks the letter, the pattern repeats, and the sub-factory gets the real layer index. "
             "Tiered hints are above the exercise.",
    )


# --------------------------------------------------------------------------- 2. a hybrid's bytes per token


def _reference_bytes_per_token(layers: Sequence[tuple], context: int, bytes_per_element: int) -> float:
    total = 0
    for layer in layers:
        kind, *sizes = layer
        if kind == "attention":
            total += mixer_state_numbers("attention", context=context, kv_width=sizes[0])
        elif kind == "window":
            total += mixer_state_numbers("window", context=context, kv_width=sizes[0], window=sizes[1])
        elif kind == "ssm":
            total += mixer_state_numbers("ssm", context=context, d_inner=sizes[0], d_state=sizes[1])
        else:
            total += mixer_state_numbers("linear", context=context, heads=sizes[0], d_k=sizes[1], d_v=sizes[2])
    return total * bytes_per_element / context


def check_hybrid_bytes_per_token(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(layers, context, bytes_per_element) -> float``: the stack's decode state over ``context``.

    ``layers`` lists ``("attention", kv_width)``, ``("window", kv_width, window)``, ``("ssm", d_inner, d_state)``
    or ``("linear", heads, d_k, d_v)``.
    """
    d = 64
    jamba = [("ssm", 2 * d, 16)] * 4 + [("attention", 2 * d)] + [("ssm", 2 * d, 16)] * 3
    gemma = [("window", 2 * d, 1024)] * 5 + [("attention", 2 * d)]
    qwen = [("linear", 4, 32, 32)] * 3 + [("attention", 2 * 2 * 16)]
    cases = [
        Case("Jamba block, 8 layers, bf16, 4K context", (jamba, 4096, 2)),
        Case("Gemma-3 pattern at 128K (windows full)", (gemma, 131072, 2)),
        Case("Gemma-3 pattern at 300 tokens (windows not yet full)", (gemma, 300, 2)),
        Case("3 linear : 1 GQA attention, fp32, 16K", (qwen, 16384, 4)),
        Case("pure SSM stack, 1M tokens", ([("ssm", 128, 16)] * 4, 1_000_000, 2)),
    ]
    return check_function(
        fn, _reference_bytes_per_token, cases, exercise="hybrid_bytes_per_token", atol=1e-9, rtol=1e-9,
        hint="sum what each layer holds at this context (a window holds at most its window, and never more than "
             "the context), multiply by the bytes per element, divide by the context. "
             "Tiered hints are above the exercise.",
    )


# --------------------------------------------------------------------------- 3. the Pareto set


def reference_pareto_front(costs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: point ``i`` is on the front unless some ``j`` has ``cost ≤`` and ``score ≥``, one strictly."""
    better_or_equal = (costs[None, :] <= costs[:, None]) & (scores[None, :] >= scores[:, None])
    strictly = (costs[None, :] < costs[:, None]) | (scores[None, :] > scores[:, None])
    return ~(better_or_equal & strictly).any(dim=1)


def check_pareto_front(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(costs (n,), scores (n,)) -> (n,) bool``: lower cost and higher score are better."""
    gen = torch.Generator().manual_seed(701)
    ties = (torch.tensor([1.0, 2.0, 2.0, 3.0, 1.0]), torch.tensor([0.2, 0.5, 0.5, 0.9, 0.1]))
    flat = (torch.tensor([1.0, 1.0, 2.0, 4.0]), torch.tensor([0.3, 0.6, 0.6, 0.6]))
    cases = [
        Case("8 random points", (torch.rand(8, generator=gen, dtype=torch.float64),
                                  torch.rand(8, generator=gen, dtype=torch.float64))),
        Case("a duplicated point (both on the front) and one beaten on score at equal cost", ties),
        Case("equal scores: only the cheapest stays; equal costs: only the best", flat),
        Case("one point", (torch.tensor([5.0]), torch.tensor([0.5]))),
        Case("40 points on a log scale of bytes", (torch.logspace(2, 8, 40, dtype=torch.float64)[
            torch.randperm(40, generator=gen)], torch.rand(40, generator=gen, dtype=torch.float64))),
    ]
    return check_function(
        fn, reference_pareto_front, cases, exercise="pareto_front",
        hint="a point is dropped only when another is at least as good on both axes and strictly better on one; "
             "an exact duplicate beats nobody. Tiered hints are above the exercise.",
    )


# --------------------------------------------------------------------------- 4. registering one's own mixer


_GQA_HEADS = 4


def _reference_register_gqa(n_kv_heads: int) -> registry.MixerSpec:
    from labsupport.grouped.mixers import GroupedQueryAttention

    return registry.register(
        f"my_gqa_{n_kv_heads}", lambda d, i: GroupedQueryAttention(d, _GQA_HEADS, n_kv_heads), family="mine",
        state_numbers=lambda context, d_model: 2 * n_kv_heads * (d_model // _GQA_HEADS) * context,
        replace_existing=True)


def _registered_row(register: Callable[[int], Any], n_kv_heads: int) -> torch.Tensor:
    """What the registry then says and holds: formula values, the decode flag, and the measured state growth."""
    name = f"my_gqa_{n_kv_heads}"
    if name in registry.names():
        registry.unregister(name)
    try:
        returned = register(n_kv_heads)
        if name not in registry.names():
            raise ValueError(f"no row named {name!r} was registered (registered: {', '.join(registry.names())})")
        spec = registry.get(name)
        if returned is not spec:
            raise ValueError("return the MixerSpec that registry.register gave back")
        if spec.family != "mine":
            raise ValueError(f"the row's family is {spec.family!r}; the exercise asks for 'mine'")
        formula = [float(spec.state_numbers(c, d)) for c in (1, 100, 4096) for d in (32, 64)]
        module = spec.build(32, 0).eval()
        held = []
        with torch.no_grad():
            state, x = None, torch.randn(1, 30, 32, generator=torch.Generator().manual_seed(0))
            for t in range(30):
                _, state = module.decode_step(x[:, t:t + 1], state)
                if t + 1 in (10, 30):
                    held.append(registry.held_bytes(module, state) / 4)  # fp32 numbers
        grown_per_token = (held[1] - held[0]) / 20
        return torch.tensor(formula + [float(spec.decodes), grown_per_token], dtype=torch.float64)
    finally:
        if name in registry.names():
            registry.unregister(name)


def check_register_gqa(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(n_kv_heads) -> MixerSpec``: registers ``my_gqa_{n_kv_heads}`` (family ``"mine"``), chapter 02's
    ``GroupedQueryAttention(d_model, 4, n_kv_heads)``, with a state formula that matches what its cache holds.

    The output compared is the row's formula at six (context, d_model) points, its decode flag, and the numbers
    per token its real cache grows by (measured), so a wrong formula or a wrong module both show.
    """
    cases = [Case(f"n_kv_heads={g}", (g,)) for g in (1, 2, 4)]

    def learner(n_kv_heads: int) -> torch.Tensor:
        return _registered_row(fn, n_kv_heads)

    def reference(n_kv_heads: int) -> torch.Tensor:
        return _registered_row(_reference_register_gqa, n_kv_heads)

    learner.__name__ = getattr(fn, "__name__", "register_gqa")
    if not callable(fn):
        return check_function(fn, reference, cases, exercise="register_gqa")
    return check_function(
        learner, reference, cases, exercise="register_gqa", atol=1e-9, rtol=1e-9,
        output_names=None,
        hint="entries 0-5 are your formula at contexts 1, 100, 4096 × d_model 32, 64; entry 6 the decode flag; "
             "entry 7 the numbers the real cache grows by per token: what your formula adds per token should "
             "match it. Tiered hints are above the exercise.",
    )
