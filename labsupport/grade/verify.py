"""Inside the sandbox: grade each exercise by running the course's checker on the learner's function.

``python -m labsupport.grade.verify SUBMISSION COURSE_NOTEBOOK EXERCISES RESULTS`` runs in a fresh process and a
fresh directory (a new copy of ``labsupport``), after the notebook's own run. It does not execute the notebook: it
builds a namespace from

1. the top-level imports of the course's notebook (so ``torch``, ``F`` and friends mean what the chapter says),
2. the submission's top-level **definitions** only, in notebook order: ``import`` statements, ``def`` and
   ``class`` statements, assignments of plain literals, and names bound to what a course function returns when
   called with constant arguments (``triton, tl = triton_or_stand_in()``). Every other top-level statement (a
   call, a loop, a monkeypatch of a checker, a print of a fake result) is skipped and counted,

then calls each exercise's checker, named by the grader from the course's notebook, on the learner's function of
that name, and writes ``{"exercises": {function: {"status", "message"}}, "skipped": n, "notes": [...]}`` to
RESULTS. A function that is the course's own code (a reference imported under the exercise's name) is refused.

What this does not stop: code that runs while the checker calls the learner's function (its body, default values,
decorators and class bodies run here too) can still subvert the check of its own submission. See
``docs/teaching/grading.md``.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import importlib
import io
import json
import linecache
import sys
from collections.abc import Sequence
from typing import Any

import nbformat

from labsupport.grade.course import code_of
from labsupport.grade.sandbox import set_limits

__all__ = ["main", "namespace_of"]

_MAX_MESSAGE = 4000
_KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _is_literal_assignment(node: ast.stmt) -> bool:
    value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
    if value is None:
        return False
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    if not all(isinstance(t, ast.Name) for t in targets):
        return False
    try:
        ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _is_course_call(node: ast.stmt, namespace: dict[str, Any]) -> bool:
    """``triton, tl = triton_or_stand_in()``: names bound to what a course function returns, called with constant
    arguments only (so no learner code runs through it)."""
    if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Call):
        return False
    targets = [t for target in node.targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
    call = node.value
    if not all(isinstance(t, ast.Name) for t in targets):
        return False
    try:
        for argument in [*call.args, *(k.value for k in call.keywords)]:
            ast.literal_eval(argument)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    parts, func = [], call.func
    while isinstance(func, ast.Attribute):
        parts.insert(0, func.attr)
        func = func.value
    if not isinstance(func, ast.Name) or func.id not in namespace:
        return False
    target: Any = namespace[func.id]
    for part in parts:
        target = getattr(target, part, None)
    module = getattr(target, "__module__", "") or ""
    return callable(target) and module.startswith("labsupport.") and not isinstance(target, type)


def _run(node: ast.stmt, source: str, filename: str, namespace: dict[str, Any]) -> str | None:
    """Execute one top-level statement; return an error note instead of raising."""
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    try:
        exec(compile(ast.Module(body=[node], type_ignores=[]), filename, "exec"), namespace)  # noqa: S102
    except BaseException as error:  # noqa: BLE001 - a broken line of the learner's is a note, not a crash
        if isinstance(error, KeyboardInterrupt):
            raise
        return f"{filename}, line {node.lineno}: {type(error).__name__}: {error}"[:300]
    return None


def namespace_of(course: nbformat.NotebookNode,
                 submission: nbformat.NotebookNode) -> tuple[dict[str, Any], int, list[str]]:
    """The namespace the checkers see: the course's imports, then the submission's definitions.

    Returns:
        (namespace, number of top-level statements skipped, notes on statements that failed).
    """
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    notes: list[str] = []
    for index, tree in code_of(course):
        for node in tree.body if tree is not None else []:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                _run(node, "", f"<course cell {index}>", namespace)
    skipped = 0
    for index, tree in code_of(submission):
        if tree is None:
            notes.append(f"cell {index} is not valid Python; its definitions were not graded")
            continue
        source = "\n".join(submission["cells"][index]["source"].splitlines())
        for node in tree.body:
            if isinstance(node, _KEPT) or _is_literal_assignment(node) or _is_course_call(node, namespace):
                note = _run(node, source, f"<cell {index}>", namespace)
                if note:
                    notes.append(note)
            else:
                skipped += 1
    return namespace, skipped, notes


def _grade(checker_name: str, function: Any) -> dict[str, str]:
    module, _, attribute = checker_name.partition(":")
    checker = getattr(importlib.import_module(module), attribute)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            result = checker(function)
    except BaseException as error:  # noqa: BLE001 - a checker never raises; if it does, say so
        if isinstance(error, KeyboardInterrupt):
            raise
        return {"status": "error", "message": f"the checker raised {type(error).__name__}: {error}"[:_MAX_MESSAGE]}
    status = getattr(result, "status", None)
    if status not in ("passed", "failed", "not done"):
        status = "passed" if result else "failed"
    message = captured.getvalue().strip() or getattr(result, "message", "")
    return {"status": status, "message": message[:_MAX_MESSAGE]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labsupport.grade.verify", description=__doc__.splitlines()[0])
    for name in ("submission", "course", "exercises", "results"):
        parser.add_argument(name)
    args = parser.parse_args(argv)
    set_limits()
    import torch

    torch.set_num_threads(1)
    with open(args.exercises, encoding="utf-8") as stream:
        exercises = json.load(stream)
    course = nbformat.read(args.course, as_version=4)
    try:
        submission = nbformat.read(args.submission, as_version=4)
    except Exception as error:  # noqa: BLE001
        results = {e["function"]: {"status": "error", "message": f"unreadable notebook: {error}"[:300]}
                   for e in exercises}
        with open(args.results, "w", encoding="utf-8") as stream:
            json.dump({"exercises": results, "skipped": 0, "notes": []}, stream)
        return 0
    namespace, skipped, notes = namespace_of(course, submission)
    results: dict[str, dict[str, str]] = {}
    for exercise in exercises:
        name = exercise["function"]
        function = namespace.get(name)
        if function is None:
            results[name] = {"status": "missing", "message": f"no top-level function `{name}` in the notebook"}
        elif callable(function) and str(getattr(function, "__module__", "") or "").startswith("labsupport"):
            results[name] = {"status": "refused",
                             "message": f"`{name}` is the course's own code ({function.__module__}), not yours"}
        else:
            results[name] = _grade(exercise["checker"], function)
    with open(args.results, "w", encoding="utf-8") as stream:
        json.dump({"exercises": results, "skipped": skipped, "notes": notes[:20]}, stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
