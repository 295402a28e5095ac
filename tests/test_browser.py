"""Every chapter in a real browser: JupyterLab in headless Chromium runs it (quick mode) and we look at the page.

For each chapter in ``notebooks/`` one JupyterLab server (throw-away settings,
no token) opens the chapter's *student edition* (as a learner gets it: solutions replaced by
``raise NotImplementedError``, made by :mod:`labsupport.harness.editions`) in Debian's Chromium driven by
Playwright (``/usr/bin/chromium``; nothing is downloaded), runs *Run All
Cells* with ``LABSUPPORT_QUICK=1``, saves it, and checks against the saved
notebook's own outputs:

* the student edition's checks (``conftest.student_edition_problems``, which tests/test_notebooks.py then leaves
  to this test): no cell failed (the first error is named with its cell and traceback), and every checker says
  "not done yet";
* every code cell ran and no output is an error (a traceback, "Error displaying widget");
* every plotly output and every widget output of the notebook is rendered in the page;
* every explorer (``interactive_figure``) shows exactly one figure, and no cell
  shows the same figure twice (JupyterLab must not draw the static fallback too);
* moving the first slider of each explorer changes its figure.

Screenshots (``slider_NN.png`` per chapter, ``failure.png`` when a chapter fails, and the whole page,
``full.jpg``, when ``COURSE_BROWSER_FULL_SCREENSHOTS=1``: drawing a page up to 30,000 pixels tall costs Chromium
seconds of CPU per chapter, which ``bin/test`` spends on the checks instead) and ``counts.md``,
a table of what was counted, go to ``.screenshots/browser/`` (ignored by git) for
a person to look at; the executed student editions go to ``.screenshots/browser/executed/``,
where tests/test_static_book.py builds the book from them, and to ``.screenshots/student/executed/`` (stamped for
the student book's build). Skipped, with a one-line reason, where Chromium or
Playwright is missing (``.ci/run`` installs both on Debian); deselect with ``-m 'not browser'``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from conftest import (REPO, chapter_notebooks, notebook_params, save_executed_student_edition,
                      student_edition_problems)

from labsupport.harness.editions import make_student_edition

pytestmark = pytest.mark.browser

SHOTS = REPO / ".screenshots" / "browser"
RUN_TIMEOUT_S = 600
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PLOTLY = "application/vnd.plotly.v1+json"

_spec = importlib.util.spec_from_file_location("screenshot_notebook", REPO / "tools" / "screenshot_notebook.py")
shots = sys.modules.setdefault("screenshot_notebook", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(shots)


def why_no_browser() -> str | None:
    if not Path(shots.CHROMIUM).is_file():
        return f"browser test skipped: {shots.CHROMIUM} not found (Debian: apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "browser test skipped: playwright is not installed (pip install -r requirements-dev.txt)"
    return None


# What the page shows, per output area (run in the browser).
PAGE_JS = """
() => {
  const text = (el) => (el.innerText || '').trim();
  const cells = Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell'));
  return cells.map((cell, index) => ({
    cell: index + 1,
    code: cell.classList.contains('jp-CodeCell'),
    executed: /\\[\\d+\\]/.test(text(cell.querySelector('.jp-InputPrompt') || cell)),
    outputs: Array.from(cell.querySelectorAll('.jp-OutputArea-output'))
      .filter((out) => !out.parentElement.closest('.jupyter-widgets'))  // not the contents of an Output widget
      .map((out) => ({
      // JupyterLab marks text outputs with data-mime-type; plotly and widget outputs by their renderer.
      mime: out.classList.contains('jp-RenderedPlotly') ? 'plotly'
        : (out.querySelector('.jupyter-widgets, .widget-box, .widget-container') || /Loading widget|Error displaying widget/.test(text(out))) ? 'widget'
        : (out.classList.contains('lm-Panel') && !out.firstElementChild) ? 'closed widget'
        : (out.getAttribute('data-mime-type') || ''),
      figures: Array.from(out.querySelectorAll('.plot-container')).map((plot) => {
        const title = plot.querySelector('.gtitle');
        return (title ? title.textContent : '') + ' | ' + plot.querySelectorAll('.trace').length;
      }),
      sliders: out.querySelectorAll('.widget-slider').length,
      error: /Traceback \\(most recent call last\\)|Error displaying widget|Loading widget/.test(text(out))
        || out.classList.contains('jp-mod-error') || out.getAttribute('data-mime-type') === 'application/vnd.jupyter.error',
      text: text(out).slice(0, 300),
    })),
  }));
}
"""


def expected_outputs(notebook: nbformat.NotebookNode) -> dict:
    """What the saved notebook says the page must show."""
    plotly = widgets = explorers = progress_bars = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            plain = str(data.get("text/plain", ""))
            if WIDGET_VIEW in data:
                widgets += 1
                explorers += plain.startswith("[interactive explorer")
                progress_bars += "it/s]" in plain  # tqdm.auto's bar; closed when it is done (leave=False)
            elif PLOTLY in data:
                plotly += 1
    code = sum(cell.cell_type == "code" for cell in notebook.cells)
    return {"code_cells": code, "plotly_outputs": plotly, "widget_outputs": widgets, "explorers": explorers,
            "progress_bars": progress_bars}


# The kernels shut down while the next chapter loads: ``keepalive`` requests outlive the page that sends them.
SHUT_DOWN_JS = """
async () => {
  const xsrf = decodeURIComponent((document.cookie.match(/_xsrf=([^;]+)/) || [])[1] || '');
  const sessions = await (await fetch('/api/sessions')).json();
  for (const s of sessions)
    fetch('/api/sessions/' + s.id, {method: 'DELETE', headers: {'X-XSRFToken': xsrf}, keepalive: true});
  return sessions.length;
}
"""

# Two animation frames: the page has laid itself out after a resize.
SETTLE_JS = "() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"


def wait_for_kernel(page, timeout_s: float = 120) -> None:
    """Until the notebook's kernel is started and idle (accepting a kernel dialog if one appears)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        shots.accept_kernel_dialog(page)
        ready = page.evaluate(
            "() => document.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset?.status === 'idle'"
            " && !/No Kernel/.test(document.querySelector('.jp-KernelName')?.innerText || 'No Kernel')"
            " && !document.querySelector('.jp-Dialog')"
        )
        if ready:
            return
        page.wait_for_timeout(500)
    raise TimeoutError(f"the kernel did not start within {timeout_s:.0f} s")


def save_notebook(page, path: Path, started: float) -> nbformat.NotebookNode:
    page.locator(".jp-NotebookPanel .jp-Notebook").first.click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.stat().st_mtime > started:
            page.wait_for_timeout(300)
            return nbformat.read(path, as_version=4)
        page.wait_for_timeout(200)
    raise TimeoutError(f"{path.name} was not saved")


POLL_MS = 250

# What wait_until_run needs, four times a second while the chapter runs: read with textContent, which (unlike
# innerText, which screenshot_notebook.INSPECT_JS reads from every output) makes Chromium lay out nothing.
RUN_STATE_JS = """
() => {
  let queued = 0, executed = 0;
  for (const prompt of document.querySelectorAll('.jp-Notebook .jp-InputPrompt')) {
    const text = prompt.textContent || '';
    if (text.includes('*')) queued++;
    else if (prompt.closest('.jp-CodeCell') && /\\[\\d+\\]/.test(text)) executed++;
  }
  const indicator = document.querySelector('.jp-Notebook-ExecutionIndicator');
  return {queued, executed, status: (indicator && indicator.dataset.status) || ''};
}
"""


def wait_until_run(page, code_cells: int, timeout_s: float) -> None:
    """After *Run All Cells*: until no cell is queued, the kernel is idle and every code cell shows its execution
    count, for half a second on end (or for three seconds when some cell never ran, which the test then reports).
    A cell's outputs all reach the page before the kernel reports idle after it, so once every cell shows its count
    two looks in a row suffice (it waited a full second, about 6 s over the eleven chapters).

    Polls every quarter second instead of waiting fixed seconds (``screenshot_notebook.wait_until_idle`` waits 2 s,
    then 1 s per look and 3 s more at the end: about 6 s per chapter of nothing but waiting).
    """
    deadline = time.monotonic() + timeout_s
    calm_since = None
    state: dict = {}
    page.wait_for_timeout(500)
    while time.monotonic() < deadline:
        shots.accept_kernel_dialog(page)
        state = page.evaluate(RUN_STATE_JS)
        now = time.monotonic()
        if state["queued"] == 0 and state["status"] == "idle":
            calm_since = now if calm_since is None else calm_since
            if now - calm_since >= (0.5 if state["executed"] >= code_cells else 3.0):
                return
        else:
            calm_since = None
        page.wait_for_timeout(POLL_MS)
    raise TimeoutError(f"the notebook was still running after {timeout_s:.0f} s (last state {state})")


def rendered(cells: list[dict], expected: dict) -> bool:
    """Has the page drawn every output the saved notebook holds (the conditions the test asserts, sliders aside)?"""
    outputs = [out for cell in cells for out in cell["outputs"]]
    plotly = [out for out in outputs if out["mime"] == "plotly"]
    widgets = [out for out in outputs if out["mime"] == "widget"]
    closed = [out for out in outputs if out["mime"] == "closed widget"]
    explorers = [out for out in widgets if out["figures"]]
    return (not any(out["error"] for out in outputs)
            and len(plotly) == expected["plotly_outputs"] and all(len(out["figures"]) == 1 for out in plotly)
            and len(widgets) + len(closed) == expected["widget_outputs"]
            and len(explorers) == expected["explorers"] and all(len(out["figures"]) == 1 for out in explorers))


def wait_until_drawn(page, expected: dict, timeout_s: float = 30) -> list[dict]:
    """What the page shows, once it shows everything the saved notebook holds, the same on two looks in a row
    (figures and widgets draw a moment after the kernel is idle); after ``timeout_s``, whatever it shows then, for
    the assertions to report. (It waited a fixed 3 s before.)"""
    def drawn(cells: list[dict]) -> list[tuple] | None:
        return [(c["cell"], o["mime"], tuple(o["figures"]), o["sliders"]) for c in cells for o in c["outputs"]] \
            if rendered(cells, expected) else None

    deadline = time.monotonic() + timeout_s
    previous = None
    while True:
        cells = page.evaluate(PAGE_JS)
        now = drawn(cells)
        if (now is not None and now == previous) or time.monotonic() > deadline:
            return cells
        previous = now
        page.wait_for_timeout(POLL_MS)


def figure_state(handle) -> str:
    """A fingerprint of what an output area's plot draws (its SVG paths and texts)."""
    return handle.evaluate(
        "(out) => Array.from(out.querySelectorAll('.plot-container svg')).map(s => s.innerHTML.length + ':' + "
        "Array.from(s.querySelectorAll('path, text')).map(e => (e.getAttribute('d') || e.textContent || '')).join('|')).join('#')"
    )


def move_sliders(page, out_dir: Path) -> list[dict]:
    """Press → three times on the first enabled slider of every explorer; report whether its figure changed.

    A slider an explorer has disabled (a parameter the chosen setting ignores, e.g. chapter 03's decay for plain
    linear attention) cannot change the figure: it is passed over, and the next enabled slider is tried, up to four.
    """
    results = []
    areas = page.locator(
        ".jp-OutputArea-child > .jp-OutputArea-output:has(.plot-container):has(.widget-slider)"
    )
    for index in range(areas.count()):
        area = areas.nth(index)
        area.scroll_into_view_if_needed()
        changed = False
        handles = area.locator(".widget-slider .noUi-handle")
        tried = 0
        for which in range(handles.count()):
            if tried == 4:
                break
            if handles.nth(which).evaluate("(h) => !!h.closest('.noUi-target')?.hasAttribute('disabled')"):
                continue  # ipywidgets marks a disabled slider so; its keys do nothing (no 10 s wait for it)
            tried += 1
            before = figure_state(area)
            handles.nth(which).click()
            for _ in range(3):
                page.keyboard.press("ArrowRight")
                page.wait_for_timeout(250)
            for _ in range(40):  # the kernel redraws; give it up to 10 s on a busy machine
                page.wait_for_timeout(POLL_MS)
                if figure_state(area) != before:
                    changed = True
                    break
            if changed:
                break
        area.screenshot(path=str(out_dir / f"slider_{index:02d}.png"))
        title = area.locator("b").first.inner_text() if area.locator("b").count() else f"explorer {index + 1}"
        results.append({"explorer": title, "changed": changed})
    return results


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One JupyterLab server (quick mode) and one headless Chromium for every chapter."""
    reason = why_no_browser()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    scratch = tmp_path_factory.mktemp("lab")
    root = scratch / "root"
    root.mkdir()
    port = shots.free_port()
    SHOTS.mkdir(parents=True, exist_ok=True)
    saved_env = dict(os.environ)
    os.environ.update(LABSUPPORT_QUICK="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    os.environ.pop("LABSUPPORT_STRICT_CHECKS", None)  # checkers are graded at full size by nbval, not at quick sizes
    try:
        # window.jupyterapp: the chapters open and close in one JupyterLab page (see lab_page)
        server = shots.start_jupyter_lab(root, port, scratch, SHOTS / "jupyter.log",
                                         extra_args=("--LabApp.expose_app_in_browser=True",))
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    try:
        shots.wait_for_server(port, server, timeout_s=180)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shots.CHROMIUM, headless=True, args=shots.CHROMIUM_ARGS)
            try:
                context = browser.new_context(viewport=shots.VIEWPORT)
                lab = {"root": root, "port": port, "browser": browser, "context": context, "page": None,
                       "console": [], "counts": {}}
                yield lab
                if lab["page"] is not None:
                    lab["page"].close()
            finally:
                browser.close()
    finally:
        shots.stop(server)


LAB_READY_JS = "() => !!(window.jupyterapp && document.querySelector('.jp-LabShell'))"
OPEN_JS = "async (path) => { await window.jupyterapp.commands.execute('docmanager:open', {path, factory: 'Notebook'}); return true; }"
# Close every document in the main area without the unsaved-changes dialog (the slider moves after the save change
# the widgets' state), then end the kernels' sessions; the next chapter opens while they shut down.
CLOSE_JS = """
async () => {
  for (const widget of Array.from(window.jupyterapp.shell.widgets('main')))
    if (widget.context) widget.dispose();
  const xsrf = decodeURIComponent((document.cookie.match(/_xsrf=([^;]+)/) || [])[1] || '');
  const sessions = await (await fetch('/api/sessions')).json();
  for (const s of sessions)
    fetch('/api/sessions/' + s.id, {method: 'DELETE', headers: {'X-XSRFToken': xsrf}});
  return sessions.length;
}
"""


def lab_page(lab):
    """The JupyterLab page the chapters open in, one after another (started on first use, or again after a chapter
    failed). Loading JupyterLab itself took about 5 s of Chromium's CPU per chapter when each chapter had a page."""
    if lab["page"] is None:
        page = lab["context"].new_page()
        page.on("console", lambda msg: lab["console"].append(msg.text) if msg.type == "error" else None)
        page.goto(f"http://127.0.0.1:{lab['port']}/lab?reset", timeout=120_000)
        page.wait_for_function(LAB_READY_JS, timeout=120_000)
        page.evaluate("async () => { await window.jupyterapp.restored; }")
        lab["page"] = page
    return lab["page"]


@pytest.fixture(scope="module", autouse=True)
def counts_table(lab):
    """Write .screenshots/browser/counts.md once every chapter has run."""
    yield
    rows = [
        "| chapter | code cells run | plotly figures | widgets shown + progress bars closed | explorers (one figure each) | sliders that changed a figure | errors | stderr outputs | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in sorted(lab["counts"].items()):
        rows.append(
            f"| {name} | {c['executed']}/{c['code_cells']} | {c['plotly_rendered']}/{c['plotly_outputs']} | "
            f"{c['widgets_rendered']}+{c['widgets_closed']}/{c['widget_outputs']} | {c['explorers_one_figure']}/{c['explorers']} | "
            f"{c['sliders_changed']}/{c['sliders_moved']} | {c['errors']} | {c['stderr']} | {c['seconds']:.0f} |"
        )
    (SHOTS / "counts.md").write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.mark.parametrize("path", notebook_params(chapter_notebooks()))
def test_chapter_runs_and_renders_in_jupyterlab(lab, path: Path) -> None:
    started = time.monotonic()
    out_dir = SHOTS / path.stem
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    copy = lab["root"] / path.name
    notebook = make_student_edition(nbformat.read(path, as_version=4), name=path.name)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(notebook, copy)  # a copy that names its kernel: JupyterLab asks nothing
    copied_at = copy.stat().st_mtime
    phases: dict[str, float] = {}

    def phase(name: str) -> None:  # seconds since the test began, for report.json
        phases[name] = round(time.monotonic() - started, 1)

    page = lab_page(lab)
    console_from = len(lab["console"])
    failed = True
    try:
        page.evaluate(OPEN_JS, path.name)
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
        phase("page loaded")
        wait_for_kernel(page)
        phase("kernel ready")
        shots.run_all_cells(page)
        wait_until_run(page, sum(cell.cell_type == "code" for cell in notebook.cells), RUN_TIMEOUT_S)
        phase("ran")
        saved = save_notebook(page, copy, copied_at)
        phase("saved")
        (SHOTS / "executed").mkdir(exist_ok=True)
        kept = nbformat.from_dict(saved)
        kept.metadata["course_source_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        kept.metadata["course_edition"] = "student"
        nbformat.write(kept, SHOTS / "executed" / path.name)  # tests/test_static_book.py builds the book from these
        save_executed_student_edition(path, saved)
        cells = wait_until_drawn(page, expected_outputs(saved))
        phase("drawn")
        sliders = move_sliders(page, out_dir)
        phase("sliders moved")
        if os.environ.get("COURSE_BROWSER_FULL_SCREENSHOTS") == "1":  # for a person to look at; no check uses it
            page.evaluate("() => document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer').scrollTo(0, 0)")
            height = page.evaluate("() => document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer').scrollHeight")
            page.set_viewport_size({"width": shots.VIEWPORT["width"], "height": min(height + 200, shots.FULL_PAGE_MAX_HEIGHT)})
            page.evaluate(SETTLE_JS)
            page.wait_for_timeout(300)
            page.screenshot(path=str(out_dir / "full.jpg"), type="jpeg", quality=70)  # JPEG: PNG took seconds more
            phase("screenshot")
        failed = False
    except Exception:
        page.screenshot(path=str(out_dir / "failure.png"))
        raise
    finally:
        console_errors = lab["console"][console_from:]
        if failed:  # the next chapter starts from a fresh JupyterLab page
            page.evaluate(SHUT_DOWN_JS)
            page.close()
            lab["page"] = None
        else:
            page.evaluate(CLOSE_JS)  # free the chapter's kernel (its memory) before the next one
            page.set_viewport_size(shots.VIEWPORT)

    expected = expected_outputs(saved)
    outputs = [(cell["cell"], out) for cell in cells for out in cell["outputs"]]
    plotly = [out for _, out in outputs if out["mime"] == "plotly"]
    widgets = [out for _, out in outputs if out["mime"] == "widget"]
    closed = [out for _, out in outputs if out["mime"] == "closed widget"]
    explorers = [out for out in widgets if out["figures"]]
    errors = [f"cell {cell}: {out['text']}" for cell, out in outputs if out["error"]]
    stderr = [f"cell {cell}: {out['text']}" for cell, out in outputs if out["mime"] == "application/vnd.jupyter.stderr"]
    duplicates = []
    for cell in cells:
        figures = [figure for out in cell["outputs"] for figure in out["figures"] if not figure.startswith(" |")]
        duplicates += [f"cell {cell['cell']}: {f!r}" for f in sorted(set(figures)) if figures.count(f) > 1]
    counts = {
        **expected,
        "executed": sum(cell["code"] and cell["executed"] for cell in cells),
        "plotly_rendered": sum(len(out["figures"]) == 1 for out in plotly),
        "widgets_rendered": sum(not out["error"] for out in widgets),
        "widgets_closed": len(closed),
        "explorers_one_figure": sum(len(out["figures"]) == 1 for out in explorers),
        "sliders_moved": len(sliders),
        "sliders_changed": sum(s["changed"] for s in sliders),
        "errors": len(errors),
        "stderr": len(stderr),
        "seconds": time.monotonic() - started,
    }
    phase("closed")
    lab["counts"][path.stem] = counts
    (out_dir / "report.json").write_text(
        json.dumps({"counts": counts, "phases": phases, "errors": errors, "stderr": stderr, "duplicates": duplicates,
                    "sliders": sliders, "console_errors": console_errors[:20]}, indent=1),
        encoding="utf-8",
    )

    name = path.name
    problem = student_edition_problems(path, saved, f"student edition of {name}")
    assert problem is None, problem
    assert not errors, f"{name}: error outputs in the page: {errors}"
    assert counts["executed"] == expected["code_cells"], f"{name}: only {counts['executed']} of {expected['code_cells']} code cells ran"
    assert len(plotly) == expected["plotly_outputs"] == counts["plotly_rendered"], (
        f"{name}: the notebook has {expected['plotly_outputs']} plotly outputs; the page shows {len(plotly)} "
        f"of which {counts['plotly_rendered']} drew a figure"
    )
    assert len(widgets) + len(closed) == expected["widget_outputs"] and len(widgets) == counts["widgets_rendered"], (
        f"{name}: the notebook has {expected['widget_outputs']} widget outputs; the page shows {len(widgets)} "
        f"({counts['widgets_rendered']} without an error) and {len(closed)} closed"
    )
    assert len(closed) <= expected["progress_bars"], f"{name}: {len(closed)} widgets closed, only progress bars may close"
    assert expected["explorers"] >= 1, f"{name}: no interactive explorer found"
    assert len(explorers) == expected["explorers"] == counts["explorers_one_figure"], (
        f"{name}: {expected['explorers']} explorers, {len(explorers)} drew a figure, "
        f"{counts['explorers_one_figure']} exactly one"
    )
    assert not duplicates, f"{name}: the same figure is shown twice in a cell: {duplicates}"
    assert sliders and all(s["changed"] for s in sliders), f"{name}: moving a slider did not change its figure: {sliders}"
