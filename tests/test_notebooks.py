"""Every chapter runs top to bottom, and so does its student edition (checkers then say "not done yet").

Both run with nbclient in a kernel of this interpreter, working directory
``notebooks/``, at most 300 s per cell; a failure names the notebook, the cell
and its error. Skip both with ``-m 'not notebooks'``.

Sizes: the student editions always run with ``LABSUPPORT_QUICK=1``. The chapters
run quick too, so that the suite stays within its time budget as chapters are
added; ``LABSUPPORT_FULL_NOTEBOOKS=1 bash bin/test`` runs them at full size (what
a reader runs; about 3 minutes each on 2 cores). ``pytest --nbval-lax notebooks/``
runs the chapters at full size through nbval.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from conftest import chapter_notebooks, notebook_params, stream_text

from labsupport.editions import find_solution_blocks, write_student_editions

NOTEBOOKS = chapter_notebooks()
CHECKER_MARKS = ("✅", "❌", "⏳")

pytestmark = pytest.mark.notebooks


@pytest.mark.parametrize("path", notebook_params(NOTEBOOKS))
def test_chapter_runs_top_to_bottom(path: Path, run_notebook, monkeypatch) -> None:
    if os.environ.get("LABSUPPORT_FULL_NOTEBOOKS", "").strip().lower() in ("1", "true", "yes"):
        monkeypatch.delenv("LABSUPPORT_QUICK", raising=False)
    else:
        monkeypatch.setenv("LABSUPPORT_QUICK", "1")
    executed = run_notebook(path)
    failures = [(cell, text) for cell, text in stream_text(executed) for line in text.splitlines()
                if line.lstrip().startswith("❌")]
    assert not failures, f"{path.name}: a checker fails on the reference solution: {failures}"


def checker_lines(notebook: nbformat.NotebookNode) -> list[tuple[int, str]]:
    return [
        (cell, line.strip())
        for cell, text in stream_text(notebook)
        for line in text.splitlines()
        if line.strip().startswith(CHECKER_MARKS)
    ]


@pytest.mark.parametrize("path", notebook_params(NOTEBOOKS))
def test_student_edition_runs_and_every_checker_says_not_done_yet(path: Path, run_notebook, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LABSUPPORT_QUICK", "1")
    [edition] = write_student_editions([path], tmp_path)
    executed = run_notebook(edition, name=f"student edition of {path.name}")
    exercises = sum(
        len(find_solution_blocks(cell.source)) for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
    )
    lines = checker_lines(executed)
    wrong = [(cell, line) for cell, line in lines if "not done yet" not in line]
    assert not wrong, f"student edition of {path.name}: checkers should all say 'not done yet', got {wrong}"
    if exercises:
        assert lines, f"student edition of {path.name}: {exercises} solution block(s) but no checker reported anything"
