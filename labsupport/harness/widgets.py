"""Interactive explorers that work in every front end and leave one static figure behind.

:func:`interactive_figure` shows ipywidgets controls above a plotly figure
that follows them. A notebook author writes one function from control values
to a figure::

    def kv_cache_figure(context: int, kv_heads: int) -> go.Figure:
        ...

    interactive_figure(
        kv_cache_figure,
        {"context": IntSlider(4096, 1024, 262144), "kv_heads": IntSlider(8, 1, 32)},
        title="KV-cache size",
    )

How the figure follows the controls depends on the front end
(:func:`labsupport.harness.settings.front_end`):

* ``"live"`` (JupyterLab, Notebook 7, headless runs, no kernel): a plotly
  ``go.FigureWidget`` (a custom widget) redrawn in place;
* ``"redraw"`` (Colab, VS Code): plotly's custom widget does not load there
  (Colab needs its custom widget manager; VS Code often drops plots inside
  widgets), so a plain ``go.Figure`` is drawn into an ``ipywidgets.Output``
  and replaced on every control change — only core widgets are used.

Either way the explorer is displayed as *one* output whose mime bundle holds
the widget view and, as its fallback, the static figure at the default values
with a caption. A front end that renders widgets shows only the explorer
(JupyterLab ranks the widget view first: the figure appears once); one that
cannot (GitHub, nbviewer, HTML exports, the course book) shows the static
figure instead.

An error raised by the function while the learner moves a control is shown as
one line in an ``ipywidgets.Output`` above the figure (the figure keeps its last
good state), not as a traceback.
"""

from __future__ import annotations

import html
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ipywidgets
import plotly.graph_objects as go

from labsupport.harness.settings import front_end

__all__ = ["MODES", "InteractiveFigure", "interactive_figure", "mode_for_front_end"]

_WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
MODES = ("live", "redraw")


def mode_for_front_end(name: str) -> str:
    """``"redraw"`` for Colab and VS Code (no custom widgets needed), ``"live"`` elsewhere."""
    return "redraw" if name in ("colab", "vscode") else "live"


class InteractiveFigure:
    """A plotly figure driven by ipywidgets controls, plus its static snapshot.

    Attributes:
        title: shown above the controls.
        controls: name -> control widget; names are ``make_figure``'s keyword arguments.
        mode: ``"live"`` (a ``go.FigureWidget`` updated in place) or ``"redraw"``
            (a plain ``go.Figure`` redrawn into :attr:`output`).
        figure: the figure on screen: the live ``go.FigureWidget``, or in
            ``"redraw"`` mode the latest plain ``go.Figure``.
        output: in ``"redraw"`` mode the ``ipywidgets.Output`` holding the one
            current figure; ``None`` in ``"live"`` mode.
        static_figure: a plain ``go.Figure`` at the controls' initial values.
        static_caption: the caption shown under the static figure (plain text).
        messages: an ``ipywidgets.Output`` where errors during interaction are shown.
        last_error: the message of the last failed update, or ``None`` after a good one.
        widget: the ``VBox`` (title, controls, messages, figure or output) that is displayed.
    """

    def __init__(
        self,
        make_figure: Callable[..., go.Figure],
        controls: Mapping[str, ipywidgets.ValueWidget],
        *,
        title: str,
        static_caption: str | None,
        mode: str,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._make_figure = make_figure
        self.title = title
        self.mode = mode
        self.controls: dict[str, ipywidgets.ValueWidget] = dict(controls)
        _align_descriptions(self.controls.values())
        self.static_figure = go.Figure(self._call(self.values()))
        self.static_caption = static_caption or (
            f"Static snapshot of “{title}” at the default settings "
            f"({_describe(self.values())}), for front ends that cannot run widgets. "
            "Run the notebook in JupyterLab, Colab or VS Code to explore it live."
        )
        self.messages = ipywidgets.Output()
        self.last_error: str | None = None
        self._displayed = False
        self._paused = False
        self.output: ipywidgets.Output | None
        if mode == "live":
            self.output = None
            self.figure: go.Figure = go.FigureWidget(self.static_figure)
            view: ipywidgets.Widget = self.figure
        else:
            self.output = ipywidgets.Output()
            self.figure = go.Figure(self.static_figure)
            self._draw_into_output(self.figure)
            view = self.output
        self.widget = ipywidgets.VBox(
            [ipywidgets.HTML(f"<b>{html.escape(title)}</b>"), *self.controls.values(), self.messages, view]
        )
        for control in self.controls.values():
            control.observe(self._on_control_change, names="value")

    # ------------------------------------------------------------------ state and updates

    def values(self) -> dict[str, Any]:
        """The controls' current values, by name."""
        return {name: control.value for name, control in self.controls.items()}

    def update(self, **values: Any) -> bool:
        """Set some controls (by name) and redraw once. Returns True when the redraw worked.

        Unknown names raise ``TypeError``. A value a control cannot take (out of a
        slider's range, not among a dropdown's options) raises the widget's own error.
        """
        unknown = sorted(set(values) - set(self.controls))
        if unknown:
            raise TypeError(f"unknown control(s) {unknown}; this figure has {sorted(self.controls)}")
        self._paused = True
        try:
            for name, value in values.items():
                self.controls[name].value = value
        finally:
            self._paused = False
        return self.redraw()

    def redraw(self) -> bool:
        """Rebuild the figure from the controls' current values; errors go to :attr:`messages`."""
        try:
            new_figure = self._call(self.values())
        except Exception as error:  # shown to the learner, never re-raised mid-interaction
            self.last_error = f"{type(error).__name__}: {error}"
            # Set the Output's content directly: works with or without a kernel.
            self.messages.outputs = ()
            self.messages.append_stdout(f"⚠️ Could not draw with {_describe(self.values())}: {self.last_error}\n")
            return False
        if self.mode == "live":
            with self.figure.batch_update():
                self.figure.data = []
                self.figure.add_traces(list(new_figure.data))
                self.figure.layout = new_figure.layout
        else:
            self.figure = new_figure
            self._draw_into_output(new_figure)
        if self.last_error is not None:
            self.messages.outputs = ()
            self.last_error = None
        return True

    def _draw_into_output(self, figure: go.Figure) -> None:
        """Replace what :attr:`output` shows by ``figure`` (one display, in the front end's plotly renderer)."""
        assert self.output is not None
        bundle = figure._repr_mimebundle_()  # the default renderer's bundle, see settings.configure_plotly
        self.output.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)

    def _on_control_change(self, _change: Mapping[str, Any]) -> None:
        if not self._paused:
            self.redraw()

    def _call(self, values: dict[str, Any]) -> go.Figure:
        figure = self._make_figure(**values)
        if not isinstance(figure, go.Figure):
            raise TypeError(f"make_figure must return a plotly go.Figure, got {type(figure).__name__}")
        return figure

    # ------------------------------------------------------------------ display

    def mimebundle(self) -> dict[str, Any]:
        """What is displayed: the widget view, with the captioned static figure as the fallback.

        Holds the static figure as plotly's mime type and as whatever plotly's
        default renderer adds (HTML, see :func:`~labsupport.harness.settings.configure_plotly`),
        the caption (in the HTML), the widget view, and a ``text/plain`` line.
        A front end shows the richest type it can render, so the figure appears once.
        """
        from plotly.io.base_renderers import PlotlyRenderer

        bundle = PlotlyRenderer().to_mimebundle(self.static_figure.to_dict())  # the figure as plotly's JSON
        bundle.update((k, v) for k, v in self.static_figure._repr_mimebundle_().items() if k != "text/plain")
        if "text/html" in bundle:  # an HTML figure: caption it (front ends that pick the JSON show no caption)
            bundle["text/html"] += f'<p class="static-caption"><em>{html.escape(self.static_caption)}</em></p>'
        bundle[_WIDGET_VIEW_MIME] = self.widget._repr_mimebundle_()[_WIDGET_VIEW_MIME]
        bundle["text/plain"] = (
            f"[interactive explorer “{self.title}”: needs a live kernel. {self.static_caption}]"
        )
        return bundle

    def show(self) -> None:
        """Display the explorer (one output; see :meth:`mimebundle`)."""
        from IPython.display import display

        display(self.mimebundle(), raw=True)
        self._displayed = True

    def _ipython_display_(self) -> None:
        # interactive_figure() already displayed everything; being the last
        # expression of a cell must not show it a second time.
        if not self._displayed:
            self.show()

    def __repr__(self) -> str:
        return f"InteractiveFigure(title={self.title!r}, mode={self.mode!r}, controls={list(self.controls)})"


def interactive_figure(
    make_figure: Callable[..., go.Figure],
    controls: Mapping[str, ipywidgets.ValueWidget],
    *,
    title: str,
    static_caption: str | None = None,
    mode: str | None = None,
) -> InteractiveFigure:
    """Build and (inside IPython/Jupyter) display an explorer, with its static snapshot as the fallback.

    Args:
        make_figure: called as ``make_figure(**{name: control.value})``; returns a ``go.Figure``.
        controls: name -> ipywidgets value widget (``IntSlider``, ``Dropdown``, ...),
            in display order. Every name must be a keyword ``make_figure`` accepts.
        title: a short title shown above the controls and in the caption.
        static_caption: the caption under the static figure (plain text); a default
            one naming the snapshot's settings is used when ``None``.
        mode: ``"live"`` or ``"redraw"`` (see the module docstring); ``None``
            chooses by front end (:func:`mode_for_front_end`).

    Returns:
        The :class:`InteractiveFigure` (``.figure``, ``.static_figure``, ``.update(**values)``).
        Outside IPython nothing is displayed; call ``.show()`` to display it again.
    """
    if not callable(make_figure):
        raise TypeError(f"make_figure must be callable, got {type(make_figure).__name__}")
    if not isinstance(controls, Mapping):
        raise TypeError(f"controls must be a dict of name -> ipywidgets control, got {type(controls).__name__}")
    if not controls:
        raise ValueError("controls must hold at least one control")
    for name, control in controls.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"control names must be valid keyword names, got {name!r}")
        if not isinstance(control, ipywidgets.ValueWidget):
            raise TypeError(
                f"controls[{name!r}] must be an ipywidgets value widget (IntSlider, Dropdown, ...), "
                f"got {type(control).__name__}"
            )
    if not isinstance(title, str) or not title.strip():
        raise TypeError(f"title must be a non-empty str, got {title!r}")
    if static_caption is not None and not isinstance(static_caption, str):
        raise TypeError(f"static_caption must be a str or None, got {type(static_caption).__name__}")
    if mode is None:
        mode = mode_for_front_end(front_end())
    elif mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    try:
        inspect.signature(make_figure).bind(**{name: None for name in controls})
    except TypeError as error:
        raise TypeError(
            f"make_figure cannot take the controls {list(controls)} as keyword arguments: {error}"
        ) from None
    except ValueError:  # no signature available (some builtins): let the first call tell
        pass

    explorer = InteractiveFigure(make_figure, controls, title=title, static_caption=static_caption, mode=mode)
    if _inside_ipython():
        explorer.show()
    return explorer


def _inside_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with ipywidgets
        return False
    return get_ipython() is not None


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in values.items())


def _align_descriptions(controls: Iterable[ipywidgets.Widget]) -> None:
    """Give every control the same label width, wide enough for the longest label.

    ipywidgets cuts labels at a fixed width ("query hea…"); a control whose
    style already sets a width keeps it.
    """
    labelled = [c for c in controls if getattr(c, "description", "") and hasattr(c.style, "description_width")]
    if not labelled:
        return
    width = max(6.0, 0.6 * max(len(c.description) for c in labelled) + 1.0)
    for control in labelled:
        if not control.style.description_width:
            control.style.description_width = f"{width:.1f}em"
