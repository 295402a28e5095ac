"""labsupport.harness.envcheck: one line per requirement, a fix for each failure, exit status 1 on failure."""

from __future__ import annotations

import types

import pytest

from labsupport.harness import envcheck
from labsupport.harness.envcheck import CheckLine, check_data, check_package, check_python, format_line, main


def fake_import(version: str):
    def import_module(name: str) -> object:
        return types.SimpleNamespace(__version__=version)

    return import_module


def failing_import(name: str) -> object:
    raise ImportError(f"No module named {name!r}")


def test_the_real_environment_passes(capsys) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("python", "torch", "numpy", "ipywidgets", "plotly", "anywidget", "jupyterlab_widgets", "tqdm",
                 "safetensors", "triton", "data checksums"):
        assert f" {name}: " in out
    assert "FAIL" not in out


@pytest.mark.parametrize(
    ("version", "status"),
    [((3, 11, 7), "OK"), ((3, 10, 0), "OK"), ((3, 12, 1), "OK"), ((3, 9, 18), "FAIL"), ((3, 13, 0), "FAIL")],
)
def test_python_version_range(version, status) -> None:
    line = check_python(version)
    assert line.status == status
    assert (line.fix is not None) == (status == "FAIL")


def test_package_versions_against_minimum_and_tested() -> None:
    name = "labsupport_no_such_dist"
    assert check_package(name, minimum="8", import_module=fake_import("8.1.2")).status == "OK"
    too_old = check_package(name, minimum="8", import_module=fake_import("7.8.0"))
    assert too_old.status == "FAIL" and "need >= 8" in too_old.detail and "pip install" in too_old.fix
    assert check_package(name, tested="2.13.0", import_module=fake_import("2.13.0+cpu")).status == "OK"
    untested = check_package(name, tested="2.13.0", import_module=fake_import("2.12.1"))
    assert untested.status == "WARN" and "2.13.0" in untested.detail


def test_missing_packages_fail_unless_optional() -> None:
    missing = check_package("anywidget", import_module=failing_import, purpose="FigureWidget")
    assert missing.status == "FAIL" and "cannot import anywidget" in missing.detail and missing.fix
    optional = check_package("triton", required=False, purpose="chapter 01 GPU kernel", import_module=failing_import)
    assert optional.status == "SKIP"
    assert format_line(optional) == "SKIP  triton: (optional, chapter 01 GPU kernel)"


def test_format_line_adds_what_to_do_only_when_needed() -> None:
    assert format_line(CheckLine("numpy", "OK", "2.4.6", fix="ignored")) == "OK    numpy: 2.4.6"
    text = format_line(CheckLine("numpy", "FAIL", "cannot import numpy", fix="pip install numpy"))
    assert text.splitlines() == ["FAIL  numpy: cannot import numpy", "      → fix: pip install numpy"]


def test_checksum_mismatch_fails_the_whole_check(monkeypatch, capsys) -> None:
    problems = ["shakespeare.txt: sha256 differs from MANIFEST.sha256 (the file was changed or is corrupt)"]
    monkeypatch.setattr("labsupport.harness.data.verify_manifest", lambda: problems)
    assert check_data().status == "FAIL"
    assert main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL  data checksums: shakespeare.txt: sha256 differs" in out
    assert "→ fix: restore data/" in out
    assert "1 problem(s): data checksums" in out


def test_a_missing_required_package_makes_the_exit_status_1(monkeypatch, capsys) -> None:
    real_check_package = envcheck.check_package

    def check_without_plotly(module_name: str, **kwargs):
        if module_name == "plotly":
            kwargs["import_module"] = failing_import
        return real_check_package(module_name, **kwargs)

    monkeypatch.setattr(envcheck, "check_package", check_without_plotly)
    assert main([]) == 1
    assert "FAIL  plotly: cannot import plotly" in capsys.readouterr().out


def test_many_data_problems_are_summarised() -> None:
    line = check_data(lambda: [f"f{i}: missing" for i in range(5)])
    assert line.detail.endswith("and 2 more")


def test_cpu_threads_warns_when_torch_oversubscribes() -> None:
    assert envcheck.check_cpu_threads(threads=2, budget=2).status == "OK"
    line = envcheck.check_cpu_threads(threads=16, budget=1)
    assert line.status == "WARN" and "16 thread" in line.detail and "OMP_NUM_THREADS=1" in line.fix
    assert envcheck.check_cpu_threads().status in ("OK", "WARN")
