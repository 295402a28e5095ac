"""The contracts between the ``lm`` bench and the modules a chapter plugs into it.

A chapter's mechanism enters :class:`~labsupport.lm.model.TinyLM` through a
*factory* ``(d_model, layer_index) -> nn.Module``, called once per layer. What
the returned module must do is written here as typing protocols, so that a
mixer's author can read the whole contract in one place and a test can check
it with ``isinstance``.

Shapes: model activations are ``(batch, length, d_model)``.

**Sequence mixer** (:class:`SequenceMixer`) mixes information across positions:
``forward(x) -> y`` of the same shape. It is causal (position ``t`` reads only
positions ``<= t``) unless it says otherwise with an attribute ``causal = False``
(a bidirectional mixer, for masked-diffusion models; such a model cannot
decode token by token).

**Decoding** (:class:`DecodingMixer`): to generate one token at a time, a mixer
also implements

* ``prefill(x) -> (y, state)``: process a whole prompt, return its output and
  the state that later steps need (a KV cache, a fixed-size recurrent matrix);
* ``decode_step(x, state) -> (y, state)``: one position ``x`` of shape
  ``(batch, 1, d_model)``; ``state`` is ``None`` at the very first token.

The state is the mixer's own business: the bench passes it back unchanged. The
contract is that decoding with states gives the outputs of ``forward`` on the
whole sequence. How big the state grows is what chapters 00-05 measure: a
:class:`CacheReport` (``cache_bytes(state)``) lets the bench and the widgets
read it.

**Channel mixer** (:class:`ChannelMixer`) mixes features within a position:
``forward(x) -> y`` of the same shape, position by position, so decoding needs
no state. An MLP is the default; a mixture of experts is the reason for the
hooks below.

**Hooks read by the trainer** (any module anywhere in the model may implement them):

* :class:`AuxiliaryLossSource` — ``auxiliary_losses()`` returns the extra loss
  terms computed in the latest forward pass (load balancing, router z-loss),
  already weighted; the trainer adds them to the objective, so they reach the
  optimiser, and records each by name.
* :class:`MetricSource` — ``training_metrics()`` returns numbers (or lists of
  numbers) describing the latest forward pass, such as tokens per expert; the
  trainer records them at every step.

**Custom initialisation**: ``TinyLM`` initialises every linear and embedding
weight from N(0, 0.02²) and every bias to zero, then calls ``init_weights()``
on every module that defines it (:class:`CustomInit`): a gate bias or a decay
rate chosen by the mixer wins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "AuxiliaryLossSource",
    "CacheReport",
    "ChannelMixer",
    "ChannelMixerFactory",
    "CustomInit",
    "DecodingMixer",
    "MetricSource",
    "MixerFactory",
    "SequenceMixer",
    "is_causal",
]


@runtime_checkable
class SequenceMixer(Protocol):
    """Mixes across positions: ``(B, L, d_model) -> (B, L, d_model)``, causal unless ``causal = False``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class DecodingMixer(Protocol):
    """A sequence mixer that can also run one token at a time with a carried state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Whole prompt ``(B, L, d_model)`` → output and the state after its last position."""
        ...

    def decode_step(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """One position ``(B, 1, d_model)`` and the state (``None`` at the start) → output and new state."""
        ...


@runtime_checkable
class CacheReport(Protocol):
    """A decoding mixer that can say how many bytes its state holds."""

    def cache_bytes(self, state: Any) -> int: ...


@runtime_checkable
class ChannelMixer(Protocol):
    """Mixes features within each position: ``(B, L, d_model) -> (B, L, d_model)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class AuxiliaryLossSource(Protocol):
    """A module that adds weighted loss terms from its latest forward pass to the training objective."""

    def auxiliary_losses(self) -> Mapping[str, torch.Tensor]: ...


@runtime_checkable
class MetricSource(Protocol):
    """A module that reports numbers about its latest forward pass (e.g. tokens per expert)."""

    def training_metrics(self) -> Mapping[str, float | Sequence[float]]: ...


@runtime_checkable
class CustomInit(Protocol):
    """A module that sets its own initial weights after the model's global initialisation."""

    def init_weights(self) -> None: ...


#: ``(d_model, layer_index) -> sequence mixer``.
MixerFactory = Callable[[int, int], nn.Module]
#: ``(d_model, layer_index) -> channel mixer``.
ChannelMixerFactory = Callable[[int, int], nn.Module]


def is_causal(module: nn.Module) -> bool:
    """A mixer is causal unless it carries ``causal = False``."""
    return bool(getattr(module, "causal", True))
