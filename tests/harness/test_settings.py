"""labsupport.harness.settings: seeding, quick mode, and plotly's renderer choice."""

from __future__ import annotations

import random

import numpy as np
import plotly.io as pio
import pytest
import torch

from labsupport.harness import settings
from labsupport.harness.settings import configure_plotly, pick, quick_mode, seed_everything


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
    for name in ("PLOTLY_RENDERER", "LABSUPPORT_PLOTLY_RENDERER", "COLAB_RELEASE_TAG", "COLAB_NOTEBOOK_ID", "VSCODE_PID"):
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


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [("COLAB_RELEASE_TAG", "release-x", "colab"), ("COLAB_NOTEBOOK_ID", "x", "colab"), ("VSCODE_PID", "42", "vscode")],
)
def test_front_end_is_detected_from_the_environment(clean_renderer_env, variable, value, expected) -> None:
    assert settings.front_end() == "none"
    clean_renderer_env.setattr(settings, "_running_in_ipykernel", lambda: True)
    assert settings.front_end() == "jupyter"
    clean_renderer_env.setenv(variable, value)
    assert settings.front_end() == expected
    assert expected in settings.FRONT_ENDS


def test_front_end_sees_colab_by_its_module(clean_renderer_env) -> None:
    import sys
    import types

    clean_renderer_env.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert settings.front_end() == "colab"
    assert configure_plotly() == "colab"


def test_the_offline_html_renderer_loads_no_script_from_the_network(clean_renderer_env) -> None:
    import plotly.graph_objects as go

    clean_renderer_env.setenv(settings.RENDERER_ENV_VAR, settings.OFFLINE_HTML_RENDERER)
    assert configure_plotly() == "offline_html"
    bundle = go.Figure(go.Scatter(y=[1, 3, 2]))._repr_mimebundle_()
    html = bundle["text/html"]
    assert list(bundle) == ["text/html"]
    assert "Plotly.newPlot" in html and '<script type="module">' in html
    assert "https://" not in html and "cdn" not in html.lower() and "<script src" not in html


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_limit_reads_v1_and_v2(tmp_path, files, expected) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert settings._cgroup_cpu_limit(tmp_path) == expected


def test_cpu_budget_is_capped_by_a_quota_and_at_least_one(tmp_path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert settings.cpu_budget(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("20000 100000\n")  # a fifth of a CPU
    assert settings.cpu_budget(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert settings.cpu_budget(tmp_path) >= 1


def test_configure_torch_threads_only_lowers(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(settings, "cpu_budget", lambda: 1)
        assert settings.configure_torch_threads() == 1
        monkeypatch.setattr(settings, "cpu_budget", lambda: 8)
        assert settings.configure_torch_threads() == 1  # never raised back
        torch.set_num_threads(2)
        assert settings.configure_torch_threads(max_threads=1) == 1
        with pytest.raises(ValueError, match="max_threads"):
            settings.configure_torch_threads(max_threads=0)
    finally:
        torch.set_num_threads(before)


def test_configure_torch_threads_defaults_to_one_thread(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(settings, "cpu_budget", lambda *args: 2)
        torch.set_num_threads(2)
        assert settings.configure_torch_threads() == 1  # the worst case on shared cores
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("load", "expected"), [(0.1, 2), (1.2, 1), (6.0, 1)])
def test_configure_torch_threads_grants_more_only_on_an_idle_machine(monkeypatch, load, expected) -> None:
    from labsupport.harness import contention

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(settings, "cpu_budget", lambda *args: 2)
        monkeypatch.setattr(contention, "cpu_budget", lambda *args: 2)
        monkeypatch.setattr(contention, "machine_cpus", lambda: 2)
        monkeypatch.setattr(contention, "load_average", lambda: load)
        torch.set_num_threads(1)
        assert settings.configure_torch_threads(max_threads=4) == expected
        assert settings.configure_torch_threads(max_threads=None) == expected
    finally:
        torch.set_num_threads(before)


def test_torch_threads_sets_and_restores(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(settings, "cpu_budget", lambda *args: 2)
        torch.set_num_threads(2)
        with settings.torch_threads(1) as threads:
            assert threads == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), settings.torch_threads(1):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2  # restored after an error too
        for bad in (0, 1.0, True, None):
            with pytest.raises(ValueError, match="threads"), settings.torch_threads(bad):
                pass
    finally:
        torch.set_num_threads(before)
