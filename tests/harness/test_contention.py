"""labsupport.harness.contention: load, spare CPUs, busy warnings, measured numbers with their conditions."""

from __future__ import annotations

import pytest
import torch

from labsupport.harness import contention, settings


@pytest.fixture
def two_cpus(monkeypatch):
    """A 2-CPU machine of which this process may use both."""
    monkeypatch.setattr(contention, "machine_cpus", lambda: 2)
    monkeypatch.setattr(contention, "cpu_budget", lambda *args: 2)
    monkeypatch.setattr(settings, "cpu_budget", lambda *args: 2)
    return monkeypatch


def test_load_average_is_a_number_here() -> None:
    load = contention.load_average()
    assert load is None or load >= 0


@pytest.mark.parametrize(("load", "expected"), [(0.0, 2), (0.3, 2), (0.8, 1), (1.6, 1), (5.0, 1)])
def test_spare_cpus_subtracts_the_load_and_keeps_one(two_cpus, load, expected) -> None:
    assert contention.spare_cpus(load) == expected


@pytest.mark.parametrize("load", [-1.0, float("nan"), "0.3", True])
def test_spare_cpus_rejects_bad_loads(two_cpus, load) -> None:
    with pytest.raises(ValueError, match="load"):
        contention.spare_cpus(load)


def test_busy_warning_only_above_the_cpus(two_cpus) -> None:
    assert contention.busy_warning(0.5) is None
    assert contention.busy_warning(2.0) is None
    warning = contention.busy_warning(5.1)
    assert warning is not None and "busy" in warning and "5.1" in warning and "2 CPU" in warning
    short = contention.busy_warning(5.1, short=True)
    assert short is not None and "busy" in short and len(short) < len(warning)
    two_cpus.setattr(contention, "load_average", lambda: None)  # Windows: no load average, no warning
    assert contention.busy_warning() is None


@pytest.mark.parametrize(("load", "state"), [(0.2, "quiet"), (1.5, "partly busy"), (4.0, "busy"), (None, "load unknown")])
def test_measurement_conditions_name_threads_cpus_and_load(two_cpus, load, state) -> None:
    two_cpus.setattr(contention, "load_average", lambda: load)
    text = contention.measurement_conditions()
    assert f"{torch.get_num_threads()} torch thread" in text and "2 CPUs" in text and state in text


def test_print_measured_prints_the_number_with_its_conditions(two_cpus, capsys) -> None:
    two_cpus.setattr(contention, "load_average", lambda: 0.2)
    line = contention.print_measured("copy bandwidth", 11.834, "GB/s")
    assert capsys.readouterr().out.strip() == line
    assert line.startswith("copy bandwidth: 11.8 GB/s") and "quiet" in line
    assert "1,235 GFLOP/s" in contention.print_measured("peak", 1234.6, "GFLOP/s")
    assert "ratio: 42 " in contention.print_measured("ratio", 42) + " "


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [(("", 1.0), {}, TypeError), (("x", "1"), {}, TypeError), (("x", None), {}, TypeError),
     (("x", 1.0, 3), {}, TypeError), (("x", 1.0), {"digits": 0}, ValueError)],
)
def test_print_measured_rejects_bad_input(args, kwargs, error) -> None:
    with pytest.raises(error):
        contention.print_measured(*args, **kwargs)


def test_contention_imports_nothing_from_the_rest_of_the_harness() -> None:
    """settings imports contention, never the other way round: no import circle between the two."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(contention.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name.startswith("labsupport")}, imported
    assert settings.cpu_budget is contention.cpu_budget  # re-exported, one definition


@pytest.mark.parametrize(("load", "state"), [(1.0, "quiet"), (1.4, "quiet"), (1.6, "partly busy"),
                                             (2.0, "partly busy"), (2.1, "busy")])
def test_the_measuring_thread_itself_does_not_make_the_machine_busy(two_cpus, load, state) -> None:
    # a load of 1.0 on 2 CPUs is the notebook's own thread: quiet, not "partly busy" (issue 24)
    two_cpus.setattr(contention, "load_average", lambda: load)
    assert contention.measurement_conditions().endswith(f"({state})")
