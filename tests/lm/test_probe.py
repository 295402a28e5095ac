"""labsupport.lm.probe: one call gives what the hand-written recipe gives."""

from __future__ import annotations

import pytest
import torch

from labsupport.harness.settings import seed_everything
from labsupport.lm.model import TinyLM
from labsupport.lm.probe import CharLMProbe, MQARProbe, SeedSummary, probe, probe_seeds
from labsupport.lm.tasks import CharCorpus, make_mqar
from labsupport.lm.training import evaluate_recall, train

TASK = MQARProbe(seq_len=32, num_pairs=4, vocab_size=64, eval_examples=64, eval_seed=7)


def test_probe_reproduces_the_hand_written_recipe_exactly() -> None:
    seed_everything(0)
    model = TinyLM(64, d_model=32, n_layers=2, max_len=32, sequence_mixer="attention", channel_mixer=None,
                   n_heads=1, short_conv=4)
    eval_batch = make_mqar(64, 32, 4, 64, seed=7)
    train(model, lambda g: make_mqar(64, 32, 4, 64, generator=g), steps=6, lr=1e-2, eval_batch=eval_batch,
          eval_every=6, progress=False)
    by_hand = evaluate_recall(model, eval_batch)

    result = probe("attention", TASK, steps=6, d_model=32, progress=False)
    assert result.score == by_hand
    assert result.metric == "recall" and result.history.steps[-1] == 6
    for (name, a), (_, b) in zip(model.state_dict().items(), result.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_probe_seeds_summarises_several_runs() -> None:
    summary = probe_seeds("attention", TASK, steps=3, seeds=(0, 1), d_model=16, progress=False, label="softmax")
    assert isinstance(summary, SeedSummary) and summary.seeds == (0, 1) and len(summary.scores) == 2
    assert summary.low <= summary.mean <= summary.high
    assert "softmax: recall" in str(summary) and "2 seeds" in str(summary)
    single = probe("attention", TASK, steps=3, seed=1, d_model=16, progress=False)
    assert summary.scores[1] == single.score


def test_probe_scores_perplexity_on_a_character_corpus() -> None:
    task = CharLMProbe(CharCorpus.from_data("shakespeare.txt", max_chars=5_000), seq_len=16, eval_examples=8)
    result = probe("attention", task, steps=2, d_model=16, progress=False)
    assert result.metric == "perplexity"
    assert 1.0 < result.score < 2 * task.vocab_size  # a barely trained model is near uniform


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: probe("attention", TASK, steps=0), ValueError),
        (lambda: probe("attention", TASK, steps=1, lr=-1.0), ValueError),
        (lambda: probe("attention", TASK, steps=1, batch_size=1.5), TypeError),
        (lambda: probe_seeds("attention", TASK, steps=1, seeds=()), ValueError),
        (lambda: MQARProbe(num_pairs=0), ValueError),
        (lambda: CharLMProbe("not a corpus"), TypeError),
    ],
)
def test_probe_rejects_bad_input(call, error) -> None:
    with pytest.raises(error):
        call()


def test_stop_at_cuts_the_same_run_short_and_only_when_reached() -> None:
    full = probe("attention", TASK, steps=12, d_model=16, eval_every=4, progress=False)
    stopped = probe("attention", TASK, steps=12, d_model=16, eval_every=4, progress=False, stop_at=0.0)
    assert stopped.history.steps[-1] == 4 and stopped.history.eval_steps == [4]
    assert stopped.history.losses == full.history.losses[:4]  # the same schedule: a prefix of the full run
    assert stopped.score == full.history.eval_accuracy[0]
    never = probe("attention", TASK, steps=12, d_model=16, eval_every=4, progress=False, stop_at=1.5)
    assert never.history.steps[-1] == 12 and never.history.losses == full.history.losses


def test_stop_at_is_refused_where_it_cannot_work() -> None:
    corpus = CharLMProbe(CharCorpus.from_data("shakespeare.txt", max_chars=5_000), seq_len=16, eval_examples=4)
    with pytest.raises(ValueError, match="stop_at works for recall tasks"):
        probe("attention", corpus, steps=2, d_model=16, progress=False, stop_at=0.5)
    model = TinyLM(64, d_model=16, n_layers=1, max_len=32, sequence_mixer="attention", channel_mixer=None)
    with pytest.raises(ValueError, match="stop_at needs an eval_batch"):
        train(model, lambda g: make_mqar(8, 32, 4, 64, generator=g), steps=2, progress=False, stop_at=0.5)
    with pytest.raises((TypeError, ValueError), match="stop_at"):
        probe("attention", TASK, steps=2, d_model=16, progress=False, stop_at="high")
