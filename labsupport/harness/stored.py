"""The course's stored GPU runs: ``benchmarks/results/<name>``, found from a notebook and read back.

The GPU benchmarks (``benchmarks/*_gpu.py``) write one JSON per run; the course keeps one run per device under
``benchmarks/results/`` (e.g. ``moe_gpu_h100.json``). A chapter quotes those numbers as such, labelled with the
device and versions they came from, on a machine without a GPU::

    from labsupport.harness.stored import load_stored_json
    run = load_stored_json("moe_gpu_h100.json")   # the parsed JSON, or None where this checkout has none

Nothing here needs a GPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["find_stored_results", "load_stored_json", "load_stored_rows", "load_stored_text", "profile_section"]


def _checkout_root() -> Path:
    """The checkout this package was imported from (``labsupport/harness/stored.py`` → the repository root)."""
    return Path(__file__).resolve().parents[2]


def find_stored_results(name: str) -> Path | None:
    """``benchmarks/results/<name>`` from the working directory, its parent (a notebook in ``notebooks/``), or
    the checkout this package was imported from; ``None`` when there is none (e.g. a pip install).

    ``name`` is a plain file name ending in ``.json``, ``.jsonl`` or ``.txt`` (no folders)."""
    if not isinstance(name, str) or not name.endswith((".json", ".jsonl", ".txt")) or Path(name).name != name \
            or name in (".json", ".jsonl", ".txt"):
        raise ValueError(f"name must be a .json, .jsonl or .txt file name without folders, got {name!r}")
    for root in (Path.cwd(), Path.cwd().parent, _checkout_root()):
        path = root / "benchmarks" / "results" / name
        if path.is_file():
            return path
    return None


def load_stored_json(name: str) -> dict | list | None:
    """The parsed JSON of ``benchmarks/results/<name>`` (see :func:`find_stored_results`), or ``None`` when the
    file is not there. A file that is there but is not JSON raises ``ValueError`` naming it."""
    if not isinstance(name, str) or not name.endswith(".json"):
        raise ValueError(f"name must be a .json file name, got {name!r}")
    path = find_stored_results(name)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def load_stored_rows(name: str) -> list[dict]:
    """The rows of the JSONL file ``benchmarks/results/<name>`` (blank lines skipped), or ``[]`` when it is not there
    (a notebook run from a copy outside the checkout still finds the checkout it imported ``labsupport`` from)."""
    if not isinstance(name, str) or not name.endswith(".jsonl"):
        raise ValueError(f"name must be a .jsonl file name, got {name!r}")
    path = find_stored_results(name)
    if path is None:
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSONL: {err}") from err


def load_stored_text(name: str) -> str | None:
    """The text of ``benchmarks/results/<name>`` (a ``.txt``, e.g. a stored profile), or ``None``."""
    if not isinstance(name, str) or not name.endswith(".txt"):
        raise ValueError(f"name must be a .txt file name, got {name!r}")
    path = find_stored_results(name)
    return None if path is None else path.read_text()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_TIME = re.compile(r"(?<![\w.])([0-9.]+)(us|ms|s)(?!\w)")


def profile_section(text: str, section: str) -> dict | None:
    """One section of a stored ``torch.profiler`` table (``key_averages().table()`` under a header
    ``## <section>, ...: N forward + backward passes``): ``{"passes": N or None, "cuda_total_ms": ...,
    "ops": {name: (self CUDA ms, calls)}}`` for its named rows (``aten::...``; kernel rows are truncated names and
    are left out); ``None`` when no header starts with ``section``."""
    if not isinstance(text, str) or not isinstance(section, str) or not section:
        raise TypeError("text and section must be strings (section not empty)")
    blocks = re.split(r"^## ", text, flags=re.MULTILINE)
    block = next((b for b in blocks[1:] if b.startswith(section)), None)
    if block is None:
        return None
    header = block.splitlines()[0]
    passes = re.search(r"(\d+) forward", header)
    total = re.search(r"Self CUDA time total:\s*" + _TIME.pattern, block)
    ops: dict[str, tuple[float, int]] = {}
    for line in block.splitlines()[1:]:
        cells = line.split()
        times = _TIME.findall(line)
        # columns with a time: Self CPU, CPU total, CPU avg, Self CUDA, CUDA total, CUDA avg; then # of Calls
        if cells and "::" in cells[0] and len(times) >= 6 and cells[-1].isdigit():
            ops[cells[0]] = (float(times[3][0]) * _UNITS[times[3][1]], int(cells[-1]))
    return {"passes": int(passes.group(1)) if passes else None,
            "cuda_total_ms": float(total.group(1)) * _UNITS[total.group(2)] if total else None, "ops": ops}
