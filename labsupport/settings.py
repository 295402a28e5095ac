"""Notebook-wide settings: seeding, quick mode for tests, and plotly's renderer.

* :func:`seed_everything` — seed Python's ``random``, numpy and torch in one call.
* :func:`quick_mode` / :func:`pick` — smaller sizes when ``LABSUPPORT_QUICK=1``
  (the test suite executes the notebooks and the student editions that way).
* :func:`configure_plotly` — a plotly renderer that works in JupyterLab, Colab,
  VS Code and in headless execution (nbclient, nbval), never opening a browser.
"""

from __future__ import annotations

import numbers
import os
import random
import sys
from typing import TypeVar

import numpy as np
import torch

__all__ = ["QUICK_ENV_VAR", "configure_plotly", "pick", "quick_mode", "seed_everything"]

QUICK_ENV_VAR = "LABSUPPORT_QUICK"
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


def configure_plotly() -> str:
    """Choose plotly's default renderer for the current front end and return its name.

    * ``PLOTLY_RENDERER`` set: respected as is.
    * Colab (``COLAB_RELEASE_TAG``/``COLAB_NOTEBOOK_ID``): ``"colab"``.
    * VS Code (``VSCODE_PID``): ``"vscode"``.
    * any other Jupyter kernel (JupyterLab, Notebook 7, nbclient/nbval runs):
      ``"plotly_mimetype+notebook_connected"`` — JupyterLab draws the plotly
      mime bundle; the HTML part (plotly.js from its CDN, not embedded) keeps
      figures visible in nbconvert HTML exports and classic front ends.
    * outside a kernel (a plain script, pytest): ``"json"``, which never
      opens a browser.
    """
    import plotly.io as pio

    if os.environ.get("PLOTLY_RENDERER"):
        renderer = os.environ["PLOTLY_RENDERER"]
    elif "COLAB_RELEASE_TAG" in os.environ or "COLAB_NOTEBOOK_ID" in os.environ:
        renderer = "colab"
    elif "VSCODE_PID" in os.environ:
        renderer = "vscode"
    elif _running_in_ipykernel():
        renderer = "plotly_mimetype+notebook_connected"
    else:
        renderer = "json"
    pio.renderers.default = renderer
    return renderer
