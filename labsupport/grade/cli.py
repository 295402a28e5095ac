"""``python -m labsupport.grade SUBMISSIONS/ --out grades.csv``: grade a class's notebooks.

For every submitted notebook, one at a time (or ``--jobs N`` at once):

1. **run** it top to bottom in a fresh kernel, in a fresh directory holding a fresh copy of the course, with a
   wall-clock limit (``--timeout``) and quick sizes (``--full`` for the chapter's full sizes); note how it ended
   (ok, the first cell that raised, a timeout, a dead kernel) and what its own checks reported;
2. **re-check** it: in another fresh process and directory, the course's checkers are called on the learner's
   functions, rebuilt from the notebook's definitions alone (:mod:`labsupport.grade.verify`). This, not the
   notebook's output, is the grade;
3. kill every process the run left, and name any file outside the sandbox that changed.

Then it writes the CSV gradebook (``--out``) and one Markdown feedback file per student (``--feedback``, default
``feedback/`` beside the gradebook). A notebook that crashes, hangs, deletes cells or is not a notebook at all
gets its row and its feedback like any other. Layout of ``SUBMISSIONS/``: one folder per student holding that
student's notebooks, named like the course's (``03_linear_attention.ipynb``, or any name with ``--chapter``);
nbgrader's ``submitted/<student>/<assignment>/`` works as it is. Read ``docs/teaching/grading.md`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nbformat

from labsupport.grade.course import Exercise, chapter_of, exercises_of
from labsupport.grade.report import STATUSES, Graded, write_feedback, write_gradebook
from labsupport.grade.sandbox import FileScan, Snapshot, become_subreaper, new_token, run_sandboxed, sandbox_env

__all__ = ["Submission", "find_submissions", "grade", "main"]

DEFAULT_TIMEOUT_S = 600.0
VERIFY_TIMEOUT_S = 180.0
_COURSE_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Submission:
    """One notebook of one student, read into memory before any notebook runs."""

    student: str
    name: str
    chapter: str | None
    content: bytes


def find_submissions(folder: Path, chapter: str | None = None) -> list[Submission]:
    """Every ``*.ipynb`` under ``folder/<student>/`` (checkpoints and hidden files skipped), read now."""
    found = []
    for student_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(student_dir.rglob("*.ipynb")):
            relative = path.relative_to(student_dir)
            if any(part.startswith(".") for part in relative.parts) or path.is_symlink():
                continue
            found.append(Submission(student_dir.name, relative.as_posix(), chapter or chapter_of(path),
                                    path.read_bytes()))
    return found


def _course_notebooks(course_root: Path) -> dict[str, tuple[str, bytes]]:
    """Chapter → (file name, content) of the course's notebooks, read once."""
    found = {}
    for path in sorted((course_root / "notebooks").glob("*.ipynb")):
        key = chapter_of(path)
        if key is not None:
            found[key] = (path.name, path.read_bytes())
    return found


def _read_small(path: Path, limit: int = 2 ** 20) -> str:
    """The start of a file a notebook may have tampered with: a regular file only (not a link, a FIFO or a
    device, which could block the grader or point anywhere), at most ``limit`` bytes."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        return os.read(descriptor, limit).decode("utf-8", "replace")
    finally:
        os.close(descriptor)


def _last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def _reported(path: Path, exercises: list[Exercise]) -> dict[str, str]:
    """What the notebook's own checks wrote to the record file (untrusted: only compared, never graded)."""
    by_checker = {e.checker.split(":")[1]: e.function for e in exercises}
    said: dict[str, str] = {}
    try:
        lines = _read_small(path).splitlines()[:1000]
    except OSError:
        return said
    for line in lines:
        try:
            record = json.loads(line)
            function = by_checker.get(record.get("checker")) or by_checker.get(f"check_{record.get('exercise')}")
        except (ValueError, AttributeError, TypeError):
            continue
        if function and record.get("status") in STATUSES:
            said[function] = record["status"]
    return said


class _Grader:
    def __init__(self, course_root: Path, workdir: Path, timeout: float, verify_timeout: float, quick: bool,
                 jobs: int, keep: bool, watch: list[Path] | None) -> None:
        self.snapshot = Snapshot(course_root)
        self.course = _course_notebooks(course_root)
        self.exercises = {k: exercises_of(nbformat.reads(c.decode("utf-8"), as_version=4))
                          for k, (_, c) in self.course.items()}
        self.workdir, self.timeout, self.verify_timeout = workdir, timeout, verify_timeout
        self.quick, self.sequential, self.keep = quick, jobs == 1, keep
        self.scan = FileScan.for_course(course_root, watch)
        # The re-check runs no set-up cell: without a GPU, Triton's kernels (chapter 01) need the interpreter.
        self.check_env = {"LABSUPPORT_QUICK": "1"}
        if "TRITON_INTERPRET" not in os.environ and not Path("/dev/nvidiactl").exists():
            self.check_env["TRITON_INTERPRET"] = "1"
        self.scan_lock = threading.Lock()
        become_subreaper()

    def _fresh_dir(self, label: str) -> Path:
        run_dir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.workdir))
        self.snapshot.write(run_dir)
        (run_dir / "notebooks").mkdir(exist_ok=True)
        return run_dir

    def grade(self, submission: Submission) -> Graded:
        graded = Graded(submission.student, submission.name, submission.chapter or "?")
        if submission.chapter not in self.course:
            graded.run = "unknown chapter"
            graded.flags.append("cannot tell which chapter this notebook is: name it like the course's "
                                "(NN_name.ipynb) or pass --chapter")
            return graded
        exercises = self.exercises[submission.chapter]
        course_name, course_content = self.course[submission.chapter]
        target = Path(submission.name).name
        dirs = []
        try:
            # 1. the notebook's own run
            run_dir = self._fresh_dir("run")
            dirs.append(run_dir)
            (run_dir / "notebooks" / target).write_bytes(submission.content)
            extra = {"LABSUPPORT_CHECK_LOG": str(run_dir / "checks.jsonl")}
            if self.quick:
                extra["LABSUPPORT_QUICK"] = "1"
            ran = run_sandboxed([sys.executable, "-m", "labsupport.grade.runner", target, "executed.ipynb",
                                 "--timeout", str(self.timeout)], run_dir / "notebooks",
                                sandbox_env(run_dir, new_token(), extra), self.timeout + 30, self.sequential)
            status = _last_json_line(ran.stdout)
            graded.run_seconds = ran.seconds
            if ran.timed_out:
                graded.run, graded.run_error = "timeout", f"stopped after {ran.seconds:.0f} s"
            elif status.get("status") in ("ok", "error", "timeout", "dead", "unreadable"):
                graded.run = status["status"]
                graded.run_cell = status.get("cell") if isinstance(status.get("cell"), int) else None
                graded.run_error = str(status.get("error", ""))[:600]
            else:
                graded.run, graded.run_error = "dead", "the run ended without a status"
            if ran.left_behind and not ran.timed_out:
                graded.flags.append(f"left {ran.left_behind} process(es) running after its run (killed)")
            graded.reported = _reported(run_dir / "checks.jsonl", exercises)
            # 2. the grader's own re-check, from a fresh copy
            check_dir = self._fresh_dir("check")
            dirs.append(check_dir)
            (check_dir / "notebooks" / target).write_bytes(submission.content)
            (check_dir / "course.ipynb").write_bytes(course_content)
            (check_dir / "exercises.json").write_text(json.dumps([e.__dict__ for e in exercises]))
            checked = run_sandboxed([sys.executable, "-m", "labsupport.grade.verify", target, "../course.ipynb",
                                     "../exercises.json", "../results.json"], check_dir / "notebooks",
                                    sandbox_env(check_dir, new_token(), self.check_env),
                                    self.verify_timeout, self.sequential)
            self._read_results(graded, check_dir / "results.json", exercises, checked.timed_out)
        finally:
            with self.scan_lock:
                changed = self.scan.changes()
            if changed:
                shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
                where = "during its run" if self.sequential else "while it ran (other runs ran at the same time)"
                graded.flags.append(f"files outside its sandbox changed {where}: {shown}")
            for folder in dirs if not self.keep else []:
                shutil.rmtree(folder, ignore_errors=True)
        for name, result in graded.exercises.items():
            said = graded.reported.get(name)
            if said == "passed" and result["status"] != "passed":
                graded.flags.append(f"{name}: the notebook's own check said passed, the grader's re-check says "
                                    f"{result['status']}")
        return graded

    def _read_results(self, graded: Graded, path: Path, exercises: list[Exercise], timed_out: bool) -> None:
        try:
            results = json.loads(_read_small(path, 4 * 2 ** 20))
            found = results["exercises"]
            graded.skipped = int(results.get("skipped", 0))
            graded.notes = [str(n)[:300] for n in results.get("notes", [])][:20]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            found = {}
            graded.flags.append("the re-check ran past its time limit" if timed_out else
                                "the re-check produced no valid results")
        for exercise in exercises:
            result = found.get(exercise.function) if isinstance(found, dict) else None
            if not (isinstance(result, dict) and result.get("status") in STATUSES):
                result = {"status": "error", "message": "no result from the grader's re-check"}
            graded.exercises[exercise.function] = {"status": result["status"],
                                                   "message": str(result.get("message", ""))[:4000]}
        if graded.skipped:
            graded.notes.append(f"the re-check ignored {graded.skipped} top-level statement(s) that are not "
                                "definitions, imports or plain constants (their effects do not count)")


def grade(submissions_dir: Path, out: Path, *, feedback: Path | None = None, course_root: Path = _COURSE_ROOT,
          chapter: str | None = None, timeout: float = DEFAULT_TIMEOUT_S, verify_timeout: float = VERIFY_TIMEOUT_S,
          quick: bool = True, jobs: int = 1, keep: bool = False, watch: list[Path] | None = None,
          progress: bool = False) -> list[Graded]:
    """Grade every notebook under ``submissions_dir``; write the gradebook and the feedback; return the rows."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    submissions = find_submissions(Path(submissions_dir), chapter)
    workdir = Path(tempfile.mkdtemp(prefix="labsupport-grade-"))
    grader = _Grader(Path(course_root), workdir, timeout, verify_timeout, quick, jobs, keep, watch)

    def one(submission: Submission) -> Graded:
        try:
            row = grader.grade(submission)
        except Exception as error:  # noqa: BLE001 - one submission never stops the class
            row = Graded(submission.student, submission.name, submission.chapter or "?", run="grader error")
            row.flags.append(f"the grader failed on this notebook ({type(error).__name__}: {error}); grade it by hand")
        if progress:
            print(f"{row.student}/{row.notebook}: run {row.run}, {row.passed}/{len(row.exercises)} passed"
                  + (f" [{len(row.flags)} flag(s)]" if row.flags else ""), flush=True)
        return row

    try:
        if jobs == 1:
            rows = [one(s) for s in submissions]
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                rows = list(pool.map(one, submissions))
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    columns = [f"{k}:{e.function}" for k in sorted({r.chapter for r in rows} & grader.exercises.keys())
               for e in grader.exercises[k]]
    write_gradebook(rows, Path(out), columns)
    write_feedback(rows, Path(feedback) if feedback else Path(out).parent / "feedback")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labsupport.grade",
                                     description="Grade a class's notebooks: run each in a sandbox, re-check each "
                                     "exercise, write a CSV gradebook and feedback.",
                                     epilog="See docs/teaching/grading.md (threat model included).")
    parser.add_argument("submissions", type=Path, help="folder with one sub-folder of notebooks per student")
    parser.add_argument("--out", type=Path, required=True, help="the CSV gradebook to write")
    parser.add_argument("--feedback", type=Path, help="folder for per-student feedback (default: feedback/ "
                        "beside --out)")
    parser.add_argument("--chapter", help="the chapter (two digits) of every notebook, when their names do not say")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per notebook run")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run at once (default 1: see the threat "
                        "model before raising it)")
    parser.add_argument("--full", action="store_true", help="run notebooks at full size (default: quick mode)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (executed notebooks)")
    parser.add_argument("--course", type=Path, default=_COURSE_ROOT, help="the course repository (default: the "
                        "one this labsupport came from)")
    args = parser.parse_args(argv)
    if not args.submissions.is_dir():
        parser.error(f"{args.submissions} is not a folder")
    rows = grade(args.submissions, args.out, feedback=args.feedback, course_root=args.course, chapter=args.chapter,
                 timeout=args.timeout, quick=not args.full, jobs=args.jobs, keep=args.keep, progress=True)
    flagged = sum(1 for r in rows if r.flags or r.run != "ok")
    print(f"graded {len(rows)} notebook(s) of {len({r.student for r in rows})} student(s); {flagged} with a "
          f"problem to look at; gradebook {args.out}")
    return 0
