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


RESOURCES_PROBE = r"""
import json, sys
sys.path.insert(0, "benchmarks")
import triton, triton.language as tl
from triton_resources_cpu import compile_for_sm90, resources

@triton.jit
def tile_sum(X, O, ROWS: tl.constexpr, COLS: tl.constexpr):
    r = tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, COLS)[None, :]
    x = tl.load(X + r * COLS + c)
    y = tl.load(X + ROWS * COLS + r * COLS + c)
    tl.store(O + r * COLS + c, x * tl.sum(y, 0)[None, :] + y * tl.sum(x, 1)[:, None])

small = resources(compile_for_sm90(tile_sum, {"X": "fp32", "O": "fp32"}, {"ROWS": 16, "COLS": 16}, 4))
large = resources(compile_for_sm90(tile_sum, {"X": "fp32", "O": "fp32"}, {"ROWS": 128, "COLS": 128}, 1))
print(json.dumps({"small": small, "large": large}))
"""


def test_register_and_spill_counts_for_an_h100_are_read_without_a_gpu(tmp_path: Path) -> None:
    """``benchmarks/triton_resources_cpu.py``: a small tile fits in registers, a 128 × 128 one in one warp spills."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    probe = tmp_path / "probe.py"  # Triton reads a kernel's source from its file
    probe.write_text(RESOURCES_PROBE.replace('sys.path.insert(0, "benchmarks")',
                                             f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})"))
    done = subprocess.run([sys.executable, str(probe)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < found["small"]["registers"] < 128 and found["small"]["stack"] == 0, found
    assert found["large"]["registers"] > found["small"]["registers"] and found["large"]["stack"] > 0, found
