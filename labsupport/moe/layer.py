"""Chapter 06, the mixture-of-experts layer: a channel mixer for the ``lm`` bench.

``TinyLM(vocab, channel_mixer=moe_mixer(n_experts=8, top_k=2))`` puts a
:class:`MoELayer` in every block. The layer reports its load-balancing loss and
router z-loss through ``auxiliary_losses()`` (the trainer adds them to the
objective) and, through ``training_metrics()`` (see :mod:`labsupport.lm.contracts`),
the assignments each expert was *sent* (before any capacity limit drops some),
the assignment budget ``T·k`` its capacity is sized from, the dropped fraction and
the experts actually run per token.

Options, each one section of the chapter:

* ``router="top_k"`` (token choice), ``"top_p"`` (adaptive: as many experts as it
  takes to reach probability mass ``top_p``, at most ``top_k``), or
  ``"expert_choice"`` (each expert picks its tokens; not causal).
* ``gate``: how the kept scores become weights — ``"probability"`` (Switch,
  DeepSeekMoE/V2), ``"renormalize"`` (GShard top-2, Mixtral) or ``"sigmoid"``
  (DeepSeek-V3); by default ``"probability"`` for ``top_k=1`` (renormalising a single
  weight makes it 1 and starves the router of gradient) and ``"renormalize"`` otherwise.
* ``balance="switch"`` (auxiliary loss ``α · N · Σ f_i P_i``), ``"bias"``
  (auxiliary-loss-free, Wang et al. 2024: a selection-only bias nudged by ``γ``
  after every training forward pass), or ``"none"``.
* ``jitter``: Switch's router jitter, the router's input multiplied by noise from
  ``U(1 − ε, 1 + ε)`` in training.
* ``entropy_weight``: top-p routing's dynamic loss (the router's mean entropy).
* ``capacity_factor``: slots per expert ``ceil(cf · T · k / E)``; overflow is dropped.
* ``n_shared``: experts every token uses (DeepSeekMoE), run as one wider MLP.
* ``n_null``: zero-compute experts; a token routed to one skips that slot.
"""

from __future__ import annotations

import torch
from torch import nn

from labsupport.harness.validation import (
    require_choice,
    require_float,
    require_int,
    require_positive_int,
    require_tensor,
)
from labsupport.lm.contracts import ChannelMixerFactory
from labsupport.lm.layers import MLP
from labsupport.moe.dispatch import moe_expert_choice, moe_grouped, moe_sorted
from labsupport.moe.routing import (
    BALANCE_CONVENTIONS,
    GATES,
    Routing,
    capacity_keep,
    expert_capacity,
    expert_choice_routing,
    expert_counts,
    load_balancing_loss,
    router_entropy,
    router_z_loss,
    top_k_routing,
    top_p_routing,
    update_balance_bias,
)

__all__ = ["MoELayer", "moe_mixer"]

ROUTERS = ("top_k", "top_p", "expert_choice")
BALANCING = ("none", "switch", "bias")


class MoELayer(nn.Module):
    """A routed mixture of MLP experts, ``(B, L, d_model) -> (B, L, d_model)``.

    Args:
        d_model: model width.
        n_experts: routed experts ``E``.
        top_k: experts per token (the most, for ``router="top_p"``).
        expert_hidden: hidden width of each expert (default ``4 · d_model``, the bench MLP's).
        router: ``"top_k"``, ``"top_p"`` or ``"expert_choice"``.
        top_p: the probability mass a token must cover with ``router="top_p"``.
        balance: ``"none"``, ``"switch"`` or ``"bias"``.
        balance_weight: ``α`` of the Switch loss.
        convention: ``"switch"`` (balanced → 1) or ``"mixtral"`` (Hugging Face transformers'
            ``load_balancing_loss_func``, balanced → k) counts in that loss.
        z_loss_weight: weight of the router z-loss (0 to leave it out).
        bias_gamma: ``γ`` of the bias update.
        gate: ``"probability"``, ``"renormalize"`` or ``"sigmoid"`` (``None``: by ``top_k``, see above).
        jitter: ``ε`` of the router's multiplicative input noise in training (0 = none).
        entropy_weight: weight of the router-entropy loss (top-p's dynamic loss; 0 to leave it out).
        capacity_factor: ``None`` for no capacity limit (token choice), or the factor;
            expert choice uses it (default 1) to size each expert's pick.
        n_shared: always-on experts of width ``expert_hidden`` each.
        n_null: zero-compute experts the router may pick.

    Attribute ``dispatch_kernel`` (``"torch"``, set after construction) picks ``moe_grouped``'s ``kernel`` on
    a CUDA device; ``"triton"`` runs the fused gather/scatter GEMMs of :mod:`labsupport.moe.triton_dispatch`
    on any device (on the CPU only under ``TRITON_INTERPRET=1``).
    """

    def __init__(self, d_model: int, n_experts: int = 8, top_k: int = 2, expert_hidden: int | None = None, *,
                 router: str = "top_k", top_p: float = 0.6, balance: str = "switch", balance_weight: float = 0.01,
                 convention: str = "switch", z_loss_weight: float = 0.0, bias_gamma: float = 1e-3,
                 capacity_factor: float | None = None, n_shared: int = 0, n_null: int = 0,
                 gate: str | None = None, jitter: float = 0.0, entropy_weight: float = 0.0) -> None:
        super().__init__()
        self.d_model = require_positive_int("d_model", d_model)
        self.n_experts = require_positive_int("n_experts", n_experts)
        self.n_null = require_int("n_null", n_null, minimum=0)
        self.top_k = require_int("top_k", top_k, minimum=1, maximum=self.n_experts + self.n_null)
        self.expert_hidden = require_positive_int("expert_hidden", 4 * d_model if expert_hidden is None
                                                  else expert_hidden)
        self.router_kind = require_choice("router", router, ROUTERS)
        self.top_p = require_float("top_p", top_p, minimum=0.0, maximum=1.0)
        self.balance = require_choice("balance", balance, BALANCING)
        self.balance_weight = require_float("balance_weight", balance_weight, minimum=0.0)
        self.convention = require_choice("convention", convention, BALANCE_CONVENTIONS)
        self.z_loss_weight = require_float("z_loss_weight", z_loss_weight, minimum=0.0)
        self.bias_gamma = require_float("bias_gamma", bias_gamma, minimum=0.0)
        self.capacity_factor = (None if capacity_factor is None
                                else require_float("capacity_factor", capacity_factor, positive=True))
        self.n_shared = require_int("n_shared", n_shared, minimum=0)
        if router == "expert_choice" and (n_null or balance == "bias"):
            raise ValueError("expert choice is balanced by construction: use it without n_null and without balance='bias'")
        if router == "top_p" and balance == "bias":
            raise ValueError("top-p routing chooses by probability mass and never reads a selection bias: "
                             "balance='bias' would update a bias that routing ignores; use 'switch' or 'none'")
        self.gate = require_choice("gate", ("probability" if self.top_k == 1 else "renormalize") if gate is None
                                   else gate, GATES)
        self.jitter = require_float("jitter", jitter, minimum=0.0, maximum=1.0)
        self.entropy_weight = require_float("entropy_weight", entropy_weight, minimum=0.0)
        E, d, h = self.n_experts, self.d_model, self.expert_hidden
        self.router = nn.Linear(d, E + self.n_null, bias=False)
        self.w_up = nn.Parameter(torch.empty(E, d, h))
        self.b_up = nn.Parameter(torch.zeros(E, h))
        self.w_down = nn.Parameter(torch.empty(E, h, d))
        self.b_down = nn.Parameter(torch.zeros(E, d))
        self.shared: nn.Module | None = None
        if self.n_shared:
            self.shared = nn.Sequential(nn.Linear(d, self.n_shared * h), nn.GELU(), nn.Linear(self.n_shared * h, d))
        self.register_buffer("selection_bias", torch.zeros(E + self.n_null))
        self.init_weights()
        self._losses: dict[str, torch.Tensor] = {}
        self._metrics: dict[str, float | list[float] | torch.Tensor] = {}
        self.last_top_expert: torch.Tensor | None = None
        self.last_router_logits: torch.Tensor | None = None
        self._sent = torch.zeros(E)
        self.dispatch_kernel = "torch"  # moe_grouped's kernel on a CUDA device ("triton": fused gather/scatter)

    # ------------------------------------------------------------------ construction

    def init_weights(self) -> None:
        """Experts from N(0, 0.02²), biases zero, selection bias zero (called again by ``TinyLM``)."""
        with torch.no_grad():
            nn.init.normal_(self.w_up, std=0.02)
            nn.init.normal_(self.w_down, std=0.02)
            self.b_up.zero_()
            self.b_down.zero_()
            self.selection_bias.zero_()

    @classmethod
    def from_dense(cls, mlp: MLP, n_experts: int = 8, top_k: int = 2, **options: object) -> MoELayer:
        """Sparse upcycling: every expert starts as a copy of the dense ``mlp``.

        The layer is built in ``mlp``'s dtype and the weights are copied bit for bit,
        so with weights that sum to 1 per token (``gate="renormalize"`` or
        ``"sigmoid"``) its output equals ``mlp(x)`` to rounding whatever the router
        says, as long as nothing is dropped, no null expert is picked and there are
        no shared experts. With ``gate="probability"`` (Switch) the output is
        ``mlp(x)`` scaled by the kept probability mass. Expert-choice routing is
        refused: a token picked by several experts, or by none, gets the dense
        output times the sum of its gates, so the upcycled layer is not the dense one.
        """
        if not isinstance(mlp, MLP):
            raise TypeError(f"from_dense upcycles a labsupport.lm.layers.MLP, got {type(mlp).__name__}")
        if options.get("router") == "expert_choice":
            raise ValueError("from_dense refuses router='expert_choice': each token gets the dense output times "
                             "the sum of the gates of the experts that picked it (0 if none did), so the "
                             "upcycled layer does not start equal to the dense MLP; use token choice")
        dtype = mlp.up.weight.dtype
        layer = cls(mlp.up.in_features, n_experts, top_k, mlp.up.out_features, **options)  # type: ignore[arg-type]
        layer = layer.to(dtype)
        with torch.no_grad():
            layer.w_up.copy_(mlp.up.weight.t().expand_as(layer.w_up))
            layer.b_up.copy_(mlp.up.bias.expand_as(layer.b_up))
            layer.w_down.copy_(mlp.down.weight.t().expand_as(layer.w_down))
            layer.b_down.copy_(mlp.down.bias.expand_as(layer.b_down))
            nn.init.normal_(layer.router.weight, std=0.02)
        return layer

    # ------------------------------------------------------------------ accounting

    def parameter_counts(self) -> dict[str, int]:
        """``total`` parameters and ``active`` ones a single token uses (router, shared, ``k`` experts)."""
        per_expert = sum(p[0].numel() for p in (self.w_up, self.b_up, self.w_down, self.b_down))
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        router = self.router.weight.numel()
        return {"total": router + shared + self.n_experts * per_expert,
                "active": router + shared + min(self.top_k, self.n_experts) * per_expert}

    # ------------------------------------------------------------------ forward

    def route(self, tokens: torch.Tensor) -> tuple[Routing, torch.Tensor, torch.Tensor]:
        """Token-choice routing of ``tokens (T, d)``: the final routing, the router logits, the dropped mask."""
        routing, logits = self.select(tokens)
        self._sent = expert_counts(routing, self.n_experts)                   # loads before any dropping
        dropped = torch.zeros_like(routing.active)
        if self.capacity_factor is not None:
            # ceil(cf · T·k / E), computed from the budget T·k exactly as the widget's replay does
            capacity = expert_capacity(tokens.shape[0] * self.top_k, self.n_experts, 1, self.capacity_factor)
            keep = capacity_keep(routing.experts, self.n_experts + self.n_null, capacity, routing.active)
            dropped = routing.active & ~keep
            routing.active = keep
        return routing, logits, dropped

    def select(self, tokens: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        """The token-choice router's choice for ``tokens (T, d)`` before any capacity limit: routing, logits.

        Slots that picked a null expert are inactive. Nothing here reads the device from the host, so
        expert parallelism (:mod:`~labsupport.moe.parallel`) routes with it and syncs only for its split sizes.
        """
        logits = self.router(self._jittered(tokens))
        if self.router_kind == "top_p":
            routing = top_p_routing(logits, self.top_p, self.top_k)
        else:
            bias = self.selection_bias if self.balance == "bias" else None
            routing = top_k_routing(logits, self.top_k, selection_bias=bias, gate=self.gate)
        routing.active = routing.active & (routing.experts < self.n_experts)  # null experts compute nothing
        return routing, logits

    def _jittered(self, tokens: torch.Tensor) -> torch.Tensor:
        """Switch's router jitter: in training, the router's input times noise from ``U(1 − ε, 1 + ε)``."""
        if not (self.training and self.jitter > 0):
            return tokens
        noise = torch.empty_like(tokens).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return tokens * noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``: the weighted sum of each token's experts (plus shared ones)."""
        x = require_tensor("x", x)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"expected inputs (..., d_model={self.d_model}), got shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.d_model)
        weights = (self.w_up, self.b_up, self.w_down, self.b_down)
        losses: dict[str, torch.Tensor] = {}
        if self.router_kind == "expert_choice":
            logits = self.router(self._jittered(tokens))
            capacity = min(tokens.shape[0],
                           expert_capacity(tokens.shape[0], self.n_experts, 1, self.capacity_factor or 1.0))
            picked, gates, probs = expert_choice_routing(logits, capacity)
            out = moe_expert_choice(tokens, picked, gates, *weights)
            served = torch.zeros(tokens.shape[0], dtype=torch.long, device=x.device)
            served.index_add_(0, picked.reshape(-1), torch.ones_like(picked.reshape(-1)))
            counts = torch.full((self.n_experts,), float(capacity))
            self._metrics = {"tokens_per_expert": counts.tolist(),
                             "assignment_budget": float(tokens.shape[0]),
                             "dropped_fraction": float((served == 0).float().mean()),
                             "experts_per_token": float(served.float().mean())}
            self.last_top_expert = probs.argmax(dim=-1).detach().view(x.shape[:-1])
        else:
            routing, logits, dropped = self.route(tokens)
            probs = routing.probs
            # on a GPU the sort-and-group path that never waits for the device (see moe_grouped)
            if tokens.is_cuda or self.dispatch_kernel != "torch":
                out = moe_grouped(tokens, routing, *weights, kernel=self.dispatch_kernel)
            else:
                out = moe_sorted(tokens, routing, *weights)
            if self.balance == "switch" and self.balance_weight > 0:
                losses["load_balance"] = self.balance_weight * load_balancing_loss(
                    probs, routing.experts, convention=self.convention)
            if self.balance == "bias" and self.training:
                with torch.no_grad():
                    all_counts = torch.bincount(routing.experts.reshape(-1), minlength=self.selection_bias.numel())
                    self.selection_bias.copy_(update_balance_bias(self.selection_bias, all_counts, self.bias_gamma))
            assignments = routing.experts.numel()
            self._metrics = {  # kept as tensors: read on the host only when asked (no sync per forward)
                "tokens_per_expert": self._sent.detach(),            # sent, before capacity dropped any
                "assignment_budget": float(assignments),           # T·k: capacity is ceil(cf · this / E)
                "dropped_fraction": dropped.sum().detach() / assignments,
                "experts_per_token": routing.active.sum().detach() / tokens.shape[0],
            }
            self.last_top_expert = routing.experts[:, 0].detach().view(x.shape[:-1])
        if self.z_loss_weight > 0:
            losses["z_loss"] = self.z_loss_weight * router_z_loss(logits)
        if self.entropy_weight > 0:
            losses["router_entropy"] = self.entropy_weight * router_entropy(logits)
        self.last_router_logits = logits.detach()
        with torch.no_grad():  # how large the router's logits grow (what the z-loss holds down)
            self._metrics["router_logit_rms"] = logits.detach().float().square().mean().sqrt()
            self._metrics["router_z"] = router_z_loss(logits.detach())
        if self.shared is not None:
            out = out + self.shared(tokens)
        self._losses = losses
        return out.view_as(x)

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """The weighted balancing loss and z-loss of the latest forward pass (those switched on)."""
        return dict(self._losses)

    def training_metrics(self) -> dict[str, float | list[float]]:
        """Assignments sent to each expert (before dropping), the budget ``T·k``, the dropped fraction,
        the mean number of experts actually run per token, and the router logits' RMS and z-loss value
        (tensors until read here, so a forward pass never waits on the host)."""
        return {name: (value.tolist() if value.dim() else float(value)) if isinstance(value, torch.Tensor) else value
                for name, value in self._metrics.items()}

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}, "
                f"expert_hidden={self.expert_hidden}, router={self.router_kind!r}, gate={self.gate!r}, "
                f"balance={self.balance!r}, "
                f"capacity_factor={self.capacity_factor}, n_shared={self.n_shared}, n_null={self.n_null}")


def moe_mixer(n_experts: int = 8, top_k: int = 2, expert_hidden: int | None = None,
              **options: object) -> ChannelMixerFactory:
    """A ``TinyLM`` channel-mixer factory that puts a :class:`MoELayer` in every block."""
    probe = MoELayer(4, n_experts, top_k, expert_hidden or 4, **options)  # validates the options early
    del probe

    def build(d_model: int, layer_index: int) -> nn.Module:
        return MoELayer(d_model, n_experts, top_k, expert_hidden, **options)  # type: ignore[arg-type]
    return build
