"""Chapter 06, routing: which expert(s) each token goes to, and the losses that keep experts busy.

Every function here works on a flat list of ``T`` tokens (``(T, d_model)``
inputs, ``(T, E)`` router logits). The convention of the chapter:

* **Token choice, top-k** (Switch, Mixtral): probabilities are a softmax over
  all ``E`` experts; each token keeps its ``k`` largest and renormalises them to
  sum to 1. That equals a softmax over the ``k`` largest *logits* alone.
* **Load-balancing loss** ``N · Σ_i f_i P_i``: ``P_i`` is the mean router
  probability of expert ``i``, ``f_i`` the fraction of routed *assignments*
  (``T · k`` of them) that went to ``i``. With this ("switch") normalisation a
  perfectly balanced router scores 1 for every ``k``. Mixtral's public code
  divides by ``T`` instead of ``T · k`` ("mixtral"), so a balanced top-2 router
  scores 2. The chapter uses "switch".
* **Capacity** ``ceil(capacity_factor · T · k / E)`` slots per expert; first
  choices are served before second choices, earlier tokens before later ones;
  assignments beyond the capacity are dropped (their token passes through the
  block's residual unchanged).
* **Expert choice**: each expert picks its ``capacity`` highest-scoring tokens.
* **Bias balancing** (DeepSeek-V3): a per-expert bias is added to the scores
  for *selection* only; after each step it moves by ``γ`` towards balance.
* **Top-p routing**: a token takes experts in order of probability until their
  mass reaches ``p`` (at least one, at most ``max_k``).
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
    "load_balancing_loss",
    "router_z_loss",
    "top_k_routing",
    "top_p_routing",
    "update_balance_bias",
]

BALANCE_CONVENTIONS = ("switch", "mixtral")


@dataclass
class Routing:
    """A routing decision for ``T`` tokens, ``k`` slots each.

    Attributes:
        experts: ``(T, k)`` int64 expert index of each slot.
        weights: ``(T, k)`` mixing weight of each slot (0 for an unused slot).
        active: ``(T, k)`` bool, False for a slot that is unused or dropped.
        probs: ``(T, E)`` router probabilities (softmax over all experts, float32 or wider).
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


def top_k_routing(logits: torch.Tensor, k: int, *, selection_bias: torch.Tensor | None = None) -> Routing:
    """Token-choice routing: softmax over experts, keep the top ``k``, renormalise them to sum to 1.

    Args:
        logits: ``(T, E)`` router logits.
        k: experts per token, ``1 <= k <= E``.
        selection_bias: optional ``(E,)`` bias added to the probabilities *only to choose*
            the experts (DeepSeek-V3's auxiliary-loss-free balancing); the weights come
            from the unbiased probabilities.
    """
    logits = _require_logits(logits)
    n_experts = logits.shape[1]
    k = require_int("k", k, minimum=1, maximum=n_experts)
    probs = _probs(logits)
    if selection_bias is None:
        top, experts = probs.topk(k, dim=-1)
    else:
        selection_bias = require_float_tensor("selection_bias", selection_bias, ndim=1)
        if selection_bias.shape[0] != n_experts:
            raise ValueError(f"selection_bias must have one entry per expert ({n_experts}), "
                             f"got shape {tuple(selection_bias.shape)}")
        _, experts = (probs + selection_bias.to(probs.dtype)).topk(k, dim=-1)
        top = probs.gather(1, experts)
    weights = top / top.sum(dim=-1, keepdim=True)
    return Routing(experts, weights, torch.ones_like(experts, dtype=torch.bool), probs)


def top_p_routing(logits: torch.Tensor, p: float, max_k: int) -> Routing:
    """Adaptive routing: experts in order of probability until their mass reaches ``p``.

    A confident token (one expert holds ``≥ p`` of the mass) uses one expert; an
    unsure one uses up to ``max_k``. Kept weights are renormalised to sum to 1;
    unused slots have ``active=False`` and weight 0.
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


def expert_counts(routing: Routing, n_experts: int) -> torch.Tensor:
    """``(E,)`` float: how many active assignments each expert received."""
    n_experts = require_positive_int("n_experts", n_experts)
    chosen = routing.experts[routing.active]
    return torch.bincount(chosen, minlength=n_experts)[:n_experts].to(torch.float32)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, *,
                        convention: str = "switch") -> torch.Tensor:
    """The Switch load-balancing loss ``N · Σ_i f_i P_i``, unscaled (multiply by ``α`` yourself).

    Args:
        probs: ``(T, E)`` router probabilities (the softmax over all experts).
        experts: ``(T, k)`` chosen expert indices.
        convention: ``"switch"`` divides the counts by ``T·k`` (balanced → 1 for any k);
            ``"mixtral"`` divides by ``T`` as Mixtral's public code does (balanced → k).

    Only ``P_i`` carries a gradient: the counts are not differentiable.
    """
    probs = require_float_tensor("probs", probs, ndim=2)
    experts = require_tensor("experts", experts, ndim=2)
    require_choice("convention", convention, BALANCE_CONVENTIONS)
    if experts.shape[0] != probs.shape[0]:
        raise ValueError(f"probs has {probs.shape[0]} tokens but experts has {experts.shape[0]}")
    tokens, k = experts.shape
    n_experts = probs.shape[1]
    counts = torch.bincount(experts.reshape(-1), minlength=n_experts).to(probs.dtype)
    fraction = counts / (tokens * k if convention == "switch" else tokens)
    return n_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of ``logsumexp(logits)²`` (keeps logits small)."""
    logits = _require_logits(logits)
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).square().mean()


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
    takes no slot and is never kept.
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
    """DeepSeek-V3's auxiliary-loss-free update: ``b_i ← b_i + γ · sign(mean load − load_i)``.

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
