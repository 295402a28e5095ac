"""The forward masking process, the denoiser, and the continuous-time (MDLM / LLaDA) objective.

* :func:`mask_probability`, :func:`loss_weight` — a masking schedule: the probability ``1 − α(t)`` that a token
  is masked at time ``t ∈ (0, 1]`` and the ELBO weight ``−α'(t) / (1 − α(t))`` (``1/t`` for the linear schedule).
* :func:`mask_tokens` — the forward process: each token independently becomes ``[MASK]`` with probability ``t``.
* :func:`masked_diffusion_loss` — cross-entropy at the masked positions, weighted by ``1/t``, per token.
* :class:`MaskedDenoiser` — a bidirectional :class:`~labsupport.lm.model.TinyLM` behind the "SUBS"
  parameterisation: it never predicts ``[MASK]`` and copies every unmasked token through.
* :class:`DiffusionObjective` — :class:`labsupport.lm.objectives.MaskedTokenObjective` (which already draws
  ``t``, masks and weights by ``1/t``) made device-aware: the noise is drawn from the trainer's CPU
  generator and moved to the tokens' device, so a GPU run masks exactly the tokens a CPU run masks.
* :func:`elbo_per_sequence` — a Monte-Carlo estimate of the bound ``E_t[(1/t) Σ_masked −log p]`` in nats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.numerics import accumulation_dtype
from labsupport.harness.validation import require_choice, require_float_tensor, require_int, require_positive_int
from labsupport.lm.model import TinyLM
from labsupport.lm.objectives import MaskedTokenObjective

__all__ = [
    "SCHEDULES",
    "DiffusionObjective",
    "MaskedDenoiser",
    "elbo_per_sequence",
    "loss_weight",
    "mask_probability",
    "mask_tokens",
    "masked_diffusion_loss",
    "subs_logits",
]

#: The masking schedules: ``linear`` (``α(t) = 1 − t``, MDLM's log-linear noise and LLaDA's) and ``cosine``
#: (``α(t) = cos(πt/2)``, so ``1 − α = 2 sin²(πt/4)``, the form that does not cancel at small ``t``).
SCHEDULES = ("linear", "cosine")


def _require_times(t: torch.Tensor) -> torch.Tensor:
    t = require_float_tensor("t", t)
    if bool(((t <= 0) | (t > 1) | ~torch.isfinite(t)).any()):
        raise ValueError(f"times t must lie in (0, 1]; got values from {float(t.min()):.3g} to {float(t.max()):.3g}")
    return t


def mask_probability(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """``1 − α(t)``: the probability that a token is masked at time ``t`` (0 at ``t → 0``, 1 at ``t = 1``).

    The cosine schedule's ``1 − cos(πt/2)`` is computed as ``2 sin²(πt/4)``: the difference of two numbers
    near 1 would round to 0 in float32 for ``t ≲ 3e-4`` (and lose every digit well before that).
    """
    require_choice("schedule", schedule, SCHEDULES)
    t = _require_times(t)
    if schedule == "linear":
        return t.clone()
    return 2.0 * torch.sin(0.25 * math.pi * t) ** 2


def loss_weight(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """The ELBO weight ``−α'(t) / (1 − α(t))`` of the masked cross-entropy.

    ``1/t`` for the linear schedule; ``(π/2) · cot(πt/4)`` for the cosine one (the quotient
    ``(π/2) sin(πt/2) / (1 − cos(πt/2))`` simplified, so that it stays finite and accurate at small ``t``).
    """
    require_choice("schedule", schedule, SCHEDULES)
    t = _require_times(t)
    if schedule == "linear":
        return 1.0 / t
    return 0.5 * math.pi / torch.tan(0.25 * math.pi * t)


def mask_tokens(tokens: torch.Tensor, mask_prob: torch.Tensor, mask_id: int, uniform: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process, with its randomness given: ``(noisy, masked)``.

    Token ``(b, i)`` is masked exactly when ``uniform[b, i] < mask_prob[b]``; a masked token becomes ``mask_id``.

    Args:
        tokens: clean ids ``(B, L)``, int64, none equal to ``mask_id``.
        mask_prob: ``(B,)`` masking probability of each sequence (``t`` for the linear schedule).
        mask_id: the id of ``[MASK]``.
        uniform: ``(B, L)`` draws from U(0, 1).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be int64 ids of shape (batch, length); got {_shape_of(tokens)}")
    mask_id = require_int("mask_id", mask_id, minimum=0)
    if bool((tokens == mask_id).any()):
        raise ValueError(f"the clean tokens already contain mask_id={mask_id}")
    mask_prob = require_float_tensor("mask_prob", mask_prob, ndim=1)
    uniform = require_float_tensor("uniform", uniform, ndim=2)
    if mask_prob.shape[0] != tokens.shape[0] or uniform.shape != tokens.shape:
        raise ValueError(f"expected mask_prob (B,) and uniform (B, L) for tokens {tuple(tokens.shape)}; got "
                         f"{tuple(mask_prob.shape)} and {tuple(uniform.shape)}")
    masked = uniform < mask_prob[:, None]
    return tokens.masked_fill(masked, mask_id), masked


def masked_diffusion_loss(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor,
                          weight: torch.Tensor) -> torch.Tensor:
    """The weighted masked cross-entropy, in nats per token: ``mean_b [weight_b · Σ_{i masked} CE_bi] / L``.

    With ``weight = 1/t`` (linear schedule) and ``t ~ U(0, 1)`` its expectation is the negative ELBO per token,
    an upper bound on ``−log p(x) / L``. Unmasked positions contribute nothing: the model copies them.

    Args:
        logits: ``(B, L, V)`` predictions for the clean tokens.
        tokens: ``(B, L)`` clean ids.
        masked: ``(B, L)`` bool, which positions were masked.
        weight: ``(B,)`` the ELBO weight of each sequence's time.
    """
    logits = require_float_tensor("logits", logits, ndim=3)
    if tokens.shape != logits.shape[:2] or masked.shape != tokens.shape or masked.dtype != torch.bool:
        raise ValueError(f"expected tokens (B, L) and a bool masked (B, L) for logits {tuple(logits.shape)}; got "
                         f"{_shape_of(tokens)} and {_shape_of(masked)}")
    weight = require_float_tensor("weight", weight, ndim=1)
    # Cross-entropy only where masked (an unmasked position's logits may be -inf off its own token), accumulated
    # in float32 at least (float64 stays float64).
    dtype = accumulation_dtype(logits.dtype)
    safe = torch.where(masked[..., None], logits.to(dtype), torch.zeros((), dtype=dtype, device=logits.device))
    token_loss = F.cross_entropy(safe.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
    token_loss = token_loss.view_as(tokens) * masked
    return (weight.to(dtype) * token_loss.sum(dim=1)).mean() / tokens.shape[1]


def subs_logits(logits: torch.Tensor, noisy: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The "SUBS" parameterisation (MDLM): no probability on ``[MASK]``; unmasked tokens copied through.

    At a masked position the logits are kept with the ``mask_id`` column at −inf; at an unmasked position the
    distribution is a point mass on the token already there (0 for it, −inf elsewhere).
    """
    vocab = logits.shape[-1]
    if not 0 <= mask_id < vocab:
        raise ValueError(f"mask_id={mask_id} is outside the logits' vocabulary of {vocab}")
    is_mask = (noisy == mask_id)[..., None]
    predicted = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    carried = torch.full_like(logits, float("-inf")).scatter(-1, noisy[..., None], 0.0)
    return torch.where(is_mask, predicted, carried)


class MaskedDenoiser(nn.Module):
    """A masked-diffusion denoiser: a bidirectional ``TinyLM`` over ``vocab_size + 1`` ids, the last is ``[MASK]``.

    ``forward(noisy)`` returns logits ``(B, L, vocab_size + 1)`` in the SUBS parameterisation
    (:func:`subs_logits`): the mask column is −inf everywhere, and an unmasked position predicts itself.

    Args:
        vocab_size: number of data tokens (``mask_id = vocab_size``).
        d_model, n_layers, n_heads, max_len: the backbone's shape (softmax attention + MLP blocks).
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2, *, n_heads: int = 4,
                 max_len: int = 128) -> None:
        super().__init__()
        vocab_size = require_positive_int("vocab_size", vocab_size)
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.backbone = TinyLM(vocab_size + 1, d_model, n_layers, max_len, n_heads=n_heads, causal=False)

    @property
    def max_len(self) -> int:
        return self.backbone.max_len

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        """Noisy ids ``(B, L)`` (data ids and ``mask_id``) to SUBS logits ``(B, L, vocab_size + 1)``."""
        if not isinstance(noisy, torch.Tensor) or noisy.dtype != torch.long or noisy.dim() != 2:
            raise ValueError(f"noisy must be int64 ids of shape (batch, length); got {_shape_of(noisy)}")
        if noisy.numel() and bool(((noisy < 0) | (noisy > self.mask_id)).any()):
            bad = noisy[(noisy < 0) | (noisy > self.mask_id)]
            raise ValueError(f"token ids must lie in 0..{self.mask_id} (data ids, then mask_id={self.mask_id}); "
                             f"got {int(bad[0])}")
        if noisy.shape[1] > self.max_len:
            raise ValueError(f"a canvas of {noisy.shape[1]} positions is longer than the model's "
                             f"max_len={self.max_len}")
        return subs_logits(self.backbone(noisy), noisy, self.mask_id)


class DiffusionObjective(MaskedTokenObjective):
    """``lm``'s :class:`~labsupport.lm.objectives.MaskedTokenObjective` for tokens on any device.

    Same draws as the parent (``t ~ U(t_min, 1)``, a token masked with probability ``t``, loss weighted by
    ``1/t``), taken from the trainer's CPU generator and then moved to the tokens' device. With ``t_min > 0`` the
    expected loss is the bound's integral over ``[t_min, 1]`` rescaled by ``1/(1 − t_min)``: not a bound. It
    moves by about ``t_min`` × (NLL − the sum of the one-masked-token losses), so a sequence whose tokens are each
    unlikely given all the others can score *below* its exact NLL
    (:func:`~labsupport.diffusion.exact.truncated_objective` computes it exactly).
    """

    def corrupt(self, tokens: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if tokens.device.type == "cpu":
            return super().corrupt(tokens, generator)
        noisy, masked, t = super().corrupt(tokens.cpu(), generator)
        return noisy.to(tokens.device), masked.to(tokens.device), t.to(tokens.device)


@torch.no_grad()
def elbo_per_sequence(model: nn.Module, tokens: torch.Tensor, *, samples: int = 16,
                      schedule: str = "linear", generator: torch.Generator | None = None,
                      where: torch.Tensor | None = None, max_rows: int = 256) -> torch.Tensor:
    """Monte-Carlo estimate of the negative ELBO of each sequence, in nats: ``(B,)``.

    ``samples`` times ``t`` are stratified over (0, 1] (one uniform draw in each of ``samples`` equal slices,
    which lowers the variance without bias), a fresh mask is drawn for each, and
    ``weight(t) · Σ_masked −log p(x_i | x_t)`` is averaged. Divide by ``L`` for nats per token.

    With ``where`` (bool ``(B, L)``), only those positions are ever masked: the result bounds
    ``−log p(x_where | the other positions)``, the conditional likelihood of an infilled span.
    ``max_rows`` caps the rows of one network call (memory).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be int64 ids of shape (batch, length); got {_shape_of(tokens)}")
    samples = require_positive_int("samples", samples)
    max_rows = require_positive_int("max_rows", max_rows)
    require_choice("schedule", schedule, SCHEDULES)
    mask_id = getattr(model, "mask_id", None)
    if not isinstance(mask_id, int):
        raise TypeError("model must carry an int attribute mask_id (a MaskedDenoiser)")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    b, length = tokens.shape
    if where is not None and (not isinstance(where, torch.Tensor) or where.dtype != torch.bool
                              or where.shape != tokens.shape):
        raise ValueError(f"where must be a bool tensor of the tokens' shape {tuple(tokens.shape)}")
    # All samples of a chunk of sequences go through the network in one batch of at most ~max_rows rows.
    slices = torch.arange(samples, dtype=torch.float64)
    t = ((slices[None, :] + torch.rand(b, samples, generator=gen, dtype=torch.float64)) / samples).clamp(min=1e-6)
    uniform = torch.rand(b, samples, length, generator=gen, dtype=torch.float64)
    clean = tokens.cpu()
    total = torch.zeros(b, dtype=torch.float64)
    per_chunk = max(1, max_rows // samples)
    for lo in range(0, b, per_chunk):
        hi = min(b, lo + per_chunk)
        rows = clean[lo:hi].repeat_interleave(samples, dim=0)                 # (n·S, L)
        times = t[lo:hi].reshape(-1)
        noisy, masked = mask_tokens(rows, mask_probability(times, schedule), mask_id,
                                    uniform[lo:hi].reshape(-1, length))
        if where is not None:
            masked = masked & where[lo:hi].cpu().repeat_interleave(samples, dim=0)
            noisy = torch.where(masked, noisy, rows)
        logits = model(noisy.to(tokens.device)).float().cpu()
        safe = torch.where(masked[..., None], logits, torch.zeros(()))
        nll = F.cross_entropy(safe.reshape(-1, logits.shape[-1]), rows.reshape(-1), reduction="none")
        weighted = loss_weight(times, schedule) * (nll.view(-1, length) * masked).sum(dim=1).double()
        total[lo:hi] = weighted.view(hi - lo, samples).sum(dim=1)
    return (total / samples).to(torch.float32)


def _shape_of(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
