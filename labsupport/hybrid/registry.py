"""THE registry of sequence mixers: every mixer of the course, once, with its family and its state formula.

Chapters 07, 09 and 10, the frontier benchmark, the widget and the tests read this one list. A row
(:class:`MixerSpec`) says all they need, so no consumer branches on a mixer's name:

* ``name`` and ``family`` (``"softmax"``, ``"grouped"``, ``"sparse"``, ``"linear"``, ``"ssm"``, or your own);
* ``build(d_model, layer_index) -> nn.Module``: the ``TinyLM`` factory (:mod:`labsupport.lm.contracts`);
* ``decodes``: the module has ``decode_step`` (and ``prefill``), so a model of it generates token by token;
* ``exact_until``: ``None`` when decoding reproduces ``forward`` at every length; a number of tokens when it
  does only up to there (a decode-time eviction policy trained with dense attention: h2o, tova, quest);
* ``state_numbers(context, d_model)``: numbers one layer holds for one sequence after ``context`` tokens
  (Based's conventions, :func:`labsupport.harness.costs.mixer_state_numbers`): attention ``2·d·L``, a window
  ``2·d·w``, Mamba ``2·d·N``, linear attention ``heads·d_k·d_v``;
* ``read_numbers(context, d_model)``: numbers one decode step reads (= held, except for Quest, which keeps every
  token but reads a budget of pages);
* ``positional``: ``"learned"`` or ``"none"`` (what the ``TinyLM`` around it should use).

Reading it::

    from labsupport.hybrid import registry
    registry.names()                         # every name, in registration order
    registry.names(family="linear")          # one family's
    spec = registry.get("gated_deltanet")
    model = TinyLM(vocab, d_model=64, sequence_mixer=spec.build)
    spec.state_bytes(context=4096, d_model=64)   # bf16 bytes per layer per sequence

Registering your own mixer is one call; it is then on the frontier, in the widget and in the tests::

    registry.register("my_mixer", my_factory, family="mine",
                      state_numbers=lambda context, d_model: d_model * d_model)

The course's own rows are registered by :func:`register_course_mixers` when this module is imported. Their
sizes are fixed by the row, scaled with ``d_model``: attention-like rows use 4 heads (GQA 2 KV heads, MQA 1,
MLA a latent of ``d/2``), windows and budgets are 32 tokens, linear attention uses 1 head (state ``d²``, as in
chapter 03's grid), Mamba ``N = 16`` with ``d_inner = 2d``, SSD ``N = 32``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from labsupport.harness.costs import mixer_state_numbers, policy_tokens_per_step
from labsupport.harness.validation import require_callable, require_choice, require_int, require_positive_int

__all__ = [
    "MixerSpec",
    "StateFormula",
    "families",
    "get",
    "held_bytes",
    "names",
    "own_conv",
    "register",
    "register_course_mixers",
    "specs",
    "unregister",
]

#: ``(context, d_model) -> numbers`` one layer keeps (or reads) for one sequence.
StateFormula = Callable[[int, int], int]

ATTENTION_HEADS = 4
WINDOW = 32
SINKS = 4
QUEST_PAGE = 8
LINEAR_HEADS = 1
MAMBA_STATE = 16
SSD_STATE = 32


@dataclass(frozen=True)
class MixerSpec:
    """One registered sequence mixer (see the module's docstring for each field)."""

    name: str
    family: str
    build: Callable[[int, int], nn.Module]
    state_numbers: StateFormula
    decodes: bool = True
    exact_until: int | None = None
    read_numbers: StateFormula | None = None
    positional: str = "learned"
    description: str = ""
    chapter: str = ""
    builtin: bool = field(default=False, compare=False)

    def state_bytes(self, context: int, d_model: int, *, bytes_per_element: int = 2) -> int:
        """Bytes one layer holds for one sequence after ``context`` tokens (default bf16)."""
        context = require_int("context", context, minimum=0)
        return int(self.state_numbers(context, require_positive_int("d_model", d_model))) * \
            require_positive_int("bytes_per_element", bytes_per_element)

    def read_bytes(self, context: int, d_model: int, *, bytes_per_element: int = 2) -> int:
        """Bytes of state one decode step reads at ``context`` tokens (default bf16)."""
        formula = self.read_numbers or self.state_numbers
        context = require_int("context", context, minimum=0)
        return int(formula(context, require_positive_int("d_model", d_model))) * \
            require_positive_int("bytes_per_element", bytes_per_element)

    @property
    def grows_with_context(self) -> bool:
        """True when the state at 4096 tokens is larger than at 1024 (a KV cache; not a window or a state)."""
        return self.state_numbers(4096, 64) > self.state_numbers(1024, 64)


_REGISTRY: dict[str, MixerSpec] = {}


def register(name: str, build: Callable[[int, int], nn.Module], *, state_numbers: StateFormula,
             family: str = "custom", decodes: bool | None = None, exact_until: int | None = None,
             read_numbers: StateFormula | None = None, positional: str = "learned", description: str = "",
             chapter: str = "", replace_existing: bool = False) -> MixerSpec:
    """Register a sequence mixer under ``name`` and return its row.

    Args:
        name: a new name (``replace_existing=True`` to overwrite one).
        build: the factory ``(d_model, layer_index) -> nn.Module``.
        state_numbers: ``(context, d_model) -> numbers`` one layer holds per sequence (see
            :func:`labsupport.harness.costs.mixer_state_numbers` for the course's conventions).
        family: the family it belongs to (a new family is fine).
        decodes: whether it decodes token by token; ``None`` asks a small module (``decode_step`` present).
        exact_until, read_numbers, positional, description, chapter: see :class:`MixerSpec`.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not isinstance(family, str) or not family.strip():
        raise ValueError(f"family must be a non-empty string, got {family!r}")
    require_callable("build", build)
    require_callable("state_numbers", state_numbers)
    if read_numbers is not None:
        require_callable("read_numbers", read_numbers)
    require_choice("positional", positional, ("learned", "none"))
    if exact_until is not None:
        require_positive_int("exact_until", exact_until)
    if name in _REGISTRY and not replace_existing:
        raise ValueError(f"a mixer named {name!r} is registered already (family {_REGISTRY[name].family!r}); "
                         "pick another name or pass replace_existing=True")
    probe_module, failure = None, None
    for width in (16, 64):  # a mixer may need a width its heads divide
        try:
            probe_module = build(width, 0)
            break
        except Exception as error:  # noqa: BLE001 - the reader's factory: report it below
            failure = error
    if probe_module is None:
        raise ValueError(f"build(d_model, layer_index) raised {type(failure).__name__} at d_model 16 and 64: "
                         f"{failure}") from None
    if not isinstance(probe_module, nn.Module):
        raise TypeError(f"build(d_model, layer_index) must return an nn.Module, got {type(probe_module).__name__}")
    if decodes is None:
        decodes = callable(getattr(probe_module, "decode_step", None))
    try:
        numbers = state_numbers(64, 16)
    except Exception as error:  # noqa: BLE001 - the reader's formula: say what went wrong
        raise ValueError(f"state_numbers(context=64, d_model=16) raised {type(error).__name__}: {error}") from None
    if isinstance(numbers, bool) or not isinstance(numbers, (int, float)) or numbers < 0:
        raise ValueError(f"state_numbers(context, d_model) must return a number of elements >= 0, got {numbers!r}")
    spec = MixerSpec(name, family, build, state_numbers, bool(decodes), exact_until, read_numbers, positional,
                     description, chapter)
    _REGISTRY[name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a row (the course's own rows come back with :func:`register_course_mixers`)."""
    if name not in _REGISTRY:
        raise KeyError(f"no mixer named {name!r}; registered: {', '.join(_REGISTRY)}")
    del _REGISTRY[name]


def get(name: str) -> MixerSpec:
    """The row registered under ``name``."""
    if name not in _REGISTRY:
        raise KeyError(f"no mixer named {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def names(*, family: str | None = None, decoding_only: bool = False) -> list[str]:
    """Registered names in registration order, optionally one family's or only those that decode."""
    return [s.name for s in specs() if (family is None or s.family == family) and (s.decodes or not decoding_only)]


def specs() -> Iterator[MixerSpec]:
    """Every row, in registration order."""
    return iter(list(_REGISTRY.values()))


def _tensor_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def held_bytes(module: nn.Module, state: object) -> int:
    """Bytes a decoding state really holds: ``module.cache_bytes(state)`` where the mixer reports it
    (:class:`~labsupport.lm.contracts.CacheReport`), else the bytes of every tensor in the state."""
    report = getattr(module, "cache_bytes", None)
    if callable(report):
        return int(report(state))
    return _tensor_bytes(state)


def families() -> list[str]:
    """The families present, in order of first registration."""
    return list(dict.fromkeys(s.family for s in _REGISTRY.values()))


# --------------------------------------------------------------------------- the course's own mixers


def _attention_numbers(context: int, d_model: int) -> int:
    return mixer_state_numbers("attention", context=context, kv_width=2 * d_model)


def _window_numbers(window: int) -> StateFormula:
    return lambda context, d_model: mixer_state_numbers("window", context=context, kv_width=2 * d_model,
                                                        window=window)


def _quest_read(context: int, d_model: int) -> int:
    read = policy_tokens_per_step("quest", max(1, context), WINDOW, page=QUEST_PAGE)
    return 2 * d_model * (read["tokens"] + read["pages"]) if context else 0


def _sparse_builder(policy_name: str, *, static: str | None) -> Callable[[int, int], nn.Module]:
    """A ``SparseAttention`` whose forward mask matches its decode policy (window, sinks) or is dense."""
    from labsupport.sparse.masks import sink_window_mask, sliding_window_mask
    from labsupport.sparse.mixers import SparseAttention
    from labsupport.sparse.policies import CachePolicy

    if policy_name == "sinks":
        policy = CachePolicy("sinks", budget=WINDOW, sinks=SINKS, positions="original")
    elif policy_name == "quest":
        policy = CachePolicy("quest", budget=WINDOW, page=QUEST_PAGE)
    else:
        policy = CachePolicy(policy_name, budget=WINDOW, positions="original") if policy_name != "full" \
            else CachePolicy("full")

    def mask(length: int) -> torch.Tensor:
        if static == "window":
            return sliding_window_mask(length, window=WINDOW)
        return sink_window_mask(length, sinks=SINKS, window=WINDOW - SINKS)

    def build(d_model: int, layer_index: int) -> nn.Module:
        module = SparseAttention(d_model, ATTENTION_HEADS, policy=policy)
        if static is not None:
            module.static_mask = mask
        return module
    return build


def own_conv(module: nn.Module) -> nn.Module:
    """Mark a mixer that brings its own short convolution (Mamba's block), so ``TinyLM`` puts none in front.

    Mamba's reference block and Zoology's Mamba have one causal convolution, inside the block. ``TinyLM`` puts
    another in front of every mixer (``short_conv``), and chapter 07 found that the second one costs Mamba its
    MQAR recall (``benchmarks/results/hybrid_mamba_check.jsonl``: width 128, 2,000 steps, three seeds, 27–56%
    with it, 90–95% without); so the registry's Mamba, S4D and SSD rows are built without it.
    """
    module.replaces_block_conv = True
    return module


def register_course_mixers() -> None:
    """(Re-)register the course's rows: chapters 00, 02, 03, 04 (Mamba, S4D and the SSD block) and 05."""
    from labsupport.grouped.mixers import GroupedQueryAttention, LatentAttention
    from labsupport.lm.layers import SoftmaxAttention
    from labsupport.linear_attention.mixers import LinearAttentionMixer
    from labsupport.ssm.mixers import MambaMixer, SSDMixer

    heads = ATTENTION_HEADS

    def add(name: str, family: str, build: Callable[[int, int], nn.Module], state: StateFormula, *,
            chapter: str, description: str, **extra: object) -> None:
        spec = register(name, build, family=family, state_numbers=state, chapter=chapter, description=description,
                        replace_existing=True, **extra)  # type: ignore[arg-type]
        _REGISTRY[name] = replace(spec, builtin=True)

    add("attention", "softmax", lambda d, i: SoftmaxAttention(d, heads), _attention_numbers, chapter="00",
        description=f"multi-head softmax attention, {heads} heads; caches 2·d numbers per token")
    add("gqa", "grouped", lambda d, i: GroupedQueryAttention(d, heads, 2),
        lambda c, d: mixer_state_numbers("attention", context=c, kv_width=2 * 2 * (d // heads)), chapter="02",
        description=f"grouped-query attention, {heads} query heads sharing 2 KV heads")
    add("mqa", "grouped", lambda d, i: GroupedQueryAttention(d, heads, 1),
        lambda c, d: mixer_state_numbers("attention", context=c, kv_width=2 * (d // heads)), chapter="02",
        description=f"multi-query attention, {heads} query heads sharing 1 KV head")
    add("mla", "grouped", lambda d, i: LatentAttention(d, heads, d // 2, 0),
        lambda c, d: mixer_state_numbers("attention", context=c, kv_width=d // 2), chapter="02",
        description="multi-head latent attention: caches a latent of d/2 numbers per token (no RoPE part)")
    add("sliding_window", "sparse", _sparse_builder("window", static="window"), _window_numbers(WINDOW),
        chapter="05", positional="none",
        description=f"sliding-window attention (RoPE), the last {WINDOW} tokens in training and decoding")
    add("sinks", "sparse", _sparse_builder("sinks", static="sinks"), _window_numbers(WINDOW), chapter="05",
        positional="none", description=f"{SINKS} attention sinks + a window of {WINDOW - SINKS} (StreamingLLM)")
    for policy, text in (("h2o", "heavy hitters + recent (H2O)"), ("tova", "evicts the least-attended (TOVA)")):
        add(policy, "sparse", _sparse_builder(policy, static=None), _window_numbers(WINDOW), chapter="05",
            positional="none", exact_until=WINDOW,
            description=f"dense RoPE attention in training; at decode a {WINDOW}-token cache that {text}")
    add("quest", "sparse", _sparse_builder("quest", static=None), _attention_numbers, chapter="05",
        positional="none", exact_until=WINDOW, read_numbers=_quest_read,
        description=f"dense RoPE attention in training; at decode it keeps every token but reads {WINDOW} "
                    f"(pages of {QUEST_PAGE}, Quest)")
    for mechanism, text in (("linear", "linear attention (elu+1 features, normalised)"),
                            ("retnet", "RetNet: fixed decay per head"),
                            ("gla", "GLA: data-dependent gate per key dimension"),
                            ("deltanet", "DeltaNet: the delta rule"),
                            ("gated_deltanet", "gated DeltaNet: delta rule + scalar gate")):
        add(mechanism, "linear",
            (lambda m: lambda d, i: LinearAttentionMixer(d, LINEAR_HEADS, mechanism=m))(mechanism),
            lambda c, d: mixer_state_numbers("linear", context=c, heads=LINEAR_HEADS, d_k=d // LINEAR_HEADS,
                                             d_v=d // LINEAR_HEADS),
            chapter="03", description=f"{text}; {LINEAR_HEADS} head, state d_k·d_v")
    # TTT's decode state is two memories: S at the start of the current mini-batch, and S now (chapter 03).
    add("ttt", "linear", lambda d, i: LinearAttentionMixer(d, LINEAR_HEADS, mechanism="ttt"),
        lambda c, d: 2 * mixer_state_numbers("linear", context=c, heads=LINEAR_HEADS, d_k=d // LINEAR_HEADS,
                                             d_v=d // LINEAR_HEADS),
        chapter="03", description="TTT-linear: one gradient step per token, mini-batches of 16; its decode state "
                                  "holds two d_k·d_v memories (the mini-batch's start and now)")
    add("mamba", "ssm", lambda d, i: own_conv(MambaMixer(d, MAMBA_STATE)), chapter="04", positional="none",
        state=lambda c, d: mixer_state_numbers("ssm", context=c, d_inner=2 * d, d_state=MAMBA_STATE),
        description=f"Mamba (S6), N={MAMBA_STATE}, d_inner=2d; state 2·d·N")
    add("s4d", "ssm", lambda d, i: own_conv(MambaMixer(d, MAMBA_STATE, selective=False)), chapter="04",
        positional="none",
        state=lambda c, d: mixer_state_numbers("ssm", context=c, d_inner=2 * d, d_state=MAMBA_STATE),
        description=f"the same block with a time-invariant S4D layer (not selective), N={MAMBA_STATE}")
    add("ssd", "ssm", lambda d, i: own_conv(SSDMixer(d, SSD_STATE)), chapter="04", positional="none",
        state=lambda c, d: mixer_state_numbers("ssm", context=c, d_inner=2 * d, d_state=SSD_STATE),
        description=f"Mamba-2 / SSD block (scalar decay per head), N={SSD_STATE}, heads of 16 channels")
    from labsupport.hybrid.stacks import head_split_factory

    for first, second in (("attention", "mamba"), ("sliding_window", "mamba")):
        a, b = get(first), get(second)
        add(f"hymba_{first}+{second}", "hybrid", head_split_factory(first, second),
            (lambda a, b: lambda c, d: a.state_numbers(c, d) + b.state_numbers(c, d))(a, b), chapter="07",
            positional="none",
            description=f"Hymba-style head split: {first} and {second} side by side in one layer, each output "
                        "normalised, scaled and averaged (each branch at full width; no meta tokens)")


register_course_mixers()
