"""Revising committed tokens: ReMDM-style remasking (Wang et al. 2025, arXiv:2503.00307).

The samplers of :mod:`labsupport.diffusion.sampling` never change a committed token, so an early mistake — made
when the canvas held almost nothing — stays for ever. ReMDM's reverse step may **remask** tokens that were already
decoded, so the model predicts them again with more of the sequence in view. Its paper draws the remasking with a
per-token probability ``σ_t`` under several schedules; one of them ("loop") decodes normally up to a point, then
spends extra steps in which each step remasks some decoded tokens and decodes the same number again, and its
"confidence" variant prefers to remask tokens that were decoded with low confidence.

What is built here is a **count** version of that loop, so that it fits the chapter's transfer schedule and
compares at an equal number of network calls:

* the first ``steps − loop_steps`` steps are plain low-confidence decoding of every mask;
* from the last of them on, each step (except the final one) also remasks ``remask`` of the generated tokens it
  did not commit in that step — the ones committed with the **lowest confidence** (the probability recorded when
  they were committed), or **random** ones;
* each loop step commits every mask on the canvas (those remasked by the step before), surest first.

With ``loop_steps = 0`` this is exactly :func:`~labsupport.diffusion.sampling.diffusion_sample` with
low-confidence remasking (a test holds it).

* :func:`remask_tokens` — one step's remasking.
* :func:`revision_sample` — the loop.
"""

from __future__ import annotations

import torch
from torch import nn

from labsupport.diffusion.sampling import SampleTrace, _sample_tokens, commit_tokens, transfer_schedule
from labsupport.harness.validation import require_choice, require_float, require_int, require_positive_int

__all__ = ["REVISION", "remask_tokens", "revision_sample"]

#: Which committed tokens a revision step remasks.
REVISION = ("lowest_confidence", "random")


def remask_tokens(canvas: torch.Tensor, eligible: torch.Tensor, score: torch.Tensor, count: int, mask_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Put ``mask_id`` back at the ``count`` ``eligible`` positions of each row with the **highest** ``score``.

    Returns the new canvas and the bool ``(B, L)`` of positions remasked (fewer than ``count`` in a row with fewer
    eligible positions). ``canvas (B, L)`` int64; ``eligible`` bool and ``score`` float of the same shape.
    """
    if not isinstance(canvas, torch.Tensor) or canvas.dtype != torch.long or canvas.dim() != 2:
        raise ValueError("canvas must be int64 ids of shape (batch, length)")
    for name, value in (("eligible", eligible), ("score", score)):
        if not isinstance(value, torch.Tensor) or value.shape != canvas.shape:
            raise ValueError(f"{name} must have the canvas's shape {tuple(canvas.shape)}")
    if eligible.dtype != torch.bool:
        raise ValueError("eligible must be a bool tensor")
    count = require_int("count", count, minimum=0)
    mask_id = require_int("mask_id", mask_id, minimum=0)
    ranked = torch.where(eligible, score.float(), float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(canvas.shape[1]).expand_as(order).contiguous())
    chosen = eligible & (rank < count)
    return canvas.masked_fill(chosen, mask_id), chosen


@torch.no_grad()
def revision_sample(model: nn.Module, canvas: torch.Tensor, *, steps: int, loop_steps: int, remask: int,
                    choose: str = "lowest_confidence", temperature: float = 0.0,
                    generator: torch.Generator | None = None, record: bool = False) -> SampleTrace:
    """Fill every mask of ``canvas`` in ``steps`` denoiser calls, revising committed tokens in the last ``loop_steps``.

    Args:
        model: a :class:`~labsupport.diffusion.process.MaskedDenoiser`.
        canvas: ``(B, L)`` ids, every row with the same number of masks (a prompt and a masked answer).
        steps: denoiser calls in all (the same budget as ``diffusion_sample(steps=...)``).
        loop_steps: of those, the steps spent revising (``0 ≤ loop_steps < steps``).
        remask: generated tokens remasked per revising step (``0`` turns revision off).
        choose: ``"lowest_confidence"`` (ReMDM's confidence variant, made deterministic) or ``"random"``.
        temperature, generator, record: as for :func:`~labsupport.diffusion.sampling.diffusion_sample`.

    ``trace.confidence`` holds each token's probability when it was (last) committed; ``trace.commit_step`` the
    step of its last commit.
    """
    mask_id = getattr(model, "mask_id", None)
    if not isinstance(mask_id, int):
        raise TypeError("model must carry an int attribute mask_id (a MaskedDenoiser)")
    if not isinstance(canvas, torch.Tensor) or canvas.dim() != 2 or canvas.dtype != torch.long:
        raise ValueError("canvas must be int64 ids of shape (batch, length)")
    steps = require_positive_int("steps", steps)
    loop_steps = require_int("loop_steps", loop_steps, minimum=0, maximum=steps - 1)
    remask = require_int("remask", remask, minimum=0)
    require_choice("choose", choose, REVISION)
    temperature = require_float("temperature", temperature, minimum=0.0)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x = canvas.clone()
    generated = x == mask_id
    per_row = generated.sum(dim=1)
    if bool((per_row != per_row[0]).any()):
        raise ValueError(f"every row must hold the same number of masks; got {per_row.tolist()}")
    base_steps = steps - loop_steps
    counts = transfer_schedule(int(per_row[0]), base_steps)
    commit_step = torch.full(x.shape, -1, dtype=torch.long)
    confidence = torch.ones(x.shape, dtype=torch.float32)
    trace = SampleTrace(x, commit_step, confidence)
    for step in range(steps):
        logits = model(x)
        trace.forward_tokens += x.numel()
        predicted, probs = _sample_tokens(logits, temperature, gen)
        p_pred = probs.gather(-1, predicted[..., None]).squeeze(-1)
        still = x == mask_id
        if step < base_steps:
            how_many = counts[step].expand(x.shape[0])
        else:
            how_many = still.sum(dim=1)                   # a revising step re-decodes every mask
        x, now = commit_tokens(x, predicted, p_pred, how_many, torch.ones_like(still), mask_id)
        commit_step[now] = step
        confidence[now] = p_pred[now]
        if remask and base_steps - 1 <= step < steps - 1:
            eligible = generated & ~now & (x != mask_id)
            score = -confidence if choose == "lowest_confidence" else torch.rand(x.shape, generator=gen)
            x, _ = remask_tokens(x, eligible, score, remask, mask_id)
        if record:
            trace.frames.append(x.clone())
    trace.tokens, trace.steps = x, steps
    return trace
