"""Chapter 04, optional GPU part: Mamba-2's chunked SSD algorithm against the sequential scan, tokens per second.

Usage::

    python benchmarks/ssm_ssd_gpu.py [--length 16384] [--chunk 64 128 256]

Workload: one SSD layer (``labsupport.ssm.reference``), batch 1, 8 heads of width 64, state 64 (Mamba-2's
N = 64 and head dimension P = 64), fp32 on the GPU. ``ssd_recurrent`` walks the ``L`` positions one at a
time (a few small kernels per token: launch-bound); ``ssd_chunked`` does the same arithmetic as batched
matrix products inside chunks of ``Q`` tokens plus a scan over ``L / Q`` chunk states. The two outputs are
compared (relative error) before timing. Times are the fastest of 5 calls after a warm-up, with CUDA
synchronised around each. Without a GPU the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # runs from a plain checkout

import torch  # noqa: E402

from labsupport.harness.numerics import rel_err  # noqa: E402
from labsupport.ssm.reference import ssd_chunked, ssd_recurrent  # noqa: E402

HEADS, HEAD_DIM, STATE = 8, 64, 64


def fastest_seconds(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16_384)
    parser.add_argument("--chunk", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one; nothing was measured (the CPU scans are benchmarks/ssm_scans_cpu.py)")
        return
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 products, so the two forms agree to fp32 accuracy
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, python {sys.version.split()[0]}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, fp32 (TF32 off)")
    gen = torch.Generator(device=dev).manual_seed(0)
    length = args.length
    x = torch.randn(1, length, HEADS, HEAD_DIM, device=dev, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(1, length, HEADS, device=dev, generator=gen) - 4.0)
    A = -torch.rand(HEADS, device=dev, generator=gen) * 4.0 - 0.5
    B = torch.randn(1, length, HEADS, STATE, device=dev, generator=gen) / STATE ** 0.5
    C = torch.randn(1, length, HEADS, STATE, device=dev, generator=gen) / STATE ** 0.5
    with torch.no_grad():
        y_ref, _ = ssd_recurrent(x, dt, A, B, C)
        t_loop = fastest_seconds(lambda: ssd_recurrent(x, dt, A, B, C), repeats=2)
        print(f"| form | L | ms | tokens/s | speed-up | rel. error vs the loop |")
        print(f"|---|---|---|---|---|---|")
        print(f"| sequential (ssd_recurrent) | {length} | {t_loop * 1e3:.1f} | {length / t_loop:,.0f} | 1× | — |")
        for q in args.chunk:
            y, _ = ssd_chunked(x, dt, A, B, C, chunk_size=q)
            err = rel_err(y, y_ref)
            t = fastest_seconds(lambda: ssd_chunked(x, dt, A, B, C, chunk_size=q))
            print(f"| chunked SSD, Q = {q} | {length} | {t * 1e3:.2f} | {length / t:,.0f} | {t_loop / t:.0f}× | "
                  f"{err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
