"""The grading command end to end, on a tiny course and a class of good, wrong, crashing, hanging, cell-deleting,
unreadable and hostile submissions.

The tiny course is a copy of ``labsupport`` plus one notebook, ``00_tiny.ipynb``, holding chapter 00's two
cheapest exercises (``largest_batch`` and ``decode_intensity``, their real checkers). Every submission starts
from the student edition that :mod:`labsupport.harness.editions` makes of it, as a learner's would.

Each submission costs two sandboxed runs (the notebook's, then the grader's re-check), so cases that cannot hide
each other share one: the wrong answer's notebook also lacks its second exercise cell (a wrong answer is graded
"failed", a deleted cell "missing", in one row).

The hostile student (graded first, so that it could reach everyone after it) tries every attack the threat model
names: it monkeypatches the checkers in its kernel, prints fake result lines, writes fake result records, rewrites
the course's files (its own copy and the grader's), overwrites the gradebook, rewrites another student's
submission on disk, and leaves a double-forked daemon that would write a file seconds after its run. Its own
answers are wrong, so any attack that worked would show as a pass.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from labsupport.grade import grade
from labsupport.grade.report import Graded
from labsupport.harness.editions import CODE_PLACEHOLDER, make_student_edition

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 15.0

# About 80 s on the 2-core dev machine: kernels start and import torch for every submission twice. The time limit
# (per cell) is what the hanging notebook costs; 15 s leaves the other cells (at most a few seconds each) ample room.
pytestmark = pytest.mark.notebooks

IMPORTS = "import torch\nfrom labsupport import attention as ref\nfrom labsupport.attention.exercises_core import check_largest_batch"
LARGEST = '''def largest_batch(shape, memory_bytes, context):
    ### BEGIN SOLUTION
    spare = memory_bytes - shape.weight_bytes
    if spare <= 0:
        return 0
    return int(spare // (context * shape.kv_bytes_per_token()))
    ### END SOLUTION


check_largest_batch(largest_batch)'''
INTENSITY = '''def decode_intensity(shape, context, batch):
    ### BEGIN SOLUTION
    flops = batch * (2 * shape.params + 4 * shape.layers * shape.q_heads * shape.head_dim * context)
    moved = shape.params * shape.bytes_per_element + batch * context * shape.kv_bytes_per_token()
    return flops / moved
    ### END SOLUTION


ref.check_decode_intensity(decode_intensity)'''
GOOD_LARGEST = LARGEST.split("    ### BEGIN SOLUTION\n")[1].split("    ### END SOLUTION")[0]
GOOD_INTENSITY = INTENSITY.split("    ### BEGIN SOLUTION\n")[1].split("    ### END SOLUTION")[0]
# The usual mistake: the weights are forgotten, the whole memory goes to the cache.
WRONG_LARGEST = "    return int(memory_bytes // (context * shape.kv_bytes_per_token()))\n"

HOSTILE = '''import json, os, pathlib, subprocess, sys
COURSE, GRADEBOOK, OTHER, MARKER = {course!r}, {gradebook!r}, {other!r}, {marker!r}
import labsupport.harness.checking as checking
import labsupport.attention.exercises_core as core
from labsupport.harness.checking import CheckResult

def always_passes(*args, **kwargs):
    print("✅ largest_batch: passed 5 cases.")
    return CheckResult("largest_batch", "passed", "", 5, 5)

checking.check_function = always_passes
core.check_largest_batch = always_passes
check_largest_batch = always_passes
ref.check_decode_intensity = always_passes
print("✅ decode_intensity: passed 5 cases.")
with open(os.environ.get("LABSUPPORT_CHECK_LOG", "/dev/null"), "a") as log:
    for name in ("largest_batch", "decode_intensity"):
        log.write(json.dumps({{"exercise": name, "checker": "check_" + name, "status": "passed"}}) + "\\n")
patch = "\\ndef check_function(*a, **k):\\n    print('passed')\\n    return True\\n"
for root in (pathlib.Path.cwd().parent, pathlib.Path(COURSE)):
    target = root / "labsupport" / "harness" / "checking.py"
    target.write_text(target.read_text() + patch)
pathlib.Path(GRADEBOOK).parent.mkdir(parents=True, exist_ok=True)
pathlib.Path(GRADEBOOK).write_text("student,passed\\nz_hostile,2\\n")
pathlib.Path(OTHER).write_text("this is not a notebook any more")
daemon = ("import os, sys, time\\nif os.fork(): sys.exit()\\nos.setsid()\\nif os.fork(): sys.exit()\\n"
          "time.sleep(4)\\nopen(%r, 'w').write('still running')\\n" % MARKER)
subprocess.Popen([sys.executable, "-c", daemon])
'''


def _course_notebook() -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# A tiny chapter"), nbformat.v4.new_code_cell(IMPORTS),
                      nbformat.v4.new_code_cell(LARGEST), nbformat.v4.new_code_cell(INTENSITY),
                      nbformat.v4.new_code_cell("print('the end')")]
    return notebook


def _answered(edition: nbformat.NotebookNode, largest: str | None, intensity: str | None) -> nbformat.NotebookNode:
    """The student edition with these bodies in place of the placeholders (None: left undone)."""
    notebook = nbformat.from_dict(json.loads(json.dumps(edition)))
    for cell in notebook.cells:
        for name, body in (("largest_batch", largest), ("decode_intensity", intensity)):
            if f"def {name}(" in cell.source and body is not None:
                cell.source = cell.source.replace(f"    {CODE_PLACEHOLDER}\n", body)
    return notebook


def _insert(notebook: nbformat.NotebookNode, position: int, source: str) -> nbformat.NotebookNode:
    notebook.cells.insert(position, nbformat.v4.new_code_cell(source))
    return notebook


def _make_course(root: Path) -> Path:
    shutil.copytree(REPO / "labsupport", root / "labsupport", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "notebooks").mkdir()
    nbformat.write(_course_notebook(), root / "notebooks" / "00_tiny.ipynb")
    return root


@pytest.fixture(scope="module")
def course(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The course the hostile notebook attacks (the parallel test makes its own)."""
    return _make_course(tmp_path_factory.mktemp("course"))


def _without_cell(notebook: nbformat.NotebookNode, defining: str) -> nbformat.NotebookNode:
    """The notebook less the cell that defines ``defining`` (a learner deleted the exercise)."""
    kept = [cell for cell in notebook.cells if f"def {defining}(" not in cell.source]
    assert len(kept) == len(notebook.cells) - 1
    return nbformat.from_dict({**notebook, "cells": kept})


def _class(course: Path, folder: Path, gradebook: Path, marker: Path) -> None:
    edition = make_student_edition(_course_notebook(), name="00_tiny")
    good = _answered(edition, GOOD_LARGEST, GOOD_INTENSITY)
    submissions = {
        "b_good": good,
        # a wrong answer, and the other exercise's cell deleted (graded "failed" and "missing")
        "c_wrong": _without_cell(_answered(edition, WRONG_LARGEST, None), "decode_intensity"),
        "d_crash": _insert(_answered(edition, GOOD_LARGEST, GOOD_INTENSITY), 3, "raise RuntimeError('oops')"),
        # a cell that never ends (asleep: spinning would take a CPU from the rest of the suite for the whole limit)
        "e_hang": _insert(_answered(edition, GOOD_LARGEST, None), 2, "import time\nwhile True:\n    time.sleep(1)"),
    }
    other = folder / "b_good" / "00_tiny.ipynb"
    hostile = _answered(edition, "    return 0\n",
                        "    return 0.0\n\nfrom labsupport.attention._solutions import decode_intensity_answer as decode_intensity\n")
    hostile = _insert(hostile, 2, HOSTILE.format(course=str(course), gradebook=str(gradebook), other=str(other),
                                                 marker=str(marker)))
    submissions["a_hostile"] = hostile
    for student, notebook in submissions.items():
        (folder / student).mkdir(parents=True)
        nbformat.write(notebook, folder / student / "00_tiny.ipynb")
    (folder / "g_garbage").mkdir()
    (folder / "g_garbage" / "00_tiny.ipynb").write_text("{ not json")


@pytest.fixture(scope="module")
def graded(course: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Graded], Path, Path]:
    base = tmp_path_factory.mktemp("class")
    gradebook, marker = base / "out" / "grades.csv", base / "daemon-was-here"
    _class(course, base / "submissions", gradebook, marker)
    rows = grade(base / "submissions", gradebook, course_root=course, timeout=TIMEOUT_S, jobs=1)
    # The daemon writes 4 s after the hostile run started it. The runs graded after that one (one at a time) took at
    # least the sum of their run times since; wait for the rest of 5 s, if any (it waited 5 s after grading before).
    after_hostile = rows[[row.student for row in rows].index("a_hostile") + 1:]  # rows come in grading order
    since_hostile = sum(row.run_seconds for row in after_hostile)
    time.sleep(max(0.0, 5.0 - since_hostile))
    return {row.student: row for row in rows}, gradebook, marker


def _statuses(row: Graded) -> dict[str, str]:
    return {name: result["status"] for name, result in row.exercises.items()}


def test_a_good_submission_passes_everything(graded) -> None:
    rows, _, _ = graded
    assert rows["b_good"].run == "ok"
    assert _statuses(rows["b_good"]) == {"largest_batch": "passed", "decode_intensity": "passed"}
    assert rows["b_good"].flags == []


def test_a_wrong_answer_fails_with_the_checkers_diagnosis(graded) -> None:
    row = graded[0]["c_wrong"]
    assert row.run == "ok"
    assert _statuses(row)["largest_batch"] == "failed"
    assert "❌ largest batch that fits: case" in row.exercises["largest_batch"]["message"]


def test_a_crashing_notebook_is_reported_and_its_exercises_still_graded(graded) -> None:
    row = graded[0]["d_crash"]
    assert row.run == "error" and row.run_cell == 3 and "RuntimeError: oops" in row.run_error
    assert _statuses(row) == {"largest_batch": "passed", "decode_intensity": "passed"}


def test_a_hanging_notebook_is_stopped_at_the_time_limit(graded) -> None:
    row = graded[0]["e_hang"]
    assert row.run == "timeout"
    # stopped by the run's own cell limit (the grader's kill, 30 s later, is the fallback for a run that ignores it)
    assert "ran past the time limit" in row.run_error, row.run_error
    assert row.run_seconds < TIMEOUT_S + 15
    assert _statuses(row) == {"largest_batch": "passed", "decode_intensity": "not done"}


def test_deleted_exercise_cells_count_as_missing(graded) -> None:
    row = graded[0]["c_wrong"]  # its decode_intensity cell is deleted
    assert row.run == "ok"
    assert _statuses(row) == {"largest_batch": "failed", "decode_intensity": "missing"}


def test_an_unreadable_notebook_gets_its_row(graded) -> None:
    row = graded[0]["g_garbage"]
    assert row.run == "unreadable"
    assert set(_statuses(row).values()) == {"error"}


def test_a_hostile_notebook_cannot_pass_itself_by_patching_printing_or_writing(graded) -> None:
    row = graded[0]["a_hostile"]
    assert _statuses(row) == {"largest_batch": "failed", "decode_intensity": "refused"}
    assert row.reported == {"largest_batch": "passed", "decode_intensity": "passed"}  # what it claimed
    flags = " ".join(row.flags)
    assert "the notebook's own check said passed" in flags
    assert "labsupport/harness/checking.py" in flags  # it rewrote the grader's course files: named
    assert row.skipped > 0


def test_a_hostile_notebook_cannot_change_anyone_elses_grade_or_the_gradebook(graded) -> None:
    rows, gradebook, marker = graded
    # graded after the hostile one, from the copy read before any notebook ran, with the checkers as they were
    assert _statuses(rows["b_good"]) == {"largest_batch": "passed", "decode_intensity": "passed"}
    assert _statuses(rows["c_wrong"])["largest_batch"] == "failed"
    with gradebook.open() as stream:
        table = {r["student"]: r for r in csv.DictReader(stream)}
    assert set(table) == set(rows)
    assert table["a_hostile"]["passed"] == "0" and table["b_good"]["passed"] == "2"
    assert table["c_wrong"]["00:largest_batch"] == "failed"
    assert not marker.exists(), "a process the hostile notebook started outlived its run"


def test_feedback_explains_each_exercise(graded) -> None:
    _, gradebook, _ = graded
    feedback = (gradebook.parent / "feedback" / "c_wrong.md").read_text()
    assert "### `largest_batch`: failed" in feedback and "❌ largest batch that fits" in feedback
    assert "### `decode_intensity`: missing" in feedback
    assert "### `decode_intensity`: not done" in (gradebook.parent / "feedback" / "e_hang.md").read_text()
    hostile = (gradebook.parent / "feedback" / "a_hostile.md").read_text()
    assert "your notebook's own check said: passed" in hostile


def test_parallel_grading_gives_the_same_grades(tmp_path: Path) -> None:
    course = _make_course(tmp_path / "course")
    edition = make_student_edition(_course_notebook(), name="00_tiny")
    folder = tmp_path / "submissions"
    for student, notebook in {"good": _answered(edition, GOOD_LARGEST, GOOD_INTENSITY),
                              "wrong": _answered(edition, WRONG_LARGEST, GOOD_INTENSITY)}.items():
        (folder / student).mkdir(parents=True)
        nbformat.write(notebook, folder / student / "00_tiny.ipynb")
    rows = {r.student: r for r in grade(folder, tmp_path / "grades.csv", course_root=course, timeout=TIMEOUT_S,
                                        jobs=2)}
    assert _statuses(rows["good"]) == {"largest_batch": "passed", "decode_intensity": "passed"}
    assert _statuses(rows["wrong"]) == {"largest_batch": "failed", "decode_intensity": "passed"}
