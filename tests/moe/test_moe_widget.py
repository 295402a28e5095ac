"""Chapter 06 expert-load explorer (labsupport.moe.widget): its data are right and its figure is drawn."""

from __future__ import annotations

import pytest
import torch

from labsupport.harness.settings import seed_everything
from labsupport.lm.model import TinyLM
from labsupport.lm.training import TrainingHistory
from labsupport.moe import moe_mixer
from labsupport.moe.widget import (
    character_expert_counts,
    dropped_at_capacity,
    expert_load,
    expert_load_figure,
    load_imbalance,
    most_imbalanced_layer,
)


def history(counts: list[list[float]], label: str = "run", layer: int = 0) -> TrainingHistory:
    h = TrainingHistory(label=label)
    h.steps = list(range(1, len(counts) + 1))
    h.metrics[f"blocks.{layer}.channel_mixer.tokens_per_expert"] = counts
    h.metrics[f"blocks.{layer}.channel_mixer.assignment_budget"] = [float(sum(c)) for c in counts]
    return h


def test_load_imbalance_and_drops_from_recorded_counts() -> None:
    h = history([[25, 25, 25, 25], [100, 0, 0, 0], [40, 40, 10, 10]])
    load = expert_load(h)
    assert torch.allclose(load.sum(1), torch.ones(3, dtype=torch.float64))
    assert load_imbalance(load).tolist() == pytest.approx([1.0, 4.0, 1.6])
    # capacity factor 1: each expert keeps a quarter of the assignments
    assert dropped_at_capacity(h, 1.0).tolist() == pytest.approx([0.0, 0.75, 0.3])
    assert dropped_at_capacity(h, 4.0).tolist() == pytest.approx([0.0, 0.0, 0.0])
    # null experts took 40 of a budget of 140: the capacity is still sized from the budget (35 slots)
    h.metrics["blocks.0.channel_mixer.assignment_budget"] = [140.0] * 3
    assert dropped_at_capacity(h, 1.0).tolist() == pytest.approx([0.0, 65 / 140, 10 / 140])


def test_the_figure_defaults_to_the_most_imbalanced_layer() -> None:
    h = history([[25, 25, 25, 25], [30, 20, 25, 25]])
    h.metrics.update(history([[70, 10, 10, 10], [80, 10, 5, 5]], layer=1).metrics)
    assert most_imbalanced_layer(h) == 1
    fig = expert_load_figure({"run": h}, "run", 1.0)
    assert "layer 1" in fig.layout.title.text
    assert fig.layout.width is None  # takes the notebook's width


def test_expert_load_names_the_missing_metric() -> None:
    with pytest.raises(KeyError, match="layer 3"):
        expert_load(history([[1, 1]]), layer=3)
    with pytest.raises(TypeError, match="TrainingHistory"):
        expert_load({"a": 1})


def test_character_counts_match_the_layer_routing() -> None:
    seed_everything(0)
    model = TinyLM(12, d_model=16, n_layers=1, max_len=10, channel_mixer=moe_mixer(4, 1, 8))
    tokens = torch.randint(0, 12, (3, 10))
    counts = character_expert_counts(model, tokens)
    assert counts.shape == (12, 4) and int(counts.sum()) == 30
    assert counts.sum(1).tolist() == torch.bincount(tokens.flatten(), minlength=12).tolist()
    with pytest.raises(TypeError, match="not a MoELayer"):
        character_expert_counts(TinyLM(12, d_model=16, n_layers=1, max_len=10), tokens)


def test_figure_has_a_panel_per_view_and_a_trace_per_expert_and_run() -> None:
    runs = {"a": history([[3, 1], [2, 2]], "a"), "b": history([[4, 0], [4, 0]], "b")}
    fig = expert_load_figure(runs, "b", 1.0, char_counts=torch.tensor([[1, 0], [0, 0], [2, 3]]),
                             characters=["x", "y", "\n"])
    kinds = [t.type for t in fig.data]
    assert kinds.count("scatter") == 2 + 2 * 2 and kinds.count("heatmap") == 1
    imbalance_lines = [t for t in fig.data if t.xaxis == "x2"]
    assert [t.name for t in imbalance_lines] == ["a", "b"] and list(imbalance_lines[1].y) == [2.0, 2.0]
    assert list(fig.data[-1].y) == ["x", "\\n"]
    assert "2.00×" in fig.layout.title.text
    with pytest.raises(KeyError, match="unknown run"):
        expert_load_figure(runs, "c", 1.0)
