"""The grader's outputs: one gradebook row and one feedback file per submitted notebook.

Both are written by the grader after every run has finished and every process of every run is gone, each file
first under a temporary name and then moved into place, so nothing a notebook wrote to those paths survives.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Graded", "STATUSES", "safe_name", "write_feedback", "write_gradebook"]

#: What an exercise can come out as. Only "passed" scores.
STATUSES = ("passed", "failed", "not done", "missing", "refused", "error")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass
class Graded:
    """One submitted notebook, graded."""

    student: str
    notebook: str
    chapter: str
    run: str = "not run"
    run_cell: int | None = None
    run_error: str = ""
    run_seconds: float = 0.0
    exercises: dict[str, dict[str, str]] = field(default_factory=dict)
    reported: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: int = 0

    @property
    def passed(self) -> int:
        return sum(1 for r in self.exercises.values() if r.get("status") == "passed")


def safe_name(text: str) -> str:
    """A file-system-safe version of a student's name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "student"


def _cell(value: object) -> str:
    """A CSV cell a spreadsheet will not run as a formula."""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.grading")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)  # replaces a file or a symlink a notebook may have put there


def _run_text(graded: Graded) -> str:
    if graded.run == "ok":
        return "ok"
    where = f" at cell {graded.run_cell}" if graded.run_cell is not None else ""
    return f"{graded.run}{where}"


def write_gradebook(rows: list[Graded], path: Path, columns: list[str]) -> None:
    """The CSV gradebook: one row per submitted notebook, one column per exercise (``NN:function``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["student", "notebook", "chapter", "run", "run_seconds", "passed", "total", *columns, "flags"])
    for row in rows:
        own = {f"{row.chapter}:{name}": result["status"] for name, result in row.exercises.items()}
        writer.writerow([_cell(row.student), _cell(row.notebook), row.chapter, _run_text(row),
                         f"{row.run_seconds:.1f}", row.passed, len(row.exercises),
                         *[own.get(c, "") for c in columns], _cell(" | ".join(row.flags))])
    _atomic_write(path, buffer.getvalue())


def write_feedback(rows: list[Graded], folder: Path) -> dict[str, Path]:
    """One Markdown file per student (all their notebooks); returns where each went."""
    by_student: dict[str, list[Graded]] = {}
    for row in rows:
        by_student.setdefault(row.student, []).append(row)
    written = {}
    for student, graded in by_student.items():
        lines = [f"# Feedback for {student}", ""]
        for row in graded:
            lines += [f"## {row.notebook} (chapter {row.chapter})", "",
                      f"- Notebook run (top to bottom, fresh kernel): **{_run_text(row)}**"
                      + (f" — {row.run_error}" if row.run_error else ""),
                      f"- Exercises passed: **{row.passed} of {len(row.exercises)}** "
                      "(each re-checked by the grader on your function)", ""]
            for name, result in row.exercises.items():
                lines.append(f"### `{name}`: {result['status']}")
                said = row.reported.get(name)
                if said and said != result["status"]:
                    lines.append(f"(your notebook's own check said: {said})")
                lines += ["", "```", result.get("message", "").strip() or "(no message)", "```", ""]
            for note in row.notes:
                lines.append(f"- note: {note}")
            for flag in row.flags:
                lines.append(f"- flagged: {flag}")
            lines.append("")
        path = folder / f"{safe_name(student)}.md"
        _atomic_write(path, "\n".join(lines))
        written[student] = path
    return written
