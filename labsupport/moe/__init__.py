"""Chapter 06: mixture of experts — routing, load balancing, capacity, expert parallelism.

* :mod:`~labsupport.moe.routing` — top-k (three gating conventions) / top-p / expert-choice routing, the load-balancing
  loss (both top-k conventions), the router z-loss, capacity and dropping, the bias update.
* :mod:`~labsupport.moe.dispatch` — the per-token loop, the sorted grouped-matmul fast path,
  the expert-choice batched path.
* :mod:`~labsupport.moe.triton_dispatch` — the GPU path as Triton grouped GEMMs with the gather fused into their
  loads and the scatter into their stores, forward and backward (imported on demand: it needs Triton).
* :mod:`~labsupport.moe.layer` — :class:`MoELayer`, an ``lm`` channel mixer, and :func:`moe_mixer`.
* :mod:`~labsupport.moe.parallel` — expert parallelism over ``torch.distributed`` (gloo on CPUs, NCCL on GPUs;
  a differentiable all-to-all, the sharded layer, the launcher).
* :mod:`~labsupport.moe.widget` — expert load over training, tokens dropped, characters per expert.
* :mod:`~labsupport.moe.quality` — a lookup-table task that rewards feed-forward capacity.
* :mod:`~labsupport.moe.exercises` — the chapter's checkers.
"""

from labsupport.moe.dispatch import (
    expert_forward,
    grouped_expert_mlp,
    moe_expert_choice,
    moe_grouped,
    moe_loop,
    moe_sorted,
    sort_by_expert,
)
from labsupport.moe.layer import MoELayer, moe_mixer
from labsupport.moe.routing import (
    BALANCE_CONVENTIONS,
    GATES,
    Routing,
    capacity_keep,
    expert_capacity,
    expert_choice_routing,
    expert_counts,
    expected_experts_touched,
    load_balancing_loss,
    router_entropy,
    router_z_loss,
    top_k_routing,
    top_p_routing,
    update_balance_bias,
)

__all__ = [
    "BALANCE_CONVENTIONS",
    "GATES",
    "MoELayer",
    "Routing",
    "capacity_keep",
    "expert_capacity",
    "expert_choice_routing",
    "expert_counts",
    "expected_experts_touched",
    "expert_forward",
    "grouped_expert_mlp",
    "load_balancing_loss",
    "moe_expert_choice",
    "moe_loop",
    "moe_mixer",
    "moe_grouped",
    "moe_sorted",
    "router_entropy",
    "router_z_loss",
    "sort_by_expert",
    "top_k_routing",
    "top_p_routing",
    "update_balance_bias",
]
