"""Chapter 04: how each scan's time grows with the length on a CPU, against the sequential loop and mambapy.

Usage::

    pip install mambapy==1.2.0      # the comparator only; the course does not depend on it
    python benchmarks/ssm_scans_cpu.py [--max-length 65536]
    python benchmarks/ssm_scans_cpu.py --headline [--rounds 15]     # L = 4096 only, interleaved rounds

Workload: ``h_t = a_t h_{t-1} + b_t`` over ``(B=1, L, 64 channels, state 16)`` fp32 tensors (a selective
SSM's scan), ``a`` uniform in [0.5, 1), one torch thread, the fastest of 3 calls after a warm-up.
Each line: length, then milliseconds per scan and the speed-up over the sequential loop. Scans whose
working set would pass ~1.5 GB at a length are skipped there (Hillis–Steele and the float64 log-space
scan copy the whole (L, 64, 16) tensor several times). mambapy's ``pscan`` (a Blelloch-style scan in
PyTorch, arXiv:2312.00752's pure-PyTorch port) runs on the same tensors when installed. "native fused" is
``labsupport.ssm.native.native_scan``, the loop compiled to C++ (built on first use; needs a compiler and
ninja): one pass over memory, the floor the eager scans are measured against.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from labsupport.harness.measuring import time_callable
from labsupport.harness.numerics import rel_err
from labsupport.ssm.native import native_scan, native_scan_available
from labsupport.ssm.scans import SCANS

CHANNELS, STATE = 64, 16
#: the longest length each scan runs at (working set), beyond which it is skipped
LIMITS = {"sequential": 65_536, "hillis_steele": 16_384, "blelloch": 65_536, "log_space": 8_192,
          "chunked": 65_536, "native fused": 65_536, "mambapy pscan": 65_536}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=65_536)
    parser.add_argument("--headline", action="store_true",
                        help="L = 4096 only: sequential, chunked and mambapy, one call of each per round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scans = dict(SCANS)
    available, reason = native_scan_available()
    if available:
        scans["native fused"] = native_scan
    else:
        print(f"# the fused native scan is skipped: {reason}")
    try:
        from mambapy.pscan import pscan

        scans["mambapy pscan"] = pscan
    except ImportError:
        print("# mambapy not installed: its column is skipped (pip install mambapy==1.2.0)")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"python {sys.version.split()[0]}, 1 thread, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.headline:
        headline(scans, args.rounds)
        return
    print("| L | " + " | ".join(scans) + " |")
    print("|---" * (len(scans) + 1) + "|")
    gen = torch.Generator().manual_seed(0)
    length = 256
    while length <= args.max_length:
        a = 0.5 + 0.5 * torch.rand(1, length, CHANNELS, STATE, generator=gen)
        b = torch.randn(1, length, CHANNELS, STATE, generator=gen)
        reference = scans["sequential"](a, b)
        cells = []
        base = None
        for name, scan in scans.items():
            if length > LIMITS[name]:
                cells.append("—")
                continue
            with torch.no_grad():
                error = rel_err(scan(a, b), reference)
                seconds = time_callable(lambda: scan(a, b), warmup=1, repeats=3)
            base = seconds if name == "sequential" else base
            ratio = "" if name == "sequential" else f" ({base / seconds:.1f}×)"
            flag = "" if error < 1e-5 else f" err {error:.0e}"
            cells.append(f"{seconds * 1e3:.2f}{ratio}{flag}")
        print(f"| {length} | " + " | ".join(cells) + " |", flush=True)
        del a, b, reference
        length *= 4


def headline(scans: dict, rounds: int) -> None:
    """L = 4096: every round calls each scan once, in turn, so a busy neighbour slows all of them alike."""
    import statistics

    names = [n for n in ("sequential", "chunked", "native fused", "mambapy pscan", "blelloch") if n in scans]
    gen = torch.Generator().manual_seed(0)
    a = 0.5 + 0.5 * torch.rand(1, 4096, CHANNELS, STATE, generator=gen)
    b = torch.randn(1, 4096, CHANNELS, STATE, generator=gen)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for name in names:
            scans[name](a, b)  # warm-up
        for _ in range(rounds):
            for name in names:
                start = time.perf_counter()
                scans[name](a, b)
                times[name].append(time.perf_counter() - start)
    base = min(times["sequential"])
    print(f"L = 4096, {rounds} interleaved rounds: fastest / median ms, speed-up of the fastest over the loop's")
    for name in names:
        best, median = min(times[name]), statistics.median(times[name])
        print(f"| {name} | {best * 1e3:.2f} | {median * 1e3:.2f} | {base / best:.1f}× |")


if __name__ == "__main__":
    main()
