"""labsupport.settings: seeding, quick mode, and plotly's renderer choice."""

from __future__ import annotations

import random

import numpy as np
import plotly.io as pio
import pytest
import torch

from labsupport import settings
from labsupport.settings import configure_plotly, pick, quick_mode, seed_everything


def draw() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_everything_makes_python_numpy_and_torch_repeat() -> None:
    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    seed_everything(124)
    assert all(a != b for a, b in zip(draw(), first))


@pytest.mark.parametrize(("seed", "error"), [(1.5, TypeError), ("0", TypeError), (True, TypeError), (-1, ValueError), (2**32, ValueError)])
def test_seed_everything_rejects_bad_seeds(seed, error) -> None:
    with pytest.raises(error):
        seed_everything(seed)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("YES", True), (" yes ", True), ("0", False), ("", False), ("no", False), ("quick", False)],
)
def test_quick_mode_reads_the_environment(monkeypatch, value, expected) -> None:
    monkeypatch.setenv("LABSUPPORT_QUICK", value)
    assert quick_mode() is expected
    assert pick(full=1000, quick=10) == (10 if expected else 1000)


def test_quick_mode_is_off_without_the_variable(monkeypatch) -> None:
    monkeypatch.delenv("LABSUPPORT_QUICK", raising=False)
    assert quick_mode() is False
    assert pick(full=[1, 2, 3], quick=[1]) == [1, 2, 3]
    assert pick(full=2.5, quick=1) == 2.5  # ints and floats mix


def test_pick_rejects_values_of_different_kinds() -> None:
    with pytest.raises(TypeError, match="same type"):
        pick(full=[1, 2], quick=1)
    with pytest.raises(TypeError, match="same type"):
        pick(full=1, quick=True)


@pytest.fixture
def clean_renderer_env(monkeypatch):
    for name in ("PLOTLY_RENDERER", "COLAB_RELEASE_TAG", "COLAB_NOTEBOOK_ID", "VSCODE_PID"):
        monkeypatch.delenv(name, raising=False)
    saved = pio.renderers.default
    yield monkeypatch
    pio.renderers.default = saved


def test_configure_plotly_outside_a_kernel_never_opens_a_browser(clean_renderer_env) -> None:
    assert configure_plotly() == "json"
    assert pio.renderers.default == "json"


def test_configure_plotly_in_a_jupyter_kernel(clean_renderer_env) -> None:
    clean_renderer_env.setattr(settings, "_running_in_ipykernel", lambda: True)
    assert configure_plotly() == "plotly_mimetype+notebook_connected"
    assert "browser" not in pio.renderers.default


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [("COLAB_RELEASE_TAG", "release-x", "colab"), ("VSCODE_PID", "42", "vscode"), ("PLOTLY_RENDERER", "svg", "svg")],
)
def test_configure_plotly_detects_front_ends(clean_renderer_env, variable, value, expected) -> None:
    clean_renderer_env.setenv(variable, value)
    assert configure_plotly() == expected
    assert pio.renderers.default == expected
