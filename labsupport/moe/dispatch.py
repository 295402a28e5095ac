"""Chapter 06, dispatch and combine: sending tokens to their experts and adding the answers back.

The experts of one layer are MLPs (``Linear → GELU → Linear``, as the bench's
:class:`~labsupport.lm.layers.MLP`) whose weights are stacked::

    w_up (E, d, h)   b_up (E, h)   w_down (E, h, d)   b_down (E, d)

Three ways to run a routed layer over ``T`` tokens ``x (T, d)``:

* :func:`moe_loop` — the definition: for each token, for each of its active
  slots, add ``weight · expert(x_t)``. Slow (``T·k`` tiny matmuls), obviously right.
* :func:`moe_sorted` — the fast path: sort the ``T·k`` assignments by expert so
  each expert's tokens are one contiguous block, run one matmul per expert on
  its block (a *grouped* matmul), and scatter-add the weighted answers back
  with ``index_add_``.
* :func:`moe_expert_choice` — for expert-choice routing every expert has the same
  number of tokens, so the grouped matmul is a plain batched ``torch.bmm``.

Why one ``mm`` per expert and not ``torch.nn.functional.grouped_mm``: in torch
2.13 that op is documented for CUDA bf16; on CPU it refuses float64, needs
16-byte-aligned strides, and its backward fails, so the chapter sorts and
loops over the ``E`` experts (not the ``T`` tokens), which keeps every matmul
large and the Python overhead at ``E`` calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from labsupport.harness.validation import require_float_tensor
from labsupport.moe.routing import Routing

__all__ = ["COMBINE_MODES", "KERNELS", "UP_BIAS_MODES", "expert_forward", "grouped_expert_mlp", "moe_expert_choice",
           "moe_grouped", "moe_loop", "moe_sorted", "sort_by_expert"]


def _require_weights(x: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor,
                     w_down: torch.Tensor, b_down: torch.Tensor) -> None:
    require_float_tensor("x", x, ndim=2)
    require_float_tensor("w_up", w_up, ndim=3)
    require_float_tensor("w_down", w_down, ndim=3)
    n_experts, d, h = w_up.shape
    expected = {"w_up": (n_experts, x.shape[1], h), "b_up": (n_experts, h),
                "w_down": (n_experts, h, d), "b_down": (n_experts, d)}
    for name, tensor in (("w_up", w_up), ("b_up", b_up), ("w_down", w_down), ("b_down", b_down)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} (experts, ...), got {tuple(tensor.shape)}")


def expert_forward(x: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor,
                   w_down: torch.Tensor, b_down: torch.Tensor) -> torch.Tensor:
    """One expert MLP on ``x (..., d)``: ``gelu(x W_up + b_up) W_down + b_down``."""
    return F.gelu(x @ w_up + b_up) @ w_down + b_down


def moe_loop(x: torch.Tensor, routing: Routing, w_up: torch.Tensor, b_up: torch.Tensor,
             w_down: torch.Tensor, b_down: torch.Tensor) -> torch.Tensor:
    """The definition, one token and one slot at a time: ``y_t = Σ_slots weight · expert(x_t)``.

    A slot with ``active=False`` (dropped, unused, or a null expert) adds nothing.
    """
    _require_weights(x, w_up, b_up, w_down, b_down)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(routing.k):
            if not bool(routing.active[t, slot]):
                continue
            e = int(routing.experts[t, slot])
            y = expert_forward(x[t], w_up[e], b_up[e], w_down[e], b_down[e])
            out[t] = out[t] + routing.weights[t, slot].to(x.dtype) * y
    return out


def sort_by_expert(routing: Routing, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The active assignments, grouped by expert.

    Returns ``(token, expert, weight, counts)``: for each active assignment in
    expert order (stable, so tokens keep their order within an expert), the token
    it comes from, its expert, its weight; and ``counts (E,)`` assignments per expert.
    """
    flat_active = routing.active.reshape(-1)
    token = torch.arange(routing.experts.shape[0], device=routing.experts.device).repeat_interleave(routing.k)
    token, expert = token[flat_active], routing.experts.reshape(-1)[flat_active]
    weight = routing.weights.reshape(-1)[flat_active]
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=n_experts)[:n_experts]
    return token[order], expert[order], weight[order], counts


def grouped_expert_mlp(x_sorted: torch.Tensor, counts: list[int], w_up: torch.Tensor, b_up: torch.Tensor,
                       w_down: torch.Tensor, b_down: torch.Tensor) -> torch.Tensor:
    """The experts on their tokens: ``x_sorted (N, d)`` in expert-contiguous blocks of ``counts[e]`` rows.

    A grouped matmul done as one fused ``addmm`` (bias + matmul) per projection and
    per non-empty expert: no gathered copies of the biases, and empty experts cost nothing.
    """
    pieces = []
    start = 0
    for e, count in enumerate(counts):
        if count:
            hidden = F.gelu(torch.addmm(b_up[e], x_sorted[start:start + count], w_up[e]))
            pieces.append(torch.addmm(b_down[e], hidden, w_down[e]))
            start += count
    if not pieces:
        return x_sorted.new_zeros(0, w_down.shape[-1])
    return torch.cat(pieces)


def moe_sorted(x: torch.Tensor, routing: Routing, w_up: torch.Tensor, b_up: torch.Tensor,
               w_down: torch.Tensor, b_down: torch.Tensor) -> torch.Tensor:
    """The vectorised layer: sort assignments by expert, one grouped matmul per projection, scatter-add back."""
    _require_weights(x, w_up, b_up, w_down, b_down)
    token, _, weight, counts = sort_by_expert(routing, w_up.shape[0])
    y = grouped_expert_mlp(x[token], counts.tolist(), w_up, b_up, w_down, b_down)
    return torch.zeros_like(x).index_add_(0, token, y * weight.to(x.dtype)[:, None])


def _grouped_matmul(x_sorted: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x_sorted (N, d)`` in expert blocks ending at ``offsets (E,)`` times ``weight (E, d, h)``, block by block.

    On CUDA with bf16 operands whose widths are multiples of 8 (16-byte rows) this is torch's
    ``grouped_mm``: one kernel for all experts, offsets read on the device. Elsewhere (the CPU, float32)
    it falls back to one matmul per expert, which reads the offsets on the host.
    """
    if (x_sorted.is_cuda and x_sorted.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and hasattr(F, "grouped_mm") and weight.shape[1] % 8 == 0 and weight.shape[2] % 8 == 0):
        return F.grouped_mm(x_sorted, weight, offs=offsets)
    out = x_sorted.new_empty(x_sorted.shape[0], weight.shape[2])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x_sorted[start:end] @ weight[e]
        start = end
    return out


UP_BIAS_MODES = ("folded", "one_hot")
COMBINE_MODES = ("gather", "index_add")
KERNELS = ("torch", "triton")


class _CopyToSlots(torch.autograd.Function):
    """``x[order // k]``: every token copied into its ``k`` slots, the slots in expert order.

    Backward without atomics: the slots' gradients are put back in slot order (``grad[inverse]``, the
    inverse permutation) and each token sums its ``k`` rows. Autograd's own backward for the gather would
    scatter-add ``T·k`` rows into ``T`` with atomics.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[torch.div(order, k, rounding_mode="floor")]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad[inverse].view(-1, ctx.k, grad.shape[-1]).sum(dim=1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """``y[perm]`` for a permutation ``perm``; its gradient is the inverse permutation, ``grad[perm_inverse]``."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, perm: torch.Tensor, perm_inverse: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(perm_inverse)
        return y[perm]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (perm_inverse,) = ctx.saved_tensors
        return grad[perm_inverse], None, None


def moe_grouped(x: torch.Tensor, routing: Routing, w_up: torch.Tensor, b_up: torch.Tensor,
                w_down: torch.Tensor, b_down: torch.Tensor, *, up_bias: str = "folded",
                combine: str = "gather", kernel: str = "torch") -> torch.Tensor:
    """:func:`moe_sorted` with no host synchronisation: the GPU path (one grouped matmul per projection).

    :func:`moe_sorted` drops inactive slots with a boolean index and hands the per-expert counts to
    Python (``.tolist()``); both wait for the device. Here every one of the ``T·k`` slots is sorted,
    an inactive slot is sent to expert 0 with weight 0 (its answer is computed and multiplied away),
    and the counts stay on the device as the offsets of a grouped matmul. The same function as
    :func:`moe_sorted` for any routing; faster only where inactive slots are rare (dropless top-k).

    ``up_bias`` says how each slot gets its expert's up-projection bias, the widest one (``h`` numbers):

    * ``"folded"`` (default): the bias is one more row of ``W_up`` and every token one more input, a 1
      (homogeneous coordinates), so the grouped matmul adds it and its gradient comes out of the weight
      gradient. Costs ``(d + 8)/d`` of the matmul (the ones column is padded to 8 for aligned rows) and
      removes the bias's own pass over the ``(T·k, h)`` hidden activations, forward and backward. On an
      H100 (``benchmarks/BENCHMARKS.md``, fourth GPU session) the saving was within run-to-run spread.
    * ``"one_hot"``: a separate product ``one_hot(expert) @ b_up`` added to the matmul's output.

    ``combine`` says how the tokens travel to their slots and the answers back:

    * ``"gather"`` (default): sorting the ``T·k`` slots is a permutation, and a permutation's gradient is
      the inverse permutation. So both directions are gathers, forward and backward: a token's answer is
      its ``k`` slots' rows read back (``y[inverse]``) and summed with their weights. No atomics, and the
      result does not depend on the order threads run in (3–5% faster than ``index_add`` on an H100).
    * ``"index_add"``: the answers scatter-added into the tokens (``index_add_``), autograd's gathers
      and scatters in the backward; on a GPU the scatters are atomic adds.

    ``kernel`` says who runs the two projections:

    * ``"torch"`` (default): the copies and permutations above around torch's grouped matmuls.
    * ``"triton"``: :func:`labsupport.moe.triton_dispatch.moe_scatter`, Triton grouped GEMMs that read the
      tokens through the sort's index inside their loads and write each answer to its slot inside their
      stores, so neither the ``(T·k, d)`` copy of the tokens nor the permuted answers are materialised;
      forward and backward (ScatterMoE's idea). ``up_bias`` and ``combine`` do not apply (the bias is added
      in the kernel's epilogue; the combine reads each token's ``k`` rows). Needs triton and a CUDA device,
      or ``TRITON_INTERPRET=1``. Not yet measured on a GPU.
    """
    _require_weights(x, w_up, b_up, w_down, b_down)
    if up_bias not in UP_BIAS_MODES:
        raise ValueError(f"up_bias must be one of {UP_BIAS_MODES}, got {up_bias!r}")
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "triton":
        from labsupport.moe.triton_dispatch import moe_scatter  # imports triton only when asked for
        return moe_scatter(x, routing, w_up, b_up, w_down, b_down)
    n_experts, _, h = w_up.shape
    tokens, k = routing.experts.shape
    active = routing.active.reshape(-1) & (routing.experts.reshape(-1) < n_experts)
    expert = torch.where(active, routing.experts.reshape(-1), torch.zeros_like(routing.experts.reshape(-1)))
    slot_weight = routing.weights.reshape(-1).to(x.dtype) * active.to(x.dtype)   # slot order (token, slot)
    order = torch.argsort(expert, stable=True)                                    # sorted position -> slot
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
    expert = expert[order]
    token = torch.div(order, k, rounding_mode="floor")
    counts = torch.zeros(n_experts, dtype=torch.long, device=x.device).index_add_(
        0, expert, torch.ones_like(expert))
    offsets = counts.cumsum(0).to(torch.int32)

    def to_slots(rows: torch.Tensor) -> torch.Tensor:
        return _CopyToSlots.apply(rows, order, inverse, k) if combine == "gather" else rows[token]

    # Each slot's biases as a product with its one-hot row, not the gather ``b_up[expert]``: the gather's
    # backward adds T·k rows into E bias rows with atomics (every slot of an expert on the same row), the
    # product's backward is one small matmul (E × T·k) @ (T·k × h).
    one_hot = F.one_hot(expert, n_experts).to(x.dtype)
    if up_bias == "folded":
        pad = 8  # a 1 and seven 0s: rows of d + 8 bf16 numbers stay 16-byte aligned for grouped_mm
        ones = torch.cat([x.new_ones(tokens, 1), x.new_zeros(tokens, pad - 1)], dim=1)
        x_aug = torch.cat([x, ones], dim=1)                                           # (T, d + 8)
        w_aug = torch.cat([w_up, b_up[:, None, :], w_up.new_zeros(n_experts, pad - 1, h)], dim=1)
        hidden = F.gelu(_grouped_matmul(to_slots(x_aug), w_aug, offsets))
    else:
        hidden = F.gelu(_grouped_matmul(to_slots(x), w_up, offsets) + one_hot @ b_up)
    y = _grouped_matmul(hidden, w_down, offsets) + one_hot @ b_down                 # sorted slots
    if combine == "gather":
        per_slot = _PermuteRows.apply(y, inverse, order).view(tokens, k, -1)         # back to slot order
        return (per_slot * slot_weight.view(tokens, k, 1)).sum(dim=1)
    return torch.zeros_like(x).index_add_(0, token, y * slot_weight[order][:, None])


def moe_expert_choice(x: torch.Tensor, tokens: torch.Tensor, gates: torch.Tensor, w_up: torch.Tensor,
                      b_up: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor) -> torch.Tensor:
    """Expert-choice layer: expert ``e`` processes ``x[tokens[e]]``; answers are added back weighted by ``gates``.

    Every expert holds the same number of tokens, so each projection is one ``torch.bmm``.
    """
    _require_weights(x, w_up, b_up, w_down, b_down)
    n_experts, capacity = tokens.shape
    picked = x[tokens]                                          # (E, C, d)
    hidden = F.gelu(torch.bmm(picked, w_up) + b_up[:, None])    # (E, C, h)
    y = torch.bmm(hidden, w_down) + b_down[:, None]             # (E, C, d)
    out = torch.zeros_like(x)
    weighted = (y * gates.to(x.dtype)[..., None]).reshape(n_experts * capacity, -1)
    return out.index_add(0, tokens.reshape(-1), weighted)
