"""Check the environment the course needs and say what to fix.

Run ``python -m labsupport.harness.envcheck`` (or ``labsupport-check-env``). It prints one
line per requirement — ``OK``, ``WARN`` (works, but not the tested version),
``SKIP`` (optional and absent) or ``FAIL`` — and after each failure one line
saying what to do. The exit status is 1 when a required item fails, else 0.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packaging.version import InvalidVersion, Version

__all__ = [
    "CheckLine",
    "check_cpu_threads",
    "check_data",
    "check_jupyterlab_widgets",
    "check_package",
    "check_python",
    "format_line",
    "main",
    "run_checks",
]

Status = Literal["OK", "WARN", "SKIP", "FAIL"]

SUPPORTED_PYTHON = ((3, 10), (3, 12))
TESTED_PYTHON = (3, 11)
TESTED_TORCH = "2.13.0"
INSTALL_HINT = "run `pip install -r requirements.txt` in the course folder (or `bin/lab`, which does it for you)"


@dataclass(frozen=True)
class CheckLine:
    """The outcome of one check: a status, what was found, and (for FAIL/WARN) what to do."""

    name: str
    status: Status
    detail: str
    fix: str | None = None


def format_line(line: CheckLine) -> str:
    """``"OK    torch: 2.13.0"``, plus an indented ``"→ fix: ..."`` line when there is something to do."""
    text = f"{line.status:<5} {line.name}: {line.detail}"
    if line.fix and line.status in ("FAIL", "WARN"):
        text += f"\n      → {'fix' if line.status == 'FAIL' else 'note'}: {line.fix}"
    return text


def check_python(version: Sequence[int] | None = None) -> CheckLine:
    """Python 3.10–3.12 is required; 3.11 is the tested version."""
    major, minor, micro = tuple(version if version is not None else sys.version_info[:3])[:3]
    found = f"{major}.{minor}.{micro} ({platform.python_implementation()})"
    low, high = SUPPORTED_PYTHON
    if not low <= (major, minor) <= high:
        return CheckLine(
            "python", "FAIL", f"{found}; the course needs 3.10-3.12",
            "install Python 3.11 (e.g. from python.org, pyenv or conda) and recreate the environment with it",
        )
    note = "tested" if (major, minor) == TESTED_PYTHON else "supported; 3.11 is the tested version"
    return CheckLine("python", "OK", f"{found}, {note}")


def _version_of(module: object, distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return getattr(module, "__version__", None)


def _base(version: str) -> Version | None:
    try:
        return Version(Version(version).base_version)
    except InvalidVersion:
        return None


def check_package(
    module_name: str,
    *,
    distribution: str | None = None,
    minimum: str | None = None,
    tested: str | None = None,
    required: bool = True,
    purpose: str = "",
    import_module: Callable[[str], object] = importlib.import_module,
) -> CheckLine:
    """Import ``module_name`` and compare its version with ``minimum`` (FAIL below) and ``tested`` (WARN if different).

    An optional package that cannot be imported gives ``SKIP (optional, <purpose>)``.
    """
    label = distribution or module_name
    try:
        module = import_module(module_name)
    except Exception as error:  # ImportError, or a broken install raising something else
        if not required:
            return CheckLine(label, "SKIP", f"(optional, {purpose})" if purpose else "(optional)")
        reason = f"cannot import {module_name} ({type(error).__name__}: {error})"
        return CheckLine(label, "FAIL", reason + (f"; needed for {purpose}" if purpose else ""), INSTALL_HINT)
    version = _version_of(module, distribution or module_name) or "unknown version"
    base = _base(version)
    if minimum is not None and (base is None or base < Version(minimum)):
        status: Status = "FAIL" if required else "WARN"
        return CheckLine(label, status, f"{version} found, need >= {minimum}", INSTALL_HINT)
    if tested is not None and base != _base(tested):
        return CheckLine(
            label, "WARN", f"{version} (the course is tested with {tested})",
            f"it will probably work; if something breaks, install the tested version: pip install {label}=={tested}",
        )
    return CheckLine(label, "OK", version + (f" ({purpose})" if purpose else ""))


def check_jupyterlab_widgets() -> CheckLine:
    """The JupyterLab widget manager: the ``jupyterlab_widgets`` package and its installed lab extension."""
    fix = "pip install jupyterlab_widgets (comes with ipywidgets >= 8), then restart JupyterLab"
    try:
        version = importlib.metadata.version("jupyterlab_widgets")
    except importlib.metadata.PackageNotFoundError:
        return CheckLine("jupyterlab_widgets", "FAIL", "not installed: JupyterLab cannot show widgets", fix)
    from jupyter_core.paths import jupyter_path

    for folder in jupyter_path("labextensions"):
        if (Path(folder) / "@jupyter-widgets" / "jupyterlab-manager" / "package.json").is_file():
            return CheckLine("jupyterlab_widgets", "OK", f"{version}, lab extension in {folder}")
    return CheckLine(
        "jupyterlab_widgets", "FAIL", f"{version} installed but its lab extension was not found", fix
    )


def check_data(verify: Callable[[], list[str]] | None = None) -> CheckLine:
    """Every file of ``data/`` matches ``data/MANIFEST.sha256``."""
    if verify is None:
        from labsupport.harness.data import verify_manifest as verify
    problems = verify()
    if not problems:
        return CheckLine("data checksums", "OK", "every file in data/ matches MANIFEST.sha256")
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    return CheckLine(
        "data checksums", "FAIL", shown,
        "restore data/ from the repository (`git checkout -- data/` or a fresh clone); never edit it by hand",
    )


def check_cpu_threads(threads: int | None = None, budget: int | None = None) -> CheckLine:
    """torch's default thread count against the CPUs this process may really use."""
    if threads is None or budget is None:
        import torch

        from labsupport.harness.settings import cpu_budget

        threads = torch.get_num_threads() if threads is None else threads
        budget = cpu_budget() if budget is None else budget
    detail = f"torch starts {threads} thread(s); this process may use {budget} CPU(s)"
    if threads > budget:
        return CheckLine(
            "CPU threads", "WARN", detail,
            "the chapters call labsupport.harness.settings.configure_torch_threads() to match them; in your own scripts "
            f"call it too, or set OMP_NUM_THREADS={budget}, or small models run several times slower",
        )
    return CheckLine("CPU threads", "OK", detail)


def run_checks() -> list[CheckLine]:
    """All checks, in the order they are printed."""
    return [
        check_python(),
        check_package("torch", tested=TESTED_TORCH, purpose="tensors and autograd"),
        check_package("numpy"),
        check_package("ipywidgets", minimum="8", purpose="interactive controls"),
        check_package("plotly", minimum="5.20", purpose="figures"),
        check_package("anywidget", purpose="plotly's FigureWidget needs it"),
        check_jupyterlab_widgets(),
        check_package("tqdm", purpose="progress bars"),
        check_package("safetensors", purpose="loading checkpoints safely"),
        check_package("triton", required=False, purpose="chapter 01 GPU kernel"),
        check_cpu_threads(),
        check_data(),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Print every check; return 1 when a required item failed, else 0."""
    argparse.ArgumentParser(
        prog="python -m labsupport.harness.envcheck",
        description="Check the course's environment: one OK/WARN/SKIP/FAIL line per requirement.",
    ).parse_args(argv)
    lines = run_checks()
    for line in lines:
        print(format_line(line))
    failed = [line.name for line in lines if line.status == "FAIL"]
    if failed:
        print(f"\n{len(failed)} problem(s): {', '.join(failed)}. Fix them as suggested above, then run this again.")
        return 1
    print("\nAll required items are OK.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
