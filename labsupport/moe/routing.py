"""Chapter 06, routing: which expert(s) each token goes to, and the losses that keep experts busy.

Every function here works on a flat list of ``T`` tokens (``(T, d_model)``
inputs, ``(T, E)`` router logits). The conventions, each with its paper:

* **Token choice, top-k.** The papers differ in how the kept scores become mixing
  weights (``gate=`` of :func:`top_k_routing`):

  - ``"probability"`` — Switch Transformer (top-1, arXiv:2101.03961) and
    DeepSeekMoE / DeepSeek-V2 (arXiv:2401.06066, 2405.04434): softmax over all ``E``
    experts, keep the top ``k``, weight each by its probability *as is* (the kept
    weights sum to less than 1).
  - ``"renormalize"`` — GShard's top-2 (arXiv:2006.16668) and Mixtral: the kept
    probabilities divided by their sum, which equals a softmax over the ``k``
    largest logits. With ``k = 1`` every weight is exactly 1, so the router gets
    no gradient from the language-model loss: never use it for top-1.
  - ``"sigmoid"`` — DeepSeek-V3 (arXiv:2412.19437): per-expert sigmoid scores,
    the top ``k`` scores normalised to sum to 1.
* **Load-balancing loss** ``N · Σ_i f_i P_i`` (Switch): ``P_i`` is the mean router
  probability of expert ``i``, ``f_i`` the fraction of routed *assignments*
  (``T · k`` of them) that went to ``i`` ("switch" normalisation: 1 whenever ``f``
  or ``P`` is uniform, for every ``k``). Hugging Face transformers'
  ``load_balancing_loss_func`` (the loss used to train Mixtral-style models there;
  Mixtral's paper and code give none) divides by ``T`` instead ("mixtral"), so a
  balanced top-2 router scores 2. The loss is *not* bounded below by 1: two experts
  reach 0.875 (tokens routed to an expert with little margin, the others confident).
* **Capacity** ``ceil(capacity_factor · T · k / E)`` slots per expert; first
  choices are served before second choices, earlier tokens before later ones,
  across the whole flattened batch; assignments beyond the capacity are dropped
  (their token passes through the block's residual unchanged). So whether a
  token is served depends on the *other* tokens of the batch and their order —
  the same non-causality as expert choice.
* **Expert choice** (Zhou et al. 2022): each expert picks its ``capacity`` highest-scoring tokens.
* **Bias balancing** (Wang et al. 2024, arXiv:2408.15664, "auxiliary-loss-free";
  used by DeepSeek-V3 on its sigmoid scores beside a small sequence-wise loss): a
  per-expert bias is added to the scores for *selection* only; after each step it
  moves by ``γ`` towards balance.
* **Top-p routing** (Huang et al. 2024, arXiv:2403.07652): a token takes experts in
  order of probability until their mass reaches ``p`` (at least one, at most
  ``max_k``). The paper trains it with a dynamic (entropy) loss that keeps the
  router from spreading its mass to buy more experts; :func:`router_entropy` is it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from labsupport.harness.validation import (
    require_choice,
    require_float,
    require_float_tensor,
    require_int,
    require_positive_int,
    require_tensor,
)

__all__ = [
    "Routing",
    "BALANCE_CONVENTIONS",
    "capacity_keep",
    "expert_capacity",
    "expert_choice_routing",
    "expert_counts",
    "expected_experts_touched",
    "GATES",
    "load_balancing_loss",
    "router_entropy",
    "router_z_loss",
    "top_k_routing",
    "top_p_routing",
    "update_balance_bias",
]

BALANCE_CONVENTIONS = ("switch", "mixtral")
GATES = ("renormalize", "probability", "sigmoid")


@dataclass
class Routing:
    """A routing decision for ``T`` tokens, ``k`` slots each.

    Attributes:
        experts: ``(T, k)`` int64 expert index of each slot.
        weights: ``(T, k)`` mixing weight of each slot (0 for an unused slot).
        active: ``(T, k)`` bool, False for a slot that is unused or dropped.
        probs: ``(T, E)`` router probabilities (softmax over all experts, float32 or wider; for
            sigmoid gating the sigmoid scores normalised over all experts, as DeepSeek-V3's
            balance loss uses them).
    """

    experts: torch.Tensor
    weights: torch.Tensor
    active: torch.Tensor
    probs: torch.Tensor

    @property
    def k(self) -> int:
        return self.experts.shape[1]


def _require_logits(logits: object) -> torch.Tensor:
    logits = require_float_tensor("logits", logits, ndim=2)
    if logits.shape[1] < 1:
        raise ValueError(f"logits must be (tokens, experts) with at least one expert, got {tuple(logits.shape)}")
    return logits


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over experts, accumulated in at least float32 (fp16/bf16 logits are upcast)."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(wide).softmax(dim=-1)


def top_k_routing(logits: torch.Tensor, k: int, *, selection_bias: torch.Tensor | None = None,
                  gate: str = "renormalize") -> Routing:
    """Token-choice routing: each token keeps its ``k`` best experts, weighted by ``gate``'s rule.

    Args:
        logits: ``(T, E)`` router logits.
        k: experts per token, ``1 <= k <= E``.
        selection_bias: optional ``(E,)`` bias added to the scores *only to choose* the
            experts (auxiliary-loss-free balancing, Wang et al. 2024); the weights come
            from the unbiased scores.
        gate: ``"renormalize"`` (GShard top-2, Mixtral: kept probabilities divided by their
            sum), ``"probability"`` (Switch, DeepSeekMoE/V2: kept probabilities as they are)
            or ``"sigmoid"`` (DeepSeek-V3: sigmoid scores, the kept ones normalised).
    """
    logits = _require_logits(logits)
    n_experts = logits.shape[1]
    k = require_int("k", k, minimum=1, maximum=n_experts)
    gate = require_choice("gate", gate, GATES)
    if gate == "sigmoid":
        scores = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        probs = scores / scores.sum(dim=-1, keepdim=True)
    else:
        scores = probs = _probs(logits)
    if selection_bias is None:
        top, experts = scores.topk(k, dim=-1)
    else:
        selection_bias = require_float_tensor("selection_bias", selection_bias, ndim=1)
        if selection_bias.shape[0] != n_experts:
            raise ValueError(f"selection_bias must have one entry per expert ({n_experts}), "
                             f"got shape {tuple(selection_bias.shape)}")
        _, experts = (scores + selection_bias.to(scores.dtype)).topk(k, dim=-1)
        top = scores.gather(1, experts)
    weights = top if gate == "probability" else top / top.sum(dim=-1, keepdim=True)
    return Routing(experts, weights, torch.ones_like(experts, dtype=torch.bool), probs)


def top_p_routing(logits: torch.Tensor, p: float, max_k: int) -> Routing:
    """Adaptive routing: experts in order of probability until their mass reaches ``p``.

    A confident token (one expert holds ``≥ p`` of the mass) uses one expert; an
    unsure one uses up to ``max_k``. Kept weights are renormalised to sum to 1;
    unused slots have ``active=False`` and weight 0. Trained alone, the router can
    buy more experts by flattening its distribution; Huang et al. add
    :func:`router_entropy` as a loss against that.
    """
    logits = _require_logits(logits)
    p = require_float("p", p, minimum=0.0, maximum=1.0)
    max_k = require_int("max_k", max_k, minimum=1, maximum=logits.shape[1])
    probs = _probs(logits)
    top, experts = probs.topk(max_k, dim=-1)
    mass_before = top.cumsum(dim=-1) - top
    active = mass_before < p
    active[:, 0] = True
    kept = top * active
    weights = kept / kept.sum(dim=-1, keepdim=True)
    return Routing(experts, weights, active, probs)


def _counts(indices: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(n,)`` float32: the (weighted) count of each index ``0..n-1``; indices ``≥ n`` (null experts) are dropped.

    An ``index_add_`` into ``n + 1`` buckets, not ``torch.bincount`` or a boolean index: on a GPU both of those
    wait for the device (they size their output from the data), this never does.
    """
    flat = indices.reshape(-1).clamp(max=n)
    ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device) if weights is None \
        else weights.reshape(-1).to(torch.float32)
    return torch.zeros(n + 1, dtype=torch.float32, device=flat.device).index_add_(0, flat, ones)[:n]


def expert_counts(routing: Routing, n_experts: int) -> torch.Tensor:
    """``(E,)`` float: how many active assignments each expert received (no host sync)."""
    n_experts = require_positive_int("n_experts", n_experts)
    return _counts(routing.experts, n_experts, routing.active)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, *,
                        convention: str = "switch") -> torch.Tensor:
    """The Switch load-balancing loss ``N · Σ_i f_i P_i``, unscaled (multiply by ``α`` yourself).

    Args:
        probs: ``(T, E)`` router probabilities (the softmax over all experts).
        experts: ``(T, k)`` chosen expert indices.
        convention: ``"switch"`` divides the counts by ``T·k`` (balanced → 1 for any k);
            ``"mixtral"`` divides by ``T`` as Hugging Face transformers'
            ``load_balancing_loss_func`` does (balanced → k).

    Only ``P_i`` carries a gradient: the counts are not differentiable. The value is
    1 whenever ``f`` or ``P`` is uniform, but 1 is not its minimum (two experts can
    reach 0.875); what it rewards is low mean probability on the busy experts.
    """
    probs = require_float_tensor("probs", probs, ndim=2)
    experts = require_tensor("experts", experts, ndim=2)
    require_choice("convention", convention, BALANCE_CONVENTIONS)
    if experts.shape[0] != probs.shape[0]:
        raise ValueError(f"probs has {probs.shape[0]} tokens but experts has {experts.shape[0]}")
    tokens, k = experts.shape
    n_experts = probs.shape[1]
    counts = _counts(experts, n_experts).to(probs.dtype)   # no host sync (bincount would wait for the GPU)
    fraction = counts / (tokens * k if convention == "switch" else tokens)
    return n_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of ``logsumexp(logits)²`` (keeps logits small)."""
    logits = _require_logits(logits)
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).square().mean()


def router_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy of the router's softmax (top-p routing's dynamic loss, Huang et al.)."""
    logits = _require_logits(logits)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def expected_experts_touched(n_experts: int, k: int, batch: int) -> float:
    """Expected fraction of ``n_experts`` that at least one of ``batch`` tokens routes to.

    With each token picking ``k`` distinct experts uniformly at random, a given expert
    is missed by one token with probability ``1 − k/E``, so it is touched by a batch
    with probability ``1 − (1 − k/E)^B``: the fraction of expert weights a decode step
    of ``B`` sequences must read.
    """
    n_experts = require_positive_int("n_experts", n_experts)
    k = require_int("k", k, minimum=0, maximum=n_experts)
    batch = require_int("batch", batch, minimum=0)
    return 1.0 - (1.0 - k / n_experts) ** batch


def expert_capacity(tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor · tokens · k / n_experts)``."""
    tokens = require_int("tokens", tokens, minimum=0)
    n_experts = require_positive_int("n_experts", n_experts)
    k = require_positive_int("k", k)
    capacity_factor = require_float("capacity_factor", capacity_factor, positive=True)
    return math.ceil(capacity_factor * tokens * k / n_experts)


def capacity_keep(experts: torch.Tensor, n_experts: int, capacity: int,
                  active: torch.Tensor | None = None) -> torch.Tensor:
    """``(T, k)`` bool: which assignments fit in their expert's ``capacity`` slots.

    Slots are filled first choices first (all tokens' slot 0, in token order), then
    second choices, and so on, as in GShard and Switch. An inactive assignment
    takes no slot and is never kept. The order runs over the whole flattened batch,
    so a token's second choice loses to *later* tokens' first choices, and adding a
    sequence to the batch can drop an assignment that was kept before.
    """
    experts = require_tensor("experts", experts, ndim=2)
    n_experts = require_positive_int("n_experts", n_experts)
    capacity = require_int("capacity", capacity, minimum=0)
    if active is None:
        active = torch.ones_like(experts, dtype=torch.bool)
    order = experts.t().reshape(-1)                       # slot-major: every first choice, then every second
    live = active.t().reshape(-1)
    one_hot = torch.nn.functional.one_hot(order, n_experts) * live[:, None]
    position = (one_hot.cumsum(dim=0) - 1).gather(1, order[:, None]).squeeze(1)
    keep = live & (position < capacity)
    return keep.view(experts.shape[1], experts.shape[0]).t()


def expert_choice_routing(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert choice (Zhou et al., 2022): every expert takes its ``capacity`` highest-scoring tokens.

    Returns ``(tokens, gates, probs)``: ``tokens (E, capacity)`` the indices each
    expert picked, ``gates (E, capacity)`` their router probabilities, and the
    ``(T, E)`` probabilities. Every expert gets exactly ``capacity`` tokens (perfect
    balance); a token may be picked by several experts or by none. Because a token's
    fate depends on the other tokens in the batch, the choice is not causal.
    """
    logits = _require_logits(logits)
    capacity = require_int("capacity", capacity, minimum=1, maximum=logits.shape[0])
    probs = _probs(logits)
    gates, tokens = probs.t().topk(capacity, dim=-1)
    return tokens, gates, probs


def update_balance_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """The auxiliary-loss-free update (Wang et al. 2024; DeepSeek-V3): ``b_i ← b_i + γ · sign(mean load − load_i)``.

    An overloaded expert's bias goes down by ``γ``, an underloaded one's up by ``γ``,
    one exactly at the mean stays. Returns a new tensor; ``bias`` is not modified.
    """
    bias = require_float_tensor("bias", bias, ndim=1)
    counts = require_tensor("counts", counts, ndim=1)
    gamma = require_float("gamma", gamma, minimum=0.0)
    if counts.shape != bias.shape:
        raise ValueError(f"counts must have one entry per expert, shape {tuple(bias.shape)}, got {tuple(counts.shape)}")
    counts = counts.to(bias.dtype)
    return bias + gamma * torch.sign(counts.mean() - counts)
