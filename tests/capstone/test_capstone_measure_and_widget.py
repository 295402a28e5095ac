"""The roofline against a tiny model, and the explorer's figure and text."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

from labsupport import capstone as cap
from labsupport.capstone import widget
from labsupport.harness import results
from labsupport.harness.hardware import MachineProfile
from labsupport.harness.widgets import interactive_figure


def test_tiny_shape_counts_the_tiny_models_parameters():
    model = cap.tiny_model(64, 2, 50, 32)
    shape = cap.tiny_shape(64, 2, 50)
    weights = sum(p.numel() for n, p in model.named_parameters()
                  if p.dim() == 2 and "embed" not in n and "pos" not in n)
    assert shape.params == weights
    with pytest.raises(ValueError, match="multiple of n_heads"):
        cap.tiny_shape(30, 2, 50)


def test_predicted_vs_measured_rows():
    peaks = MachineProfile(gflops=1e6, bandwidth_gbs=1e6)  # an impossible machine: every measurement is slower
    machine, rows = cap.predicted_vs_measured(d_model=32, n_layers=1, vocab=16, prefill_lengths=(16, 32),
                                              decode_contexts=(16,), repeats=1, machine=peaks)
    assert machine is peaks and [(r.phase, r.length) for r in rows] == [("prefill", 16), ("prefill", 32),
                                                                         ("decode", 16)]
    assert all(r.ratio > 1 and r.predicted_s > 0 for r in rows)
    with pytest.raises(ValueError, match="prefill length"):
        cap.predicted_vs_measured(prefill_lengths=(0,), machine=peaks)


def test_the_explorer_follows_its_sliders(tmp_path, monkeypatch):
    monkeypatch.setenv(results.ENV_VAR, str(tmp_path / "r.json"))
    frontier = cap.load_frontier([tmp_path])
    controls = widget.explorer_controls("RAG over long documents")
    explorer = interactive_figure(lambda **v: widget.recommendation_figure(**v, frontier=frontier), controls,
                                  title="t")
    assert isinstance(explorer.static_figure, go.Figure)
    assert "prefill compute" in explorer.static_figure.layout.title.text
    assert explorer.update(prompt=2048)
    assert "prefill compute" not in explorer.figure.layout.title.text
    assert explorer.last_error is None
    values = widget.profile_values("long-running agent")
    assert explorer.update(profile="long-running agent", **values)
    assert "cache memory" in explorer.figure.layout.title.text


def test_the_text_names_the_bottleneck_the_pick_and_its_sources(tmp_path, monkeypatch):
    monkeypatch.setenv(results.ENV_VAR, str(tmp_path / "r.json"))
    lines = widget.recommendation_text(cap.PROFILES["real-time chat / voice"], cap.load_frontier([tmp_path]))
    text = "\n".join(lines)
    assert "bottleneck: sequential decoding" in text and "no sequence mixer moves this bottleneck" in text
    assert "ch 07" in text and "roofline: ch 00" in text
