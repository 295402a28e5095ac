"""labsupport.harness.widgets: the live explorer, its static snapshot, errors during interaction."""

from __future__ import annotations

import ipywidgets
import IPython.display
import plotly.graph_objects as go
import pytest

from labsupport.harness import widgets
from labsupport.harness.widgets import InteractiveFigure, interactive_figure


def line_figure(slope: int, kind: str = "line") -> go.Figure:
    if slope == 13:
        raise ValueError("13 is unlucky")
    xs = [0, 1, 2]
    trace = go.Scatter(x=xs, y=[slope * x for x in xs]) if kind == "line" else go.Bar(x=xs, y=[slope] * 3)
    return go.Figure(trace, layout={"title": {"text": f"slope {slope}"}})


def make_explorer(**kwargs) -> InteractiveFigure:
    controls = {
        "slope": ipywidgets.IntSlider(value=2, min=0, max=20),
        "kind": ipywidgets.Dropdown(options=["line", "bar"], value="line"),
    }
    return interactive_figure(line_figure, controls, title="Lines", **kwargs)


def test_initial_state_is_drawn_in_both_figures() -> None:
    explorer = make_explorer()
    assert isinstance(explorer.figure, go.FigureWidget)
    assert type(explorer.static_figure) is go.Figure
    assert list(explorer.figure.data[0].y) == [0, 2, 4]
    assert list(explorer.static_figure.data[0].y) == [0, 2, 4]
    assert explorer.values() == {"slope": 2, "kind": "line"}
    assert "static snapshot" in explorer.static_caption.lower()
    assert "slope=2" in explorer.static_caption


def test_moving_a_control_redraws_the_live_figure_in_place() -> None:
    explorer = make_explorer()
    live = explorer.figure
    explorer.controls["slope"].value = 5  # as if the learner dragged the slider
    assert explorer.figure is live
    assert list(live.data[0].y) == [0, 5, 10]
    assert live.layout.title.text == "slope 5"
    assert explorer.update(slope=3, kind="bar")
    assert [type(t).__name__ for t in live.data] == ["Bar"]
    assert list(live.data[0].y) == [3, 3, 3]
    assert list(explorer.static_figure.data[0].y) == [0, 2, 4]  # the snapshot stays at the defaults


def test_an_error_during_interaction_is_a_message_not_a_traceback() -> None:
    explorer = make_explorer()
    assert explorer.update(slope=13) is False
    assert explorer.last_error == "ValueError: 13 is unlucky"
    assert "13 is unlucky" in explorer.messages.outputs[0]["text"]
    assert list(explorer.figure.data[0].y) == [0, 2, 4]  # last good figure kept
    explorer.controls["slope"].value = 1
    assert explorer.last_error is None and explorer.messages.outputs == ()
    assert list(explorer.figure.data[0].y) == [0, 1, 2]


def test_make_figure_must_return_a_figure_during_interaction() -> None:
    explorer = interactive_figure(
        lambda n: go.Figure() if n < 5 else "oops", {"n": ipywidgets.IntSlider(1, 0, 9)}, title="t"
    )
    assert explorer.update(n=7) is False
    assert "go.Figure" in explorer.last_error


def test_update_rejects_unknown_controls() -> None:
    with pytest.raises(TypeError, match="unknown control"):
        make_explorer().update(slop=3)


@pytest.fixture
def shown(monkeypatch) -> list[object]:
    """Record what would be displayed in a notebook."""
    displayed: list[object] = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kwargs: displayed.append(obj))
    monkeypatch.setattr(widgets, "_inside_ipython", lambda: True)
    return displayed


def test_in_a_notebook_the_explorer_is_one_output_with_the_static_figure_as_its_fallback(shown) -> None:
    explorer = make_explorer(static_caption="Snapshot for readers without widgets.")
    assert len(shown) == 1  # never a second, separate static figure (JupyterLab would show the figure twice)
    [bundle] = shown
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.widget.model_id
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["y"] == [0, 2, 4]  # the static figure, as a fallback
    assert "Snapshot for readers without widgets." in bundle["text/plain"]
    explorer._ipython_display_()  # the cell's last expression: nothing shown again
    assert len(shown) == 1
    explorer.show()
    assert len(shown) == 2


def test_the_fallback_html_carries_the_figure_and_its_caption(shown) -> None:
    import plotly.io as pio

    saved = pio.renderers.default
    pio.renderers.default = "plotly_mimetype+notebook_connected"
    try:
        make_explorer()
    finally:
        pio.renderers.default = saved
    html = shown[0]["text/html"]
    assert "Plotly" in html and "Static snapshot of “Lines”" in html and "slope=2" in html


@pytest.mark.parametrize(("front_end", "mode"), [("jupyter", "live"), ("none", "live"), ("colab", "redraw"), ("vscode", "redraw")])
def test_the_mode_follows_the_front_end(monkeypatch, front_end, mode) -> None:
    monkeypatch.setattr(widgets, "front_end", lambda: front_end)
    explorer = make_explorer()
    assert explorer.mode == mode
    assert isinstance(explorer.figure, go.FigureWidget) == (mode == "live")
    assert (explorer.output is None) == (mode == "live")


def figures_in(output: ipywidgets.Output) -> list[dict]:
    """The plotly figures an Output widget shows (as plotly's JSON)."""
    return [item["data"]["application/vnd.plotly.v1+json"] for item in output.outputs]


def test_fallback_redraws_a_plain_figure_in_an_output_on_each_control_change(monkeypatch) -> None:
    import plotly.io as pio

    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    explorer = make_explorer(mode="redraw")
    assert type(explorer.figure) is go.Figure
    assert not any(isinstance(w, go.FigureWidget) for w in explorer.widget.children)  # only core widgets
    assert explorer.output in explorer.widget.children
    assert [f["data"][0]["y"] for f in figures_in(explorer.output)] == [[0, 2, 4]]
    explorer.controls["slope"].value = 5  # as if the learner dragged the slider
    [figure] = figures_in(explorer.output)  # one figure: the old one is replaced, not added to
    assert figure["data"][0]["y"] == [0, 5, 10] and figure["layout"]["title"]["text"] == "slope 5"
    explorer.controls["kind"].value = "bar"
    [figure] = figures_in(explorer.output)
    assert figure["data"][0]["type"] == "bar"
    assert list(explorer.static_figure.data[0].y) == [0, 2, 4]  # the snapshot stays at the defaults
    assert explorer.update(slope=13) is False  # an error keeps the last good figure
    [figure] = figures_in(explorer.output)
    assert figure["data"][0]["type"] == "bar" and figure["data"][0]["y"] == [5, 5, 5]
    assert "13 is unlucky" in explorer.messages.outputs[0]["text"]


def test_fallback_uses_the_front_ends_renderer(monkeypatch) -> None:
    import plotly.io as pio

    monkeypatch.setattr(pio.renderers, "default", "colab")
    explorer = make_explorer(mode="redraw")
    [item] = explorer.output.outputs
    assert "text/html" in item["data"] and "application/vnd.plotly.v1+json" not in item["data"]


def test_fallback_in_a_notebook_is_one_output_too(shown, monkeypatch) -> None:
    monkeypatch.setattr(widgets, "front_end", lambda: "colab")
    explorer = make_explorer()
    [bundle] = shown
    assert explorer.mode == "redraw"
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.widget.model_id
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["y"] == [0, 2, 4]


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        make_explorer(mode="static")


def test_outside_a_notebook_nothing_is_displayed(monkeypatch) -> None:
    displayed: list[object] = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kwargs: displayed.append(obj))
    make_explorer()
    assert displayed == []


@pytest.mark.parametrize(
    ("make_figure", "controls", "kwargs", "error", "match"),
    [
        ("nope", {"slope": ipywidgets.IntSlider()}, {"title": "t"}, TypeError, "callable"),
        (line_figure, {}, {"title": "t"}, ValueError, "at least one"),
        (line_figure, [ipywidgets.IntSlider()], {"title": "t"}, TypeError, "dict"),
        (line_figure, {"slope": 3}, {"title": "t"}, TypeError, "value widget"),
        (line_figure, {"slope": ipywidgets.Button()}, {"title": "t"}, TypeError, "value widget"),
        (line_figure, {"not a name": ipywidgets.IntSlider()}, {"title": "t"}, TypeError, "keyword"),
        (line_figure, {"speed": ipywidgets.IntSlider()}, {"title": "t"}, TypeError, "cannot take"),
        (line_figure, {"slope": ipywidgets.IntSlider()}, {"title": ""}, TypeError, "title"),
        (line_figure, {"slope": ipywidgets.IntSlider()}, {"title": "t", "static_caption": 3}, TypeError, "static_caption"),
        (lambda slope: "not a figure", {"slope": ipywidgets.IntSlider()}, {"title": "t"}, TypeError, "go.Figure"),
    ],
)
def test_interactive_figure_rejects_bad_arguments(make_figure, controls, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        interactive_figure(make_figure, controls, **kwargs)


def test_long_labels_get_one_common_width_and_a_set_width_is_kept() -> None:
    controls = {
        "a": ipywidgets.IntSlider(value=1, min=0, max=3, description="query heads per group"),
        "b": ipywidgets.IntSlider(value=1, min=0, max=3, description="step"),
        "c": ipywidgets.IntSlider(value=1, min=0, max=3, description="kept", style={"description_width": "3em"}),
    }
    interactive_figure(lambda a, b, c: go.Figure(), controls, title="labels")
    wide = controls["a"].style.description_width
    assert wide == controls["b"].style.description_width
    assert float(wide.removesuffix("em")) >= 0.6 * len("query heads per group")
    assert controls["c"].style.description_width == "3em"
