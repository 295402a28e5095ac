"""The trainer learns, is deterministic, and its evaluators count correctly."""

from __future__ import annotations

import math

import pytest
import torch

from labsupport.lm.model import TinyLM
from labsupport.lm.tasks import IGNORE_INDEX, TaskBatch, make_mqar
from labsupport.harness.plotting import plot_histories
from labsupport.lm.objectives import sequence_loss
from labsupport.lm.training import evaluate_perplexity, evaluate_recall, train


class Oracle(torch.nn.Module):
    """Predicts the target wherever one exists (cheats, for testing the evaluators)."""

    def __init__(self, batch: TaskBatch, vocab: int, wrong_every: int = 0):
        super().__init__()
        self.batch, self.vocab, self.wrong_every = batch, vocab, wrong_every

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        target = self.batch.targets.clamp(min=0)
        if self.wrong_every:
            target = torch.where(torch.arange(target.numel()).view_as(target) % self.wrong_every == 0,
                                 (target + 1) % self.vocab, target)
        logits.scatter_(-1, target[..., None], 10.0)
        return logits


def test_evaluate_recall_counts_scored_positions_only():
    batch = make_mqar(8, 32, 4, 32, seed=0)
    assert evaluate_recall(Oracle(batch, 32), batch) == 1.0
    partly = evaluate_recall(Oracle(batch, 32, wrong_every=3), batch)
    assert 0.0 < partly < 1.0
    with pytest.raises(ValueError, match="no scored positions"):
        evaluate_recall(Oracle(batch, 32), TaskBatch(batch.inputs, torch.full_like(batch.targets, IGNORE_INDEX)))
    with pytest.raises(TypeError, match="TaskBatch"):
        evaluate_recall(Oracle(batch, 32), batch.inputs)


def test_perplexity_of_uniform_model_is_vocab_size():
    batch = make_mqar(4, 16, 2, 16, seed=0)

    class Uniform(torch.nn.Module):
        def forward(self, tokens):
            return torch.zeros(*tokens.shape, 16)

    assert math.isclose(evaluate_perplexity(Uniform(), batch), 16.0, rel_tol=1e-6)


def test_training_learns_and_is_deterministic():
    def run():
        torch.manual_seed(0)
        model = TinyLM(32, 32, 1, 16, channel_mixer=None, n_heads=2, short_conv=3)
        history = train(model, lambda g: make_mqar(32, 16, 2, 32, generator=g), steps=60, lr=1e-2,
                        eval_batch=make_mqar(64, 16, 2, 32, seed=99), progress=False, label="t")
        return history

    a, b = run(), run()
    assert a.losses == b.losses
    assert a.losses[-1] < a.losses[0] * 0.8
    assert len(a.eval_accuracy) == 10 and a.eval_steps[-1] == 60
    fig = plot_histories([a, b])
    assert len(fig.data) == 4


def test_train_bad_arguments():
    model = TinyLM(8, 8, 1, 8)
    with pytest.raises(ValueError, match="steps"):
        train(model, lambda g: None, steps=0)
    with pytest.raises(TypeError, match="TaskBatch"):
        train(model, lambda g: "nope", steps=1, progress=False)
    with pytest.raises(ValueError, match="logits"):
        sequence_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
