"""A short, seeded CPU training loop, and the two quality measures the course uses.

* :func:`train` — AdamW with weight decay, linear warm-up then cosine decay,
  gradient clipping, a ``tqdm.auto`` progress bar, periodic evaluation; returns
  a :class:`TrainingHistory` that plots itself. The loss is a pluggable
  objective (:mod:`labsupport.lm.objectives`; next-token by default) plus every
  auxiliary loss the model's modules report, and the modules' metrics (tokens
  per expert, say) are recorded at every step (hooks: :mod:`labsupport.lm.contracts`).
* :func:`evaluate_recall` — accuracy of the argmax prediction at the scored
  positions of a :class:`~labsupport.lm.tasks.TaskBatch` (MQAR, needle, copying).
* :func:`evaluate_perplexity` — ``exp`` of the mean cross-entropy at the scored
  positions (language modelling).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from labsupport.harness.validation import require_callable, require_float, require_positive_int, require_probability
from labsupport.lm.contracts import AuxiliaryLossSource, MetricSource
from labsupport.lm.objectives import Objective, next_token_loss, sequence_loss
from labsupport.lm.tasks import IGNORE_INDEX, TaskBatch

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = [
    "TrainingHistory",
    "auxiliary_losses",
    "evaluate_perplexity",
    "evaluate_recall",
    "train",
    "training_metrics",
]


@dataclass
class TrainingHistory:
    """What happened during :func:`train`.

    Attributes:
        steps, losses: training loss after each step.
        eval_steps, eval_accuracy, eval_loss: the periodic evaluations.
        aux_losses: each auxiliary loss (by ``"module.name"``) at every step.
        metrics: each module metric (by ``"module.name"``) at every step.
        seconds: wall-clock time of the whole run.
        label: a name for legends.
    """

    label: str = "model"
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    aux_losses: dict[str, list[float]] = field(default_factory=dict)
    metrics: dict[str, list[float | list[float]]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        """The last evaluated accuracy (NaN when nothing was evaluated)."""
        return self.eval_accuracy[-1] if self.eval_accuracy else float("nan")

    def plot(self, *, title: str | None = None) -> go.Figure:
        """Training loss and evaluation accuracy against step."""
        from labsupport.harness.plotting import plot_histories

        return plot_histories([self], title=title or f"Training: {self.label}")


def auxiliary_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """The auxiliary losses of the model's latest forward pass, by ``"module_path.loss_name"``."""
    found: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, AuxiliaryLossSource):
            for name, value in module.auxiliary_losses().items():
                found[f"{path}.{name}" if path else name] = value
    return found


def training_metrics(model: nn.Module) -> dict[str, float | list[float]]:
    """The metrics of the model's latest forward pass, by ``"module_path.metric_name"``."""
    found: dict[str, float | list[float]] = {}
    for path, module in model.named_modules():
        if isinstance(module, MetricSource):
            for name, value in module.training_metrics().items():
                key = f"{path}.{name}" if path else name
                if isinstance(value, torch.Tensor):
                    value = value.detach().tolist()
                elif isinstance(value, Sequence):
                    value = [float(v) for v in value]
                found[key] = value if isinstance(value, list) else float(value)
    return found


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
    objective: Objective = next_token_loss,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.1,
    grad_clip: float = 1.0,
    seed: int = 0,
    eval_batch: TaskBatch | None = None,
    eval_every: int | None = None,
    evaluate: Callable[[nn.Module, TaskBatch], float] = evaluate_recall,
    label: str = "model",
    progress: bool = True,
    stop_at: float | None = None,
) -> TrainingHistory:
    """Train ``model`` for ``steps`` steps on batches from ``make_batch(generator)``.

    The run is deterministic for a given ``seed`` on a given machine: the
    parameters are not re-initialised here (seed before building the model), but
    the data stream, the objective's own randomness and dropout are seeded. The
    learning rate warms up linearly for ``warmup_fraction`` of the steps, then
    follows a cosine to zero.

    The loss of a step is ``objective(model, batch, generator)`` plus the sum of
    every auxiliary loss that the model's modules report after that forward pass
    (:class:`~labsupport.lm.contracts.AuxiliaryLossSource`); the modules' metrics
    (:class:`~labsupport.lm.contracts.MetricSource`) are recorded too.

    Args:
        model: maps token ids ``(B, L)`` to logits ``(B, L, V)``.
        make_batch: returns a training :class:`TaskBatch`; it must draw its
            randomness from the generator it is given.
        steps: optimiser steps.
        objective: the loss (default: next-token cross-entropy at the scored
            positions; see :mod:`labsupport.lm.objectives`).
        eval_batch: held-out batch scored with ``evaluate`` (default
            :func:`evaluate_recall`) every ``eval_every`` steps (default: 10 times
            per run) and at the end; its objective loss is recorded too.
        progress: show a ``tqdm.auto`` progress bar.
        stop_at: stop after the first evaluation whose score (``evaluate``, higher is better) reaches this
            value — "train to convergence" with ``steps`` as the cap. The learning-rate schedule is still the
            one of a ``steps``-long run, so a stopped run is exactly the first part of the full run.
    """
    steps = require_positive_int("steps", steps)
    if stop_at is not None:
        stop_at = require_float("stop_at", stop_at)
        if eval_batch is None:
            raise ValueError("stop_at needs an eval_batch to evaluate on; pass one, or leave stop_at=None")
    require_callable("make_batch", make_batch)
    require_callable("objective", objective)
    require_callable("evaluate", evaluate)
    lr = require_float("lr", lr, positive=True)
    warmup_fraction = require_probability("warmup_fraction", warmup_fraction, open_right=True)
    if eval_every is None:
        eval_every = max(1, steps // 10)
    eval_every = require_positive_int("eval_every", eval_every)
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
        loss = objective(model, batch, generator)
        extra = auxiliary_losses(model)
        _record(history.aux_losses, extra)
        _record(history.metrics, training_metrics(model))
        if extra:
            loss = loss + sum(extra.values())
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
            history.eval_accuracy.append(evaluate(model, eval_batch))
            with torch.no_grad():
                model.eval()
                eval_generator = torch.Generator().manual_seed(seed)
                history.eval_loss.append(float(objective(model, eval_batch, eval_generator)))
                model.train()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", recall=f"{history.eval_accuracy[-1]:.2f}")
            if stop_at is not None and history.eval_accuracy[-1] >= stop_at:
                break
    bar.close()
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def _record(log: dict[str, list], values: Mapping[str, object]) -> None:
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            value = float(value.detach()) if value.numel() == 1 else value.detach().tolist()
        log.setdefault(name, []).append(value)
