"""The shared engine of the seed/grid scripts: a pool of one-thread worker processes, one JSONL row per run.

The grid scripts (``ch00_mqar_baseline_seeds.py``, ``linear_attention_mqar_seeds.py``, ``ssm_mqar_grid.py``)
each define a ``run(job) -> dict`` and a list of jobs; this module runs them and makes the runs resumable:

* ``--out FILE`` collects one JSON row per finished run, written (and flushed) as it finishes, so a run cut off
  by a time limit keeps everything finished so far;
* ``--resume`` appends to ``FILE`` and skips the jobs whose rows are already in it;
* ``--only TEXT`` (repeatable) keeps the jobs whose description contains every ``TEXT`` given;
* ``--summarise FILE`` prints the script's tables from a finished (or partial) file without training.

A grid script is run as ``python benchmarks/<script>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

Job = tuple[Any, ...]


def add_arguments(parser: argparse.ArgumentParser, default_out: str, default_workers: int | None = None) -> None:
    """The options every grid script shares."""
    workers = default_workers if default_workers is not None else max(1, (mp.cpu_count() or 2) - 1)
    parser.add_argument("--workers", type=int, default=workers, help="worker processes (one torch thread each)")
    parser.add_argument("--out", default=default_out, help="JSONL file that collects one row per finished run")
    parser.add_argument("--resume", action="store_true", help="append to --out and skip the runs already in it")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only the jobs whose description contains TEXT (repeat to require several)")
    parser.add_argument("--summarise", metavar="JSONL", help="print the tables from a finished run's file")


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL file (blank lines skipped)."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run_grid(args: argparse.Namespace, jobs: Sequence[Job], run: Callable[[Job], dict],
             key: Callable[[dict], Hashable], describe: Callable[[Job], str],
             report: Callable[[dict], str]) -> list[dict]:
    """Run ``jobs`` in a spawn pool and return every row of ``args.out`` (old rows included with ``--resume``).

    ``describe(job)`` names a job in words (what ``--only`` matches against); ``key(row)`` must give the same
    words for the row that job produces, which is how ``--resume`` knows a job is done. ``report(row)`` is
    the line printed as each run finishes.
    """
    if args.workers < 1:
        raise SystemExit(f"--workers must be at least 1, got {args.workers}")
    done: list[dict] = read_rows(args.out) if args.resume and Path(args.out).exists() else []
    done_keys = {key(row) for row in done}
    todo = [job for job in jobs if describe(job) not in done_keys
            and all(text in describe(job) for text in args.only)]
    print(f"# {platform.processor() or platform.machine()}, python {sys.version.split()[0]}, {args.workers} "
          f"worker processes of 1 thread, {time.strftime('%Y-%m-%d %H:%M')}; {len(todo)} runs to do, "
          f"{len(done)} already in {args.out}", flush=True)
    rows = list(done)
    if not todo:
        return rows
    with mp.get_context("spawn").Pool(min(args.workers, len(todo))) as pool, \
            open(args.out, "a" if args.resume else "w") as out:
        for row in pool.imap_unordered(run, todo):
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(report(row), flush=True)
    return rows
