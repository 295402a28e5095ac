"""Chapter 01 on a GPU: the course's Triton forward vs SDPA (flash backend) vs naive attention.

Run from the repository root on a machine with a CUDA GPU:

    python3 benchmarks/flash_attention_gpu.py [--out DIR] [--quick]

For B=4, H=16, fp16, D in {64, 128}, N in {1K, 4K, 16K}, causal and not, it

1. checks that the three implementations agree (relative error of each against an
   fp32 reference computed on a slice: batch 0, heads 0-1, in query chunks);
2. times each forward with ``triton.testing.do_bench`` (CUDA events, median);
3. prints a markdown table of ms and TFLOP/s (forward FLOPs = 4·B·H·N²·D, halved
   when causal) and the course kernel's speed relative to SDPA-flash;
4. does the same for the backward pass (course Triton backward vs SDPA-flash's, FLOPs
   = 2.5 × forward), after checking that the gradients agree.

Naive attention materialises the (B, H, N, N) score matrix in fp16 and its
softmax; where that would exceed the GPU memory it is skipped and marked so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

B, H = 4, 16


def naive_fp16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Materialised attention in the input precision: scores, softmax, product."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def reference_slice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """fp32 attention for batch 0, heads 0-1, computed in chunks of 1024 queries."""
    qs, ks, vs = (t[:1, :2].float() for t in (q, k, v))
    n = qs.shape[-2]
    out = torch.empty_like(qs)
    scale = 1.0 / math.sqrt(qs.shape[-1])
    for r0 in range(0, n, 1024):
        r1 = min(n, r0 + 1024)
        s = (qs[..., r0:r1, :] @ ks.transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(r0, r1, device=q.device)[:, None]
            cols = torch.arange(n, device=q.device)[None, :]
            s = s.masked_fill(cols > rows, float("-inf"))
        out[..., r0:r1, :] = torch.softmax(s, dim=-1) @ vs
    return out


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a[:1, :2].float()
    return float((a - ref).norm() / ref.norm())


def naive_fits(n: int, d: int) -> bool:
    # scores (fp16) + softmax output (fp16) + q, k, v, out, with 25% headroom
    need = 2 * B * H * n * n * 2 + 4 * B * H * n * d * 2
    free, _ = torch.cuda.mem_get_info()
    return need * 1.25 < free


def _driver_version() -> str:
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return done.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - informative only
        return "unknown"


def sdpa_flash_grads(q, k, v, dout, causal):
    """SDPA-flash forward once, then a closure that runs only its backward."""
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    out = sdpa_flash(qr, kr, vr, causal)
    return lambda: torch.autograd.grad(out, (qr, kr, vr), dout, retain_graph=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results")
    parser.add_argument("--quick", action="store_true", help="N in {1K, 4K} only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one (the CPU memory benchmark is flash_attention_cpu_memory.py)")
        return

    import triton
    from triton.testing import do_bench

    from labsupport.flash import triton as flash_triton
    from labsupport.flash.tiled import flash_attention_backward, flash_attention_forward
    from labsupport.flash.triton import best_config, triton_flash_backward, triton_flash_forward

    props = torch.cuda.get_device_properties(0)
    info = {
        "device": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "driver": _driver_version(),
    }
    print("device:", info)

    # --- small correctness checks of the contract (fully masked rows, bf16, ragged lengths)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for lq, lk, causal in ((300, 300, True), (300, 200, True), (100, 333, False), (257, 257, False)):
            q = torch.randn(2, 3, lq, 64, device="cuda", dtype=dtype, generator=gen)
            k = torch.randn(2, 3, lk, 64, device="cuda", dtype=dtype, generator=gen)
            v = torch.randn(2, 3, lk, 64, device="cuda", dtype=dtype, generator=gen)
            out, lse = triton_flash_forward(q, k, v, causal=causal, block_m=64, block_n=64)
            ref, ref_lse = flash_attention_forward(q.double(), k.double(), v.double(), causal=causal)
            err = float((out.double() - ref).norm() / ref.norm())
            finite = torch.isfinite(ref_lse)
            lse_ok = bool(torch.equal(torch.isfinite(lse), finite)) and float(
                (lse.double()[finite] - ref_lse[finite]).abs().max()
            ) < 1e-3
            dout = torch.randn(out.shape, device="cuda", dtype=dtype, generator=gen)
            grads = triton_flash_backward(q, k, v, out, lse, dout, causal=causal, block_m=64, block_n=64)
            ref_grads = flash_attention_backward(q.double(), k.double(), v.double(), ref, ref_lse, dout.double(),
                                                 causal=causal)
            gerr = max(float((g.double() - r).norm() / r.norm()) for g, r in zip(grads, ref_grads))
            nan = bool(torch.isnan(out).any()) or any(bool(torch.isnan(g).any()) for g in grads)
            status = "ok" if err < 1e-2 and gerr < 2e-2 and lse_ok and not nan else "FAIL"
            print(f"contract {str(dtype):15s} Lq={lq} Lk={lk} causal={causal}: rel err out {err:.2e}, "
                  f"grads {gerr:.2e}, lse ok {lse_ok}, NaN {nan} -> {status}")

    # --- the table
    rows = []
    ns = (1024, 4096) if args.quick else (1024, 4096, 16384)
    for d in (64, 128):
        for n in ns:
            for causal in (False, True):
                torch.cuda.empty_cache()
                q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3))
                flops = 4 * B * H * n * n * d * (0.5 if causal else 1.0)
                ref = reference_slice(q, k, v, causal)
                t0 = time.time()
                course = lambda: triton_flash_forward(q, k, v, causal=causal)  # noqa: E731
                out_course = course()[0]  # first call autotunes
                tune_s = time.time() - t0
                out_sdpa = sdpa_flash(q, k, v, causal)
                row = {
                    "D": d, "N": n, "causal": causal,
                    "err_course": rel_err(out_course, ref),
                    "err_sdpa": rel_err(out_sdpa, ref),
                    "course_vs_sdpa": float((out_course.float() - out_sdpa.float()).norm() / out_sdpa.float().norm()),
                    "tune_s": tune_s,
                }
                del out_course, out_sdpa
                row["ms_course"] = do_bench(course, warmup=25, rep=200, return_mode="median")
                row["ms_sdpa"] = do_bench(lambda: sdpa_flash(q, k, v, causal), warmup=25, rep=200, return_mode="median")
                if naive_fits(n, d):
                    out_naive = naive_fp16(q, k, v, causal)
                    row["err_naive"] = rel_err(out_naive, ref)
                    del out_naive
                    torch.cuda.empty_cache()
                    row["ms_naive"] = do_bench(lambda: naive_fp16(q, k, v, causal), warmup=5, rep=100, return_mode="median")
                else:
                    row["err_naive"] = None
                    row["ms_naive"] = None
                for name in ("course", "sdpa", "naive"):
                    ms = row[f"ms_{name}"]
                    row[f"tflops_{name}"] = None if ms is None else flops / (ms * 1e-3) / 1e12
                # backward: course kernels vs SDPA-flash's backward
                dout = torch.randn_like(q)
                out_c, lse_c = triton_flash_forward(q, k, v, causal=causal)
                course_bwd = lambda: triton_flash_backward(q, k, v, out_c, lse_c, dout, causal=causal)  # noqa: E731
                sdpa_bwd = sdpa_flash_grads(q, k, v, dout, causal)
                g_course, g_sdpa = course_bwd(), sdpa_bwd()
                row["bwd_rel_diff"] = max(
                    float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(g_course, g_sdpa)
                )
                del g_course, g_sdpa
                row["ms_course_bwd"] = do_bench(course_bwd, warmup=25, rep=200, return_mode="median")
                row["ms_sdpa_bwd"] = do_bench(sdpa_bwd, warmup=25, rep=200, return_mode="median")
                row["tflops_course_bwd"] = 2.5 * flops / (row["ms_course_bwd"] * 1e-3) / 1e12
                row["tflops_sdpa_bwd"] = 2.5 * flops / (row["ms_sdpa_bwd"] * 1e-3) / 1e12
                del out_c, lse_c, dout, sdpa_bwd
                rows.append(row)
                print(json.dumps(row), flush=True)
                del q, k, v

    configs = best_config()
    for name in ("_flash_bwd_dkdv_autotuned", "_flash_bwd_dq_autotuned"):
        cache = getattr(getattr(flash_triton, name, None), "cache", {})
        configs.update({f"{name} {key}": str(cfg) for key, cfg in cache.items()})
    lines = [
        f"Device: {info['device']} ({info['sms']} SMs, driver {info['driver']}); torch {info['torch']} (CUDA {info['cuda']}), "
        f"triton {info['triton']}, Python {info['python']}. B={B}, H={H}, fp16, forward only; "
        "ms = median of triton.testing.do_bench; TFLOP/s from 4·B·H·N²·D (halved when causal).",
        "",
        "| D | N | causal | course Triton ms / TFLOP/s | SDPA flash ms / TFLOP/s | naive ms / TFLOP/s | course / SDPA | rel. err course / SDPA / naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        naive = "does not fit" if r["ms_naive"] is None else f"{r['ms_naive']:.3f} / {r['tflops_naive']:.0f}"
        err_naive = "—" if r["err_naive"] is None else f"{r['err_naive']:.1e}"
        lines.append(
            f"| {r['D']} | {r['N']} | {'yes' if r['causal'] else 'no'} | "
            f"{r['ms_course']:.3f} / {r['tflops_course']:.0f} | {r['ms_sdpa']:.3f} / {r['tflops_sdpa']:.0f} | "
            f"{naive} | {r['ms_sdpa'] / r['ms_course']:.2f}× | "
            f"{r['err_course']:.1e} / {r['err_sdpa']:.1e} / {err_naive} |"
        )
    lines += [
        "",
        "Backward (FLOPs = 2.5 × forward): course Triton backward (dK/dV kernel + dQ kernel) vs SDPA-flash backward",
        "",
        "| D | N | causal | course bwd ms / TFLOP/s | SDPA flash bwd ms / TFLOP/s | course / SDPA | max rel. diff of grads |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['D']} | {r['N']} | {'yes' if r['causal'] else 'no'} | "
            f"{r['ms_course_bwd']:.3f} / {r['tflops_course_bwd']:.0f} | {r['ms_sdpa_bwd']:.3f} / {r['tflops_sdpa_bwd']:.0f} | "
            f"{r['ms_sdpa_bwd'] / r['ms_course_bwd']:.2f}× | {r['bwd_rel_diff']:.1e} |"
        )
    lines += ["", "Autotuned configurations:", ""]
    lines += [f"- `{key}`: `{cfg}`" for key, cfg in (configs or {}).items()]
    table = "\n".join(lines)
    print()
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "flash_gpu.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "flash_gpu.json"), "w") as f:
        json.dump({"info": info, "rows": rows, "configs": configs}, f, indent=1)


if __name__ == "__main__":
    main()
