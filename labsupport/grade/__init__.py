"""The instructor's grading command: ``python -m labsupport.grade SUBMISSIONS/ --out grades.csv``.

| module | what it holds |
|---|---|
| `cli` | the command: find the submissions, run and re-check each one, write the gradebook and feedback (`grade`) |
| `course` | the exercises of a chapter and their checkers, read from the course's own notebook (`exercises_of`) |
| `sandbox` | the isolation: in-memory course snapshot, scrubbed environment, process clean-up, file-change scan |
| `runner` | inside the sandbox: executes one notebook in a fresh kernel |
| `verify` | inside the sandbox: re-runs each checker on the learner's function, rebuilt from its definitions |
| `report` | the CSV gradebook and the per-student feedback files |

How to use it and what it does and does not defend against: ``docs/teaching/grading.md``. This package is an
instructor's tool: it reaches the families' checkers only by name, at run time, inside the sandbox.
"""

from labsupport.grade.cli import grade, main

__all__ = ["grade", "main"]
