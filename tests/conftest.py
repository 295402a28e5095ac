"""Shared test helpers: the repository's paths and a notebook runner.

The runner executes a notebook with nbclient in a kernel of *this* interpreter
(``sys.executable -m ipykernel_launcher``), whatever kernelspecs are installed
elsewhere, with the working directory ``notebooks/`` as when a reader opens it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

REPO = Path(__file__).resolve().parent.parent

# Triton's kernels run on the CPU through its interpreter unless a GPU is present. Set here, before any test module
# is imported: some course modules import torch's FLOP counter, which imports Triton, and Triton reads
# TRITON_INTERPRET only at its first import (a test file's own setdefault would come too late).
if not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
NOTEBOOKS_DIR = REPO / "notebooks"
EXECUTED_STUDENT_EDITIONS = REPO / ".screenshots" / "student" / "executed"
CELL_TIMEOUT_S = 300
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "notebooks: executes whole notebooks (slow); deselect with -m 'not notebooks'")
    config.addinivalue_line("markers", "browser: runs chapters in JupyterLab in headless Chromium; deselect with -m 'not browser'")
    config.addinivalue_line("markers", "book: builds the course book (quick mode); deselect with -m 'not book'")
    config.addinivalue_line("markers", "wheel: builds a wheel, installs it in a fresh venv, runs a chapter; deselect with -m 'not wheel'")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Every test runs on one torch thread (a test that needs more sets it and restores it): the tensors here are
    tiny, and on a busy 2-core machine a second thread waiting on the first made single small operations up to 100
    times slower. ``bin/test`` also exports ``OMP_NUM_THREADS=1`` for its two worker processes."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _lenient_checkers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests feed checkers wrong answers on purpose: never let strict mode raise there."""
    monkeypatch.delenv("LABSUPPORT_STRICT_CHECKS", raising=False)


@pytest.fixture(autouse=True)
def _private_results_file(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests (and the notebooks they run) record measurements in a file of their own, never the reader's
    (``labsupport.harness.results``); a test that needs another sets ``LABSUPPORT_RESULTS`` itself."""
    monkeypatch.setenv("LABSUPPORT_RESULTS", str(tmp_path_factory.getbasetemp() / "course-results.json"))


def chapter_notebooks() -> list[Path]:
    """``notebooks/*.ipynb`` tracked by git (every one on disk when git is unavailable), sorted."""
    on_disk = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--", "notebooks/*.ipynb"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return on_disk
    return sorted(REPO / name for name in listed if (REPO / name).is_file())


def notebook_params(paths: list[Path]) -> list:
    """pytest parameters named after each notebook; one skipped parameter when there are none."""
    if not paths:
        return [pytest.param(None, marks=pytest.mark.skip(reason="no notebooks in notebooks/ yet"), id="no-notebooks")]
    return [pytest.param(path, id=path.stem) for path in paths]


class _ThisInterpreterKernelSpecs(KernelSpecManager):
    """Every kernel name resolves to an ipykernel running on ``sys.executable``."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python ({sys.executable})",
            language="python",
            resource_dir=str(REPO),
        )


def first_error(notebook: nbformat.NotebookNode, name: str) -> str | None:
    """The first error output of an executed notebook, naming the notebook, the cell and the error (None: none)."""
    for index, cell in enumerate(notebook.cells):
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if cell.cell_type == "code" and errors:
            source = "\n".join(f"    {line}" for line in cell.source.splitlines()[:12])
            traceback = _ANSI.sub("", "\n".join(errors[0].get("traceback", [])))
            return (
                f"{name}: cell {index + 1} failed with {errors[0]['ename']}: {errors[0]['evalue']}\n"
                f"--- cell source (first lines) ---\n{source}\n--- traceback ---\n{traceback[-4000:]}"
            )
    return None


def _describe_failure(notebook: nbformat.NotebookNode, name: str, error: Exception) -> str:
    return first_error(notebook, name) or \
        f"{name}: execution failed: {type(error).__name__}: {_ANSI.sub('', str(error))[-4000:]}"


def execute_notebook(path: Path, *, name: str | None = None, timeout: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """Run ``path`` top to bottom (cwd ``notebooks/``); return it with outputs, or fail naming the cell."""
    notebook = nbformat.read(path, as_version=4)
    # Asynchronous: with a blocking manager, nbclient's wait for a cell's output blocks its event loop, and the
    # cell's time limit never fires (see labsupport/grade/runner.py).
    manager = AsyncKernelManager(kernel_spec_manager=_ThisInterpreterKernelSpecs(), kernel_name="python3")
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=timeout,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
        record_timing=False,
    )
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
        pytest.fail(_describe_failure(notebook, name or path.name, error), pytrace=False)
    return notebook


@pytest.fixture
def run_notebook() -> Callable[..., nbformat.NotebookNode]:
    """The notebook runner :func:`execute_notebook` as a fixture."""
    return execute_notebook


def stream_text(notebook: nbformat.NotebookNode) -> list[tuple[int, str]]:
    """(cell number, text) of every stdout/stderr stream output and text/plain result."""
    found = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                found.append((index + 1, output.get("text", "")))
            elif "data" in output and "text/plain" in output["data"]:
                found.append((index + 1, output["data"]["text/plain"]))
    return found


CHECKER_MARKS = ("✅", "❌", "⏳")


def checker_lines(notebook: nbformat.NotebookNode) -> list[tuple[int, str]]:
    """(cell number, line) of every line a checker printed (it starts with ✅, ❌ or ⏳)."""
    return [
        (cell, line.strip())
        for cell, text in stream_text(notebook)
        for line in text.splitlines()
        if line.strip().startswith(CHECKER_MARKS)
    ]


def student_edition_problems(source: Path, executed: nbformat.NotebookNode, name: str) -> str | None:
    """What is wrong with an executed student edition of the chapter ``source`` (None: nothing): an error output
    (named by cell, with its traceback), a checker that says anything but "not done yet", or a chapter with
    solution blocks whose checkers printed nothing. Used by tests/test_browser.py, which runs the student editions
    in JupyterLab, and by tests/test_notebooks.py, which runs them with nbclient where the browser test cannot."""
    from labsupport.harness.editions import find_solution_blocks

    error = first_error(executed, name)
    if error:
        return error
    lines = checker_lines(executed)
    wrong = [(cell, line) for cell, line in lines if "not done yet" not in line]
    if wrong:
        return f"{name}: checkers should all say 'not done yet', got {wrong}"
    exercises = sum(len(find_solution_blocks(cell.source))
                    for cell in nbformat.read(source, as_version=4).cells if cell.cell_type == "code")
    if exercises and not lines:
        return f"{name}: {exercises} solution block(s) but no checker reported anything"
    return None


def save_executed_student_edition(source: Path, executed: nbformat.NotebookNode) -> None:
    """Keep the executed student edition of ``source`` in ``.screenshots/student/executed/`` (ignored by git) for
    tests/test_static_book.py's student book, stamped as ``tools/build_book.py`` stamps a student edition it ran in
    quick mode (the notebook's bytes, the library's sources, the mode, the edition): the build then reuses it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_book", REPO / "tools" / "build_book.py")
    build_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_book)
    kept = nbformat.from_dict(executed)
    kept.metadata[build_book.STAMP_KEY] = build_book.source_stamp(source, quick=True, student=True)
    kept.metadata.pop("widgets", None)
    EXECUTED_STUDENT_EDITIONS.mkdir(parents=True, exist_ok=True)
    nbformat.write(kept, EXECUTED_STUDENT_EDITIONS / source.name)
