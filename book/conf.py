"""Sphinx configuration of the course book (built by ``bash bin/book``; see book/README.md).

The pages are the executed chapters (myst-nb reads their outputs, it never
executes them) plus ``index.md``. Everything a page loads comes with the
book: MathJax 3 from ``book/_vendor/``, plotly.js from the installed plotly
wheel, the theme's own files. No CDN, no web font.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import plotly

CONF_DIR = Path(__file__).resolve().parent
REPO = CONF_DIR.parent


def _course_settings() -> dict[str, str]:
    """``repository`` and ``branch`` from course.toml (the one place that names the repository)."""
    pattern = re.compile(r'^\s*(\w+)\s*=\s*"([^"]*)"')
    lines = (REPO / "course.toml").read_text(encoding="utf-8").splitlines()
    return {m.group(1): m.group(2) for m in map(pattern.match, lines) if m}


COURSE = _course_settings()

project = "Efficient LLM Architectures, built from scratch"
author = "the course authors"
copyright = "the course authors"
extensions = ["myst_nb"]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
suppress_warnings = ["mystnb.unknown_mime_type"]

# The notebooks were executed by tools/build_book.py; never run them again here.
nb_execution_mode = "off"
# Widget views need a kernel (or a CDN for the widget manager): show the explorers' static fallback instead.
nb_ipywidgets_js = {}
nb_mime_priority_overrides = [("*", "application/vnd.jupyter.widget-view+json", None)]
myst_enable_extensions = ["dollarmath", "amsmath"]

html_theme = "sphinx_book_theme"
html_title = project
html_static_path = ["_vendor"]  # MathJax 3 (npm mathjax@3.2.2, es5/tex-chtml.js and its woff-v2 fonts)
mathjax_path = "mathjax/tex-chtml.js"
html_js_files = ["plotly.min.js"]  # copied from the plotly wheel after the build (see setup below)
html_theme_options = {
    "repository_url": COURSE["repository"],
    "repository_branch": COURSE["branch"],
    "path_to_docs": "",
    "use_repository_button": True,
    "use_issues_button": False,
    "use_download_button": True,
    "launch_buttons": {"colab_url": "https://colab.research.google.com", "binderhub_url": "https://mybinder.org"},
    "show_toc_level": 2,
}
html_last_updated_fmt = None


def _copy_plotly_js(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        source = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
        shutil.copy2(source, Path(app.outdir) / "_static" / "plotly.min.js")


def setup(app) -> None:
    app.connect("build-finished", _copy_plotly_js)
