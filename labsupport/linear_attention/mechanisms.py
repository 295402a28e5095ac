"""THE registry of chapter 03's mechanisms: one row each, read by the notebook, the widget, the mixer and the tests.

Every mechanism keeps a fixed-size matrix memory ``S`` of shape ``(D_k, D_v)``
per head and updates it once per token. They differ only in how they *forget*
(what multiplies the old state) and how they *write* (what is added), and every
one reads with ``o_t = S_tᵀ q_t``::

    mechanism        forget                          write
    linear attention S                               + k vᵀ
    RetNet           γ_h · S        (fixed per head) + k vᵀ
    GLA              diag(α_t) · S  (per token, dim) + k vᵀ
    DeltaNet         (I − β_t k kᵀ) · S              + β_t k vᵀ
    gated DeltaNet   α_t (I − β_t k kᵀ) · S          + β_t k vᵀ
    TTT-linear       one gradient step on ½‖Sᵀk − v‖² with step size η (= DeltaNet, β = η)

A :class:`MechanismSpec` row says all a consumer needs, so no consumer branches
on a mechanism's name:

============== ============================ ================================== ==========================
mechanism      features (q, k)              gates                              sequence form / step form
============== ============================ ================================== ==========================
linear         elu + 1, normalised output   none                               chunkwise / recurrent step
retnet         q·D^-½, k                    fixed decay γ_h = 1 − 2^(−5−h)     chunkwise / recurrent step
gla            q·D^-½, k                    data-dependent gate per key dim    chunkwise (C ≤ 16) / step
deltanet       L2-normalised silu           β_t = σ(w·x)                       UT chunkwise / delta step
gated_deltanet L2-normalised silu           β_t, and a scalar gate α_t         UT chunkwise / delta step
ttt            L2-normalised silu           η_t (the β gate)                   mini-batch dual form / step
============== ============================ ================================== ==========================

The *sequence form* computes a whole sequence ``(B, H, L, ·)`` and returns
``(output, state)``; the *step form* takes that state (``None`` at the first
token) and one token ``(B, H, ·)`` and returns ``(output, new state)``. Both
take a :class:`MemoryInputs` (features, values and gates, already computed)
and the :class:`FormOptions` of the caller. The tests prove, for every row,
that stepping token by token gives the sequence form's outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from labsupport.harness.validation import require_choice
from labsupport.linear_attention.reference import (
    _augment,
    _finish,
    delta_rule_chunkwise,
    delta_rule_update,
    elu_feature_map,
    linear_attention_chunkwise,
    recurrent_update,
    ttt_linear_minibatch,
)

__all__ = [
    "MECHANISMS",
    "FormOptions",
    "MechanismSpec",
    "MemoryInputs",
    "get_mechanism",
    "widget_mechanisms",
]


# --------------------------------------------------------------------------- what the forms take


class MemoryInputs(NamedTuple):
    """Features, values and gates of a sequence ``(B, H, L, ·)`` or of one token ``(B, H, ·)``.

    ``log_decay`` is ``None`` (no decay), ``(B, H[, L])`` for a scalar per head
    or ``(B, H[, L], D_k)`` for a gate per key dimension; ``beta`` is ``None`` or
    ``(B, H[, L])``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    log_decay: torch.Tensor | None = None
    beta: torch.Tensor | None = None

    def token(self, t: int) -> MemoryInputs:
        """The inputs of position ``t`` of a sequence."""
        return MemoryInputs(*(None if x is None else x[:, :, t] for x in self))


@dataclass(frozen=True)
class FormOptions:
    """The caller's settings: chunk length, TTT's inner mini-batch, and the normaliser (linear attention)."""

    chunk_size: int = 64
    mini_batch: int = 16
    normalize: bool = False
    eps: float = 1e-6


FeatureMap = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SequenceForm = Callable[[MemoryInputs, FormOptions], tuple[torch.Tensor, Any]]
StepForm = Callable[[Any, MemoryInputs, FormOptions], tuple[torch.Tensor, Any]]


# --------------------------------------------------------------------------- feature maps


def elu_features(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``elu(x) + 1`` on both (Katharopoulos et al.): positive, so the normaliser never vanishes."""
    return elu_feature_map(q), elu_feature_map(k)


def scaled_features(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ``q / √D`` and ``k`` (RetNet, GLA)."""
    return q / math.sqrt(q.shape[-1]), k


def l2_silu_features(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``silu`` (DeltaNet and its kin): unit keys keep ``β ∈ (0, 1)`` stable."""
    return F.normalize(F.silu(q), dim=-1), F.normalize(F.silu(k), dim=-1)


# --------------------------------------------------------------------------- additive rules


def additive_sequence(x: MemoryInputs, options: FormOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention, RetNet, GLA over a sequence: the chunkwise form, and the final state."""
    return linear_attention_chunkwise(x.q, x.k, x.v, x.log_decay, chunk_size=options.chunk_size,
                                      normalize=options.normalize, eps=options.eps, return_state=True)


def additive_step(state: torch.Tensor | None, x: MemoryInputs, options: FormOptions,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of an additive rule; with the normaliser, it rides along as a column of ones."""
    v = _augment(x.v, options.normalize)
    if state is None:
        state = x.k.new_zeros(*x.k.shape, v.shape[-1])
    y, state = recurrent_update(state, x.q, x.k, v, x.log_decay)
    return _finish(y, options.normalize, options.eps), state


# --------------------------------------------------------------------------- delta rules


def delta_sequence(x: MemoryInputs, options: FormOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gated) DeltaNet over a sequence: the chunkwise UT form, and the final state."""
    return delta_rule_chunkwise(x.q, x.k, x.v, x.beta, x.log_decay, chunk_size=options.chunk_size,
                                return_state=True)


def delta_step(state: torch.Tensor | None, x: MemoryInputs, options: FormOptions,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of (gated) DeltaNet: decay (if gated), the delta-rule write, then read."""
    if state is None:
        state = x.k.new_zeros(*x.k.shape, x.v.shape[-1])
    if x.log_decay is not None:
        state = x.log_decay.exp()[..., None, None] * state
    state = delta_rule_update(state, x.k, x.v, x.beta)
    return (x.q[..., :, None] * state).sum(dim=-2), state


# --------------------------------------------------------------------------- test-time training


def ttt_sequence(x: MemoryInputs, options: FormOptions) -> tuple[torch.Tensor, Any]:
    """TTT-linear over a sequence: the mini-batch ("dual") form, then token steps for a partial last batch.

    The inner step size ``η`` is the ``beta`` gate. The state is what
    :func:`ttt_step` continues from: (S at the mini-batch start, S now, tokens into the batch).
    """
    length, mb = x.q.shape[2], options.mini_batch
    eta = x.beta
    full = (length // mb) * mb
    y, start = ttt_linear_minibatch(x.q[:, :, :full], x.k[:, :, :full], x.v[:, :, :full],
                                    eta[:, :, :full], mini_batch=mb, return_state=True) if full else (
        x.v[:, :, :0], None)
    state = (start, start, 0) if start is not None else None
    if full < length:  # a partial last mini-batch: continue token by token to get the decode state
        outs = [y]
        for t in range(full, length):
            o, state = ttt_step(state, x.token(t), options)
            outs.append(o[:, :, None])
        y = torch.cat(outs, dim=2)
    return y, state


def ttt_step(state: Any, x: MemoryInputs, options: FormOptions) -> tuple[torch.Tensor, Any]:
    """One token of TTT-linear; the state is (S at the mini-batch start, S now, tokens into the batch)."""
    if state is None:
        zero = x.k.new_zeros(*x.k.shape, x.v.shape[-1])
        state = (zero, zero, 0)
    start, current, count = state
    error = (x.k[..., :, None] * start).sum(dim=-2) - x.v  # gradient taken at the mini-batch start
    current = current - x.k[..., :, None] * (x.beta[..., None] * error)[..., None, :]
    out = (x.q[..., :, None] * current).sum(dim=-2)
    count += 1
    if count == options.mini_batch:
        start, count = current, 0
    return out, (start, current, count)


# --------------------------------------------------------------------------- the registry


DecayKind = Literal["none", "fixed", "vector_gate", "scalar_gate"]


@dataclass(frozen=True)
class MechanismSpec:
    """One mechanism of the chapter, as every consumer needs it.

    Attributes:
        name: the key in :data:`MECHANISMS` (``"deltanet"``).
        label: how figures and tables name it (``"DeltaNet"``).
        forget, write: the update, as text (what multiplies the old state; what is added).
        features: ``(q, k) -> (φ(q), φ(k))``, the mechanism's feature map.
        sequence_form: the whole sequence, ``(MemoryInputs, FormOptions) -> (y, state)``.
        step_form: one token, ``(state, MemoryInputs, FormOptions) -> (y, state)``.
        decay: ``"none"``; ``"fixed"`` (one constant per head, RetNet); ``"vector_gate"``
            (data-dependent, one per key dimension, GLA); ``"scalar_gate"`` (data-dependent,
            one per head, gated DeltaNet).
        beta: whether it has a data-dependent writing strength ``β_t`` (TTT's step size ``η_t``).
        rule: ``"add"`` (``S += β k vᵀ``) or ``"delta"`` (``S += β k (v − Sᵀk)ᵀ``).
        normalize: divide by ``φ(q)ᵀ z`` (linear attention); the others normalise each head's output.
        max_chunk: the longest chunk its sequence form should use (GLA's chunks hold ``C × C × D``).
        in_widget: drawn by the memory-decay widget (TTT is not: with one-token
            mini-batches it is DeltaNet; with longer ones its forget map is not per token).
    """

    name: str
    label: str
    forget: str
    write: str
    features: FeatureMap
    sequence_form: SequenceForm
    step_form: StepForm
    decay: DecayKind = "none"
    beta: bool = False
    rule: Literal["add", "delta"] = "add"
    normalize: bool = False
    max_chunk: int | None = None
    in_widget: bool = True

    def __post_init__(self) -> None:
        require_choice("decay", self.decay, ("none", "fixed", "vector_gate", "scalar_gate"))
        require_choice("rule", self.rule, ("add", "delta"))


#: The mechanisms of the chapter, in the order the chapter meets them.
MECHANISMS: dict[str, MechanismSpec] = {spec.name: spec for spec in (
    MechanismSpec("linear", "linear attention", "S (nothing is forgotten)", "+ k vᵀ",
                  elu_features, additive_sequence, additive_step, normalize=True),
    MechanismSpec("retnet", "RetNet", "γ_h S (fixed decay per head)", "+ k vᵀ",
                  scaled_features, additive_sequence, additive_step, decay="fixed"),
    MechanismSpec("gla", "GLA", "diag(α_t) S (data-dependent gate per key dimension)", "+ k vᵀ",
                  scaled_features, additive_sequence, additive_step, decay="vector_gate", max_chunk=16),
    MechanismSpec("deltanet", "DeltaNet", "(I − β_t k kᵀ) S (erase what k currently points to)", "+ β_t k vᵀ",
                  l2_silu_features, delta_sequence, delta_step, beta=True, rule="delta"),
    MechanismSpec("gated_deltanet", "gated DeltaNet", "α_t (I − β_t k kᵀ) S (decay, then erase)", "+ β_t k vᵀ",
                  l2_silu_features, delta_sequence, delta_step, decay="scalar_gate", beta=True, rule="delta"),
    MechanismSpec("ttt", "TTT-linear", "S − η k kᵀ S (gradient step on ½‖Sᵀk − v‖²)", "+ η k vᵀ",
                  l2_silu_features, ttt_sequence, ttt_step, beta=True, rule="delta", in_widget=False),
)}


def get_mechanism(name: str) -> MechanismSpec:
    """The registry row of ``name``; a ``ValueError`` naming the known mechanisms otherwise."""
    return MECHANISMS[require_choice("mechanism", name, tuple(MECHANISMS))]


def widget_mechanisms() -> tuple[str, ...]:
    """The names the memory-decay widget can draw (rows with ``in_widget``)."""
    return tuple(name for name, spec in MECHANISMS.items() if spec.in_widget)
