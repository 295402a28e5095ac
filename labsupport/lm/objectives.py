"""Training objectives: what loss a batch gives. :func:`~labsupport.lm.training.train` takes any of them.

An objective is a callable ``objective(model, batch, generator) -> loss`` (a
scalar tensor with a gradient). It receives the trainer's seeded generator for
any randomness of its own (which tokens to mask), so runs stay reproducible.
Auxiliary losses of the model's modules (load balancing, z-loss) are *not* the
objective's business: the trainer collects them (see :mod:`labsupport.lm.contracts`).

* :func:`next_token_loss` — the decoder's objective: cross-entropy at the scored positions.
* :class:`MaskedTokenObjective` — the masked-diffusion objective: mask a random
  fraction ``t`` of the tokens, predict them with a bidirectional model, weight by ``1/t``.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.validation import require_choice, require_float, require_int
from labsupport.lm.tasks import IGNORE_INDEX, TaskBatch

__all__ = ["MaskedTokenObjective", "Objective", "next_token_loss", "sequence_loss"]


class Objective(Protocol):
    """``(model, batch, generator) -> scalar loss``."""

    def __call__(self, model: nn.Module, batch: TaskBatch, generator: torch.Generator) -> torch.Tensor: ...


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored positions (targets != −100); refuses a batch with none."""
    if logits.dim() != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(
            f"expected logits (B, L, V) and targets (B, L); got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if targets.dtype != torch.long:
        raise TypeError(f"targets must be token ids of dtype int64 (torch.long), got {targets.dtype}")
    if not bool((targets != IGNORE_INDEX).any()):
        raise ValueError(f"every target is {IGNORE_INDEX} (ignored): there is no position to score, and the mean "
                         "over none would be NaN; make sure each batch holds at least one scored target")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def next_token_loss(model: nn.Module, batch: TaskBatch, generator: torch.Generator) -> torch.Tensor:
    """The decoder objective: :func:`sequence_loss` of ``model(batch.inputs)`` against ``batch.targets``."""
    return sequence_loss(model(batch.inputs), batch.targets)


class MaskedTokenObjective:
    """The masked-diffusion objective (as in MDLM and LLaDA), for a bidirectional model.

    For each sequence a masking ratio ``t ~ U(t_min, 1)`` is drawn, each token of
    ``batch.inputs`` is replaced by ``mask_id`` with probability ``t``, and the
    model predicts the original tokens at the masked positions. With
    ``weighting="1/t"`` the cross-entropy of a sequence is divided by ``t``
    (summed over its masked tokens, divided by its length). With ``t`` drawn from
    all of ``(0, 1]`` its expectation would be the negative ELBO, an upper bound on
    the negative log-likelihood; drawn from ``[t_min, 1]`` it is that integral
    rescaled by ``1/(1 − t_min)``, which is *not* a bound: it differs from the bound
    by about ``t_min`` × (the NLL − the sum of the one-masked-token losses), so for a
    sequence whose tokens are each unlikely given all the others it falls below the
    sequence's NLL. ``"none"`` averages the cross-entropy over masked tokens instead
    (no bound at all).

    Args:
        mask_id: the token id of ``[MASK]`` (the model's vocabulary must include it).
        weighting: ``"1/t"`` (the ELBO weighting) or ``"none"``.
        t_min: the smallest masking ratio drawn (keeps ``1/t`` bounded).
    """

    def __init__(self, mask_id: int, *, weighting: str = "1/t", t_min: float = 1e-3) -> None:
        self.mask_id = require_int("mask_id", mask_id, minimum=0)
        self.weighting = require_choice("weighting", weighting, ("1/t", "none"))
        self.t_min = require_float("t_min", t_min, positive=True, maximum=1.0)

    def corrupt(self, tokens: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """Mask ``tokens (B, L)``: returns the noisy tokens, the boolean mask and each sequence's ratio ``t (B,)``."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"expected token ids (batch, length) of dtype int64, got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        if bool((tokens == self.mask_id).any()):
            raise ValueError(f"the clean tokens already contain mask_id={self.mask_id}; pick an id outside the data")
        b, length = tokens.shape
        t = self.t_min + (1.0 - self.t_min) * torch.rand(b, generator=generator)
        masked = torch.rand(b, length, generator=generator) < t[:, None]
        noisy = torch.where(masked, torch.full_like(tokens, self.mask_id), tokens)
        return noisy, masked, t

    def __call__(self, model: nn.Module, batch: TaskBatch, generator: torch.Generator) -> torch.Tensor:
        tokens = batch.inputs
        noisy, masked, t = self.corrupt(tokens, generator)
        logits = model(noisy)
        vocab = logits.shape[-1]
        if self.mask_id >= vocab:
            raise ValueError(f"mask_id={self.mask_id} is outside the model's vocabulary of {vocab} tokens")
        token_loss = F.cross_entropy(logits.reshape(-1, vocab), tokens.reshape(-1), reduction="none")
        token_loss = token_loss.view_as(tokens) * masked
        if self.weighting == "none":
            return token_loss.sum() / masked.sum().clamp(min=1)
        return (token_loss.sum(dim=1) / t).mean() / tokens.shape[1]
