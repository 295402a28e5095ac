"""Student editions: the chapters with every solution replaced by a placeholder.

Run ``python -m labsupport.harness.editions [--out student-editions] [notebooks ...]``
(or ``labsupport-editions``). With no notebooks named, every ``notebooks/*.ipynb``
under the current directory is converted. In each notebook:

* in a code cell, every block from a ``### BEGIN SOLUTION`` line to a
  ``### END SOLUTION`` line (markers included) becomes
  ``raise NotImplementedError("your code here")`` at the BEGIN marker's indentation;
* in a markdown cell, such a block becomes ``*Your answer here.*``;
* every output and execution count is cleared, and saved widget state dropped;
* the notebook gets the ``python3`` kernelspec (:data:`KERNELSPEC`) when it has none, so JupyterLab
  opens it without asking "Select Kernel" (and without marking it modified at once).

A marker without its partner, or a BEGIN inside another block, stops the run
with an error naming the notebook and the cell. Exercises live inside
functions, so a student edition still runs top to bottom and each checker
reports "not done yet".
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat import NotebookNode

__all__ = [
    "BEGIN_MARKER",
    "CODE_PLACEHOLDER",
    "END_MARKER",
    "KERNELSPEC",
    "MARKDOWN_PLACEHOLDER",
    "SolutionBlock",
    "SolutionMarkerError",
    "find_solution_blocks",
    "main",
    "make_student_edition",
    "replace_solutions",
    "write_student_editions",
]

BEGIN_MARKER = "### BEGIN SOLUTION"
END_MARKER = "### END SOLUTION"
CODE_PLACEHOLDER = 'raise NotImplementedError("your code here")'
MARKDOWN_PLACEHOLDER = "*Your answer here.*"
#: The kernel every chapter and every student edition names (the hygiene test requires it in the chapters).
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


class SolutionMarkerError(ValueError):
    """Solution markers that do not pair up (unbalanced or nested)."""


@dataclass(frozen=True)
class SolutionBlock:
    """Lines ``begin`` to ``end`` (0-based, both markers included) of a cell, and the BEGIN line's indentation."""

    begin: int
    end: int
    indent: str


def _marker(line: str) -> str | None:
    stripped = line.strip()
    if stripped.startswith(BEGIN_MARKER):
        return "begin"
    if stripped.startswith(END_MARKER):
        return "end"
    return None


def find_solution_blocks(source: str, *, where: str = "cell") -> list[SolutionBlock]:
    """The solution blocks of one cell's source, in order.

    Raises:
        SolutionMarkerError: an END without a BEGIN, a BEGIN inside a block, or a
            block left open; the message starts with ``where`` and gives line numbers (1-based).
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    blocks: list[SolutionBlock] = []
    open_line: int | None = None
    lines = source.splitlines()
    for number, line in enumerate(lines):
        kind = _marker(line)
        if kind == "begin":
            if open_line is not None:
                raise SolutionMarkerError(
                    f"{where}: nested '{BEGIN_MARKER}' on line {number + 1} "
                    f"(the block opened on line {open_line + 1} is not closed)"
                )
            open_line = number
        elif kind == "end":
            if open_line is None:
                raise SolutionMarkerError(f"{where}: '{END_MARKER}' on line {number + 1} without a '{BEGIN_MARKER}'")
            begin_line = lines[open_line]
            indent = begin_line[: len(begin_line) - len(begin_line.lstrip())]
            blocks.append(SolutionBlock(open_line, number, indent))
            open_line = None
    if open_line is not None:
        raise SolutionMarkerError(f"{where}: '{BEGIN_MARKER}' on line {open_line + 1} is never closed by '{END_MARKER}'")
    return blocks


def replace_solutions(source: str, *, cell_type: str, where: str = "cell") -> str:
    """``source`` with each solution block replaced by the placeholder for ``cell_type`` ("code" or "markdown")."""
    if cell_type not in ("code", "markdown"):
        raise ValueError(f"cell_type must be 'code' or 'markdown', got {cell_type!r}")
    blocks = find_solution_blocks(source, where=where)
    if not blocks:
        return source
    lines = source.splitlines()
    out: list[str] = []
    position = 0
    for block in blocks:
        out.extend(lines[position : block.begin])
        placeholder = CODE_PLACEHOLDER if cell_type == "code" else MARKDOWN_PLACEHOLDER
        out.append(block.indent + placeholder)
        position = block.end + 1
    out.extend(lines[position:])
    text = "\n".join(out)
    return text + "\n" if source.endswith("\n") else text


def make_student_edition(notebook: NotebookNode, *, name: str = "notebook") -> NotebookNode:
    """A copy of ``notebook`` with solutions replaced and all outputs cleared.

    ``name`` (e.g. the file name) starts the message of any marker error, with the cell's number and id.
    """
    if not isinstance(notebook, NotebookNode) or "cells" not in notebook:
        raise TypeError(f"notebook must be an nbformat NotebookNode, got {type(notebook).__name__}")
    student = copy.deepcopy(notebook)
    student.metadata.pop("widgets", None)
    if not student.metadata.get("kernelspec"):
        student.metadata["kernelspec"] = dict(KERNELSPEC)
    for index, cell in enumerate(student.cells):
        cell_id = cell.get("id")
        where = f"{name}, cell {index + 1}" + (f" (id {cell_id})" if cell_id else "")
        if cell.cell_type in ("code", "markdown"):
            cell.source = replace_solutions(cell.source, cell_type=cell.cell_type, where=where)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nbformat.validate(student)
    return student


def write_student_editions(notebooks: Sequence[Path | str], out_dir: Path | str) -> list[Path]:
    """Write the student edition of each notebook into ``out_dir`` (same file names); return their paths.

    Every notebook is checked before anything is written, so a marker error leaves ``out_dir`` untouched.
    """
    if isinstance(notebooks, (str, Path)) or not isinstance(notebooks, Sequence):
        raise TypeError("notebooks must be a list of paths")
    paths = [Path(p) for p in notebooks]
    if not paths:
        raise ValueError("no notebooks given")
    for path in paths:
        if path.suffix != ".ipynb":
            raise ValueError(f"{path}: not a .ipynb notebook")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such notebook")
    names = [p.name for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several notebooks share the file name(s) {duplicates}; the editions would overwrite each other")
    editions = [make_student_edition(nbformat.read(p, as_version=4), name=str(p)) for p in paths]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, edition in zip(paths, editions):
        target = out / path.name
        if target.resolve() == path.resolve():
            raise ValueError(f"{path}: the student edition would overwrite the notebook itself; pick another --out")
        nbformat.write(edition, target)
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 1 on an error)."""
    parser = argparse.ArgumentParser(
        prog="python -m labsupport.harness.editions",
        description="Write student editions: solutions replaced by placeholders, outputs cleared.",
    )
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to convert (default: notebooks/*.ipynb)")
    parser.add_argument("--out", type=Path, default=Path("student-editions"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted(Path("notebooks").glob("*.ipynb"))
    if not notebooks:
        print("error: no notebooks given and none found in notebooks/", file=sys.stderr)
        return 1
    try:
        written = write_student_editions(notebooks, args.out)
    except (SolutionMarkerError, ValueError, FileNotFoundError, nbformat.ValidationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
