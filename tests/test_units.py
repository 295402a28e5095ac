"""Memory sizes in the chapters' figures are binary (GiB = 2**30 bytes), one convention for every chapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

FIGURE_CELLS = {
    "00_where_the_time_goes.ipynb": "def kv_calculator_figure",
    "02_kv_cache_and_grouped_attention.ipynb": "def cache_figure",
}


@pytest.mark.parametrize("notebook", sorted(FIGURE_CELLS))
def test_memory_figures_use_gib(notebook):
    cells = json.loads((NOTEBOOKS / notebook).read_text(encoding="utf-8"))["cells"]
    source = next("".join(c["source"]) for c in cells if FIGURE_CELLS[notebook] in "".join(c["source"]))
    assert "1e9" not in source, "a memory figure converts bytes with 1e9 (decimal GB); use 2**30 (GiB)"
    assert "(GB)" not in source and "GB consumer" not in source
