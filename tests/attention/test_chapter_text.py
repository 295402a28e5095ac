"""Chapters 00 and 01 as saved: no progress widget frozen at 0 %, and each prints its own run time (issue 24)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
CHAPTERS = ["00_where_the_time_goes.ipynb", "01_online_softmax_and_tiling.ipynb"]


def _cells(name: str) -> list[dict]:
    return json.loads((NOTEBOOKS / name).read_text())["cells"]


def test_chapter_00_trains_without_a_widget_progress_bar() -> None:
    # tqdm.auto's widget is saved as its first state, "0/400", in an executed notebook; the cell prints the time
    calls = [("".join(c["source"])) for c in _cells(CHAPTERS[0]) if c["cell_type"] == "code"
             and "probe(" in "".join(c["source"])]
    assert calls and all("progress=False" in source for source in calls)


@pytest.mark.parametrize("name", CHAPTERS)
def test_the_last_code_cell_prints_the_readers_run_time(name: str) -> None:
    cells = _cells(name)
    last = next("".join(c["source"]) for c in reversed(cells) if c["cell_type"] == "code")
    assert "chapter_started" in last and "measurement_conditions()" in last
    header = "".join(cells[0]["source"])
    assert not re.search(r"ran in \d+–\d+ s", header), "a run-time range from one machine, given as everyone's"
