"""The MAD-style suite's generators, decode-time recall, and the frontier's points and Pareto mask."""

from __future__ import annotations

import pytest
import torch

from labsupport.hybrid import registry
from labsupport.hybrid.tasks import SUITE, decode_recall, make_fuzzy_recall, make_memorization, make_noisy_recall
from labsupport.hybrid.widget import frontier_figure, frontier_points, pareto_mask
from labsupport.lm.model import TinyLM
from labsupport.lm.tasks import IGNORE_INDEX
from labsupport.lm.training import evaluate_recall


@pytest.mark.parametrize("name", sorted(SUITE))
def test_every_suite_task_scores_positions_whose_answer_is_in_the_input(name: str) -> None:
    task = SUITE[name](64)
    batch = task.train_batch(8, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == (8, 64) and batch.num_scored > 0
    assert int(batch.inputs.max()) < task.vocab_size and int(batch.inputs.min()) >= 0
    if name != "memorization":  # recall tasks: the scored value appears earlier in the same sequence
        for b in range(8):
            for t in (batch.targets[b] != IGNORE_INDEX).nonzero().flatten().tolist():
                assert int(batch.targets[b, t]) in batch.inputs[b, : t + 1].tolist() or name == "selective_copy"
    assert torch.equal(task.eval_batch().inputs, task.eval_batch().inputs)  # a fixed held-out batch


def test_fuzzy_recall_predicts_the_value_after_a_two_token_key() -> None:
    batch = make_fuzzy_recall(4, 48, 3, 32, seed=1)
    for b in range(4):
        context = batch.inputs[b, :9].view(3, 3).tolist()
        for t in (batch.targets[b] != IGNORE_INDEX).nonzero().flatten().tolist():
            key = batch.inputs[b, t - 1:t + 1].tolist()
            assert [row[2] for row in context if row[:2] == key] == [int(batch.targets[b, t])]


def test_noisy_recall_and_memorization_refuse_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        make_noisy_recall(2, 16, 8, 64)
    a, b = make_memorization(2, 10, 32, seed=0), make_memorization(2, 10, 32, seed=1)
    table = {}
    for batch in (a, b):  # the same key always maps to the same value, across batches
        for row_in, row_t in zip(batch.inputs, batch.targets):
            for t in (row_t != IGNORE_INDEX).nonzero().flatten().tolist():
                assert table.setdefault(int(row_in[t]), int(row_t[t])) == int(row_t[t])


def test_decode_recall_equals_forward_recall_for_an_exact_mixer() -> None:
    batch = SUITE["mqar"](64).eval_batch()
    batch.inputs, batch.targets = batch.inputs[:16], batch.targets[:16]
    torch.manual_seed(0)
    model = TinyLM(64, d_model=16, n_layers=1, max_len=64, sequence_mixer=registry.get("gated_deltanet").build,
                   channel_mixer=None).double()
    assert decode_recall(model, batch) == evaluate_recall(model, batch)


def test_pareto_mask_keeps_duplicates_and_drops_the_dominated() -> None:
    assert pareto_mask([1, 2, 2, 3, 1], [0.2, 0.5, 0.5, 0.9, 0.1]) == [True, True, True, True, False]
    with pytest.raises(ValueError, match="same length"):
        pareto_mask([1, 2], [0.5])


def test_frontier_points_take_the_best_lr_mean_and_sum_the_layers_state() -> None:
    rows = [{"kind": "quality", "design": "qwen3_next", "task": "mqar", "seq_len": 64, "lr": lr, "seed": s,
             "width": 32, "metric": "recall", "score": score,
             "layer_names": ["gated_deltanet"] * 3 + ["attention"]}
            for lr, scores in ((1e-3, (0.1, 0.2, 0.3)), (1e-2, (0.5, 0.6, 0.7))) for s, score in enumerate(scores)]
    rows.append({"kind": "quality", "design": "broken", "task": "mqar", "seq_len": 64, "lr": 1e-2, "seed": 0,
                 "width": 32, "metric": "recall", "score": None, "failed": "boom"})
    (point,) = frontier_points(rows, context=1024)
    assert point.lr == 1e-2 and abs(point.recall - 0.6) < 1e-12 and point.family == "hybrid"
    expected = (3 * 32 * 32 + 2 * 32 * 1024) * 2 / 1024
    assert point.bytes_per_token == expected and point.decode_ms is None
    fig = frontier_figure([point], x_axis="bytes")
    assert any(trace.name == "Pareto set" for trace in fig.data)
    with pytest.raises(ValueError):
        frontier_figure([point], x_axis="flops")


def test_frontier_points_take_the_rate_run_on_every_seed_over_a_lucky_single_run() -> None:
    """The grid searches rates on seed 0 and runs the winner on seeds 1 and 2: a loser's one seed may score
    above the winner's three-seed mean, and must not be picked."""
    def row(lr: float, seed: int, score: float) -> dict:
        return {"kind": "quality", "design": "attention", "task": "mqar", "seq_len": 64, "lr": lr, "seed": seed,
                "width": 64, "metric": "recall", "score": score, "layer_names": ["attention"] * 2}

    rows = [row(3e-3, 0, 0.55), row(1e-2, 0, 0.60), row(1e-2, 1, 0.40), row(1e-2, 2, 0.45)]
    (point,) = frontier_points(rows)
    assert point.lr == 1e-2 and len(point.seed_scores) == 3 and abs(point.recall - 0.48333333) < 1e-6


def test_compression_rebuilds_the_sequence_from_one_position() -> None:
    from labsupport.hybrid.tasks import CompressionModel, make_compression

    batch = make_compression(4, 32, 16, seed=0)
    n = 15
    assert torch.equal(batch.targets[:, n + 1:2 * n + 1], batch.inputs[:, :n]) and (batch.inputs[:, n] == 15).all()
    body = TinyLM(16, d_model=16, n_layers=1, max_len=32, channel_mixer=None)
    model = CompressionModel(body, 32)
    tokens = batch.inputs.clone()
    out = model(tokens)
    tokens[:, n + 1:] = 7   # what follows the compression token cannot reach the slots' logits
    assert torch.equal(model(tokens), out)
    tokens[:, 0] = (tokens[:, 0] % 14) + 1   # what precedes it can
    assert not torch.equal(model(tokens), out)
    with pytest.raises(TypeError, match="wraps a TinyLM"):
        CompressionModel(torch.nn.Linear(2, 2), 32)
