"""Chapter 04: the selective scan expanded to (batch, L, D, N) against fused schedules, on a CPU.

Usage::

    python benchmarks/ssm_fused_cpu.py [--lengths 1024 4096 16384] [--rounds 5] [--block 64]

Workload: the Mamba mixer's SSM core at the notebook's size — batch 1, 128 channels, state 16, float32, one
torch thread — from ``(u, Δ, A, B, C)``. Per length, the forms are called in turn in each round (so a
neighbour's load falls on all alike) and the fastest call is kept:

* ``expanded`` — ``ssm.selective_scan`` with the chunked scan: builds ``a = exp(ΔA)``, ``b = ΔBu`` and every
  ``h_t`` at ``(1, L, 128, 16)``, then reduces with ``C``;
* ``expanded + native scan`` — the same, with the scan itself by ``ssm.native_scan`` (one compiled pass);
* ``fused (PyTorch, blocks)`` — ``ssm.fused_selective_scan``: the same work per block of ``--block`` tokens;
* ``fused (native)`` — ``ssm.native_selective_scan``: a C++ loop that keeps one channel's 16 state numbers in a
  buffer and reads each input once, writing only ``y`` (built on first use; needs a compiler and ninja).

Also printed: ``ssm.selective_scan_traffic``'s bytes to main memory for the expanded and the fused schedules,
the peak extra memory of each form (``peak_memory_bytes``), and each output's relative error against
``expanded``.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch
import torch.nn.functional as F

from labsupport.harness.contention import load_average
from labsupport.harness.costs import format_bytes
from labsupport.harness.measuring import peak_memory_bytes, time_callable
from labsupport.harness.numerics import rel_err
from labsupport.ssm import (
    fused_selective_scan,
    native_scan,
    native_scan_available,
    native_selective_scan,
    selective_scan,
    selective_scan_traffic,
)
from labsupport.ssm.reference import _selective_elements

CHANNELS, STATE = 128, 16


def _inputs(length: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(length)
    u = torch.randn(1, length, CHANNELS, generator=g)
    delta = F.softplus(torch.randn(1, length, CHANNELS, generator=g) - 2)
    A = -torch.arange(1, STATE + 1, dtype=torch.float32).expand(CHANNELS, STATE).contiguous()
    B, C = (torch.randn(1, length, STATE, generator=g) for _ in range(2))
    return u, delta, A, B, C


def _expanded_native(u, delta, A, B, C):
    a, b = _selective_elements(u, delta, A, B)
    return (native_scan(a, b) * C[:, :, None, :]).sum(-1), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    native_ok, reason = native_scan_available()
    print(f"# {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, Python "
          f"{sys.version.split()[0]}, one torch thread; load average at start {load_average() or float('nan'):.1f}; "
          f"native: {'yes' if native_ok else reason}")
    print(f"# batch 1, {CHANNELS} channels, state {STATE}, float32, block {args.block}; fastest of {args.rounds} "
          "interleaved rounds")
    print("| L | form | fastest ms | speed-up vs expanded | peak extra memory | rel. error | bytes to memory (model) |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        inputs = _inputs(length)
        traffic = selective_scan_traffic(1, length, CHANNELS, STATE, block=args.block)
        forms = {"expanded": lambda: selective_scan(*inputs),
                 "fused (PyTorch, blocks)": lambda: fused_selective_scan(*inputs, block=args.block)}
        if native_ok:
            forms["expanded + native scan"] = lambda: _expanded_native(*inputs)
            forms["fused (native)"] = lambda: native_selective_scan(*inputs)
        with torch.no_grad():
            reference = forms["expanded"]()[0]
            errors = {name: rel_err(fn()[0], reference) for name, fn in forms.items()}
            best = {name: float("inf") for name in forms}
            for _ in range(args.rounds):
                for name, fn in forms.items():
                    best[name] = min(best[name], time_callable(fn, repeats=1, warmup=0))
            peaks = {name: peak_memory_bytes(fn) for name, fn in forms.items()}
        for name in forms:
            model = {"expanded": traffic["expanded (selective_scan)"],
                     "fused (native)": traffic["fused, block in cache"]}.get(name)
            print(f"| {length} | {name} | {best[name] * 1e3:.2f} | {best['expanded'] / best[name]:.1f}× | "
                  f"{format_bytes(peaks[name])} | {errors[name]:.1e} | "
                  f"{format_bytes(model) if model is not None else '—'} |", flush=True)
    print(f"# load average at the end {load_average() or float('nan'):.1f}")


if __name__ == "__main__":
    main()
