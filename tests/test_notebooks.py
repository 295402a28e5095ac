"""Student editions run top to bottom, and every checker in them says "not done yet".

The chapters themselves are executed at full size by nbval (``bin/test`` runs
pytest over ``tests/`` and ``notebooks/`` with ``--nbval-lax``), with
``LABSUPPORT_STRICT_CHECKS=1`` so that a checker failing on a reference solution
fails the run. Here each chapter's student edition (solution blocks replaced by
``raise NotImplementedError``) runs with nbclient in a kernel of this
interpreter, working directory ``notebooks/``, in quick mode
(``LABSUPPORT_QUICK=1``); a failure names the notebook, the cell and its error.
Each executed edition is saved to ``.screenshots/student/executed/`` (ignored by git), stamped as the book
build stamps its own (``tools/build_book.py``'s ``source_stamp``): tests/test_static_book.py's student book
takes chapter 00 from there instead of running it a second time. Skip with ``-m 'not notebooks'``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, chapter_notebooks, notebook_params, stream_text

from labsupport.harness.editions import find_solution_blocks, write_student_editions

NOTEBOOKS = chapter_notebooks()
CHECKER_MARKS = ("✅", "❌", "⏳")
EXECUTED_STUDENT_EDITIONS = REPO / ".screenshots" / "student" / "executed"


def save_executed_edition(path: Path, executed: nbformat.NotebookNode) -> None:
    """Keep the executed student edition of ``path`` for the student book, stamped as ``tools/build_book.py`` stamps
    a student edition it ran in quick mode (the notebook's bytes, the library's sources, the mode, the edition)."""
    spec = importlib.util.spec_from_file_location("build_book", REPO / "tools" / "build_book.py")
    build_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_book)
    kept = nbformat.from_dict(executed)
    kept.metadata[build_book.STAMP_KEY] = build_book.source_stamp(path, quick=True, student=True)
    kept.metadata.pop("widgets", None)
    EXECUTED_STUDENT_EDITIONS.mkdir(parents=True, exist_ok=True)
    nbformat.write(kept, EXECUTED_STUDENT_EDITIONS / path.name)


pytestmark = pytest.mark.notebooks


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
    save_executed_edition(path, executed)
