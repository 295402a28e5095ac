"""The multi-GPU expert-parallel benchmark's smoke mode runs here, on CPU processes over gloo.

``benchmarks/moe_expert_parallel_gpu.py --backend gloo --cpu`` goes through the same launcher, layer, equality
check, timing and tables as the NCCL run, at tiny sizes. (Without GPUs its default mode exits 0 with a reason:
tests/test_gpu_benchmarks.py checks that.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "moe_expert_parallel_gpu.py"


def _run(*args: str, out: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, str(SCRIPT), *args] + (["--out", str(out)] if out else [])
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_smoke_mode_runs_the_whole_benchmark_on_cpu_processes(tmp_path: Path) -> None:
    done = _run("--backend", "gloo", "--cpu", out=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| 2 | 4 | float32 |" in done.stdout and "| yes | – |" in done.stdout
    result = json.loads((tmp_path / "moe_expert_parallel.json").read_text())
    assert result["info"]["backend"] == "gloo"
    assert [c["ok"] for c in result["checks"]] == [True]
    balanced, skewed = result["rows"]
    assert balanced["router"] == "balanced" and skewed["router"] == "skewed 1.00"
    assert skewed["share_received"][0] > 0.99            # everything went to rank 0's experts
    assert 0.2 < balanced["share_received"][0] < 0.8
    assert balanced["bytes_sent_per_rank"][0] > 0 and balanced["step_ms"] > 0
    assert (tmp_path / "moe_expert_parallel.md").read_text().startswith("Equality")


def test_smoke_mode_refuses_nccl_on_the_cpu() -> None:
    done = _run("--backend", "nccl", "--cpu")
    assert done.returncode == 2
    assert "--backend nccl does not go with --cpu" in done.stderr
