"""The reader's own numbers: a small local file where chapters record their key measurements for chapter 10.

Chapter 10 (the capstone) ranks designs with numbers measured on *this* machine where the reader has run the
earlier chapters, and with shipped reference numbers otherwise. The chapters write those numbers here::

    from labsupport.harness.results import record, lookup
    record("00", "matmul_gflops_1thread", 61.2, "GFLOP/s")   # the machine label is filled in
    lookup("00", "matmul_gflops_1thread")                   # -> Measurement(...) or None

The file is JSON, one entry per ``(chapter, key)`` (a new value replaces the old one). Where it lives
(:func:`results_path`):

1. ``$LABSUPPORT_RESULTS`` when set (the tests point it at a temporary file);
2. the learner's workspace (the folder ``bin/lab`` made, holding ``.course-editions.json``) when the notebook runs
   there, or the default workspace ``my-notebooks/`` beside the ``notebooks/`` folder it runs in;
3. otherwise ``~/.cache/labsupport/course-results.json`` (Colab, a notebook opened elsewhere).

Writing never fails a chapter: a file that cannot be written or read is reported as one warning and ignored.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from labsupport.harness.validation import require_float

__all__ = ["ENV_VAR", "FILE_NAME", "Measurement", "clear", "lookup", "machine_label", "record", "recorded",
           "results_path"]

ENV_VAR = "LABSUPPORT_RESULTS"
FILE_NAME = ".course-results.json"
_WORKSPACE_RECORD = ".course-editions.json"  # labsupport.harness.workspace.RECORD_NAME (not imported: no cycle)
_WORKSPACE_FOLDER = "my-notebooks"


@dataclass(frozen=True)
class Measurement:
    """One recorded number: what chapter measured it, under which key, in which unit, on which machine, when."""

    chapter: str
    key: str
    value: float
    unit: str
    machine: str
    when: str

    def describe(self) -> str:
        """``"61.2 GFLOP/s (chapter 00, your machine: ..., 2026-12-07)"``."""
        return f"{self.value:.4g} {self.unit} (chapter {self.chapter}, your machine: {self.machine}, {self.when[:10]})"


def machine_label() -> str:
    """A short label of this machine and torch build: CPU architecture, visible CPUs, torch version."""
    import torch

    return f"{platform.machine() or 'unknown CPU'}, {os.cpu_count() or '?'} CPUs, torch {torch.__version__}"


def results_path() -> Path:
    """Where the results file lives (see the module's docstring for the order of the choices)."""
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        return Path(override).expanduser()
    here = Path.cwd()
    if (here / _WORKSPACE_RECORD).exists():
        return here / FILE_NAME
    beside = here.parent / _WORKSPACE_FOLDER
    if here.name == "notebooks" and beside.is_dir():
        return beside / FILE_NAME
    return Path.home() / ".cache" / "labsupport" / "course-results.json"


def _read(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(f"the results file {path} could not be read ({error}); it is ignored", stacklevel=3)
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _entry(item: dict) -> Measurement | None:
    try:
        return Measurement(str(item["chapter"]), str(item["key"]), float(item["value"]), str(item["unit"]),
                           str(item.get("machine", "")), str(item.get("when", "")))
    except (KeyError, TypeError, ValueError):
        return None


def record(chapter: str, key: str, value: float, unit: str, machine: str | None = None) -> Measurement:
    """Record ``value`` (in ``unit``) as chapter ``chapter``'s measurement ``key``; returns the entry.

    ``machine`` defaults to :func:`machine_label`. The file is rewritten whole, through a temporary file and an
    atomic rename, so a reader never sees half a file. A failure to write is a warning, never an error.
    """
    for name, text in (("chapter", chapter), ("key", key), ("unit", unit)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} must be a non-empty string, got {text!r}")
    value = require_float("value", value)
    if not math.isfinite(value):
        raise ValueError(f"value must be finite, got {value}")
    if machine is not None and not isinstance(machine, str):
        raise TypeError(f"machine must be a string or None, got {type(machine).__name__}")
    entry = Measurement(chapter, key, value, unit, machine or machine_label(),
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    path = results_path()
    try:
        data = _read(path)
        data[f"{chapter}/{key}"] = asdict(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".results-", suffix=".tmp", delete=False,
                                         encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        os.replace(handle.name, path)
    except OSError as error:
        warnings.warn(f"could not record {chapter}/{key} in {path}: {error}", stacklevel=2)
    return entry


def recorded(chapter: str | None = None) -> list[Measurement]:
    """Every recorded measurement (one chapter's with ``chapter=``), sorted by chapter and key."""
    entries = [e for e in (_entry(item) for item in _read(results_path()).values()) if e is not None]
    return sorted((e for e in entries if chapter is None or e.chapter == chapter), key=lambda e: (e.chapter, e.key))


def lookup(chapter: str, key: str) -> Measurement | None:
    """The recorded measurement ``chapter``/``key``, or ``None`` when the reader has not run it here."""
    item = _read(results_path()).get(f"{chapter}/{key}")
    return None if item is None else _entry(item)


def clear() -> None:
    """Delete the results file (a fresh start; the chapters record again when they run)."""
    try:
        results_path().unlink()
    except FileNotFoundError:
        pass
