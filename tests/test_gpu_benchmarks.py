"""Every ``benchmarks/*_gpu.py`` runs as its docstring says, from a plain checkout, and exits 0 without a GPU.

A new user runs ``python3 benchmarks/x_gpu.py`` from the repository root without ``pip install -e .``. The
test reproduces that: it hides the editable install (its import hook and path entries) and the current
directory from ``sys.path``, checks that ``labsupport`` is then NOT importable (so the test can fail), puts the
script's own folder first on the path as ``python3 script.py`` does, hides every CUDA device, and runs the
script. It must print a clear "no CUDA GPU" line and exit 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "benchmarks").glob("*_gpu.py"))

# Runs inside the child interpreter: strip the editable install, then run the script as __main__.
BOOTSTRAP = r"""
import importlib.util, os, runpy, sys
root = os.path.realpath(sys.argv[1]); script = sys.argv[2]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", ""))]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in str(getattr(h, "__module__", ""))]
sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != root
               and not os.path.isdir(os.path.join(p, "labsupport"))]  # no checkout of the course on the path
sys.path_importer_cache.clear()
for name in [m for m in sys.modules if m == "labsupport" or m.startswith("labsupport.")]:
    del sys.modules[name]
if importlib.util.find_spec("labsupport") is not None:
    raise SystemExit("test setup: labsupport is still importable without the script's help")
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
sys.argv = [script]
runpy.run_path(script, run_name="__main__")
"""


def test_there_are_gpu_benchmarks() -> None:
    assert len(SCRIPTS) >= 3, [p.name for p in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_gpu_benchmark_runs_from_a_plain_checkout_and_skips_without_a_gpu(script: Path, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", BOOTSTRAP, str(ROOT), str(script.relative_to(ROOT))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script.name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "no CUDA GPU" in done.stdout, done.stdout
    assert list(tmp_path.iterdir()) == [], "nothing should be written without a GPU"
