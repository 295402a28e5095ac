"""Build the course book: execute every chapter, then render the pages with Sphinx + myst-nb, offline.

    python tools/build_book.py [--quick] [--student] [--jobs 2] [--out _build/book] [notebooks ...]

(``bash bin/book`` runs this in the course's environment.) Two books:

* the instructor book (the default, ``_build/book``): the chapters as committed. Each exercise cell shows
  what a learner sees (the solution replaced by ``raise NotImplementedError``), and the solution follows,
  folded under "Solution (instructor edition)"; a markdown answer is folded the same way. No
  ``### BEGIN/END SOLUTION`` marker is ever shown;
* the student book (``--student``, ``_build/book-student``): built from the student editions
  (:mod:`labsupport.harness.editions`), executed as a learner would run them: no solution, no marker,
  and each checker says "not done yet".

Steps:

1. each chapter in ``notebooks/`` (or its student edition) is executed top to bottom with nbclient in a
   kernel of this interpreter, working directory ``notebooks/``, with plotly's
   ``offline_html`` renderer (figures as HTML that load no script from the
   network; the page loads plotly.js once) and progress bars off; ``--quick``
   runs it in quick mode (``LABSUPPORT_QUICK=1``). An executed copy whose
   source and mode have not changed is reused;
   ``--executed DIR`` takes chapters already executed elsewhere instead
   (the browser test saves the ones JupyterLab ran);
2. the executed copies and ``book/index.md`` go to ``<out>/src``, their
   outputs made offline and their solutions folded or gone (:func:`offline_pages`);
3. ``sphinx-build -b html -c book <out>/src <out>/html`` renders them
   (``book/conf.py``: sphinx-book-theme, MathJax 3 and plotly.js served from
   the book itself).

Open ``<out>/html/index.html``. Exit status 1 when a chapter fails (its cell
and error are named) or Sphinx fails.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
BOOK = REPO / "book"
NOTEBOOKS = REPO / "notebooks"
STAMP_KEY = "course_book_source"

# The kernel's environment while a chapter runs for the book.
BOOK_ENV = {
    "LABSUPPORT_PLOTLY_RENDERER": "offline_html",  # labsupport.harness.settings.configure_plotly honours it
    "TQDM_DISABLE": "1",  # progress bars would be left as stale text in the pages
    "MPLBACKEND": "Agg",
    "PYTHONHASHSEED": "0",
}


SOLUTION_LABEL = "Solution (instructor edition)"
STUDENT_NOTE = ("*This is the student edition of the book: the exercises are shown as a learner gets them, "
                "without solutions, and each checker says \"not done yet\".*")


def source_stamp(path: Path, quick: bool, student: bool = False) -> str:
    """What an executed copy was made from: the notebook's bytes, the library's sources, the mode, the edition."""
    digest = hashlib.sha256(path.read_bytes())
    for module in sorted((REPO / "labsupport").rglob("*.py")):
        digest.update(module.read_bytes())
    digest.update(b"quick" if quick else b"full")
    digest.update(b"student" if student else b"")
    return digest.hexdigest()[:16]


def execute(path: Path, target: Path, quick: bool, student: bool = False) -> tuple[str, float, str | None]:
    """Run ``path`` (its student edition when ``student``) and write it with outputs to ``target``.

    Returns (name, seconds, error or None).
    """
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name="Python 3", language="python",
            )

    os.environ.update(BOOK_ENV)
    os.environ["LABSUPPORT_QUICK"] = "1" if quick else "0"
    started = time.monotonic()
    notebook = nbformat.read(path, as_version=4)
    if student:
        from labsupport.harness.editions import make_student_edition

        notebook = make_student_edition(notebook, name=path.name)
    client = NotebookClient(
        notebook,
        km=KernelManager(kernel_spec_manager=ThisInterpreter(), kernel_name="python3"),
        timeout=900,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
        store_widget_state=False,
        coalesce_streams=True,
        record_timing=False,
    )
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
        for index, cell in enumerate(notebook.cells, start=1):
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            if errors:
                return path.name, time.monotonic() - started, f"cell {index}: {errors[0]['ename']}: {errors[0]['evalue']}"
        return path.name, time.monotonic() - started, f"{type(error).__name__}: {str(error)[-800:]}"
    notebook.metadata[STAMP_KEY] = source_stamp(path, quick, student)
    notebook.metadata.pop("widgets", None)
    nbformat.write(notebook, target)
    return path.name, time.monotonic() - started, None


PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
_CAPTION = re.compile(r'<p class="static-caption">.*?</p>', re.S)


def fold_solutions(notebook: nbformat.NotebookNode, *, student: bool) -> nbformat.NotebookNode:
    """Solutions as the book shows them: folded under :data:`SOLUTION_LABEL` (instructor) or gone (student).

    A code cell with solution blocks shows the learner's version (each block replaced by
    ``raise NotImplementedError``), followed, in the instructor book, by a markdown cell with the whole
    cell's code, markers removed, inside ``<details>``. A markdown answer is folded in place. The markers
    never reach a page.
    """
    from nbformat.v4 import new_markdown_cell

    from labsupport.harness.editions import (
        MARKDOWN_PLACEHOLDER,
        find_solution_blocks,
        replace_solutions,
    )

    cells = []
    for cell in notebook.cells:
        blocks = find_solution_blocks(cell.source) if cell.cell_type in ("code", "markdown") else []
        if not blocks:
            cells.append(cell)
            continue
        lines = cell.source.splitlines()
        if cell.cell_type == "code":
            full = "\n".join(line for number, line in enumerate(lines)
                             if not any(number in (b.begin, b.end) for b in blocks))
            cell.source = replace_solutions(cell.source, cell_type="code")
            cells.append(cell)
            if not student:
                cells.append(new_markdown_cell(
                    f"<details class=\"course-solution\"><summary>{SOLUTION_LABEL}</summary>\n\n"
                    f"```python\n{full}\n```\n\n</details>"))
            continue
        out, position = [], 0
        for block in blocks:
            out.extend(lines[position:block.begin])
            answer = "\n".join(lines[block.begin + 1:block.end])
            out.append(MARKDOWN_PLACEHOLDER if student else
                       f"<details class=\"course-solution\"><summary>{SOLUTION_LABEL}</summary>\n\n{answer}\n\n"
                       "</details>")
            position = block.end + 1
        out.extend(lines[position:])
        cell.source = "\n".join(out)
        cells.append(cell)
    for cell in cells:  # no marker survives, even one outside a block
        cell.source = "\n".join(line for line in cell.source.splitlines()
                                if not line.strip().startswith(("### BEGIN SOLUTION", "### END SOLUTION")))
    notebook.cells = cells
    return notebook


def offline_pages(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Make a notebook's outputs fit an offline page, whatever renderer ran it (also a JupyterLab run).

    * every plotly figure (plotly's JSON mime type) gets its HTML from the
      ``offline_html`` renderer: a ``<div>`` and a module script, no plotly.js, no CDN;
    * HTML outputs that only load plotly.js from its CDN (``notebook_connected``'s set-up) go;
    * widget outputs other than the explorers (progress bars) go: without a
      kernel they would be stale text. An explorer keeps its static figure;
    * the solution markers of markdown answers go (they would render as headings).
    """
    import plotly.io as pio

    from labsupport.harness.settings import OFFLINE_HTML_RENDERER, RENDERER_ENV_VAR, configure_plotly

    os.environ[RENDERER_ENV_VAR] = OFFLINE_HTML_RENDERER
    configure_plotly()
    renderer = pio.renderers[OFFLINE_HTML_RENDERER]
    for cell in notebook.cells:
        if cell.cell_type == "markdown":  # a solution's markers would render as headings
            cell.source = "\n".join(
                line for line in cell.source.splitlines()
                if not line.strip().startswith(("### BEGIN SOLUTION", "### END SOLUTION"))
            )
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_MIME in data:
                caption = _CAPTION.search(data.get("text/html", ""))
                data["text/html"] = renderer.to_mimebundle(data[PLOTLY_MIME])["text/html"] + (
                    caption.group(0) if caption else ""
                )
            elif WIDGET_MIME in data:
                continue
            elif "cdn.plot.ly" in data.get("text/html", ""):
                continue
            kept.append(output)
        if cell.cell_type == "code":
            cell.outputs = kept
    notebook.metadata.pop("widgets", None)
    return notebook


def build(notebooks: list[Path], out: Path, *, quick: bool, jobs: int, executed: Path | None = None,
          student: bool = False) -> int:
    src = out / "src"
    (src / "notebooks").mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in notebooks}
    for stale in (src / "notebooks").glob("*.ipynb"):
        if stale.name not in wanted:
            stale.unlink()
    index = (BOOK / "index.md").read_text(encoding="utf-8")
    if student:
        index = index.replace("\n```{toctree}", f"\n{STUDENT_NOTE}\n\n```{{toctree}}", 1)
    (src / "index.md").write_text(index, encoding="utf-8")

    todo = []
    for path in notebooks:
        target = src / "notebooks" / path.name
        ready = executed / path.name if executed and not student else None
        if ready is not None and ready.is_file():
            shutil.copy2(ready, target)
            print(f"[book] {path.name}: taken as executed from {executed}")
        elif (target.is_file() and nbformat.read(target, as_version=4).metadata.get(STAMP_KEY)
              == source_stamp(path, quick, student)):
            print(f"[book] {path.name}: unchanged, reusing its executed copy")
        else:
            target.unlink(missing_ok=True)
            todo.append((path, target))
    failed = []
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for name, seconds, error in (pool.map(execute, *zip(*todo), [quick] * len(todo), [student] * len(todo))
                                     if todo else []):
            print(f"[book] {name}: {'FAILED, ' + error if error else 'executed'} ({seconds:.0f} s)")
            if error:
                failed.append(name)
    if failed:
        print(f"[book] not built: {len(failed)} chapter(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1

    pages = out / "pages"  # the executed copies stay as they ran (and reusable); the pages are made from them
    if pages.exists():
        shutil.rmtree(pages)
    (pages / "notebooks").mkdir(parents=True)
    shutil.copy2(src / "index.md", pages / "index.md")
    for target in sorted((src / "notebooks").glob("*.ipynb")):
        page = offline_pages(fold_solutions(nbformat.read(target, as_version=4), student=student))
        nbformat.write(page, pages / "notebooks" / target.name)

    html = out / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-c", str(BOOK), str(pages), str(html)], check=False
    )
    if done.returncode:
        print("[book] sphinx-build failed", file=sys.stderr)
        return 1
    print(f"[book] written to {html / 'index.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--out", type=Path, default=None, help="default: _build/book (_build/book-student)")
    parser.add_argument("--quick", action="store_true", help="run the chapters in quick mode (smaller sizes)")
    parser.add_argument("--student", action="store_true",
                        help="the student book: built from the student editions, no solutions, no markers")
    parser.add_argument("--jobs", type=int, default=1, help="chapters executed at once (default: 1)")
    parser.add_argument(
        "--executed", type=Path, default=None,
        help="a folder of chapters already executed (e.g. saved from JupyterLab): used instead of running them",
    )
    args = parser.parse_args(argv)
    notebooks = [p.resolve() for p in args.notebooks] or sorted(NOTEBOOKS.glob("*.ipynb"))
    if not notebooks:
        print("error: no notebooks found", file=sys.stderr)
        return 1
    executed = args.executed.resolve() if args.executed else None
    out = args.out or REPO / "_build" / ("book-student" if args.student else "book")
    return build(notebooks, out.resolve(), quick=args.quick, jobs=args.jobs, executed=executed, student=args.student)


if __name__ == "__main__":
    sys.exit(main())
