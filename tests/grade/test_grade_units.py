"""The grader's parts, without kernels: exercise discovery, the re-check's namespace, the record channel, the
outputs, process clean-up and the file scan."""

from __future__ import annotations

import csv
import importlib
import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch

from labsupport.grade.cli import find_submissions
from labsupport.grade.course import chapter_of, exercises_of
from labsupport.grade.report import Graded, write_gradebook
from labsupport.grade.sandbox import FileScan, Snapshot, new_token, run_sandboxed, sandbox_env
from labsupport.grade.verify import namespace_of
from labsupport.harness.checking import RECORD_ENV_VAR, Case, check_function

REPO = Path(__file__).resolve().parents[2]
CHAPTERS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_exercise_of_every_chapter_resolves_to_a_checker(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    blocks = sum(c.source.count("### BEGIN SOLUTION") for c in notebook.cells if c.cell_type == "code")
    exercises = exercises_of(notebook)
    assert len(exercises) >= 1 and len(exercises) <= blocks
    for exercise in exercises:
        module, attribute = exercise.checker.split(":")
        assert callable(getattr(importlib.import_module(module), attribute)), exercise


def test_a_solution_without_a_checker_call_is_an_error() -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION")]
    with pytest.raises(ValueError, match="calls no course checker"):
        exercises_of(notebook)


def test_chapter_comes_from_the_file_name() -> None:
    assert chapter_of("03_linear_attention.ipynb") == "03"
    assert chapter_of("homework.ipynb") is None


def test_the_recheck_keeps_definitions_and_skips_everything_else() -> None:
    course = nbformat.v4.new_notebook()
    course.cells = [nbformat.v4.new_code_cell("import math\n%matplotlib inline")]
    submission = nbformat.v4.new_notebook()
    submission.cells = [
        nbformat.v4.new_code_cell("SCALE = 2\nimport labsupport.harness.checking as checking\n"
                                  "checking.check_function = None\nprint('✅ passed')"),
        nbformat.v4.new_code_cell("def f(x):\n    return SCALE * math.sqrt(x)\n\nf = f\nraise RuntimeError('no')"),
        nbformat.v4.new_code_cell("def (broken"),
    ]
    submission.cells.append(nbformat.v4.new_code_cell(
        "from labsupport.harness import settings\nmode = settings.pick(full=1, quick=2)\nbad = settings.pick(full=f, quick=f)"))
    namespace, skipped, notes = namespace_of(course, submission)
    assert namespace["f"](4.0) == 4.0
    assert namespace["mode"] in (1, 2) and "bad" not in namespace  # a course call with constants only
    import labsupport.harness.checking as checking

    assert checking.check_function is check_function  # the monkeypatch was skipped
    assert skipped == 5  # the patch, the print, `f = f` (not a literal), the raise, a course call on `f`
    assert any("cell 2" in n for n in notes)


def test_check_function_writes_its_record_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "checks.jsonl"
    cases = [Case("two", (torch.tensor([1.0, 2.0]),))]

    def check_double(fn):
        return check_function(fn, lambda x: 2 * x, cases, exercise="double", quiet=True)

    check_double(lambda x: 2 * x)
    assert not record.exists()
    monkeypatch.setenv(RECORD_ENV_VAR, str(record))
    check_double(lambda x: 2 * x)
    check_double(lambda x: 3 * x)
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r["exercise"], r["checker"], r["status"]) for r in lines] == [
        ("double", "check_double", "passed"), ("double", "check_double", "failed")]
    assert lines[0]["cases_passed"] == lines[0]["cases_total"] == 1


def test_the_gradebook_escapes_formulas_and_replaces_a_planted_link(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep me")
    out = tmp_path / "grades.csv"
    out.symlink_to(elsewhere)
    row = Graded("=HYPERLINK(\"x\")", "00_a.ipynb", "00", run="ok",
                 exercises={"f": {"status": "passed", "message": ""}})
    write_gradebook([row], out, ["00:f"])
    assert elsewhere.read_text() == "keep me" and not out.is_symlink()
    [read] = list(csv.DictReader(out.open()))
    assert read["student"].startswith("'=") and read["00:f"] == "passed" and read["passed"] == "1"


def test_submissions_are_read_at_once_and_checkpoints_skipped(tmp_path: Path) -> None:
    (tmp_path / "ann" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "ann" / "01_x.ipynb").write_text("{}")
    (tmp_path / "ann" / ".ipynb_checkpoints" / "01_x-checkpoint.ipynb").write_text("{}")
    found = find_submissions(tmp_path)
    (tmp_path / "ann" / "01_x.ipynb").write_text("changed")
    assert [(s.student, s.name, s.chapter, s.content) for s in found] == [("ann", "01_x.ipynb", "01", b"{}")]


def test_a_double_forked_process_does_not_outlive_its_run(tmp_path: Path) -> None:
    marker = tmp_path / "alive"
    daemon = ("import os, sys, time\nif os.fork(): sys.exit()\nos.setsid()\nif os.fork(): sys.exit()\n"
              f"time.sleep(2)\nopen({str(marker)!r}, 'w').write('x')\n")
    env = sandbox_env(tmp_path / "run", new_token())
    env["PATH"] = os.environ.get("PATH", "")
    result = run_sandboxed([sys.executable, "-c", daemon], tmp_path, env, 30, alone=True)
    assert result.returncode == 0 and not result.timed_out
    assert result.left_behind >= 1
    time.sleep(3)
    assert not marker.exists()


def test_a_run_past_its_limit_is_stopped(tmp_path: Path) -> None:
    env = sandbox_env(tmp_path / "run", new_token())
    started = time.monotonic()
    result = run_sandboxed([sys.executable, "-c", "while True: pass"], tmp_path, env, 1.5, alone=True)
    assert result.timed_out and time.monotonic() - started < 10


def test_the_scan_names_a_changed_file_even_with_its_time_set_back(tmp_path: Path) -> None:
    target = tmp_path / "lib" / "module.py"
    target.parent.mkdir()
    target.write_text("x = 1\n")
    scan = FileScan([tmp_path / "lib"])
    assert scan.changes() == []
    before = target.stat()
    time.sleep(0.01)
    target.write_text("x = 2\n")  # same size
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert scan.changes() == [str(target)]


def test_the_snapshot_is_taken_once(tmp_path: Path) -> None:
    course = tmp_path / "course"
    (course / "labsupport").mkdir(parents=True)
    (course / "labsupport" / "__init__.py").write_text("ORIGINAL = True\n")
    snapshot = Snapshot(course)
    (course / "labsupport" / "__init__.py").write_text("ORIGINAL = False\n")
    snapshot.write(tmp_path / "run")
    assert (tmp_path / "run" / "labsupport" / "__init__.py").read_text() == "ORIGINAL = True\n"


def test_a_planted_fifo_or_link_does_not_block_or_mislead_the_grader(tmp_path: Path) -> None:
    from labsupport.grade.cli import _read_small

    fifo, link, plain = tmp_path / "fifo", tmp_path / "link", tmp_path / "plain"
    os.mkfifo(fifo)
    plain.write_text("x" * 100)
    link.symlink_to(plain)
    for path in (fifo, link):
        with pytest.raises(OSError):
            _read_small(path)
    assert _read_small(plain, limit=10) == "x" * 10
