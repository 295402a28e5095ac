"""Chapter 01 on a CPU: peak memory and time of tiled vs naive attention as N grows.

    python benchmarks/flash_attention_cpu_memory.py [--max-naive 8192] [--max-tiled 32768]

One head (B=1, H=1), D=64, float32, non-causal. For each N it measures the peak
extra torch CPU memory (``labsupport.harness.measuring.peak_memory_bytes``) and the
time (``labsupport.harness.measuring.time_callable``: the fastest of 3 calls) of

* naive attention (``labsupport.flash.reference.naive_attention``): materialises the N×N scores;
* the tiled forward (``labsupport.flash.tiled.flash_attention_forward``, 128×128 tiles):
  holds one tile of scores at a time;
* torch's own ``scaled_dot_product_attention`` on the CPU, for scale.

and prints a markdown table plus the fitted power-law exponents of memory vs N.
The inputs (q, k, v: 3·N·D floats) are allocated before measuring and not counted.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from labsupport.harness.measuring import fit_power_law, peak_memory_bytes, time_callable  # noqa: E402
from labsupport.flash.reference import naive_attention  # noqa: E402
from labsupport.flash.tiled import flash_attention_forward  # noqa: E402

D = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-naive", type=int, default=8192, help="largest N for naive attention")
    parser.add_argument("--max-tiled", type=int, default=32768, help="largest N for the tiled forward")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = [n for n in (1024, 2048, 4096, 8192, 16384, 32768) if n <= max(args.max_naive, args.max_tiled)]
    methods = {
        "naive": (lambda q, k, v: naive_attention(q, k, v), args.max_naive),
        "tiled 128×128": (lambda q, k, v: flash_attention_forward(q, k, v, block_q=128, block_k=128), args.max_tiled),
        "SDPA (torch CPU)": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), args.max_tiled),
    }
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}, Python {platform.python_version()}; B=1, H=1, D={D}, float32")
    results: dict[str, dict[int, tuple[int, float]]] = {name: {} for name in methods}
    for n in sizes:
        q, k, v = (torch.randn(1, 1, n, D) for _ in range(3))
        for name, (fn, limit) in methods.items():
            if n > limit:
                continue
            call = lambda: fn(q, k, v)  # noqa: E731
            peak = peak_memory_bytes(call)
            seconds = time_callable(call, warmup=1, repeats=3)
            results[name][n] = (peak, seconds)
            print(f"  N={n:6d} {name:18s} peak {peak / 2**20:9.1f} MiB   {seconds * 1e3:9.1f} ms", flush=True)
    header = "| N | " + " | ".join(f"{name}: peak MiB / ms" for name in methods) + " |"
    lines = [header, "|---|" + "---|" * len(methods)]
    for n in sizes:
        cells = []
        for name in methods:
            if n in results[name]:
                peak, seconds = results[name][n]
                cells.append(f"{peak / 2**20:.1f} / {seconds * 1e3:.0f}")
            else:
                cells.append("not run")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    fits = []
    for name in methods:
        ns = sorted(results[name])
        if len(ns) >= 2 and all(results[name][n][0] > 0 for n in ns):
            mem_exp, _ = fit_power_law(ns, [results[name][n][0] for n in ns])
            time_exp, _ = fit_power_law(ns, [results[name][n][1] for n in ns])
            fits.append(f"{name}: memory ∝ N^{mem_exp:.2f}, time ∝ N^{time_exp:.2f}")
    print()
    print("\n".join(lines))
    print()
    print("Fitted exponents: " + "; ".join(fits))


if __name__ == "__main__":
    main()
