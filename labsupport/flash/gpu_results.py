"""Chapter 01: the stored GPU measurements of the Hopper ladder, found, loaded and summarised for the notebook.

``benchmarks/flash_attention_steps_gpu.py`` writes ``flash_steps.json`` on a GPU; the course keeps one run per
device under ``benchmarks/results/`` (e.g. ``flash_steps_h100.json``). A reader without a GPU sees those numbers,
labelled with the device, torch and triton versions they were measured with. Nothing here needs a GPU or Triton.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from labsupport.harness import stored

__all__ = ["STORED_STEPS", "find_stored_results", "load_step_results", "ratio_ranges", "step_gains", "step_table"]

#: The file name of the stored H100 run, under ``benchmarks/results/``.
STORED_STEPS = "flash_steps_h100.json"


def find_stored_results(name: str = STORED_STEPS) -> Path | None:
    """``benchmarks/results/<name>`` (default: the stored H100 ladder), found by
    :func:`labsupport.harness.stored.find_stored_results`; ``None`` when this checkout has none."""
    if not isinstance(name, str) or not name.endswith(".json"):
        raise ValueError(f"name must be a .json file name, got {name!r}")
    return stored.find_stored_results(name)


def load_step_results(path: str | Path) -> dict:
    """The JSON written by the steps benchmark, checked for the keys the summaries read."""
    data = json.loads(Path(path).read_text())
    missing = [key for key in ("info", "rows", "steps", "step_names") if key not in data]
    if missing:
        raise ValueError(f"{path} is not a flash_steps.json (missing {', '.join(missing)})")
    return data


def _tflops(row: dict, name: str) -> float | None:
    ms = row.get(f"ms_{name}")
    return row["flops"] / ms / 1e9 if ms else None


def step_gains(results: dict) -> dict[str, float | None]:
    """Geometric mean over the measured shapes of each step's speed-up over the step before it ((h) over (e),
    (i) over (d))."""
    steps = list(results["steps"])
    chain = [s for s in "abcdefg" if s in steps]
    pairs = list(zip(chain, chain[1:])) + [(a, b) for a, b in (("e", "h"), ("d", "i")) if a in steps and b in steps]
    gains: dict[str, float | None] = {}
    for prev, step in pairs:
        ratios = [r[f"ms_{prev}"] / r[f"ms_{step}"] for r in results["rows"]
                  if r.get(f"ms_{prev}") and r.get(f"ms_{step}")]
        gains[step] = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
    return gains


def ratio_ranges(results: dict) -> dict[str, tuple[float, float]]:
    """``(lowest, highest)`` over the measured shapes of: the fastest step against SDPA's default backend, per
    head dimension (``"best step / SDPA default, D=64"``), and the FP8 kernel against SDPA's default and against
    the fastest fp16/bf16 step (``> 1``: faster)."""
    found: dict[str, list[float]] = {}
    for r in results["rows"]:
        best = min((r[f"ms_{s}"] for s in results["steps"] if r.get(f"ms_{s}")), default=None)
        default = r.get("ms_sdpa_default")
        if best and default:
            found.setdefault(f"best step / SDPA default, D={r['D']}", []).append(default / best)
        if r.get("ms_fp8") and default:
            found.setdefault("FP8 / SDPA default", []).append(default / r["ms_fp8"])
        if r.get("ms_fp8") and best:
            found.setdefault("FP8 / best step", []).append(best / r["ms_fp8"])
    order = sorted(found, key=lambda key: (not key.startswith("best"), len(key), key))  # D=64 before D=128
    return {key: (min(found[key]), max(found[key])) for key in order}


def step_table(results: dict) -> str:
    """A plain-text table: TFLOP/s of SDPA's default backend, each step and FP8 per shape, and the best step's
    speed relative to SDPA's default; then each step's mean gain. "—" where a variant did not run."""
    steps = list(results["steps"])
    names = ["sdpa_default", *steps, *(["fp8"] if results.get("fp8") else [])]
    heads = ["SDPA", *[f"({s})" for s in steps], *(["FP8"] if results.get("fp8") else [])]
    info = results["info"]
    lines = [f"{info['device']}, torch {info['torch']}, triton {info['triton']}: forward TFLOP/s, "
             f"B={info.get('B', 4)}, H={info.get('H', 16)}, one run",
             f"{'dtype':5s} {'D':>4s} {'N':>6s} {'causal':6s} " + " ".join(f"{h:>6s}" for h in heads)
             + "  best step / SDPA"]
    for r in results["rows"]:
        cells = [_tflops(r, n) for n in names]
        best = [r[f"ms_{s}"] for s in steps if r.get(f"ms_{s}")]
        ratio = f"{r['ms_sdpa_default'] / min(best):.2f}x" if best and r.get("ms_sdpa_default") else "—"
        lines.append(f"{r['dtype']:5s} {r['D']:4d} {r['N']:6d} {'yes' if r['causal'] else 'no':6s} "
                     + " ".join(f"{c:6.0f}" if c else f"{'—':>6s}" for c in cells) + f"  {ratio}")
    gains = step_gains(results)
    lines.append("mean gain over the step before: " + ", ".join(
        f"({s}) {results['step_names'][s]} {g:.2f}x" if g else f"({s}) —" for s, g in gains.items()))
    lines += [f"{key}: {low:.2f}x to {high:.2f}x" for key, (low, high) in ratio_ranges(results).items()]
    return "\n".join(lines)
