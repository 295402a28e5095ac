"""Chapter 03 on CPU: how fast is the chunkwise form of linear attention?

Run from the repository root::

    .venv/bin/python benchmarks/linear_attention_cpu.py            # about 1-2 minutes on 2 cores
    .venv/bin/python benchmarks/linear_attention_cpu.py --quick    # a smoke run

It prints Markdown tables for ``benchmarks/BENCHMARKS.md``:

1. **The headline**: B=1, H=4, L=8192, D=64, fp32. The chunkwise form against
   the machine's dense fp32 matmul throughput (1024³) *measured in the same
   run*, and against the token-by-token recurrent loop. Each round times the
   matmul and every variant once, in turn, and the table reports medians over
   rounds, so a neighbour process slowing the machine for a while affects all
   of them alike.

   FLOPs are counted as matmul FLOPs only, 2 per multiply-add
   (:func:`labsupport.harness.costs.chunkwise_flops`): per chunk of C tokens
   ``Q Kᵀ`` (2C²D), ``scores·V`` (2C²D), ``Kᵀ V`` (2CD²) and ``Q S`` (2CD²).
   "executed" counts the full C×C intra-chunk products the code computes (half
   is zeroed by the causal mask afterwards); "useful" counts only the causal
   half and diagonal. Element-wise work (mask, prefix sum of chunk states) is
   real time but counted as zero FLOPs, so it can only lower the rate.

2. **Where the time goes** in the fast chunkwise form at C=64.
3. **Prefill time against length** for the parallel, recurrent and chunkwise
   forms and for softmax attention (``scaled_dot_product_attention``), with
   fitted log-log exponents.
4. **Decode**: time per token and bytes held, a recurrent state update against
   attention over a KV cache, as the context grows.

By default the script re-runs itself with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` raised: with glibc's defaults, the tens of MB of
temporaries of one call go back to the OS and the next call faults in fresh,
kernel-zeroed pages, which at L=8192 can cost as much as the arithmetic (and
varies with what ran before). ``--default-malloc`` measures that case.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from labsupport.harness.costs import chunkwise_flops  # noqa: E402
from labsupport.harness.measuring import fit_power_law, time_callable  # noqa: E402
from labsupport.linear_attention.exercises import recurrent_step  # noqa: E402
from labsupport.linear_attention.fast import _exclusive_prefix_sum, linear_attention_chunkwise_fast  # noqa: E402
from labsupport.linear_attention.reference import (  # noqa: E402
    linear_attention_chunkwise,
    linear_attention_parallel,
    linear_attention_recurrent,
)


def once(fn: Callable[[], object]) -> float:
    """Seconds of one call, no warm-up (what a call costs right after other work)."""
    return time_callable(fn, warmup=0, repeats=1)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, block: int = 3) -> dict[str, float]:
    """Median seconds of each callable, visiting all of them once per round, in turn.

    Each visit makes one untimed call, then times ``block`` calls back to back:
    the first call after *other* work pays for fresh memory pages (the
    allocator hands large temporaries back to the OS and the kernel zeroes new
    ones), which at L=8192 nearly doubles the time; a layer called repeatedly
    runs in the steady state timed here. Visiting every variant in each round
    keeps a neighbour's load from favouring one of them.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_callable(fn, warmup=1, repeats=block, statistic="median"))
    return {name: statistics.median(values) for name, values in samples.items()}


def cold_and_warm(fn: Callable[[], object], other: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median time of ``fn`` right after ``other`` (cold pages) and on a repeated call (warm)."""
    cold, warm = [], []
    for _ in range(rounds):
        other()
        cold.append(once(fn))
        warm.append(once(fn))
    return statistics.median(cold), statistics.median(warm)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def headline(rounds: int, length: int) -> None:
    b, h, d = 1, 4, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=gen) for _ in range(3))
    a, m = torch.randn(1024, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
    chunks = [32, 64, 128, 256]
    fns: dict[str, Callable[[], object]] = {"matmul 1024³": lambda: a @ m}
    for c in chunks:
        fns[f"fast C={c}"] = (lambda c=c: linear_attention_chunkwise_fast(q, k, v, chunk_size=c))
    fns["reference C=64"] = lambda: linear_attention_chunkwise(q, k, v, chunk_size=64)
    with torch.no_grad():
        # correctness first: the fast form against the float64 parallel form on a slice
        ref = linear_attention_parallel(q[..., :1024, :].double(), k[..., :1024, :].double(),
                                        v[..., :1024, :].double())
        got = linear_attention_chunkwise_fast(q[..., :1024, :], k[..., :1024, :], v[..., :1024, :])
        rel = float((got.double() - ref).norm() / ref.norm())
        times = interleaved(fns, rounds)
        cold, warm = cold_and_warm(lambda: linear_attention_chunkwise_fast(q, k, v, chunk_size=64), lambda: a @ m,
                                   rounds)
        recurrent = statistics.median(
            once(lambda: linear_attention_recurrent(q, k, v)) for _ in range(max(1, rounds // 4))
        )
    peak = 2 * 1024**3 / times["matmul 1024³"] / 1e9
    print(f"\n### Chunkwise linear attention, B={b}, H={h}, L={length}, D={d}, fp32\n")
    print(f"Dense fp32 matmul 1024³ in the same run: **{peak:.0f} GFLOP/s** (median of {rounds} rounds).")
    print(f"Fast chunkwise vs float64 parallel form (L=1024 slice): relative error {rel:.1e}.\n")
    print("| form | C | ms | executed GFLOP | GFLOP/s (executed) | % of matmul | GFLOP/s (useful) | × faster than recurrent |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| recurrent loop (one token per step) | – | {recurrent * 1e3:.0f} | – | – | – | – | 1 |")
    for name, seconds in times.items():
        if name.startswith("matmul"):
            continue
        c = int(name.split("C=")[1])
        flops = chunkwise_flops(b, h, length, d, d, c)
        rate = flops["executed"] / seconds / 1e9
        print(f"| {name.split(' C=')[0]} chunkwise | {c} | {seconds * 1e3:.2f} | {flops['executed'] / 1e9:.2f} "
              f"| {rate:.0f} | {100 * rate / peak:.0f}% | {flops['useful'] / seconds / 1e9:.0f} "
              f"| {recurrent / seconds:.0f} |")
    print(f"\nFirst call right after a different computation (fresh memory pages), fast C=64: {cold * 1e3:.2f} ms; "
          f"the call after it: {warm * 1e3:.2f} ms.")


def breakdown(rounds: int, length: int) -> None:
    b, h, d, c = 1, 4, 64, 64
    n = length // c
    gen = torch.Generator().manual_seed(1)
    qc, kc, vc = (torch.randn(b * h * n, c, d, generator=gen) for _ in range(3))
    scores = torch.matmul(qc, kc.mT)
    writes = torch.matmul(kc.mT, vc).view(b * h, n, d * d)
    before = _exclusive_prefix_sum(writes).view(b * h * n, d, d)
    out = torch.matmul(scores, vc)
    stages = {
        "Q Kᵀ (all chunks, one batched matmul)": lambda: torch.matmul(qc, kc.mT),
        "causal mask in place (tril_)": lambda: scores.tril_(),
        "Kᵀ V (chunk writes)": lambda: torch.matmul(kc.mT, vc),
        "prefix sum of chunk states": lambda: _exclusive_prefix_sum(writes),
        "scores · V": lambda: torch.matmul(scores, vc),
        "+= Q S (baddbmm_)": lambda: out.baddbmm_(qc, before),
        "whole function": lambda: linear_attention_chunkwise_fast(
            qc.view(b, h, length, d), kc.view(b, h, length, d), vc.view(b, h, length, d), chunk_size=c),
    }
    with torch.no_grad():
        times = interleaved(stages, rounds)
    total = times.pop("whole function")
    print(f"\n### Where the time goes: fast chunkwise, C={c}, L={length}\n")
    print("| stage | ms | share of the whole |")
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {100 * seconds / total:.0f}% |")
    print(f"| whole function (incl. reshapes, Python) | {total * 1e3:.2f} | 100% |")


def prefill_scaling(lengths: list[int], rounds: int) -> None:
    b, h, d = 1, 4, 64
    gen = torch.Generator().manual_seed(2)
    forms: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]] = {
        "softmax (SDPA, causal)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "linear, parallel (L×L)": lambda q, k, v: linear_attention_parallel(q, k, v),
        "linear, recurrent loop": lambda q, k, v: linear_attention_recurrent(q, k, v),
        "linear, chunkwise reference (C=64)": lambda q, k, v: linear_attention_chunkwise(q, k, v, chunk_size=64),
        "linear, chunkwise fast (C=64)": lambda q, k, v: linear_attention_chunkwise_fast(q, k, v, chunk_size=64),
    }
    table: dict[str, list[float]] = {name: [] for name in forms}
    with torch.no_grad():
        for length in lengths:
            q, k, v = (torch.randn(b, h, length, d, generator=gen) for _ in range(3))
            fns = {name: (lambda f=f: f(q, k, v)) for name, f in forms.items()}
            slow = {"linear, recurrent loop"}
            if length > 4096:  # the L×L form would hold several GiB of scores: skip it
                slow.add("linear, parallel (L×L)")
            times = interleaved({n: f for n, f in fns.items() if n not in slow}, rounds)
            times["linear, recurrent loop"] = statistics.median(
                once(fns["linear, recurrent loop"]) for _ in range(3))
            for name in forms:
                table[name].append(times.get(name, float("nan")))
    print(f"\n### Prefill time (ms) against length, B={b}, H={h}, D={d}, fp32\n")
    print("| form | " + " | ".join(f"L={n}" for n in lengths) + " | fitted exponent (largest 3) |")
    print("|---|" + "---|" * (len(lengths) + 1))
    for name, seconds in table.items():
        measured = [(n, s) for n, s in zip(lengths, seconds) if s == s]
        exponent, _ = fit_power_law([n for n, _ in measured], [s for _, s in measured],
                                    tail=min(3, len(measured)))
        cells = " | ".join("–" if s != s else f"{s * 1e3:.2f}" for s in seconds)
        print(f"| {name} | {cells} | {exponent:.2f} |")


def decode(contexts: list[int], rounds: int) -> None:
    b, h, d = 1, 4, 64
    gen = torch.Generator().manual_seed(3)
    print(f"\n### Decode: one new token, B={b}, H={h}, D={d}, fp32, one layer\n")
    print("| context | softmax over KV cache (µs) | KV-cache bytes | linear-attention state update (µs) | state bytes |")
    print("|---|---|---|---|---|")
    state = torch.randn(b, h, d, d, generator=gen)
    q1, k1, v1 = (torch.randn(b, h, d, generator=gen) for _ in range(3))
    with torch.no_grad():
        for context in contexts:
            keys = torch.randn(b, h, context, d, generator=gen)
            values = torch.randn(b, h, context, d, generator=gen)
            qa = q1[:, :, None]

            def attend() -> torch.Tensor:
                return F.scaled_dot_product_attention(qa, keys, values)

            times = interleaved({"attn": attend, "rec": lambda: recurrent_step(state, q1, k1, v1)}, rounds)
            kv_bytes = 2 * keys.numel() * keys.element_size()
            print(f"| {context} | {times['attn'] * 1e6:.0f} | {kv_bytes / 2**20:.1f} MiB "
                  f"| {times['rec'] * 1e6:.0f} | {state.numel() * state.element_size() / 2**10:.0f} KiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (a smoke test)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default allocator settings (large temporaries go back to the OS "
                             "after every call and come back as fresh, kernel-zeroed pages)")
    args = parser.parse_args()
    if not args.default_malloc and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Keep freed temporaries in the process so that repeated calls reuse them, as a long-running
        # server would; re-run this script with the setting in place (glibc reads it at start-up).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 30), MALLOC_TRIM_THRESHOLD_=str(1 << 30))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    rounds = 3 if args.quick else 11
    length = 2048 if args.quick else 8192
    print("## Chapter 03 measurements\n")
    print(f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, Python {platform.python_version()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    mode = ("glibc defaults (--default-malloc)" if "MALLOC_MMAP_THRESHOLD_" not in os.environ
            else f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} (temporaries reused, not returned to the OS)")
    print(f"- allocator: {mode}")
    print(f"- load average when the run started: {load:.2f} (other work on the machine slows every row alike; "
          "ratios are within one run)")
    headline(rounds, length)
    breakdown(rounds, length)
    lengths = [256, 512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192]
    prefill_scaling(lengths, 2 if args.quick else 3)
    decode([1024, 4096] if args.quick else [1024, 4096, 16384, 65536], 5 if args.quick else 15)


if __name__ == "__main__":
    main()
