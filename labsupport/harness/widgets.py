"""Interactive explorers that always leave a static figure behind.

:func:`interactive_figure` shows ipywidgets controls above a plotly
``go.FigureWidget`` that redraws in place when a control moves, and below them
a plain ``go.Figure`` snapshot at the default control values, captioned for
front ends that cannot run widgets (GitHub, nbviewer, HTML exports, some
Colab/VS Code set-ups). A notebook author writes one function from control
values to a figure::

    def kv_cache_figure(context: int, kv_heads: int) -> go.Figure:
        ...

    interactive_figure(
        kv_cache_figure,
        {"context": IntSlider(4096, 1024, 262144), "kv_heads": IntSlider(8, 1, 32)},
        title="KV-cache size",
    )

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

__all__ = ["InteractiveFigure", "interactive_figure"]

_WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"


class InteractiveFigure:
    """A live plotly figure driven by ipywidgets controls, plus its static snapshot.

    Attributes:
        title: shown above the controls.
        controls: name -> control widget; names are ``make_figure``'s keyword arguments.
        figure: the live ``go.FigureWidget``, updated in place.
        static_figure: a plain ``go.Figure`` at the controls' initial values.
        static_caption: the caption shown under the static figure.
        messages: an ``ipywidgets.Output`` where errors during interaction are shown.
        last_error: the message of the last failed update, or ``None`` after a good one.
        widget: the ``VBox`` (title, controls, messages, figure) that is displayed.
    """

    def __init__(
        self,
        make_figure: Callable[..., go.Figure],
        controls: Mapping[str, ipywidgets.ValueWidget],
        *,
        title: str,
        static_caption: str | None,
    ) -> None:
        self._make_figure = make_figure
        self.title = title
        self.controls: dict[str, ipywidgets.ValueWidget] = dict(controls)
        _align_descriptions(self.controls.values())
        self.static_figure = go.Figure(self._call(self.values()))
        self.figure = go.FigureWidget(self.static_figure)
        self.static_caption = static_caption or (
            f"*Static snapshot of “{title}” at the default settings "
            f"({_describe(self.values())}), for front ends that cannot run widgets. "
            "Run the notebook in JupyterLab, Colab or VS Code to explore it live.*"
        )
        self.messages = ipywidgets.Output()
        self.last_error: str | None = None
        self._displayed = False
        self._paused = False
        self.widget = ipywidgets.VBox(
            [ipywidgets.HTML(f"<b>{html.escape(title)}</b>"), *self.controls.values(), self.messages, self.figure]
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
        with self.figure.batch_update():
            self.figure.data = []
            self.figure.add_traces(list(new_figure.data))
            self.figure.layout = new_figure.layout
        if self.last_error is not None:
            self.messages.outputs = ()
            self.last_error = None
        return True

    def _on_control_change(self, _change: Mapping[str, Any]) -> None:
        if not self._paused:
            self.redraw()

    def _call(self, values: dict[str, Any]) -> go.Figure:
        figure = self._make_figure(**values)
        if not isinstance(figure, go.Figure):
            raise TypeError(f"make_figure must return a plotly go.Figure, got {type(figure).__name__}")
        return figure

    # ------------------------------------------------------------------ display

    def show(self) -> None:
        """Display the live explorer, then the static snapshot with its caption."""
        from IPython.display import Markdown, display

        bundle = dict(self.widget._repr_mimebundle_())
        # What front ends without widgets show instead of the live view:
        bundle["text/plain"] = f"[interactive explorer “{self.title}”: needs a live kernel; static figure below]"
        display(bundle, raw=True)
        display(self.static_figure)
        display(Markdown(self.static_caption))
        self._displayed = True

    def _ipython_display_(self) -> None:
        # interactive_figure() already displayed everything; being the last
        # expression of a cell must not show it a second time.
        if not self._displayed:
            self.show()

    def __repr__(self) -> str:
        return f"InteractiveFigure(title={self.title!r}, controls={list(self.controls)})"


def interactive_figure(
    make_figure: Callable[..., go.Figure],
    controls: Mapping[str, ipywidgets.ValueWidget],
    *,
    title: str,
    static_caption: str | None = None,
) -> InteractiveFigure:
    """Build and (inside IPython/Jupyter) display a live explorer and its static snapshot.

    Args:
        make_figure: called as ``make_figure(**{name: control.value})``; returns a ``go.Figure``.
        controls: name -> ipywidgets value widget (``IntSlider``, ``Dropdown``, ...),
            in display order. Every name must be a keyword ``make_figure`` accepts.
        title: a short title shown above the controls and in the caption.
        static_caption: the caption under the static figure (Markdown); a default
            one naming the snapshot's settings is used when ``None``.

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
    try:
        inspect.signature(make_figure).bind(**{name: None for name in controls})
    except TypeError as error:
        raise TypeError(
            f"make_figure cannot take the controls {list(controls)} as keyword arguments: {error}"
        ) from None
    except ValueError:  # no signature available (some builtins): let the first call tell
        pass

    explorer = InteractiveFigure(make_figure, controls, title=title, static_caption=static_caption)
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
