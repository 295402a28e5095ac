"""A short, seeded CPU training loop, and the two quality measures the course uses.

* :func:`train` — AdamW with weight decay, linear warm-up then cosine decay,
  gradient clipping, a ``tqdm.auto`` progress bar, periodic evaluation; returns
  a :class:`TrainingHistory` that plots itself.
* :func:`evaluate_recall` — accuracy of the argmax prediction at the scored
  positions of a :class:`~labsupport.tasks.TaskBatch` (MQAR, needle, copying).
* :func:`evaluate_perplexity` — ``exp`` of the mean cross-entropy at the scored
  positions (language modelling).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from labsupport.tasks import IGNORE_INDEX, TaskBatch

__all__ = ["TrainingHistory", "train", "sequence_loss", "evaluate_recall", "evaluate_perplexity"]


@dataclass
class TrainingHistory:
    """What happened during :func:`train`.

    Attributes:
        steps, losses: training loss after each step.
        eval_steps, eval_accuracy, eval_loss: the periodic evaluations.
        seconds: wall-clock time of the whole run.
        label: a name for legends.
    """

    label: str = "model"
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        """The last evaluated accuracy (NaN when nothing was evaluated)."""
        return self.eval_accuracy[-1] if self.eval_accuracy else float("nan")

    def plot(self, *, title: str | None = None) -> go.Figure:
        """Training loss and evaluation accuracy against step."""
        return plot_histories([self], title=title or f"Training: {self.label}")


def plot_histories(histories: list[TrainingHistory], *, title: str = "Training") -> go.Figure:
    """Loss (left axis, log) and evaluation accuracy (right axis) of several runs."""
    if not histories:
        raise ValueError("plot_histories needs at least one TrainingHistory")
    fig = go.Figure()
    for h in histories:
        fig.add_trace(go.Scatter(x=h.steps, y=h.losses, name=f"{h.label}: train loss", mode="lines"))
        if h.eval_steps:
            fig.add_trace(go.Scatter(x=h.eval_steps, y=h.eval_accuracy, name=f"{h.label}: recall",
                                     mode="lines+markers", yaxis="y2"))
    fig.update_layout(
        title=title,
        xaxis_title="training step",
        yaxis=dict(title="cross-entropy loss", type="log"),
        yaxis2=dict(title="accuracy at scored positions", overlaying="y", side="right", range=[0, 1.02],
                    tickmode="linear", tick0=0, dtick=0.2, tickformat=".0%", showgrid=False),
        legend=dict(orientation="h", y=-0.2),
        height=420,
    )
    return fig


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored positions (targets != −100)."""
    if logits.dim() != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(
            f"expected logits (B, L, V) and targets (B, L); got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate_recall(model: nn.Module, batch: TaskBatch, *, chunk: int = 256) -> float:
    """Fraction of scored positions where the model's top prediction is the target."""
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"evaluate_recall expects a TaskBatch, got {type(batch).__name__}")
    if batch.num_scored == 0:
        raise ValueError("the batch has no scored positions (all targets are -100)")
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(batch), chunk):
        inputs = batch.inputs[start : start + chunk]
        targets = batch.targets[start : start + chunk]
        predictions = model(inputs).argmax(dim=-1)
        scored = targets != IGNORE_INDEX
        correct += int((predictions[scored] == targets[scored]).sum())
    model.train(was_training)
    return correct / batch.num_scored


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, batch: TaskBatch, *, chunk: int = 64) -> float:
    """``exp`` of the mean next-token cross-entropy over the scored positions."""
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"evaluate_perplexity expects a TaskBatch, got {type(batch).__name__}")
    if batch.num_scored == 0:
        raise ValueError("the batch has no scored positions (all targets are -100)")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(batch), chunk):
        targets = batch.targets[start : start + chunk]
        logits = model(batch.inputs[start : start + chunk])
        n = int((targets != IGNORE_INDEX).sum())
        total += float(sequence_loss(logits, targets)) * n
        count += n
    model.train(was_training)
    return math.exp(total / count)


def train(
    model: nn.Module,
    make_batch: Callable[[torch.Generator], TaskBatch],
    *,
    steps: int,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.1,
    grad_clip: float = 1.0,
    seed: int = 0,
    eval_batch: TaskBatch | None = None,
    eval_every: int | None = None,
    label: str = "model",
    progress: bool = True,
) -> TrainingHistory:
    """Train ``model`` for ``steps`` steps on batches from ``make_batch(generator)``.

    The run is deterministic for a given ``seed`` on a given machine: the
    parameters are not re-initialised here (seed before building the model), but
    the data stream and dropout are seeded. The learning rate warms up linearly
    for ``warmup_fraction`` of the steps, then follows a cosine to zero.

    Args:
        model: maps token ids ``(B, L)`` to logits ``(B, L, V)``.
        make_batch: returns a training :class:`TaskBatch`; it must draw its
            randomness from the generator it is given.
        steps: optimiser steps.
        eval_batch: held-out batch scored with :func:`evaluate_recall` every
            ``eval_every`` steps (default: 10 times per run) and at the end.
        progress: show a ``tqdm.auto`` progress bar.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not callable(make_batch):
        raise TypeError("make_batch must be a function generator -> TaskBatch")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not (0.0 <= warmup_fraction < 1.0):
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    if eval_every is None:
        eval_every = max(1, steps // 10)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "embed" not in name and ".pos" not in name else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98),
    )
    warmup = max(1, int(warmup_fraction * steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history = TrainingHistory(label=label)
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc=label, disable=not progress, leave=False)
    for step in bar:
        batch = make_batch(generator)
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"make_batch must return a TaskBatch, got {type(batch).__name__}")
        loss = sequence_loss(model(batch.inputs), batch.targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss.detach())} at step {step}; try a lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        history.steps.append(step + 1)
        history.losses.append(float(loss.detach()))
        if eval_batch is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
            history.eval_steps.append(step + 1)
            history.eval_accuracy.append(evaluate_recall(model, eval_batch))
            with torch.no_grad():
                model.eval()
                history.eval_loss.append(float(sequence_loss(model(eval_batch.inputs), eval_batch.targets)))
                model.train()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", recall=f"{history.eval_accuracy[-1]:.2f}")
    bar.close()
    model.eval()
    history.seconds = time.perf_counter() - start
    return history
