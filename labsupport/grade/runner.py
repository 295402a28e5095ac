"""Inside the sandbox: execute one submitted notebook top to bottom in a fresh kernel.

``python -m labsupport.grade.runner NOTEBOOK EXECUTED --timeout SECONDS`` is started by the grader in the
submission's own run directory, with a scrubbed environment. The kernel is an ipykernel on this interpreter
whatever kernel the notebook names, its standard streams go to /dev/null, and execution stops at the first cell
that raises (a "Restart and run all"). The last line printed is the run's status as JSON:
``{"status": "ok" | "error" | "timeout" | "dead" | "unreadable", "cell": index or null, "error": "...",
"seconds": ...}``. The executed notebook is written to ``EXECUTED`` (the instructor keeps it with ``--keep``).

The status is only what this process saw; a hostile kernel of the same user can fake it (see
``docs/teaching/grading.md``, "threat model"). The grade of each exercise never comes from here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence

import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from labsupport.grade.sandbox import set_limits

__all__ = ["main"]

_MAX_ERROR = 600


class _ThisInterpreter(KernelSpecManager):
    """Every kernel name resolves to an ipykernel on ``sys.executable`` (a submission cannot pick its kernel)."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name="Python 3 (grader)", language="python")


def _first_error(notebook: nbformat.NotebookNode) -> tuple[int | None, str]:
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            if output.get("output_type") == "error":
                return index, f"{output.get('ename', '?')}: {output.get('evalue', '')}"[:_MAX_ERROR]
    return None, ""


def _running_cell(notebook: nbformat.NotebookNode) -> int | None:
    """The cell that was executing when time ran out: the last code cell with an execution count."""
    last = None
    for index, cell in enumerate(notebook.cells):
        if cell.get("cell_type") == "code" and cell.get("execution_count") is not None:
            last = index
    return last


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labsupport.grade.runner", description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("executed")
    parser.add_argument("--timeout", type=float, required=True, help="seconds for the whole notebook")
    args = parser.parse_args(argv)
    set_limits()
    started = time.monotonic()
    report: dict[str, object] = {"status": "ok", "cell": None, "error": ""}
    try:
        notebook = nbformat.read(args.notebook, as_version=4)
        nbformat.validate(notebook)
    except Exception as error:  # noqa: BLE001 - anything unreadable is reported, never raised
        report.update(status="unreadable", error=f"{type(error).__name__}: {error}"[:_MAX_ERROR])
        print(json.dumps(report | {"seconds": 0.0}), flush=True)
        return 0
    # The asynchronous manager: with a blocking client, nbclient's wait for a cell's output blocks its event loop,
    # and the cell's time limit never fires (a hanging cell then ran until the grader killed the run, 30 s later).
    manager = AsyncKernelManager(kernel_spec_manager=_ThisInterpreter(), kernel_name="python3")
    client = NotebookClient(notebook, km=manager, timeout=max(1, int(args.timeout)), allow_errors=False,
                            record_timing=False, interrupt_on_timeout=False, shutdown_kernel="immediate")
    try:
        client.execute(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except CellTimeoutError:
        report.update(status="timeout", cell=_running_cell(notebook),
                      error=f"a cell ran past the time limit ({args.timeout:g} s for the notebook)")
    except DeadKernelError as error:
        report.update(status="dead", cell=_running_cell(notebook), error=f"the kernel died: {error}"[:_MAX_ERROR])
    except CellExecutionError:
        cell, message = _first_error(notebook)
        report.update(status="error", cell=cell, error=message)
    except Exception as error:  # noqa: BLE001
        report.update(status="dead", error=f"{type(error).__name__}: {error}"[:_MAX_ERROR])
    try:
        nbformat.write(notebook, args.executed)
    except Exception:  # noqa: BLE001 - the status matters more than the copy
        pass
    print(json.dumps(report | {"seconds": round(time.monotonic() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
