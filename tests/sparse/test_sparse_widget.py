"""Chapter 05's explorer: the data behind the widget, for every pattern, and its figure."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch

from labsupport import sparse
from labsupport.harness.costs import decode_read_bytes
from labsupport.lm.tasks import make_needle
from labsupport.sparse.checkpoints import mqar_model, with_sink_token


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mqar_model(32, d_model=16, n_heads=2).eval()


@pytest.fixture(scope="module")
def batch():
    return make_needle(4, 48, 0.25, 32, seed=3)


@pytest.mark.parametrize("pattern", sparse.EXPLORER_PATTERNS)
def test_explorer_data_for_every_pattern(model, batch, pattern):
    data = sparse.explorer_data(model, batch, pattern, 16)
    length = batch.inputs.shape[1]
    assert data.read.shape == (length, length) and data.read.dtype == torch.bool
    assert not data.read.triu(1).any()  # causal: nothing read from the future
    assert data.read.diagonal().all() or pattern in ("dilated",)  # every query reads itself (dilated: offset 0 too)
    assert torch.allclose(data.attention.sum(dim=-1), torch.ones(length), atol=1e-5)
    assert 0 < data.density <= 1 and 0 <= data.recall <= 1
    assert data.tokens_per_step == int(data.read[-1].sum())
    assert data.needle_position == batch.info["position"]
    assert data.needle_read == bool(data.read[-1, data.needle_position])
    if pattern in ("window", "sinks", "h2o", "tova"):
        assert int(data.read.sum(dim=1).max()) <= 16  # a bounded cache never reads more than its budget
    if pattern == "full":
        assert data.read.equal(torch.ones(length, length, dtype=torch.bool).tril()) and data.needle_read
    if pattern == "window":
        assert not data.needle_read  # the needle sits 35 tokens back, outside a window of 16
        assert data.read.equal(sparse.sliding_window_mask(length, window=16))
    expected_bytes = decode_read_bytes(data.tokens_per_step, layers=2, kv_heads=2, head_dim=8, bytes_per_element=4,
                                       pages=6 if pattern == "quest" else 0)
    assert data.bytes_per_step == expected_bytes
    figure = sparse.explorer_figure(data)
    assert isinstance(figure, go.Figure) and len(figure.data) == 2 and pattern in figure.layout.title.text
    # the attention mass the read set captures: all of it under the full cache, a share otherwise
    expected_mass = float((data.attention * data.read).sum(-1).mean())
    assert data.mass == pytest.approx(expected_mass) and 0 < data.mass <= 1 + 1e-6
    if pattern == "full":
        assert data.mass == pytest.approx(1.0, abs=1e-5) and data.last_mass == pytest.approx(1.0, abs=1e-5)
    if pattern == "window":
        assert data.mass < 1 - 1e-3


def test_explorer_shows_the_chosen_layer_and_head(model, batch):
    first = sparse.explorer_data(model, batch, "full", 16, layer=0, head=1)
    last = sparse.explorer_data(model, batch, "full", 16, layer=-1, head=0)
    assert (first.layer, first.head) == (0, 1) and (last.layer, last.head) == (1, 0)
    assert not torch.equal(first.attention, last.attention)
    assert "layer 0, head 1" in sparse.explorer_figure(first).layout.annotations[0].text


def test_explorer_leaves_the_model_as_it_was(model, batch):
    sparse.explorer_data(model, batch, "dilated", 16)
    assert all(not m.record_attention and m.static_mask is None for m in model.modules()
               if isinstance(m, sparse.SparseAttention))


def test_explorer_guards(model, batch):
    with pytest.raises(ValueError, match="pattern"):
        sparse.explorer_data(model, batch, "lru", 16)
    with pytest.raises(ValueError, match="budget"):
        sparse.explorer_data(model, batch, "h2o", 4)
    with pytest.raises(ValueError, match="SparseAttention"):
        sparse.explorer_data(torch.nn.Linear(2, 2), batch, "h2o", 16)


def test_sink_token_batches():
    from labsupport.lm.tasks import TaskBatch

    batch = TaskBatch(torch.arange(10).view(2, 5), torch.arange(1, 11).view(2, 5))
    sunk = with_sink_token(batch, 99)
    assert sunk.inputs[:, 0].tolist() == [99, 99] and sunk.inputs[0, 1:].tolist() == [0, 1, 2, 3]
    assert sunk.targets[0].tolist() == [0, 1, 2, 3, 4]
