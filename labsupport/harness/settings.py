"""Notebook-wide settings: seeding, quick mode for tests, and plotly's renderer.

* :func:`seed_everything` — seed Python's ``random``, numpy and torch in one call.
* :func:`quick_mode` / :func:`pick` — smaller sizes when ``LABSUPPORT_QUICK=1``
  (the test suite executes the notebooks and the student editions that way).
* :func:`front_end` — which front end runs this kernel: Colab, VS Code,
  Jupyter (JupyterLab, Notebook 7, or a headless run by nbclient/nbval) or none.
* :func:`configure_plotly` — a plotly renderer chosen by front end (never
  opening a browser); ``LABSUPPORT_PLOTLY_RENDERER=offline_html`` writes figures
  as HTML that loads no script from the network (the course book, ``bin/book``).
* :func:`triton_interpreter_enabled` — whether Triton kernels run on the CPU under ``TRITON_INTERPRET=1``
  (every family's Triton module re-exports it as ``interpreter_enabled``).
* :func:`cpu_budget` / :func:`configure_torch_threads` — no more torch threads
  than the CPUs this process may really use (containers such as Binder cap CPU
  time with a cgroup quota that torch does not see).
"""

from __future__ import annotations

import math
import numbers
import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

from labsupport.harness.contention import _cgroup_cpu_limit, cpu_budget, spare_cpus  # noqa: F401 (re-exported)

__all__ = [
    "FRONT_ENDS",
    "OFFLINE_HTML_RENDERER",
    "QUICK_ENV_VAR",
    "RENDERER_ENV_VAR",
    "configure_plotly",
    "configure_torch_threads",
    "cpu_budget",
    "front_end",
    "pick",
    "quick_mode",
    "seed_everything",
    "torch_threads",
    "triton_interpreter_enabled",
]

QUICK_ENV_VAR = "LABSUPPORT_QUICK"
FRONT_ENDS = ("colab", "vscode", "jupyter", "none")
OFFLINE_HTML_RENDERER = "offline_html"
# plotly checks PLOTLY_RENDERER against its own renderers when imported, so a renderer
# registered here (offline_html) is asked for through this variable instead.
RENDERER_ENV_VAR = "LABSUPPORT_PLOTLY_RENDERER"
_TRUE_WORDS = frozenset({"1", "true", "yes"})

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every GPU).

    Results are then repeatable run to run on the same machine and versions;
    this does not switch torch to deterministic algorithms (not needed here).
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r})")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    random.seed(int(seed))
    np.random.seed(int(seed))
    torch.manual_seed(int(seed))  # also seeds every CUDA device


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` was set (Triton kernels then run on the CPU, in Python). Triton reads the
    variable when it is first imported, so set it before that."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def quick_mode() -> bool:
    """True when the environment variable ``LABSUPPORT_QUICK`` is ``1``, ``true`` or ``yes`` (any case)."""
    return os.environ.get(QUICK_ENV_VAR, "").strip().lower() in _TRUE_WORDS


def pick(full: T, quick: T) -> T:
    """``quick`` in quick mode (see :func:`quick_mode`), else ``full``.

    Use it for every size that drives run time, e.g.
    ``steps = pick(full=2000, quick=20)``. Both values must be of the same kind
    (numbers may mix int and float) so that quick mode exercises the same code.
    """
    both_numbers = all(
        isinstance(v, numbers.Number) and not isinstance(v, bool) for v in (full, quick)
    )
    if not both_numbers and type(full) is not type(quick):
        raise TypeError(
            f"pick(full, quick) needs values of the same type, got {type(full).__name__} "
            f"and {type(quick).__name__}"
        )
    return quick if quick_mode() else full


def _running_in_ipykernel() -> bool:
    ipython_module = sys.modules.get("IPython")
    if ipython_module is None:
        return False
    shell = ipython_module.get_ipython()
    return shell is not None and type(shell).__module__.startswith("ipykernel.")


def front_end() -> str:
    """Which front end runs this code: one of :data:`FRONT_ENDS`.

    * ``"colab"``: Google Colab (``google.colab`` imported, or its environment
      variables ``COLAB_RELEASE_TAG`` / ``COLAB_NOTEBOOK_ID``);
    * ``"vscode"``: a kernel started by VS Code (``VSCODE_PID``);
    * ``"jupyter"``: any other Jupyter kernel — JupyterLab, Notebook 7, or a
      headless run (nbclient, nbval, the book build), which cannot be told apart
      from inside the kernel;
    * ``"none"``: no kernel (a plain script, pytest).
    """
    if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ or "COLAB_NOTEBOOK_ID" in os.environ:
        return "colab"
    if "VSCODE_PID" in os.environ:
        return "vscode"
    if _running_in_ipykernel():
        return "jupyter"
    return "none"


_RENDERER_BY_FRONT_END = {
    "colab": "colab",
    "vscode": "vscode",
    "jupyter": "plotly_mimetype+notebook_connected",
    "none": "json",
}


def _register_offline_html_renderer() -> None:
    """Register :data:`OFFLINE_HTML_RENDERER`: a figure as an HTML ``<div>`` plus a module script, no plotly.js.

    The page that shows it must load plotly.js itself (the course book ships a
    local copy); ``type="module"`` defers the drawing until that script has run.
    """
    import plotly.io as pio
    from plotly.io.base_renderers import MimetypeRenderer

    class OfflineHtmlRenderer(MimetypeRenderer):
        def to_mimebundle(self, fig_dict: dict) -> dict:
            html = pio.to_html(
                fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False, validate=False
            )
            for plain in ('<script type="text/javascript">', "<script>"):
                html = html.replace(plain, '<script type="module">')
            return {"text/html": html}

    if OFFLINE_HTML_RENDERER not in pio.renderers:
        pio.renderers[OFFLINE_HTML_RENDERER] = OfflineHtmlRenderer()


def configure_plotly() -> str:
    """Choose plotly's default renderer for the current front end (:func:`front_end`) and return its name.

    * ``LABSUPPORT_PLOTLY_RENDERER`` or ``PLOTLY_RENDERER`` set: respected as is
      (the first may name :data:`OFFLINE_HTML_RENDERER`).
    * Colab: ``"colab"``; VS Code: ``"vscode"`` (its built-in plotly renderer).
    * any other Jupyter kernel (JupyterLab, Notebook 7, nbclient/nbval runs):
      ``"plotly_mimetype+notebook_connected"`` — JupyterLab draws the plotly
      mime bundle; the HTML part (plotly.js from its CDN, not embedded) keeps
      figures visible in nbconvert HTML exports and classic front ends.
    * outside a kernel (a plain script, pytest): ``"json"``, which never
      opens a browser.
    """
    import plotly.io as pio

    _register_offline_html_renderer()
    renderer = (
        os.environ.get(RENDERER_ENV_VAR) or os.environ.get("PLOTLY_RENDERER") or _RENDERER_BY_FRONT_END[front_end()]
    )
    pio.renderers.default = renderer
    return renderer


def configure_torch_threads(max_threads: int | None = 1) -> int:
    """Set torch's intra-op threads for the worst case, one, unless more are asked for and free; return the count.

    The default is **one thread**. torch starts one thread per visible core, and
    its threads wait on each other whenever another program shares those cores
    (Binder, a lab server, a laptop compiling in the background): chapter 00 took
    29 s alone and 728 s beside two busy neighbours on 2 threads of a 2-core
    machine, but 35 s and 39 s on 1 thread. One thread costs a little on a quiet
    machine (large matrix products up to about ``cpu_budget()`` times slower, most
    of the course's small models hardly at all) and saves a collapse on a busy one.

    ``max_threads`` asks for more (``None``: as many as granted). It is granted
    only up to :func:`cpu_budget` and up to the CPUs nobody else is using now
    (:func:`labsupport.harness.contention.spare_cpus`, from the load average):
    on a busy machine the answer stays one. Chapter 00 measures what the choice
    costs on the reader's machine.
    """
    if max_threads is not None and (isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1):
        raise ValueError(f"max_threads must be a positive int or None, got {max_threads!r}")
    target = 1 if max_threads == 1 else min(cpu_budget(), spare_cpus(), max_threads or cpu_budget())
    if target != torch.get_num_threads():
        torch.set_num_threads(target)
    return torch.get_num_threads()


@contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run a block on exactly ``threads`` torch threads (capped by :func:`cpu_budget`), then restore the count.

    ``with torch_threads(1): ...`` is how every timing sweep runs: one thread
    is comparable from machine to machine and unhurt by busy neighbours.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(min(threads, cpu_budget()))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
