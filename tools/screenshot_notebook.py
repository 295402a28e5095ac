"""Real-browser check of a notebook: run it in JupyterLab in headless Chromium, screenshot it, report errors.

    .venv/bin/python tools/screenshot_notebook.py notebooks/00_where_the_time_goes.ipynb [--out .screenshots]

What it does:

1. copies the notebook into a temporary folder (the committed file is never
   touched: no outputs can be saved into the repository) and starts
   ``jupyter lab --no-browser`` there without a token, with throw-away user
   settings: autosave off, news/update checks off, every cell kept in the DOM
   (``windowingMode: none``) so the whole notebook can be inspected;
2. opens it in headless Chromium (Debian's ``/usr/bin/chromium``, driven by
   Playwright; ``playwright install`` is never needed), accepts the kernel
   dialog if one appears, and runs *Run → Run All Cells*;
3. waits until the kernel is idle and no cell is queued;
4. scrolls through the notebook saving viewport screenshots
   ``<out>/<notebook>/section_NN.png`` plus one tall ``full.png``;
5. reports what rendered (plotly figures, widget views, static images), every
   error output found in the page (tracebacks, "Error displaying widget") and,
   separately, stderr text (warnings). Exit status 1 when errors were found,
   a cell did not run, or a step failed;
6. with ``--interact``, presses → three times on the first slider and saves
   ``after_slider.png`` of that output (does the live figure follow?).

Needs ``pip install -r requirements-dev.txt`` (playwright) and ``apt-get install chromium``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 1000}
FULL_PAGE_MAX_HEIGHT = 30_000

# Throw-away JupyterLab user settings (file name -> content).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}

# Run in the page: what rendered and which outputs are errors.
INSPECT_JS = """
() => {
  const text = (el) => (el.innerText || "").trim();
  const errors = [];
  document.querySelectorAll('.jp-Cell').forEach((cell, index) => {
    cell.querySelectorAll('.jp-OutputArea-output').forEach((out) => {
      const mime = out.getAttribute('data-mime-type') || '';
      const body = text(out);
      const isError = /Traceback \\(most recent call last\\)/.test(body) || /Error displaying widget/.test(body)
        || out.classList.contains('jp-mod-error');
      if (isError || mime === 'application/vnd.jupyter.stderr')
        errors.push({cell: index + 1, kind: isError ? 'error' : 'stderr', text: body.slice(0, 600)});
    });
  });
  return {
    cells: document.querySelectorAll('.jp-Notebook .jp-Cell').length,
    codeCells: document.querySelectorAll('.jp-Notebook .jp-CodeCell').length,
    plotlyFigures: document.querySelectorAll('.jp-OutputArea-output .plot-container').length,
    widgetViews: document.querySelectorAll('.jp-OutputArea-output .jupyter-widgets, .jp-OutputArea-output .widget-container').length,
    sliders: document.querySelectorAll('.jp-OutputArea-output .widget-slider').length,
    images: document.querySelectorAll('.jp-OutputArea-output img').length,
    widgetErrors: Array.from(document.querySelectorAll('.jp-OutputArea-output')).filter(e => /Error displaying widget|Loading widget/.test(text(e))).length,
    queued: Array.from(document.querySelectorAll('.jp-InputPrompt')).filter(e => text(e).includes('*')).length,
    executed: Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')).filter(e => /\\[\\d+\\]/.test(text(e))).length,
    errors: errors,
  };
}
"""


@dataclass
class Report:
    """What the browser check found."""

    screenshots: list[Path] = field(default_factory=list)
    page: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_lab_settings(settings_dir: Path) -> None:
    for name, content in LAB_SETTINGS.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))


def start_jupyter_lab(root: Path, port: int, scratch: Path, log_path: Path, extra_args: tuple[str, ...] = ()) -> subprocess.Popen:
    settings_dir = scratch / "user-settings"
    write_lab_settings(settings_dir)
    command = [
        sys.executable, "-m", "jupyterlab",
        "--allow-root", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
        "--IdentityProvider.token=", "--ServerApp.password=",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={settings_dir}",
        f"--LabApp.workspaces_dir={scratch / 'workspaces'}",
        *extra_args,
    ]
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(scratch / "runtime")}
    log = log_path.open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for_server(port: int, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"jupyter lab exited early with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer on port {port} within {timeout_s:.0f} s")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def accept_kernel_dialog(page) -> None:
    """A notebook without kernelspec metadata asks which kernel to start: take the default."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and dialog.first.is_visible():
        page.locator(".jp-Dialog .jp-mod-accept").first.click()
        page.wait_for_timeout(500)


def run_all_cells(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def wait_until_idle(page, timeout_s: float) -> dict:
    """Poll until no cell is queued and the kernel is idle twice in a row; return the last inspection."""
    deadline = time.monotonic() + timeout_s
    calm = 0
    state: dict = {}
    page.wait_for_timeout(2000)
    while time.monotonic() < deadline:
        accept_kernel_dialog(page)
        state = page.evaluate(INSPECT_JS)
        status = page.locator(".jp-Notebook-ExecutionIndicator").first.get_attribute("data-status") or ""
        calm = calm + 1 if state["queued"] == 0 and status == "idle" else 0
        if calm >= 2:
            page.wait_for_timeout(3000)  # let widgets and figures finish drawing
            return page.evaluate(INSPECT_JS)
        page.wait_for_timeout(1000)
    raise TimeoutError(f"the notebook was still running after {timeout_s:.0f} s (last state {state})")


def screenshot_sections(page, out_dir: Path) -> list[Path]:
    """Scroll the notebook's scroll container a screen at a time; save each view, then one tall image."""
    paths = []
    scroller = ".jp-NotebookPanel .jp-WindowedPanel-outer"
    total = page.evaluate(f"() => document.querySelector('{scroller}').scrollHeight")
    step = int(VIEWPORT["height"] * 0.85)
    for index, top in enumerate(range(0, max(total, 1), step)):
        page.evaluate(f"() => document.querySelector('{scroller}').scrollTo(0, {top})")
        page.wait_for_timeout(400)
        path = out_dir / f"section_{index:02d}.png"
        page.screenshot(path=str(path))
        paths.append(path)
    page.evaluate(f"() => document.querySelector('{scroller}').scrollTo(0, 0)")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": min(total + 200, FULL_PAGE_MAX_HEIGHT)})
    page.wait_for_timeout(1500)
    full = out_dir / "full.png"
    page.screenshot(path=str(full))
    page.set_viewport_size(VIEWPORT)
    paths.append(full)
    return paths


def nudge_first_slider(page, out_dir: Path) -> Path | None:
    """Press → three times on the first slider (a live-widget check); screenshot that output area after."""
    handle = page.locator(".jp-OutputArea-output .widget-slider .noUi-handle").first
    if not handle.count():
        return None
    handle.scroll_into_view_if_needed()
    handle.click()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
        page.wait_for_timeout(300)
    page.wait_for_timeout(2000)
    area = handle.locator("xpath=ancestor::div[contains(@class, 'jp-OutputArea')][1]")
    path = out_dir / "after_slider.png"
    area.screenshot(path=str(path))
    return path


def check_notebook(
    notebook: Path, out_root: Path, *, timeout_s: float = 900, port: int | None = None, interact: bool = False
) -> Report:
    """Run ``notebook`` in JupyterLab in headless Chromium; save screenshots under ``out_root``; report."""
    from playwright.sync_api import sync_playwright

    if notebook.suffix != ".ipynb" or not notebook.is_file():
        raise FileNotFoundError(f"{notebook}: not a notebook file")
    if not Path(CHROMIUM).is_file():
        raise FileNotFoundError(f"{CHROMIUM} not found: apt-get install -y chromium")
    report = Report()
    out_dir = out_root / notebook.stem
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="nbshot-") as tmp:
        scratch = Path(tmp)
        root = scratch / "root"
        root.mkdir()
        shutil.copy2(notebook, root / notebook.name)
        server = start_jupyter_lab(root, port, scratch, out_dir / "jupyter.log")
        try:
            wait_for_server(port, server, timeout_s=120)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport=VIEWPORT)
                console_errors: list[str] = []
                page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
                try:
                    page.goto(f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?reset", timeout=120_000)
                    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
                    page.wait_for_timeout(3000)
                    accept_kernel_dialog(page)
                    page.wait_for_function(
                        "() => document.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset?.status === 'idle'",
                        timeout=120_000,
                    )
                    run_all_cells(page)
                    report.page = wait_until_idle(page, timeout_s)
                    report.screenshots = screenshot_sections(page, out_dir)
                    if interact:
                        nudged = nudge_first_slider(page, out_dir)
                        if nudged is not None:
                            report.screenshots.append(nudged)
                            report.page = page.evaluate(INSPECT_JS)  # errors the interaction caused
                except Exception:
                    page.screenshot(path=str(out_dir / "failure.png"))
                    report.screenshots.append(out_dir / "failure.png")
                    raise
                finally:
                    report.page["consoleErrors"] = console_errors[:20]
                    browser.close()
        except Exception as error:  # report any failed step, keep what was saved
            report.problems.append(f"{type(error).__name__}: {error}")
        finally:
            stop(server)
    page_state = report.page
    if page_state:
        for item in page_state.get("errors", []):
            found = report.problems if item["kind"] == "error" else report.stderr
            found.append(f"cell {item['cell']}: {item['text']}")
        if page_state.get("executed", 0) < page_state.get("codeCells", 0):
            report.problems.append(
                f"only {page_state['executed']} of {page_state['codeCells']} code cells ran (execution stopped early?)"
            )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, default=Path(".screenshots"), help="screenshot folder (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for Run All (default: %(default)s)")
    parser.add_argument("--port", type=int, default=None, help="JupyterLab port (default: a free one)")
    parser.add_argument(
        "--interact", action="store_true",
        help="after running, press → three times on the first slider and save after_slider.png",
    )
    args = parser.parse_args(argv)
    report = check_notebook(args.notebook.resolve(), args.out.resolve(), timeout_s=args.timeout, port=args.port, interact=args.interact)
    state = report.page
    if state:
        print(
            f"{args.notebook.name}: {state.get('executed')}/{state.get('codeCells')} code cells ran; "
            f"{state.get('plotlyFigures')} plotly figures, {state.get('widgetViews')} widget views "
            f"({state.get('sliders')} sliders), {state.get('images')} images rendered; "
            f"{state.get('widgetErrors')} widget placeholders/errors"
        )
        for message in state.get("consoleErrors", []):
            print(f"  browser console error: {message[:300]}")
    for path in report.screenshots:
        print(f"  screenshot: {path}")
    for text in report.stderr:
        print(f"stderr (warning, not an error): {text}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    print("OK: no error outputs" if not report.problems else f"{len(report.problems)} problem(s)")
    return 1 if report.problems else 0


if __name__ == "__main__":
    # Killed by `timeout` or Ctrl-C: unwind normally so JupyterLab and its kernel are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    sys.exit(main())
