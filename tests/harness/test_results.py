"""The reader's local results file: record, look up, where it lives, and never failing a chapter."""

from __future__ import annotations

import json

import pytest

from labsupport.harness import hardware, results


@pytest.fixture
def results_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    monkeypatch.setenv(results.ENV_VAR, str(path))
    return path


def test_record_then_lookup_and_a_new_value_replaces_the_old(results_file):
    assert results.lookup("00", "x") is None
    results.record("00", "x", 1.5, "GB/s", machine="test box")
    results.record("00", "x", 2.5, "GB/s", machine="test box")
    results.record("07", "y", 0.5, "recall")
    got = results.lookup("00", "x")
    assert got is not None and got.value == 2.5 and got.unit == "GB/s" and got.machine == "test box"
    assert [m.key for m in results.recorded()] == ["x", "y"]
    assert [m.key for m in results.recorded("07")] == ["y"]
    assert "2.5 GB/s (chapter 00, your machine: test box" in got.describe()
    assert set(json.loads(results_file.read_text())) == {"00/x", "07/y"}


def test_a_corrupt_file_is_ignored_with_a_warning_and_then_rewritten(results_file):
    results_file.write_text("{not json")
    with pytest.warns(UserWarning, match="could not be read"):
        assert results.recorded() == []
    with pytest.warns(UserWarning):
        results.record("00", "x", 1.0, "s")
    assert results.lookup("00", "x").value == 1.0


def test_bad_records_are_refused_clearly(results_file):
    with pytest.raises(ValueError, match="chapter must be a non-empty string"):
        results.record("", "x", 1.0, "s")
    with pytest.raises(TypeError, match="value must be a number"):
        results.record("00", "x", "fast", "s")
    with pytest.raises(ValueError, match="finite"):
        results.record("00", "x", float("nan"), "s")


def test_the_file_lives_in_the_learners_workspace_when_the_notebook_runs_there(tmp_path, monkeypatch):
    monkeypatch.delenv(results.ENV_VAR, raising=False)
    workspace = tmp_path / "my-notebooks"
    workspace.mkdir()
    (workspace / ".course-editions.json").write_text("{}")
    monkeypatch.chdir(workspace)
    assert results.results_path() == workspace / results.FILE_NAME
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    monkeypatch.chdir(notebooks)  # the tracked chapters, with the default workspace beside them
    assert results.results_path() == workspace / results.FILE_NAME
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert results.results_path().name == "course-results.json"


def test_an_unwritable_place_warns_and_does_not_raise(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(results.ENV_VAR, str(blocker / "sub" / "results.json"))
    with pytest.warns(UserWarning, match="could not record"):
        entry = results.record("00", "x", 1.0, "s")
    assert entry.value == 1.0


def test_profile_machine_records_its_peaks_for_chapter_10(results_file, monkeypatch):
    monkeypatch.setattr(hardware, "matmul_gflops", lambda n=1024: 50.0)
    monkeypatch.setattr(hardware, "copy_bandwidth_gbs", lambda megabytes=256: 10.0)
    hardware.profile_machine(threads=1)
    assert results.lookup("00", "matmul_gflops_1thread").value == 50.0
    assert results.lookup("00", "copy_bandwidth_gbs_1thread").value == 10.0
    results.clear()
    hardware.profile_machine(threads=1, record_as=None)
    hardware.profile_machine(threads=1, matmul_n=64, copy_megabytes=8)  # cache-sized: not the machine's peaks
    assert results.recorded() == []
