"""Chapter 04 on a GPU: the chunked SSD against a fused Triton scan of the same recurrence (state in registers).

    python3 benchmarks/ssm_scan_triton_gpu.py [--out DIR] [--lengths 4096 16384 65536] [--batches 1 8]

Workload: one SSD layer, 8 heads of width P = 64, state N = 64 (Mamba-2's sizes), fp32 with TF32 off so that
the forms agree to fp32 accuracy. Compared on the same inputs:

* **fused scan**: ``labsupport.ssm.triton_scan.ssd_scan_triton``, one kernel that walks the tokens with each
  program's slice of the state in registers; it never writes ``(batch, L, H, N, P)`` states to memory;
* **chunked SSD**: ``labsupport.ssm.reference.ssd_chunked`` (batched matrix products inside chunks of Q tokens,
  a scan over chunk states), Q ∈ {64, 128, 256}, eager PyTorch;
* at the shortest length, the token-by-token loop ``ssd_recurrent`` as the correctness reference.

Times are medians of ``triton.testing.do_bench``. "bytes" for the fused scan are the least any forward must
move (read x, dt, B, C once, write y once), so bytes / time is its achieved bandwidth; for the chunked form the
peak extra GPU memory of one call is given, the size of what it materialises. Exits 0 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # runs from a plain checkout

import torch  # noqa: E402

HEADS, HEAD_DIM, STATE = 8, 64, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one and Triton; nothing was measured")
        return
    import triton
    from triton.testing import do_bench

    from labsupport.harness.numerics import rel_err
    from labsupport.ssm.reference import ssd_chunked, ssd_recurrent
    from labsupport.ssm.triton_scan import _ssd_scan_autotuned, scan_bytes, ssd_scan_triton

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}
    print("device:", info, flush=True)
    rows = []
    for batch in args.batches:
        for length in args.lengths:
            gen = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(batch, length, HEADS, HEAD_DIM, device=dev, generator=gen)
            dt = torch.nn.functional.softplus(torch.randn(batch, length, HEADS, device=dev, generator=gen) - 4.0)
            A = -torch.rand(HEADS, device=dev, generator=gen) * 4.0 - 0.5
            B = torch.randn(batch, length, HEADS, STATE, device=dev, generator=gen) / STATE ** 0.5
            C = torch.randn(batch, length, HEADS, STATE, device=dev, generator=gen) / STATE ** 0.5
            with torch.no_grad():
                y_fused, _ = ssd_scan_triton(x, dt, A, B, C)
                row = {"batch": batch, "L": length}
                if length == min(args.lengths) and batch == min(args.batches):
                    y_loop, _ = ssd_recurrent(x, dt, A, B, C)
                    row["err_fused_vs_loop"] = rel_err(y_fused, y_loop)
                row["fused_ms"] = do_bench(lambda: ssd_scan_triton(x, dt, A, B, C), warmup=5, rep=200,
                                           return_mode="median")
                row["fused_config"] = str(_ssd_scan_autotuned.best_config)
                row["bytes"] = scan_bytes(batch, length, HEADS, HEAD_DIM, STATE)
                for q in args.chunks:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    y, _ = ssd_chunked(x, dt, A, B, C, chunk_size=q)
                    torch.cuda.synchronize()
                    row[f"chunked_peak_bytes_{q}"] = torch.cuda.max_memory_allocated() - before
                    row[f"err_chunked_{q}_vs_fused"] = rel_err(y, y_fused)
                    del y
                    row[f"chunked_ms_{q}"] = do_bench(lambda: ssd_chunked(x, dt, A, B, C, chunk_size=q), warmup=5,
                                                      rep=200, return_mode="median")
            rows.append(row)
            print(json.dumps(row), flush=True)
            del x, dt, B, C, y_fused
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ssm_scan_gpu.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    lines = [f"{info}; 8 heads, P = 64, N = 64, fp32 (TF32 off); ms = median of do_bench", "",
             "| batch | L | fused scan ms | tokens/s | bytes moved (least) | GB/s | best chunked SSD ms (Q) | tokens/s | "
             "chunked / fused time | chunked peak extra memory | rel. diff chunked vs fused |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = min(args.chunks, key=lambda c: r[f"chunked_ms_{c}"])
        tokens = r["batch"] * r["L"]
        lines.append(f"| {r['batch']} | {r['L']:,} | {r['fused_ms']:.3f} | {tokens / r['fused_ms'] * 1e3:,.0f} | "
                     f"{r['bytes'] / 1e6:.1f} MB | {r['bytes'] / r['fused_ms'] / 1e6:.0f} | "
                     f"{r[f'chunked_ms_{q}']:.3f} (Q={q}) | {tokens / r[f'chunked_ms_{q}'] * 1e3:,.0f} | "
                     f"{r[f'chunked_ms_{q}'] / r['fused_ms']:.2f} | {r[f'chunked_peak_bytes_{q}'] / 1e6:.0f} MB | "
                     f"{r[f'err_chunked_{q}_vs_fused']:.1e} |")
    lines += ["", "All chunk sizes (ms): " + "; ".join(
        f"B={r['batch']} L={r['L']}: " + ", ".join(f"Q={q} {r[f'chunked_ms_{q}']:.3f}" for q in args.chunks)
        for r in rows), "", "Fused configs: " + "; ".join(f"B={r['batch']} L={r['L']}: {r['fused_config']}" for r in rows),
        "", "Fused vs loop: " + ", ".join(f"{r['err_fused_vs_loop']:.1e}" for r in rows if "err_fused_vs_loop" in r)]
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(args.out, "ssm_scan_gpu.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
