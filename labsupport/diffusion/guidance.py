"""LLaDA's classifier-free guidance, without a separately trained unconditional model.

Nie et al. 2025 (LLaDA, arXiv:2502.09992) guide a masked-diffusion sampler with the same network twice: once on
the canvas as it is (prompt given) and once on the canvas with the **prompt masked too** (the model has seen
fully masked sequences in training, so this is its unconditional prediction). At the masked positions the two
log-probabilities are extrapolated away from the unconditional one,

``log p̃ = log p_u + (1 + w) · (log p_c − log p_u) = (1 + w) log p_c − w log p_u``,

which sharpens whatever the prompt adds (``w = 0`` is plain sampling). The cost is a second pass over the canvas
per step (here the two canvases go through the network as one batch of twice the size).

* :func:`guided_logits` — the guided logits of one step (masked positions guided, given ones copied through).
"""

from __future__ import annotations

import torch
from torch import nn

from labsupport.harness.validation import require_float

__all__ = ["guided_logits"]


@torch.no_grad()
def guided_logits(model: nn.Module, canvas: torch.Tensor, prompt: torch.Tensor, scale: float) -> torch.Tensor:
    """SUBS logits ``(B, L, V + 1)`` of ``canvas`` with classifier-free guidance of strength ``scale``.

    Args:
        model: a denoiser with ``mask_id`` (a :class:`~labsupport.diffusion.process.MaskedDenoiser`).
        canvas: ``(B, L)`` ids, the current canvas (prompt given, the rest partly committed, partly masked).
        prompt: ``(B, L)`` bool, the positions that are the condition (masked in the unconditional pass).
        scale: the guidance weight ``w ≥ 0``; 0 returns the model's own logits.

    At positions that are masked in ``canvas`` the data columns hold ``(1 + w) log p_c − w log p_u`` (each
    log-softmaxed over the data tokens first, so the ``[MASK]`` column's −inf never meets another −inf); the
    ``[MASK]`` column stays −inf, and every other position keeps the conditional pass's point mass.
    """
    scale = require_float("scale", scale, minimum=0.0)
    mask_id = getattr(model, "mask_id", None)
    if not isinstance(mask_id, int):
        raise TypeError("model must carry an int attribute mask_id (a MaskedDenoiser)")
    if not isinstance(canvas, torch.Tensor) or canvas.dtype != torch.long or canvas.dim() != 2:
        raise ValueError("canvas must be int64 ids of shape (batch, length)")
    if not isinstance(prompt, torch.Tensor) or prompt.dtype != torch.bool or prompt.shape != canvas.shape:
        raise ValueError(f"prompt must be a bool tensor of the canvas's shape {tuple(canvas.shape)}")
    if scale == 0.0:
        return model(canvas)
    unconditional = canvas.masked_fill(prompt, mask_id)
    both = model(torch.cat([canvas, unconditional]))
    cond, uncond = both[: canvas.shape[0]], both[canvas.shape[0]:]
    data = slice(0, mask_id)
    log_c = cond[..., data].float().log_softmax(dim=-1)
    log_u = uncond[..., data].float().log_softmax(dim=-1)
    mixed = (1.0 + scale) * log_c - scale * log_u
    out = cond.clone()
    is_mask = (canvas == mask_id)[..., None]
    out[..., data] = torch.where(is_mask, mixed.to(cond.dtype), cond[..., data])
    return out
