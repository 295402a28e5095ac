"""Chapter 06, exercises: the checkers for the gating conventions, the top-k router, the
load-balancing losses (Switch's batch-wise and DeepSeek-V3's sequence-wise), the
capacity-limited dispatch, the bias update and bias balancing of a skewed router.

Each checker runs the learner's function on seeded random cases against the
reference in :mod:`labsupport.moe.routing` and prints one line (pass, not done
yet) or a short explanation. Each is built to reject the tempting shortcut:

* ``gate_top_k`` — one rule for every paper: renormalising Switch's single weight
  (to 1, which starves the router of gradient), or not renormalising GShard's;
  a softmax where DeepSeek-V3 uses sigmoid scores;
* ``top_k_router`` — keeping the top-k probabilities *without* renormalising them;
* ``sequence_balance_loss`` — counting over the whole batch instead of per
  sequence, or averaging raw sigmoid scores instead of normalised ones;
* ``bias_balance`` — weighting by the biased scores, or moving overloaded experts up;
* ``load_balancing_loss`` — Mixtral's counting (divide by ``T``, balanced → k)
  where the chapter's Switch form divides by ``T·k`` (balanced → 1); and a
  gradient that flows through the counts (only ``P_i`` may carry one);
* ``capacity_keep`` — filling slots token by token (a token's second choice
  before the next token's first) instead of first choices first;
* ``update_balance_bias`` — moving overloaded experts *up*, moving by the load
  instead of its sign, or modifying ``bias`` in place.

Every checker takes ``reveal=True`` to print the full recipe; without it a failure names what this answer did
(``found``, where a known mistake or a probe recognises it) and points at the notebook's tiered hints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.diagnosis import Diagnose, known_mistakes
from labsupport.moe import routing as ref

__all__ = [
    "check_bias_balance",
    "check_capacity_keep",
    "check_gate_top_k",
    "check_sequence_balance_loss",
    "check_load_balancing_loss",
    "check_top_k_router",
    "check_update_balance_bias",
    "reference_top_k_router",
]


def reference_top_k_router(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, experts)``, both ``(T, k)``: the top-k of the softmax, renormalised, largest first."""
    routing = ref.top_k_routing(logits, k)
    return routing.weights, routing.experts


_ROUTER_MISTAKES = known_mistakes({
    "your weights are the kept probabilities, not renormalised over the k experts (rows sum to less than 1)":
        lambda logits, k: tuple(logits.softmax(dim=-1).topk(k, dim=-1)),
}, output=0)


def check_top_k_router(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(logits (T, E), k) -> (weights (T, k), experts (T, k) int64)``, largest weight first."""
    gen = torch.Generator().manual_seed(601)
    cases = [
        Case("T=6, E=4, k=1 (renormalised: every weight is 1; Switch would keep the probability)",
             (torch.randn(6, 4, generator=gen, dtype=torch.float64), 1)),
        Case("T=10, E=8, k=2 (GShard, Mixtral)", (torch.randn(10, 8, generator=gen, dtype=torch.float64), 2)),
        Case("T=7, E=16, k=4, logits spread wide", (5 * torch.randn(7, 16, generator=gen, dtype=torch.float64), 4)),
        Case("float32, T=12, E=6, k=3", (torch.randn(12, 6, generator=gen), 3)),
        Case("k = E: every expert, weights are the full softmax", (torch.randn(5, 3, generator=gen,
                                                                                dtype=torch.float64), 3)),
    ]
    return check_function(
        fn, reference_top_k_router, cases, exercise="top_k_router", atol=1e-6, rtol=1e-5,
        hint="compare your weights' row sums with 1, and the order of your slots with the largest-first "
             "convention. Tiered hints are above the exercise.",
        output_names=("weights", "experts"), diagnose=_ROUTER_MISTAKES, reveal=reveal,
        recipe="probs = logits.softmax(-1); top, experts = probs.topk(k, dim=-1); weights = top / top.sum(-1, "
               "keepdim=True); return (weights, experts).",
    )


def _balance_reference(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    return ref.load_balancing_loss(probs, experts, convention="switch")


def _routed(gen: torch.Generator, tokens: int, n_experts: int, k: int, skew: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(tokens, n_experts, generator=gen, dtype=torch.float64)
    logits[:, 0] += skew
    probs = logits.softmax(dim=-1)
    return probs, probs.topk(k, dim=-1).indices


def _balance_counted_per_token(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    return experts.shape[-1] * ref.load_balancing_loss(probs, experts, convention="switch")


_BALANCE_MISTAKES = known_mistakes({
    "your f divides the counts by T, not T·k (Mixtral's counting): a balanced router then scores k, not 1":
        _balance_counted_per_token,
})


def check_load_balancing_loss(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        hint="a perfectly balanced router must score 1 for every k, and only the mean probabilities may carry "
             "a gradient. Tiered hints are above the exercise.",
        diagnose=_BALANCE_MISTAKES, reveal=reveal,
        recipe="counts = bincount(experts.reshape(-1), minlength=E) (no gradient); f = counts / (T·k); "
               "P = probs.mean(0); loss = E · (f · P).sum().",
    )


def check_capacity_keep(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        fn, ref.capacity_keep, cases, exercise="capacity_keep", diagnose=_probing(_capacity_hint, fn),
        reveal=reveal,
        hint="serve assignments in the order the exercise states, and count each expert's slots separately. "
             "Tiered hints are above the exercise.",
        recipe="order = experts.t().reshape(-1) (every first choice, then every second); position = "
               "(F.one_hot(order, E).cumsum(0) − 1).gather(1, order[:, None]); keep = position < capacity, "
               "reshaped to (k, T) and transposed back to (T, k).",
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


_BIAS_UPDATE_MISTAKES = known_mistakes({
    "your update moves an overloaded expert's bias up: a busy expert must become less attractive":
        lambda bias, counts, gamma: bias + gamma * torch.sign(counts.to(bias.dtype) - counts.to(bias.dtype).mean()),
    "your step is proportional to the overload: DeepSeek-V3 moves each bias by exactly ±gamma (its sign)":
        lambda bias, counts, gamma: bias + gamma * (counts.to(bias.dtype).mean() - counts.to(bias.dtype)),
})


def check_update_balance_bias(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        hint="the step never depends on how far an expert is from the mean, only on which side it is. "
             "Tiered hints are above the exercise.",
        diagnose=_BIAS_UPDATE_MISTAKES, reveal=reveal, checker="check_update_balance_bias",
        recipe="return bias + gamma · torch.sign(counts.mean() − counts), in bias's dtype, as a new tensor.",
    )


# --------------------------------------------------------------------------- diagnosing hints


def _quietly(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or ``None`` if it raises or prints (a diagnosis must never crash or chatter)."""
    import contextlib
    import io
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            return fn(*args)
    except BaseException:  # noqa: BLE001 - a learner's function may raise anything; the checker reports it later
        return None


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _probing(probe: Callable[[Callable[..., Any]], str | None], fn: Any) -> Diagnose:
    """A diagnosis rule that probes the learner's function on a small telling input (``probe(fn)``)."""

    def rule(case: Any, expected: Any, got: Any) -> str | None:
        return probe(fn) if callable(fn) else None

    return rule


def _capacity_hint(fn: Callable[..., Any]) -> str | None:
    crowded = torch.tensor([[1, 0], [0, 1], [1, 2]])
    got = _quietly(fn, crowded, 3, 1) if callable(fn) else None
    if isinstance(got, torch.Tensor) and got.shape == crowded.shape and bool(got[0, 1]):
        return ("your mask gives token 0's second choice a slot before token 1's first choice: "
                "every first choice is served before any second choice")
    return None


# --------------------------------------------------------------------------- gating conventions


def reference_gate_top_k(logits: torch.Tensor, k: int, gate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, experts)``, both ``(T, k)``, largest score first, under ``gate``'s convention."""
    routing = ref.top_k_routing(logits, k, gate=gate)
    return routing.weights, routing.experts


def _gate_hint(fn: Callable[..., Any]) -> str | None:
    if not callable(fn):
        return None
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.3, 0.2, 0.1, -0.4]], dtype=torch.float64)
    notes = []
    for gate, k in (("probability", 1), ("renormalize", 2), ("sigmoid", 2)):
        weights = _first_tensor(_quietly(fn, logits, k, gate))
        if weights is None or weights.shape != (2, k) or not weights.is_floating_point():
            continue
        expected = ref.top_k_routing(logits, k, gate=gate).weights
        if torch.allclose(weights, expected, atol=1e-6):
            continue
        sums = weights.sum(dim=-1)
        sums_text = " and ".join(f"{float(v):.2f}" for v in sums)
        want = " and ".join(f"{float(v):.2f}" for v in expected.sum(dim=-1))
        if gate == "probability" and torch.allclose(sums, torch.ones_like(sums)):
            notes.append(f"with gate='probability' and k=1 your weights are {sums_text}: renormalised to 1, "
                         "so the router would get no gradient (Switch keeps the probability)")
        elif not torch.allclose(sums, expected.sum(dim=-1), atol=1e-6):
            notes.append(f"with gate={gate!r} your weights sum to {sums_text} per row, the paper's to {want}")
        else:
            notes.append(f"with gate={gate!r} your weights have the right sums but the wrong values: "
                         "check which scores you start from")
    return "; ".join(notes) if notes else None


def check_gate_top_k(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(logits (T, E), k, gate) -> (weights (T, k), experts (T, k) int64)`` for the three papers' gates."""
    gen = torch.Generator().manual_seed(611)

    def z(t: int, e: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(t, e, generator=gen, dtype=torch.float64)

    cases = [
        Case("Switch: gate='probability', T=8, E=4, k=1", (z(8, 4), 1, "probability")),
        Case("DeepSeekMoE: gate='probability', T=6, E=16, k=4", (z(6, 16), 4, "probability")),
        Case("GShard: gate='renormalize', T=10, E=8, k=2", (z(10, 8), 2, "renormalize")),
        Case("DeepSeek-V3: gate='sigmoid', T=9, E=16, k=4", (z(9, 16, 2.0), 4, "sigmoid")),
        Case("gate='sigmoid', T=5, E=6, k=1 (normalised: weight 1)", (z(5, 6), 1, "sigmoid")),
        Case("float32, gate='renormalize', T=12, E=6, k=3", (torch.randn(12, 6, generator=gen), 3, "renormalize")),
        Case("gate='probability', logits spread wide, T=7, E=8, k=2", (z(7, 8, 6.0), 2, "probability")),
    ]
    return check_function(fn, reference_gate_top_k, cases, exercise="gate_top_k", atol=1e-6, rtol=1e-5,
                          output_names=("weights", "experts"), diagnose=_probing(_gate_hint, fn), reveal=reveal,
                          hint="check each gate's convention in the table above: which gates give rows that sum "
                               "to 1, and where do the scores come from? Tiered hints are above the exercise.",
                          recipe="s = softmax(logits) (sigmoid(logits) for 'sigmoid'); top, experts = s.topk(k, -1); "
                                 "weights = top for 'probability', top / top.sum(-1, keepdim=True) for "
                                 "'renormalize' and 'sigmoid'.")


# --------------------------------------------------------------------------- DeepSeek-V3's sequence-wise loss


def reference_sequence_balance_loss(scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, unscaled, averaged over the ``B`` sequences.

    ``scores (B, L, E)`` are sigmoid affinities, ``experts (B, L, k)`` the chosen experts.
    Per sequence: ``f_i = E/(k·L) · #{t : i chosen by t}``, ``P_i = mean_t s_{i,t} / Σ_j s_{j,t}``;
    the loss is ``Σ_i f_i P_i``, 1 at balance. Only ``P`` carries a gradient.
    """
    batch, length, n_experts = scores.shape
    k = experts.shape[-1]
    counts = torch.zeros(batch, n_experts, dtype=scores.dtype)
    counts.scatter_add_(1, experts.reshape(batch, -1), torch.ones(batch, length * k, dtype=scores.dtype))
    fraction = counts * n_experts / (k * length)
    normalised = scores / scores.sum(dim=-1, keepdim=True)
    return (fraction * normalised.mean(dim=1)).sum(dim=-1).mean()


def _sequence_cases(gen: torch.Generator) -> list[Case]:
    def case(name: str, batch: int, length: int, n_experts: int, k: int, skew: float = 0.0,
             opposite: bool = False) -> Case:
        logits = torch.randn(batch, length, n_experts, generator=gen, dtype=torch.float64)
        if opposite:  # each sequence leans on its own expert: balanced over the batch, not within a sequence
            for b in range(batch):
                logits[b, :, b % n_experts] += skew
        else:
            logits[..., 0] += skew
        scores = logits.sigmoid()
        experts = scores.topk(k, dim=-1).indices
        return Case(name, (scores, experts), grad_argnums=(0,))

    return [
        case("B=1, L=16, E=4, k=1", 1, 16, 4, 1),
        case("B=3, L=12, E=8, k=2", 3, 12, 8, 2),
        case("B=4, L=10, E=4, k=1, each sequence favours its own expert (balanced over the batch)",
             4, 10, 4, 1, skew=4.0, opposite=True),
        case("B=2, L=20, E=6, k=3, expert 0 favoured", 2, 20, 6, 3, skew=2.0),
    ]


def _sequence_hint(fn: Callable[..., Any]) -> str | None:
    if not callable(fn):
        return None
    scores = torch.tensor([[[0.8, 0.2]] * 4, [[0.2, 0.8]] * 4], dtype=torch.float64)
    experts = torch.tensor([[[0]] * 4, [[1]] * 4])      # each sequence on one expert; the batch is balanced
    got = _quietly(fn, scores, experts)
    try:
        value = float(got)
    except (TypeError, ValueError, RuntimeError):
        return "your answer is not one number: return a 0-dim tensor for the whole batch"
    if abs(value - 1.0) < 1e-9:
        return ("two sequences that each put every token on one expert scored 1.00 (balanced): you counted over "
                "the whole batch, but the loss is computed per sequence, then averaged")
    uniform = torch.full((1, 4, 4), 0.9, dtype=torch.float64)
    spread = torch.tensor([[[0], [1], [2], [3]]])
    got = _quietly(fn, uniform, spread)
    try:
        value = float(got)
    except (TypeError, ValueError, RuntimeError):
        return None
    if abs(value - 1.0) > 1e-9:
        return (f"a perfectly balanced sequence whose scores were all 0.9 scored {value:.2f}: balance must score 1 "
                "whatever the scale of the sigmoid scores")
    return None


def check_sequence_balance_loss(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(scores (B, L, E), experts (B, L, k)) -> loss`` (DeepSeek-V3's sequence-wise form, unscaled)."""
    gen = torch.Generator().manual_seed(612)
    return check_function(fn, reference_sequence_balance_loss, _sequence_cases(gen),
                          exercise="sequence_balance_loss", atol=1e-9, rtol=1e-7,
                          diagnose=_probing(_sequence_hint, fn), reveal=reveal,
                          hint="compare each factor with its definition above the exercise: the counts are per "
                               "sequence, and balance must score 1. Tiered hints are above the exercise.",
                          recipe="counts (B, E) = zeros.scatter_add_(1, experts.reshape(B, -1), ones) (no gradient); "
                                 "f = counts · E / (k·L); P = (scores / scores.sum(-1, keepdim=True)).mean(dim=1); "
                                 "loss = (f · P).sum(-1).mean().")


# --------------------------------------------------------------------------- bias balancing of a fixed router


def reference_bias_balance(scores: torch.Tensor, k: int, gamma: float, steps: int) -> torch.Tensor:
    """The selection bias after ``steps`` rounds of choose-by-``scores + bias`` and the sign update (from zeros)."""
    bias = torch.zeros(scores.shape[1], dtype=scores.dtype)
    for _ in range(steps):
        experts = (scores + bias).topk(k, dim=-1).indices
        counts = torch.bincount(experts.reshape(-1), minlength=scores.shape[1]).to(scores.dtype)
        bias = bias + gamma * torch.sign(counts.mean() - counts)
    return bias


def _bias_hint(fn: Callable[..., Any]) -> str | None:
    if not callable(fn):
        return None
    scores = torch.tensor([[0.9, 0.1, 0.0]] * 6, dtype=torch.float64)
    got = _quietly(fn, scores, 1, 0.1, 1)
    if isinstance(got, torch.Tensor) and got.shape == (3,) and got.is_floating_point():
        if float(got[0]) > 0:
            return (f"expert 0 took every token, yet your bias for it went up to {float(got[0]):+.2f}: "
                    "an overloaded expert must become less attractive")
        if abs(abs(float(got[0])) - 0.1) > 1e-9:
            return (f"after one step expert 0's bias is {float(got[0]):+.3f}: each step moves a bias by exactly "
                    "gamma, whatever the size of the overload")
    return None


def check_bias_balance(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(scores (T, E), k, gamma, steps) -> bias (E,)``: auxiliary-loss-free balancing of a fixed router."""
    gen = torch.Generator().manual_seed(613)

    def skewed(t: int, e: int, skew: float) -> torch.Tensor:
        logits = torch.randn(t, e, generator=gen, dtype=torch.float64)
        logits[:, 0] += skew
        return logits.sigmoid()

    cases = [
        Case("T=40, E=4, k=1, 1 step", (skewed(40, 4, 2.0), 1, 0.05, 1)),
        Case("T=64, E=8, k=2, 30 steps, expert 0 favoured", (skewed(64, 8, 2.0), 2, 0.01, 30)),
        Case("T=50, E=6, k=3, 12 steps", (skewed(50, 6, 0.0), 3, 0.02, 12)),
        Case("T=32, E=4, k=1, 0 steps: the bias starts at zero", (skewed(32, 4, 1.0), 1, 0.05, 0)),
    ]
    return check_function(fn, reference_bias_balance, cases, exercise="bias_balance", atol=1e-9, rtol=1e-7,
                          diagnose=_probing(_bias_hint, fn), reveal=reveal,
                          hint="one step chooses by the biased scores, counts, then moves every bias; check the "
                               "order and what you count. Tiered hints are above the exercise.",
                          recipe="bias = zeros(E); repeat steps times: experts = (scores + bias).topk(k, -1).indices; "
                                 "counts = torch.bincount(experts.reshape(-1), minlength=E); bias = bias + gamma · "
                                 "torch.sign(counts.mean() − counts).")
