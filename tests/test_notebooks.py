"""Student editions run top to bottom, and every checker in them says "not done yet".

The chapters themselves are executed at full size by nbval (``bin/test`` runs
pytest over ``tests/`` and ``notebooks/`` with ``--nbval-lax``), with
``LABSUPPORT_STRICT_CHECKS=1`` so that a checker failing on a reference solution
fails the run. Each chapter's student edition (solution blocks replaced by
``raise NotImplementedError``) is run once per session, in quick mode (``LABSUPPORT_QUICK=1``), and checked by
``conftest.student_edition_problems``; a failure names the notebook, the cell and its error:

* by tests/test_browser.py, in JupyterLab, as a learner runs it, when that test is selected in this session and
  can run (Chromium and Playwright present): the test here then skips, saying so;
* otherwise here, with nbclient in a kernel of this interpreter, working directory ``notebooks/``.

Each executed edition is saved to ``.screenshots/student/executed/`` (ignored by git), stamped as the book
build stamps its own (``tools/build_book.py``'s ``source_stamp``): tests/test_static_book.py's student book
takes chapter 00 from there instead of running it a second time. Skip with ``-m 'not notebooks'``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import chapter_notebooks, notebook_params, save_executed_student_edition, student_edition_problems

from labsupport.harness.editions import write_student_editions

NOTEBOOKS = chapter_notebooks()
BROWSER_TEST = "tests/test_browser.py::test_chapter_runs_and_renders_in_jupyterlab"

pytestmark = pytest.mark.notebooks


def browser_runs_it(request: pytest.FixtureRequest, path: Path) -> bool:
    """Will tests/test_browser.py run this chapter's student edition in this session (selected, and able to run)?"""
    wanted = f"{BROWSER_TEST}[{path.stem}]"
    if not any(item.nodeid.endswith(wanted) for item in request.session.items):
        return False
    browser = sys.modules.get("test_browser")
    return browser is not None and browser.why_no_browser() is None


@pytest.mark.parametrize("path", notebook_params(NOTEBOOKS))
def test_student_edition_runs_and_every_checker_says_not_done_yet(path: Path, run_notebook, tmp_path, monkeypatch,
                                                                   request) -> None:
    if browser_runs_it(request, path):
        pytest.skip(f"{path.name}: tests/test_browser.py runs and checks its student edition in this session")
    monkeypatch.setenv("LABSUPPORT_QUICK", "1")
    [edition] = write_student_editions([path], tmp_path)
    name = f"student edition of {path.name}"
    executed = run_notebook(edition, name=name)
    problem = student_edition_problems(path, executed, name)
    assert problem is None, problem
    save_executed_student_edition(path, executed)
