"""What a chapter asks for: its exercises and their checkers, read from the course's own notebook.

The grader never takes this list from a submission (a student who deletes an exercise's cell would otherwise
delete the exercise). In the course's notebook, an exercise is a code cell with a ``### BEGIN SOLUTION`` block
and a call ``<checker>(<function>)`` whose name starts with ``check_``; the checker is resolved through the
notebook's own imports (``from labsupport import flash as ref`` then ``ref.check_flash_forward``, or
``from labsupport.moe import check_gate_top_k``) to ``"labsupport.flash:check_flash_forward"``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from nbformat import NotebookNode

from labsupport.harness.editions import BEGIN_MARKER

__all__ = ["Exercise", "chapter_of", "code_of", "exercises_of", "python_source"]

_CHAPTER = re.compile(r"^(\d{2})_")


@dataclass(frozen=True)
class Exercise:
    """One graded exercise: the learner's function and the checker that grades it.

    Attributes:
        function: the name the learner's function has in the notebook (``online_softmax_update``).
        checker: ``"module:attribute"`` of the checker (``"labsupport.flash:check_online_softmax_update"``).
        cell: the index of the course notebook's cell that holds the exercise.
    """

    function: str
    checker: str
    cell: int


def chapter_of(path: Path | str) -> str | None:
    """The two-digit chapter of a notebook's file name (``"03"`` for ``03_linear_attention.ipynb``), or None."""
    found = _CHAPTER.match(Path(path).name)
    return found.group(1) if found else None


def python_source(source: str) -> str:
    """A code cell's source as plain Python: IPython magics and shell lines are dropped (commented out)."""
    lines = []
    for line in source.splitlines():
        stripped = line.lstrip()
        lines.append(line[: len(line) - len(stripped)] + "# " + stripped if stripped.startswith(("%", "!")) else line)
    return "\n".join(lines)


def code_of(notebook: NotebookNode) -> list[tuple[int, ast.Module | None]]:
    """Each code cell's index and its parsed source (None where it does not parse)."""
    parsed: list[tuple[int, ast.Module | None]] = []
    for index, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "code" or not isinstance(cell.get("source"), str):
            continue
        try:
            parsed.append((index, ast.parse(python_source(cell["source"]))))
        except (SyntaxError, ValueError):
            parsed.append((index, None))
    return parsed


def _aliases(cells: list[tuple[int, ast.Module | None]]) -> dict[str, str]:
    """Names the notebook's imports bind: ``{"ref": "labsupport.flash", "check_x": "labsupport.moe:check_x"}``."""
    names: dict[str, str] = {}
    for _, tree in cells:
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        names[alias.asname] = alias.name
                    else:
                        names[alias.name.split(".")[0]] = alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    # ``from labsupport import flash`` binds a module; ``from labsupport.moe import check_x`` a name.
                    names[alias.asname or alias.name] = f"{node.module}:{alias.name}"
    return names


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _resolve(expression: str, aliases: dict[str, str]) -> str | None:
    """``ref.check_x`` → ``labsupport.flash:check_x`` through the import aliases; None when it is not the course's."""
    head, _, rest = expression.partition(".")
    target = aliases.get(head)
    if target is None:
        return None
    if ":" in target:  # bound by ``from M import name``
        module, name = target.split(":")
        if not rest:
            return f"{module}:{name}"
        # ``from labsupport import flash as ref`` then ``ref.check_x`` (``name`` was a submodule)
        path = f"{module}.{name}.{rest}"
    else:
        path = f"{target}.{rest}" if rest else target
    module, _, attribute = path.rpartition(".")
    return f"{module}:{attribute}" if module.startswith("labsupport") and attribute.startswith("check_") else None


def exercises_of(notebook: NotebookNode) -> list[Exercise]:
    """The exercises of a course notebook (with its solutions), in notebook order.

    Raises:
        ValueError: a cell with a solution block calls no checker the notebook's imports can resolve.
    """
    cells = code_of(notebook)
    aliases = _aliases(cells)
    found: list[Exercise] = []
    for index, tree in cells:
        if tree is None or BEGIN_MARKER not in notebook["cells"][index]["source"]:
            continue
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Name)]
        here = []
        for call in sorted(calls, key=lambda c: (c.lineno, c.col_offset)):
            expression = _dotted(call.func)
            if expression is None or not expression.rpartition(".")[2].startswith("check_"):
                continue
            checker = _resolve(expression, aliases)
            if checker is not None:
                here.append(Exercise(call.args[0].id, checker, index))  # type: ignore[attr-defined]
        if not here:
            raise ValueError(f"cell {index} holds a solution block but calls no course checker on a function")
        found.extend(here)
    return found
