"""Chapter 01 on a Hopper GPU: the course's attention kernels against SDPA's default backend (cuDNN) and flash.

Run from the repository root on a machine with a CUDA GPU (exits 0 without one):

    python3 benchmarks/flash_attention_hopper_gpu.py [--out DIR] [--dtypes fp16 bf16] [--dims 64 128]
                                                     [--lengths 4096 16384] [--no-warp-spec]

For B=4, H=16 and every (dtype, D, N, causal) it times, with ``triton.testing.do_bench`` (CUDA events, median):

* forward: SDPA with no backend forced (what a practitioner gets; on Hopper torch picks cuDNN), SDPA forced to
  cuDNN, SDPA forced to flash, the course's pointer kernel (``labsupport.flash.triton``, autotuned per head
  dimension and length bucket), the course's TMA kernel (``labsupport.flash.tma``), and the TMA kernel with
  Triton's automatic warp specialisation where this Triton compiles it;
* forward + backward: SDPA (autograd, each backend) against the course forward followed by the course backward
  (``triton_flash_backward``; the backward is the same for both course forwards).

Each output is first checked against an fp32 reference on a slice (batch 0, heads 0-1). FLOPs: forward
4·B·H·N²·D, forward + backward 3.5 × that, both halved when causal. The script also times how long the first
call takes at a new length in an already-tuned bucket (it should compile, never re-benchmark), and names the
kernels SDPA's default backend launches. Writes ``DIR/flash_hopper.json`` and ``DIR/flash_hopper.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # runs from a plain checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

B, H = 4, 16
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v, causal):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def reference_slice(q, k, v, causal):
    qs, ks, vs = (t[:1, :2].float() for t in (q, k, v))
    n = qs.shape[-2]
    out = torch.empty_like(qs)
    for r0 in range(0, n, 2048):
        r1 = min(n, r0 + 2048)
        s = (qs[..., r0:r1, :] @ ks.transpose(-1, -2)) / math.sqrt(qs.shape[-1])
        if causal:
            rows = torch.arange(r0, r1, device=q.device)[:, None]
            s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > rows, float("-inf"))
        out[..., r0:r1, :] = torch.softmax(s, dim=-1) @ vs
    return out


def rel_err(a, ref):
    return float((a[:1, :2].float() - ref).norm() / ref.norm())


def default_backend_kernels(q, k, v):
    """Names of the CUDA kernels that SDPA's default dispatch launches for one call."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            F.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
        return sorted({e.key[:90] for e in prof.key_averages() if "CUDA" in str(e.device_type)})
    except Exception as error:  # noqa: BLE001 - informative only
        return [f"profiler failed: {type(error).__name__}: {error}"]


def write_tables(rows: list, info: dict, retune: dict | None, out_dir: str, echo: bool = False) -> None:
    """The markdown tables of the rows measured so far, to ``out_dir/flash_hopper.md`` (and stdout)."""
    def cell(r, kind, name, mult):
        ms = r.get(f"{kind}_ms_{name}")
        return "—" if ms is None else f"{ms:.3f} / {mult * r['fwd_flops'] / ms / 1e9:.0f}"

    def ratio(r, kind, num, names):
        cands = [r.get(f"{kind}_ms_{n}") for n in names if r.get(f"{kind}_ms_{n}") is not None]
        base = r.get(f"{kind}_ms_{num}")
        return "—" if not cands or base is None else f"{base / min(cands):.2f}×"

    course_fwd = ["course_ptr", "course_tma", "course_tma_ws"]
    lines = [f"Device: {info['device']} ({info['sms']} SMs); torch {info['torch']} (CUDA {info['cuda']}, cuDNN "
             f"{info['cudnn']}), triton {info['triton']}, Python {info['python']}. B={B}, H={H}; ms / TFLOP/s, "
             "median of do_bench.", "",
             "Forward", "",
             "| dtype | D | N | causal | SDPA default | SDPA cuDNN | SDPA flash | course pointer | course TMA | "
             "course TMA+WS | best course / default | best course / flash |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['D']} | {r['N']} | {'yes' if r['causal'] else 'no'} | "
                     + " | ".join(cell(r, "fwd", nm, 1) for nm in ["sdpa_default", "sdpa_cudnn", "sdpa_flash",
                                                                     *course_fwd])
                     + f" | {ratio(r, 'fwd', 'sdpa_default', course_fwd)} | {ratio(r, 'fwd', 'sdpa_flash', course_fwd)} |")
    lines += ["", "Forward + backward (FLOPs 3.5 × forward)", "",
              "| dtype | D | N | causal | SDPA default | SDPA cuDNN | SDPA flash | course pointer fwd + bwd | "
              "course TMA fwd + bwd | best course / default | best course / flash | grad rel. diff vs flash |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['D']} | {r['N']} | {'yes' if r['causal'] else 'no'} | "
                     + " | ".join(cell(r, "fb", nm, 3.5) for nm in ["sdpa_default", "sdpa_cudnn", "sdpa_flash",
                                                                      "course_ptr", "course_tma"])
                     + f" | {ratio(r, 'fb', 'sdpa_default', ['course_ptr', 'course_tma'])} | "
                     f"{ratio(r, 'fb', 'sdpa_flash', ['course_ptr', 'course_tma'])} | {r.get('grad_rel_diff', float('nan')):.1e} |")
    lines += ["", f"Re-tune check: {retune}", "", "Errors against fp32 (slice):"]
    for r in rows:
        errs = ", ".join(f"{k[4:]} {v:.1e}" for k, v in r.items() if k.startswith("err_"))
        lines.append(f"- {r['dtype']} D={r['D']} N={r['N']} causal={r['causal']}: {errs}")
    failures = sorted({f"{k}: {v}" for r in rows for k, v in r.items() if "error" in k})
    lines += ["", "Variants that did not run:", *[f"- {x}" for x in failures]]
    table = "\n".join(lines)
    if echo:
        print("\n" + table)
    with open(os.path.join(out_dir, "flash_hopper.md"), "w") as f:
        f.write(table + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    parser.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--no-warp-spec", action="store_true", help="skip the warp-specialised TMA variant")
    parser.add_argument("--warp-spec-dtypes", nargs="*", default=["fp16"], choices=list(DTYPES),
                        help="dtypes for which the warp-specialised variant is tried (it compiles slowly)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one and Triton; nothing was measured")
        return

    import triton
    from triton.testing import do_bench

    from labsupport.flash import tma
    from labsupport.flash import triton as flash_triton

    info = {"device": torch.cuda.get_device_name(0), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "triton": triton.__version__, "python": platform.python_version(),
            "capability": torch.cuda.get_device_capability(0)}
    print("device:", info, flush=True)
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)

    # contract of the TMA kernel on ragged shapes (the pointer kernel's is checked by flash_attention_gpu.py)
    from labsupport.flash.tiled import flash_attention_forward
    for dtype in (torch.float16, torch.bfloat16):
        for lq, lk, causal, d in ((300, 300, True, 64), (300, 200, True, 128), (100, 333, False, 64)):
            q, k, v = (torch.randn(2, 3, n, d, device="cuda", dtype=dtype, generator=gen) for n in (lq, lk, lk))
            out, lse = tma.tma_flash_forward(q, k, v, causal=causal)
            ref, ref_lse = flash_attention_forward(q.double(), k.double(), v.double(), causal=causal)
            err = float((out.double() - ref).norm() / ref.norm())
            ok = err < 1e-2 and not bool(torch.isnan(out).any()) and bool(
                torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)))
            print(f"tma contract {dtype} Lq={lq} Lk={lk} D={d} causal={causal}: rel err {err:.1e} -> "
                  f"{'ok' if ok else 'FAIL'}", flush=True)

    warp_spec = not args.no_warp_spec
    rows = []
    retune = None
    for n in args.lengths:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            for d in args.dims:
                for causal in (False, True):
                    torch.cuda.empty_cache()
                    q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
                    dout = torch.randn_like(q)
                    flops = 4 * B * H * n * n * d * (0.5 if causal else 1.0)
                    ref = reference_slice(q, k, v, causal)
                    row = {"dtype": dname, "D": d, "N": n, "causal": causal}
                    if not rows:
                        row["default_kernels"] = default_backend_kernels(q, k, v)
                        print("SDPA default launches:", row["default_kernels"], flush=True)
                    fwd = {
                        "sdpa_default": lambda: sdpa(None)(q, k, v, causal),
                        "sdpa_cudnn": lambda: sdpa("CUDNN_ATTENTION")(q, k, v, causal),
                        "sdpa_flash": lambda: sdpa("FLASH_ATTENTION")(q, k, v, causal),
                        "course_ptr": lambda: flash_triton.triton_flash_forward(q, k, v, causal=causal)[0],
                        "course_tma": lambda: tma.tma_flash_forward(q, k, v, causal=causal)[0],
                    }
                    if warp_spec and dname in args.warp_spec_dtypes:
                        fwd["course_tma_ws"] = lambda: tma.tma_flash_forward(q, k, v, causal=causal,
                                                                             warp_specialize=True)[0]
                    for name, fn in fwd.items():
                        try:
                            t0 = time.time()
                            out = fn()
                            torch.cuda.synchronize()
                            row[f"first_call_s_{name}"] = time.time() - t0
                            row[f"err_{name}"] = rel_err(out, ref)
                            del out
                            row[f"fwd_ms_{name}"] = do_bench(fn, warmup=25, rep=100, return_mode="median")
                        except Exception as error:  # noqa: BLE001 - a backend or variant that cannot run here
                            row[f"fwd_ms_{name}"] = None
                            row[f"error_{name}"] = f"{type(error).__name__}: {str(error)[:200]}"
                            if name == "course_tma_ws":
                                warp_spec = False
                    # forward + backward
                    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))

                    def sdpa_fb(backend):
                        def run():
                            o = sdpa(backend)(qr, kr, vr, causal)
                            return torch.autograd.grad(o, (qr, kr, vr), dout)
                        return run

                    def course_fb(forward):
                        def run():
                            o, lse = forward(q, k, v, causal=causal)
                            return flash_triton.triton_flash_backward(q, k, v, o, lse, dout, causal=causal)
                        return run

                    fb = {"sdpa_default": sdpa_fb(None), "sdpa_cudnn": sdpa_fb("CUDNN_ATTENTION"),
                          "sdpa_flash": sdpa_fb("FLASH_ATTENTION"),
                          "course_ptr": course_fb(flash_triton.triton_flash_forward),
                          "course_tma": course_fb(tma.tma_flash_forward)}
                    grads = {}
                    for name, fn in fb.items():
                        try:
                            grads[name] = fn()
                            row[f"fb_ms_{name}"] = do_bench(fn, warmup=10, rep=100, return_mode="median")
                        except Exception as error:  # noqa: BLE001
                            row[f"fb_ms_{name}"] = None
                            row[f"fb_error_{name}"] = f"{type(error).__name__}: {str(error)[:200]}"
                    if "course_ptr" in grads and "sdpa_flash" in grads:
                        row["grad_rel_diff"] = max(float((a.float() - b.float()).norm() / b.float().norm())
                                                   for a, b in zip(grads["course_ptr"], grads["sdpa_flash"]))
                    del grads, qr, kr, vr
                    row["fwd_flops"] = flops
                    if retune is None:  # a new length in the tuned bucket: compile only, no benchmarking
                        m = n - max(1, n // 40)  # same bucket, a length not seen yet
                        q2, k2, v2 = (t[:, :, :m].contiguous() for t in (q, k, v))
                        t0 = time.time()
                        flash_triton.triton_flash_forward(q2, k2, v2, causal=causal)
                        torch.cuda.synchronize()
                        t1 = time.time()
                        flash_triton.triton_flash_forward(q2, k2, v2, causal=causal)
                        torch.cuda.synchronize()
                        retune = {"tuned_N": n, "new_N": m, "first_call_tuned_bucket_s": row["first_call_s_course_ptr"],
                                  "first_call_new_length_same_bucket_s": t1 - t0, "second_call_s": time.time() - t1}
                        print("re-tune check:", retune, flush=True)
                        del q2, k2, v2
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    with open(os.path.join(args.out, "flash_hopper.json"), "w") as f:
                        json.dump({"info": info, "rows": rows, "retune": retune,
                                   "configs": flash_triton.best_config()}, f, indent=1)
                    write_tables(rows, info, retune, args.out)
                    del q, k, v, dout

    write_tables(rows, info, retune, args.out, echo=True)


if __name__ == "__main__":
    main()
