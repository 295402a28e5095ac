"""Chapter 06, exercises: the checkers for the top-k router, the load-balancing loss,
the capacity-limited dispatch and the bias update.

Each checker runs the learner's function on seeded random cases against the
reference in :mod:`labsupport.moe.routing` and prints one line (pass, not done
yet) or a short explanation. Each is built to reject the tempting shortcut:

* ``top_k_router`` — keeping the top-k probabilities *without* renormalising them;
* ``load_balancing_loss`` — Mixtral's counting (divide by ``T``, balanced → k)
  where the chapter's Switch form divides by ``T·k`` (balanced → 1); and a
  gradient that flows through the counts (only ``P_i`` may carry one);
* ``capacity_keep`` — filling slots token by token (a token's second choice
  before the next token's first) instead of first choices first;
* ``update_balance_bias`` — moving overloaded experts *up*, moving by the load
  instead of its sign, or modifying ``bias`` in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.moe import routing as ref

__all__ = [
    "check_capacity_keep",
    "check_load_balancing_loss",
    "check_top_k_router",
    "check_update_balance_bias",
    "reference_top_k_router",
]


def reference_top_k_router(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, experts)``, both ``(T, k)``: the top-k of the softmax, renormalised, largest first."""
    routing = ref.top_k_routing(logits, k)
    return routing.weights, routing.experts


def check_top_k_router(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(logits (T, E), k) -> (weights (T, k), experts (T, k) int64)``, largest weight first."""
    gen = torch.Generator().manual_seed(601)
    cases = [
        Case("T=6, E=4, k=1 (Switch)", (torch.randn(6, 4, generator=gen, dtype=torch.float64), 1)),
        Case("T=10, E=8, k=2 (Mixtral)", (torch.randn(10, 8, generator=gen, dtype=torch.float64), 2)),
        Case("T=7, E=16, k=4, logits spread wide", (5 * torch.randn(7, 16, generator=gen, dtype=torch.float64), 4)),
        Case("float32, T=12, E=6, k=3", (torch.randn(12, 6, generator=gen), 3)),
        Case("k = E: every expert, weights are the full softmax", (torch.randn(5, 3, generator=gen,
                                                                                dtype=torch.float64), 3)),
    ]
    return check_function(
        fn, reference_top_k_router, cases, exercise="top_k_router", atol=1e-6, rtol=1e-5,
        hint="softmax over all experts, torch.topk, then divide the k kept probabilities by their sum "
             "(the same as a softmax over the k largest logits).",
        output_names=("weights", "experts"),
    )


def _balance_reference(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    return ref.load_balancing_loss(probs, experts, convention="switch")


def _routed(gen: torch.Generator, tokens: int, n_experts: int, k: int, skew: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(tokens, n_experts, generator=gen, dtype=torch.float64)
    logits[:, 0] += skew
    probs = logits.softmax(dim=-1)
    return probs, probs.topk(k, dim=-1).indices


def check_load_balancing_loss(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(probs (T, E), experts (T, k)) -> N · Σ_i f_i P_i`` (Switch form: f counts T·k assignments).

    The gradient with respect to ``probs`` is checked too: only ``P_i`` carries one.
    """
    gen = torch.Generator().manual_seed(602)
    cases = []
    for name, (t, e, k, skew) in {
        "T=16, E=4, top-1": (16, 4, 1, 0.0),
        "T=32, E=8, top-2": (32, 8, 2, 0.0),
        "T=24, E=8, top-2, expert 0 favoured (unbalanced)": (24, 8, 2, 3.0),
        "T=20, E=6, top-3": (20, 6, 3, 0.0),
    }.items():
        probs, experts = _routed(gen, t, e, k, skew)
        cases.append(Case(name, (probs, experts), grad_argnums=(0,)))
    return check_function(
        fn, _balance_reference, cases, exercise="load_balancing_loss", atol=1e-9, rtol=1e-7,
        hint="f_i = (assignments to expert i) / (T·k), P_i = probs.mean(0)[i]; return N · Σ f_i P_i. "
             "Count with bincount so that no gradient flows through f.",
    )


def check_capacity_keep(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(experts (T, k), n_experts, capacity) -> keep (T, k) bool``, first choices served first."""
    gen = torch.Generator().manual_seed(603)

    def experts(t: int, e: int, k: int) -> torch.Tensor:
        return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])

    crowded = torch.tensor([[1, 0], [0, 1], [1, 2]])
    cases = [
        Case("T=3, E=3, k=2, capacity 1: token 1's first choice beats token 0's second", (crowded, 3, 1)),
        Case("T=12, E=4, k=2, capacity 4", (experts(12, 4, 2), 4, 4)),
        Case("T=16, E=8, k=1, capacity 1", (experts(16, 8, 1), 8, 1)),
        Case("T=10, E=4, k=2, capacity 0: everything dropped", (experts(10, 4, 2), 4, 0)),
        Case("T=9, E=3, k=3, capacity 100: nothing dropped", (experts(9, 3, 3), 3, 100)),
    ]
    return check_function(
        fn, ref.capacity_keep, cases, exercise="capacity_keep",
        hint="walk slot 0 of every token in token order, then slot 1, ...; keep an assignment while its "
             "expert has had fewer than `capacity` kept so far.",
    )


def _bias_reference(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    return ref.update_balance_bias(bias, counts, gamma)


def _refuse_in_place(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> Any:
        before = bias.clone()
        result = fn(bias, counts, gamma)
        if not torch.equal(before, bias):
            raise ValueError("bias was modified in place; return a new tensor and leave the input as it was")
        return result
    wrapped.__name__ = getattr(fn, "__name__", "update_balance_bias")
    return wrapped


def check_update_balance_bias(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(bias (E,), counts (E,), gamma) -> new bias`` (DeepSeek-V3's sign update, not in place)."""
    gen = torch.Generator().manual_seed(604)
    cases = [
        Case("E=4, expert 0 overloaded", (torch.zeros(4), torch.tensor([10.0, 2.0, 2.0, 2.0]), 0.01)),
        Case("E=8, random loads, random bias", (0.1 * torch.randn(8, generator=gen),
                                                 torch.randint(0, 50, (8,), generator=gen).float(), 0.001)),
        Case("E=4, perfectly balanced: nothing moves", (torch.tensor([0.3, -0.1, 0.0, 0.2]), torch.full((4,), 7.0),
                                                        0.05)),
        Case("E=6, integer counts (bincount output)", (torch.zeros(6, dtype=torch.float64),
                                                       torch.tensor([0, 3, 9, 3, 1, 2]), 0.002)),
    ]
    if not callable(fn):
        return check_function(fn, _bias_reference, cases, exercise="update_balance_bias")
    return check_function(
        _refuse_in_place(fn), _bias_reference, cases, exercise="update_balance_bias", atol=1e-9, rtol=1e-7,
        hint="an expert above the mean load gets its bias lowered by gamma, one below raised by gamma, "
             "one exactly at the mean unchanged (torch.sign).",
    )
