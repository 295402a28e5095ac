"""The quality probe every chapter runs: one call from a mixer to a recall (or perplexity) figure.

A chapter that claims "this design recalls as well as attention" trains the
same small model around each mixer, on the same task, for the same budget,
from the same seeds, and scores it the same way. :func:`probe` is that recipe
written once::

    result = probe(linear_mixer("deltanet", n_heads=1), MQARProbe(num_pairs=4), steps=600)
    result.score          # recall on the held-out MQAR batch
    result.model          # the trained model, for further analysis

    summary = probe_seeds(attention_mixer(1), MQARProbe(), steps=600, seeds=(0, 1, 2))
    summary.mean, summary.low, summary.high

The model is :class:`~labsupport.lm.model.TinyLM` with two mixer-only layers
and a short convolution by default, as in Zoology's MQAR experiments. The
random state is set exactly as a chapter would set it by hand
(``seed_everything(seed)``, then build, then train with ``seed``), so a probe
reproduces the figures of a hand-written run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn

from labsupport.harness.settings import seed_everything
from labsupport.harness.validation import require_float, require_int, require_positive_int
from labsupport.lm.contracts import ChannelMixerFactory, MixerFactory
from labsupport.lm.model import TinyLM
from labsupport.lm.tasks import CharCorpus, TaskBatch, make_mqar
from labsupport.lm.training import TrainingHistory, evaluate_perplexity, evaluate_recall, train

__all__ = ["CharLMProbe", "MQARProbe", "ProbeResult", "ProbeTask", "SeedSummary", "probe", "probe_seeds"]


class ProbeTask(Protocol):
    """What a probe trains on and how it scores: a vocabulary, a length, batches and a metric."""

    vocab_size: int
    seq_len: int
    metric: Literal["recall", "perplexity"]

    def train_batch(self, batch_size: int, generator: torch.Generator) -> TaskBatch: ...

    def eval_batch(self) -> TaskBatch: ...


@dataclass(frozen=True)
class MQARProbe:
    """Multi-query associative recall: ``num_pairs`` key-value pairs in ``seq_len`` tokens, scored by recall."""

    seq_len: int = 64
    num_pairs: int = 8
    vocab_size: int = 128
    eval_examples: int = 512
    eval_seed: int = 1234
    metric: Literal["recall", "perplexity"] = field(default="recall", init=False)

    def __post_init__(self) -> None:
        for name in ("seq_len", "num_pairs", "vocab_size", "eval_examples"):
            require_positive_int(name, getattr(self, name))
        require_int("eval_seed", self.eval_seed)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        return make_mqar(batch_size, self.seq_len, self.num_pairs, self.vocab_size, generator=generator)

    def eval_batch(self) -> TaskBatch:
        return make_mqar(self.eval_examples, self.seq_len, self.num_pairs, self.vocab_size, seed=self.eval_seed)


@dataclass(frozen=True)
class CharLMProbe:
    """Character-level language modelling on a shipped corpus, scored by validation perplexity."""

    corpus: CharCorpus
    seq_len: int = 128
    eval_examples: int = 64
    eval_seed: int = 1234
    metric: Literal["recall", "perplexity"] = field(default="perplexity", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, CharCorpus):
            raise TypeError(f"corpus must be a CharCorpus, got {type(self.corpus).__name__}")
        for name in ("seq_len", "eval_examples"):
            require_positive_int(name, getattr(self, name))

    @property
    def vocab_size(self) -> int:
        return self.corpus.vocab_size

    def train_batch(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        return self.corpus.sample_batch(batch_size, self.seq_len, generator=generator)

    def eval_batch(self) -> TaskBatch:
        return self.corpus.sample_batch(self.eval_examples, self.seq_len, split="val", seed=self.eval_seed)


@dataclass
class ProbeResult:
    """One probe run: the score, the trained model and its training history."""

    label: str
    metric: Literal["recall", "perplexity"]
    score: float
    model: nn.Module
    history: TrainingHistory
    seed: int

    @property
    def seconds(self) -> float:
        """Wall-clock seconds of the training run."""
        return self.history.seconds


@dataclass(frozen=True)
class SeedSummary:
    """The score of one design over several seeds."""

    label: str
    metric: Literal["recall", "perplexity"]
    scores: tuple[float, ...]
    seeds: tuple[int, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def low(self) -> float:
        return min(self.scores)

    @property
    def high(self) -> float:
        return max(self.scores)

    def __str__(self) -> str:
        if self.metric == "recall":
            return (f"{self.label}: recall {self.mean:.1%} (range {self.low:.1%}-{self.high:.1%}, "
                    f"{len(self.seeds)} seeds)")
        return (f"{self.label}: perplexity {self.mean:.2f} (range {self.low:.2f}-{self.high:.2f}, "
                f"{len(self.seeds)} seeds)")


def probe(
    sequence_mixer: str | MixerFactory,
    task: ProbeTask | None = None,
    *,
    steps: int,
    lr: float = 1e-2,
    seed: int = 0,
    batch_size: int = 64,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 1,
    short_conv: int = 4,
    channel_mixer: str | ChannelMixerFactory | None = None,
    positional: str = "learned",
    eval_every: int | None = None,
    label: str = "model",
    progress: bool = True,
    build: Callable[[], nn.Module] | None = None,
    stop_at: float | None = None,
) -> ProbeResult:
    """Train a small model around ``sequence_mixer`` on ``task`` for ``steps`` steps and score it.

    Args:
        sequence_mixer: ``"attention"`` or a mixer factory (see :class:`~labsupport.lm.model.TinyLM`).
        task: an :class:`MQARProbe` (default: 8 pairs in 64 tokens) or a :class:`CharLMProbe`.
        steps, lr, batch_size: the training budget (state it next to every figure).
        seed: seeds the model's initialisation and the data stream.
        d_model, n_layers, n_heads, short_conv, channel_mixer, positional: the model
            (``n_heads`` only matters for ``"attention"``).
        eval_every: evaluations during training (default: once, at the end).
        build: build the model yourself instead (called after seeding); the other
            model arguments are then ignored.
        stop_at: for a recall task, stop at the first evaluation (every ``eval_every`` steps) whose recall
            reaches this fraction; ``steps`` is then the cap. Same schedule as the full run, so a stopped run
            equals the full run up to that step. ``result.history.steps[-1]`` is where it stopped.

    Returns:
        A :class:`ProbeResult`: recall (fraction) or perplexity on the task's held-out batch.
    """
    task = MQARProbe() if task is None else task
    steps = require_positive_int("steps", steps)
    batch_size = require_positive_int("batch_size", batch_size)
    require_float("lr", lr, positive=True)
    seed_everything(seed)
    if build is not None:
        model = build()
    else:
        model = TinyLM(task.vocab_size, d_model=d_model, n_layers=n_layers, max_len=task.seq_len,
                       sequence_mixer=sequence_mixer, channel_mixer=channel_mixer, n_heads=n_heads,
                       short_conv=short_conv, positional=positional)
    eval_batch = task.eval_batch()
    if stop_at is not None and task.metric != "recall":
        raise ValueError(f"stop_at works for recall tasks (higher is better); this task reports {task.metric}")
    evaluate = evaluate_recall if task.metric == "recall" else evaluate_perplexity
    history = train(model, lambda g: task.train_batch(batch_size, g), steps=steps, lr=lr, seed=seed,
                    eval_batch=eval_batch, eval_every=steps if eval_every is None else eval_every,
                    evaluate=evaluate, label=label, progress=progress, stop_at=stop_at)
    return ProbeResult(label, task.metric, history.eval_accuracy[-1], model, history, seed)


def probe_seeds(sequence_mixer: str | MixerFactory, task: ProbeTask | None = None, *, steps: int,
                seeds: Sequence[int] = (0, 1, 2), label: str = "model", **options: object) -> SeedSummary:
    """:func:`probe` once per seed (same budget each time); the scores and their mean and range."""
    if len(seeds) == 0:
        raise ValueError("seeds must name at least one seed")
    checked = tuple(require_int(f"seeds[{i}]", s) for i, s in enumerate(seeds))
    scores = [probe(sequence_mixer, task, steps=steps, seed=s, label=f"{label} (seed {s})", **options).score
              for s in checked]
    metric = (task or MQARProbe()).metric
    return SeedSummary(label, metric, tuple(scores), checked)
