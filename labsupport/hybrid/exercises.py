"""Chapter 07, exercises: the checkers for the pattern builder, a hybrid's bytes per token, the Pareto set, and
registering one's own mixer.

Each checker runs the learner's function on fixed cases against a reference and prints one line (pass, not done
yet) or a short explanation, through :func:`labsupport.harness.checking.check_function`: what this answer got wrong
when a known mistake matches it (``found``), a pointer to the tiered hints, and the full recipe only when asked
(``check_…(fn, reveal=True)``). The shortcuts each refuses:

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
from labsupport.harness.diagnosis import known_mistakes
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


def _built_by(builder: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    """A wrong builder as the checker sees it: ``(pattern, letters, n_layers, d_model) -> layers built``."""
    def layers(pattern: str, letters: str, n_layers: int, d_model: int) -> torch.Tensor:
        return _layers_built(builder, pattern, letters, n_layers, d_model)
    return layers


_BUILDER_MISTAKES = known_mistakes({
    "every layer gets the pattern's first letter: the layer index has to choose the letter":
        _built_by(lambda pattern, legend: lambda d, i: legend[pattern[0]](d, i)),
    "the letter is right but the sub-factory received the position inside the pattern, not the layer's own "
    "index (layer 9 of 'DDDA' must be built as layer 9)":
        _built_by(lambda pattern, legend: lambda d, i: legend[pattern[i % len(pattern)]](d, i % len(pattern))),
    "your layers follow the pattern read backwards":
        _built_by(lambda pattern, legend: lambda d, i: legend[pattern[::-1][i % len(pattern)]](d, i)),
})


def check_pattern_builder(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        return check_function(fn, reference, cases, exercise="pattern_builder", checker="check_pattern_builder")
    return check_function(
        learner, reference, cases, exercise="pattern_builder", diagnose=_BUILDER_MISTAKES, reveal=reveal,
        checker="check_pattern_builder",
        hint="each row of the output is (letter code, d_model, layer_index) as the legend's factory received them; "
             "see Hint 1 above the exercise: which letter does layer i get when the model is deeper than the "
             "pattern, and which index does its factory receive?",
        recipe="def build(d_model, layer_index): return legend[pattern[layer_index % len(pattern)]](d_model, "
               "layer_index); return build — the pattern repeats, and the sub-factory gets the layer's real index.",
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


def _bytes_counting(window_rule: str, *, per_token: bool = True, with_bytes: bool = True) -> Callable[..., float]:
    """A wrong count: a window charged ``window_rule`` tokens, or the total, or numbers instead of bytes."""
    def wrong(layers: Sequence[tuple], context: int, bytes_per_element: int) -> float:
        total = 0
        for kind, *sizes in layers:
            if kind == "attention":
                total += sizes[0] * context
            elif kind == "window":
                total += sizes[0] * {"window": sizes[1], "context": context, "right": min(context, sizes[1])}[
                    window_rule]
            elif kind == "ssm":
                total += sizes[0] * sizes[1]
            else:
                total += sizes[0] * sizes[1] * sizes[2]
        total *= bytes_per_element if with_bytes else 1
        return total / context if per_token else float(total)
    return wrong


_BYTES_MISTAKES = known_mistakes({
    "your window layers are charged their whole window, but before the context fills it a window holds only "
    "the tokens seen so far": _bytes_counting("window"),
    "your window layers are charged the whole context, like attention: a window keeps at most its window":
        _bytes_counting("context"),
    "you returned the stack's total bytes; the exercise asks for bytes per token of context":
        _bytes_counting("right", per_token=False),
    "you counted numbers, not bytes: multiply by bytes_per_element": _bytes_counting("right", with_bytes=False),
}, atol=1e-9, rtol=1e-9)


def check_hybrid_bytes_per_token(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        diagnose=_BYTES_MISTAKES, reveal=reveal,
        hint="see Hint 1 above the exercise: each layer type keeps something different at this context — which "
             "grow with it, which stop growing, and which never grow?",
        recipe="numbers = Σ over layers of: attention kv_width·L; window kv_width·min(L, window); ssm "
               "d_inner·d_state; linear heads·d_k·d_v; return numbers · bytes_per_element / L.",
    )


# --------------------------------------------------------------------------- 3. the Pareto set


def reference_pareto_front(costs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: point ``i`` is on the front unless some ``j`` has ``cost ≤`` and ``score ≥``, one strictly."""
    better_or_equal = (costs[None, :] <= costs[:, None]) & (scores[None, :] >= scores[:, None])
    strictly = (costs[None, :] < costs[:, None]) | (scores[None, :] > scores[:, None])
    return ~(better_or_equal & strictly).any(dim=1)


def _pareto_without_duplicates(costs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    dominated = (costs[None, :] <= costs[:, None]) & (scores[None, :] >= scores[:, None])
    return ~(dominated & ~torch.eye(len(costs), dtype=torch.bool)).any(dim=1)


def _pareto_strict_on_both(costs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return ~((costs[None, :] < costs[:, None]) & (scores[None, :] > scores[:, None])).any(dim=1)


_PARETO_MISTAKES = known_mistakes({
    "you dropped points that another point only ties: an exact duplicate is beaten by nobody, so both stay":
        _pareto_without_duplicates,
    "you dropped a point only when another is strictly better on both axes, so a point beaten on one axis and "
    "tied on the other stays": _pareto_strict_on_both,
})


def check_pareto_front(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        fn, reference_pareto_front, cases, exercise="pareto_front", diagnose=_PARETO_MISTAKES, reveal=reveal,
        hint="see Hint 1 above the exercise: what exactly must another point do to push this one off the front, "
             "and what happens with ties?",
        recipe="dominated[i, j] = (cost_j <= cost_i) & (score_j >= score_i) & ((cost_j < cost_i) | (score_j > "
               "score_i)); on_front = ~dominated.any(dim=1) — broadcast (n, 1) against (1, n).",
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


def _register_counting(formula: Callable[[int, int, int], int]) -> Callable[[int], torch.Tensor]:
    """A wrong registration as the checker sees it: the row it leaves, for ``n_kv_heads``."""
    def register(n_kv_heads: int) -> registry.MixerSpec:
        from labsupport.grouped.mixers import GroupedQueryAttention

        return registry.register(f"my_gqa_{n_kv_heads}", lambda d, i: GroupedQueryAttention(d, _GQA_HEADS, n_kv_heads),
                                 family="mine", state_numbers=lambda c, d: formula(c, d, n_kv_heads),
                                 replace_existing=True)
    return lambda n_kv_heads: _registered_row(register, n_kv_heads)


_REGISTER_MISTAKES = known_mistakes({
    "your formula counts all 4 query heads; the cache holds only the KV heads (entries 0-5 against entry 7)":
        _register_counting(lambda c, d, g: 2 * _GQA_HEADS * (d // _GQA_HEADS) * c),
    "your formula misses the factor 2: the cache keeps a key and a value per KV head":
        _register_counting(lambda c, d, g: g * (d // _GQA_HEADS) * c),
    "your formula does not grow with the context, but a KV cache adds every token":
        _register_counting(lambda c, d, g: 2 * g * (d // _GQA_HEADS)),
}, atol=1e-9, rtol=1e-9)


def check_register_gqa(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        return check_function(fn, reference, cases, exercise="register_gqa", checker="check_register_gqa")
    return check_function(
        learner, reference, cases, exercise="register_gqa", atol=1e-9, rtol=1e-9,
        output_names=None, diagnose=_REGISTER_MISTAKES, reveal=reveal, checker="check_register_gqa",
        hint="entries 0-5 are your formula at contexts 1, 100, 4096 × d_model 32, 64; entry 6 the decode flag; "
             "entry 7 the numbers the real cache grows by per token. See Hint 1 above the exercise: what does one "
             "token add to a GQA cache?",
        recipe="registry.register(f'my_gqa_{n_kv_heads}', lambda d, i: GroupedQueryAttention(d, 4, n_kv_heads), "
               "family='mine', state_numbers=lambda context, d_model: 2 * n_kv_heads * (d_model // 4) * context) "
               "— and return the row it gives back.",
    )
