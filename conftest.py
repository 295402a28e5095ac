"""Root-level pytest set-up, loaded whatever paths are given (tests/, notebooks/ or both).

The test helpers themselves live in ``tests/conftest.py``; this file only tells pytest-xdist how to share the
work between processes when ``bin/test`` runs two of them (``-n 2``):

* every test file stays whole on one worker — a notebook's nbval cells share one kernel — and the book test
  runs on the browser test's worker, after it, because it reuses the chapters the browser test executed;
* the long files start first (longest first balances two workers best).
"""

from __future__ import annotations

import pytest

_SAME_WORKER_AS = {"tests/test_static_book.py": "tests/test_browser.py"}
# Longest first, by their times in a whole bin/test run on the 2-vCPU dev machine (7 Dec 2026: the browser test,
# which runs the student editions, ~310 s; chapters 02/03 150-180 s, 06/08/09 100-115 s; the grading end to end
# ~90-105 s; tests/test_notebooks.py ~225 s only where the browser test cannot run, else a second); the many short
# files after them fill the end, so both workers finish within seconds of each other (793 s and 788 s of tests).
_LONG_FIRST = ("tests/test_browser.py", "tests/test_static_book.py", "tests/test_notebooks.py",
               "notebooks/02_", "notebooks/03_", "notebooks/09_", "notebooks/06_", "tests/grade/test_grade_submissions.py",
               "notebooks/08_", "notebooks/00_", "notebooks/05_", "notebooks/07_", "notebooks/04_", "notebooks/",
               "tests/test_wheel.py", "tests/test_gpu_benchmarks.py", "tests/linear_attention/", "tests/flash/",
               "tests/moe/")


def _work_unit(nodeid: str) -> str:
    """The file a test belongs to, as the scheduler groups it."""
    path = nodeid.split("::")[0]
    return _SAME_WORKER_AS.get(path, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's file-by-file scheduler, with the book test joined to the browser test's unit."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    return FileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # a plain run: keep pytest's order
        return

    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return next((i for i, prefix in enumerate(_LONG_FIRST) if path.startswith(prefix)), len(_LONG_FIRST))

    items.sort(key=rank)  # stable, and the same in every worker: the order inside each file is kept
