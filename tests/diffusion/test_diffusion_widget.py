"""labsupport.diffusion.widget: the explorer's data and its figure."""

from __future__ import annotations

import math

import pytest
import torch

from labsupport.diffusion import MaskedDenoiser, diffusion_sample
from labsupport.diffusion.widget import denoising_figure, denoising_state, trace_summary, visible_char

CHARS = list("abcdefg \n")


@pytest.fixture(scope="module")
def trace():
    torch.manual_seed(0)
    model = MaskedDenoiser(len(CHARS), 16, 1, max_len=20).eval()
    canvas = torch.randint(0, len(CHARS), (2, 20), generator=torch.Generator().manual_seed(0))
    canvas[:, 6:] = model.mask_id
    return diffusion_sample(model, canvas, steps=7, record=True)


def test_state_counts_given_committed_and_masked(trace) -> None:
    start = denoising_state(trace, CHARS, step=0)
    assert start.kind.count("given") == 6 and start.masked_left == 14
    assert all(math.isnan(v) for v in start.value)
    middle = denoising_state(trace, CHARS, step=3)
    assert middle.kind.count("committed") == 2 + 2 + 2  # 14 masks in 7 steps: 2 per step
    end = denoising_state(trace, CHARS)
    assert end.masked_left == 0 and end.step == 7
    conf = [v for v, k in zip(end.value, end.kind) if k == "committed"]
    assert all(0 < v <= 1 for v in conf)
    steps = denoising_state(trace, CHARS, colour_by="step")
    assert sorted({v for v, k in zip(steps.value, steps.kind) if k == "committed"}) == list(range(7))


def test_state_refuses_bad_arguments(trace) -> None:
    with pytest.raises(ValueError, match="step"):
        denoising_state(trace, CHARS, step=8)
    with pytest.raises(ValueError, match="colour_by"):
        denoising_state(trace, CHARS, colour_by="age")
    with pytest.raises(TypeError, match="SampleTrace"):
        denoising_state("trace", CHARS)


def test_figure_shows_the_grid_and_the_confidence_bars(trace) -> None:
    fig = denoising_figure(trace, CHARS, step=4, width=8)
    kinds = [t.type for t in fig.data]
    assert kinds == ["heatmap", "heatmap", "scatter", "bar"]
    assert len(fig.data[2].text) == 20
    plain = denoising_figure(type(trace)(trace.tokens, trace.commit_step, trace.confidence, steps=trace.steps),
                             CHARS, step=4, width=8)               # no recorded candidates: the mask glyph
    assert "░" in plain.data[2].text and "░" not in fig.data[2].text
    assert len(fig.data[3].y) == 7
    assert "after 4 of 7 steps" in fig.layout.title.text
    import json

    data = fig.to_plotly_json()["data"]
    json.dumps([t.get("z") for t in data] + [t.get("y") for t in data], allow_nan=False)  # widget messages: JSON
    assert visible_char(" ") == "␣" and visible_char("\n") == "⏎"
    summary = trace_summary(trace)
    assert summary["steps"] == 7 and 0 < summary["mean_confidence"] <= 1


def test_masked_cells_show_their_next_step_top_candidates(trace) -> None:
    from labsupport.diffusion.widget import candidate_lists

    lists = candidate_lists(trace, CHARS, step=2)
    ids, probs = trace.candidates[2]
    masked_now = [i for i, k in enumerate(denoising_state(trace, CHARS, step=2).kind) if k == "masked"]
    assert masked_now
    for i in masked_now:
        assert lists[i][0] == (visible_char(CHARS[int(ids[0, i, 0])]), pytest.approx(float(probs[0, i, 0])))
        assert len(lists[i]) == 3 and lists[i][0][1] >= lists[i][1][1] >= lists[i][2][1]
    assert candidate_lists(trace, CHARS, step=trace.steps) is None
    fig = denoising_figure(trace, CHARS, step=2)
    text = next(t for t in fig.data if t.type == "scatter" and t.mode == "text")
    assert any("top candidates" in h for h in text.hovertext)
    assert "top candidate" in fig.layout.title.text
