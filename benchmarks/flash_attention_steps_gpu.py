"""Chapter 01, "the last 20% on Hopper": every step of the forward-kernel ladder timed, and the FP8 forward.

Run from the repository root on a machine with a CUDA GPU (exits 0 without one):

    python3 benchmarks/flash_attention_steps_gpu.py [--out DIR] [--quick] [--budget-s 210]
                                                    [--dtypes fp16 bf16] [--dims 64 128] [--lengths 4096 16384]
                                                    [--steps a b c d e f g h i] [--no-sweep] [--no-fp8]

For B=4, H=16 and every (dtype, D, N, causal) it times with ``triton.testing.do_bench`` (CUDA events, median):
SDPA with no backend forced (what a practitioner gets; cuDNN on Hopper), SDPA forced to its flash backend, each
step (a)-(g) of ``labsupport.flash.hopper`` (one kernel, one compile-time switch more per step), the extra steps (h)
(step (e) with Triton's automatic warp specialisation) and (i) (step (d) with half the exponentials computed on the
FMA units), and the FP8 forward of ``labsupport.flash.fp8_triton``
(inputs quantised beforehand; the quantisation pass is timed apart). About three minutes on an H100 (most of it
compiling: about 90 kernel variants); ``--quick`` takes one shape.

Before timing: (1) step (d)'s tile configuration is picked per head dimension among a few candidates, timed once at
(fp16, first N, not causal), and used by steps (d)-(i), and the FP8 kernel's among three the same way
(``--no-sweep``: the modules' fixed choices); (2) every
variant is checked against float64 attention at Lq ≠ Lk, fully masked rows included, on lengths that are tile
multiples (the kernels the timing runs); a variant that fails is not timed. Every timed output is also compared
with an fp32 reference on a slice (batch 0, heads 0-1), and not timed when wrong. After the timing, while time
is left, the same check on ragged lengths (other kernels for the TMA steps).

Guards, so one slow or failing compile cannot eat the run: a variant whose first call raises (a compile error,
out of resources) gets a row "did not compile: <error>" and is skipped for the remaining shapes with the same
(dtype, D, causal); a first call longer than ``--compile-guard-s`` (SIGALRM) disables the variant; past
``--budget-s`` seconds no more timing starts and the remaining cells say "not reached". The FP8 accuracy table
(PyTorch emulation, float64, on the CPU) is printed at the end. Writes ``DIR/flash_steps.md`` and
``DIR/flash_steps.json`` after every shape.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # runs from a plain checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling script's SDPA runner and fp32 slice

import torch  # noqa: E402
from flash_attention_hopper_gpu import reference_slice, sdpa  # noqa: E402

B, H = 4, 16
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
STEP_KEYS = ("a", "b", "c", "d", "e", "f", "g", "h", "i")
# the cumulative ladder; (h) = (e) + warp specialisation and (i) = (d) + FMA exp2 are compared with their parents
CHAIN = ("a", "b", "c", "d", "e", "f", "g")


class GuardTimeout(Exception):
    """A first call (compile) ran past its guard."""


@contextlib.contextmanager
def time_guard(seconds: float):
    """Raise :class:`GuardTimeout` in this (main) thread after ``seconds``."""
    def handler(signum, frame):  # noqa: ARG001
        raise GuardTimeout(f"first call (compile) ran past {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def short(error: BaseException) -> str:
    """One line for a table: the exception's type and the first 160 characters of its message."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}"


def rel_err(a, ref) -> float:
    return float((a[:1, :2].float() - ref).norm() / ref.norm())


def contract_check(name, forward, d, causal, dtype, reference_fn, device, shapes) -> str | None:
    """``None`` when ``forward`` meets the attention contract on ``shapes`` (Lq, Lk), else what went wrong."""
    gen = torch.Generator(device=device).manual_seed(1)
    tol = 0.08 if name == "fp8" else (1e-2 if dtype == torch.float16 else 3e-2)
    for lq, lk in shapes:
        q, k, v = (torch.randn(2, 3, n, d, device=device, dtype=dtype, generator=gen) for n in (lq, lk, lk))
        out, lse = forward(q, k, v, causal)
        ref = reference_fn(q.double(), k.double(), v.double(), causal=causal)
        if torch.isnan(out).any() or torch.isnan(lse).any():
            return f"NaN at Lq={lq} Lk={lk}"
        err = float((out.double() - ref).norm() / ref.norm())
        if err > tol:
            return f"rel. error {err:.1e} > {tol:.0e} at Lq={lq} Lk={lk}"
        if causal and lq > lk:
            masked = lq - lk
            if out[..., :masked, :].abs().max() != 0 or not torch.isneginf(lse[..., :masked]).all():
                return f"fully masked rows not zero / lse not -inf at Lq={lq} Lk={lk}"
    return None


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def write_report(state: dict, out_dir: str, echo: bool = False) -> None:
    """``out_dir/flash_steps.json`` and ``.md`` from what is measured so far."""
    info, rows = state["info"], state["rows"]
    steps = state["steps"]
    names = ["sdpa_default", "sdpa_flash", *steps, *(["fp8"] if state["fp8"] else [])]
    heads = {"sdpa_default": "SDPA default", "sdpa_flash": "SDPA flash", "fp8": "FP8",
             **{s: f"({s}) {state['step_names'][s]}" for s in steps}}

    def cell(r, name):
        ms = r.get(f"ms_{name}")
        if ms is not None:
            return f"{ms:.3f} / {r['flops'] / ms / 1e9:.0f}"
        note = r.get(f"note_{name}")
        return note if note else "—"

    def ratio(r, num, den):
        a, b = r.get(f"ms_{num}"), r.get(f"ms_{den}")
        return f"{a / b:.2f}×" if a and b else "—"

    best = [s for s in steps]
    chain = [s for s in CHAIN if s in steps]
    pairs = list(zip(chain, chain[1:])) + [(a, b) for a, b in (("e", "h"), ("d", "i")) if a in steps and b in steps]
    lines = [f"Device: {info['device']} ({info['sms']} SMs, sm_{info['capability'][0]}{info['capability'][1]}); "
             f"torch {info['torch']} (CUDA {info['cuda']}, cuDNN {info['cudnn']}), triton {info['triton']}, "
             f"Python {info['python']}. B={B}, H={H}; each cell: ms / TFLOP/s (forward FLOPs 4·B·H·N²·D, halved "
             "when causal), median of triton.testing.do_bench; one run.", "",
             "Configurations: steps (a)-(c) " + state["generic_config"] + "; steps (d)-(i) per head dimension: "
             + ", ".join(f"D={d}: {c}" for d, c in state["configs"].items())
             + (f"; FP8: " + ", ".join(f"D={d}: {c}" for d, c in state["fp8_configs"].items()) if state["fp8"] else ""),
             "", "Forward", "",
             "| dtype | D | N | causal | " + " | ".join(heads[n] for n in names)
             + " | best step / default | best step / flash |" + (" FP8 / default |" if state["fp8"] else ""),
             "|" + "---|" * (4 + len(names) + 2 + (1 if state["fp8"] else 0))]
    for r in rows:
        times = [r.get(f"ms_{s}") for s in best if r.get(f"ms_{s}")]
        fastest = min(times) if times else None
        vs_default = f"{r['ms_sdpa_default'] / fastest:.2f}×" if fastest and r.get("ms_sdpa_default") else "—"
        vs_flash = f"{r['ms_sdpa_flash'] / fastest:.2f}×" if fastest and r.get("ms_sdpa_flash") else "—"
        line = (f"| {r['dtype']} | {r['D']} | {r['N']} | {'yes' if r['causal'] else 'no'} | "
                + " | ".join(cell(r, n) for n in names) + f" | {vs_default} | {vs_flash} |")
        if state["fp8"]:
            line += f" {ratio(r, 'sdpa_default', 'fp8')} |"
        lines.append(line)
    lines += ["", "(best step / default > 1 means the course's fastest step beats SDPA's default.)", "",
              "Gain of each step over the step before it (time before / time after; > 1 is faster; (h) is "
              "compared with (e), (i) with (d))", "",
              "| dtype | D | N | causal | " + " | ".join(f"({s}) {state['step_names'][s]}" for _, s in pairs) + " |",
              "|" + "---|" * (4 + len(pairs))]
    gains: dict[str, list] = {s: [] for _, s in pairs}
    for r in rows:
        cells = []
        for prev, s in pairs:
            a, b = r.get(f"ms_{prev}"), r.get(f"ms_{s}")
            g = a / b if a and b else None
            gains[s].append(g)
            cells.append(f"{g:.2f}×" if g else "—")
        lines.append(f"| {r['dtype']} | {r['D']} | {r['N']} | {'yes' if r['causal'] else 'no'} | "
                     + " | ".join(cells) + " |")
    lines.append("| geometric mean | | | | " + " | ".join(
        f"{g:.2f}×" if (g := geomean(gains[s])) else "—" for _, s in pairs) + " |")
    state["gain_geomean"] = {s: geomean(gains[s]) for _, s in pairs}
    lines += ["", "Relative error of each output against fp32 (batch 0, heads 0-1):", "",
              "| dtype | D | N | causal | " + " | ".join(heads[n] for n in names) + " |",
              "|" + "---|" * (4 + len(names))]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['D']} | {r['N']} | {'yes' if r['causal'] else 'no'} | "
                     + " | ".join(f"{r[f'err_{n}']:.1e}" if r.get(f"err_{n}") is not None else "—" for n in names)
                     + " |")
    if state["fp8"] and any(r.get("ms_fp8_quantize") for r in rows):
        lines += ["", "FP8 quantisation pass (PyTorch, not in the FP8 column): "
                  + ", ".join(f"{r['dtype']} D={r['D']} N={r['N']}: {r['ms_fp8_quantize']:.3f} ms"
                              for r in rows if r.get("ms_fp8_quantize") and not r["causal"])]
    if state.get("sweep"):
        lines += ["", "Step (d)'s configuration, timed once per head dimension (fp16, not causal):", ""]
        for d, results in state["sweep"].items():
            lines.append(f"- D={d}: " + ", ".join(f"{c} {v if isinstance(v, str) else f'{v:.3f} ms'}"
                                                  for c, v in results.items()))
    if state.get("fp8_sweep"):
        lines += ["", "The FP8 kernel's configuration, timed once per head dimension (fp16 inputs, not causal):", ""]
        for d, results in state["fp8_sweep"].items():
            lines.append(f"- D={d}: " + ", ".join(f"{c} {v if isinstance(v, str) else f'{v:.3f} ms'}"
                                                  for c, v in results.items()))
    if state.get("contract"):
        lines += ["", "Contract check against float64 (fp16, Lq ≠ Lk, fully masked rows; tile-multiple lengths "
                  "before the timing, ragged lengths after it):", ""]
        lines += [f"- {k}: {v}" for k, v in state["contract"].items()]
    if state.get("fp8_accuracy"):
        lines += ["", "FP8 accuracy, PyTorch emulation against float64 (causal, 4 heads, N=512, fp16 inputs and "
                  "output; blocks of 128 rows):", "",
                  "| D | inputs | recipe | max abs error | mean abs error | rel. error |", "|---|---|---|---|---|---|"]
        for a in state["fp8_accuracy"]:
            lines.append(f"| {a['D']} | {a['inputs']} | {a['recipe']} | {a['max_abs']:.2e} | {a['mean_abs']:.2e} | "
                         f"{a['rel']:.2e} |")
    if state["failures"]:
        lines += ["", "Variants that did not run:", ""] + [f"- {f}" for f in state["failures"]]
    lines += ["", f"Run time {time.time() - state['started']:.0f} s."]
    table = "\n".join(lines)
    if echo:
        print("\n" + table, flush=True)
    with open(os.path.join(out_dir, "flash_steps.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "flash_steps.json"), "w") as f:
        json.dump({k: v for k, v in state.items() if k != "started"}, f, indent=1, default=str)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results")
    parser.add_argument("--quick", action="store_true", help="one shape (fp16, D=128, N=4096), causal and not")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    parser.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--steps", nargs="+", default=list(STEP_KEYS), choices=list(STEP_KEYS))
    parser.add_argument("--no-sweep", action="store_true", help="use the fixed step (d) configurations")
    parser.add_argument("--no-fp8", action="store_true", help="skip the FP8 kernel")
    parser.add_argument("--budget-s", type=float, default=200.0, help="no timing starts after this many seconds")
    parser.add_argument("--compile-guard-s", type=float, default=30.0, help="longest first call (compile) allowed")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the whole script on the CPU under TRITON_INTERPRET=1 with tiny shapes (a test)")
    args = parser.parse_args()
    global B, H
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        B, H = 1, 2
        args.lengths = [n if n <= 96 else 64 for n in args.lengths]
        args.dims = [d if d <= 32 else 32 for d in args.dims]
    elif not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one and Triton; nothing was measured")
        return
    started = time.time()
    if args.quick:
        args.dtypes, args.dims, args.lengths = ["fp16"], args.dims[-1:], args.lengths[:1]

    import triton

    if args.cpu_smoke:
        def do_bench(fn, warmup=0, rep=0, return_mode="median"):  # noqa: ARG001 - a stand-in timer
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        from triton.testing import do_bench

    from labsupport.flash import fp8, fp8_triton, hopper
    from labsupport.flash.reference import naive_attention

    dev = "cpu" if args.cpu_smoke else "cuda"

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    cap = (9, 0) if args.cpu_smoke else torch.cuda.get_device_capability(0)
    info = {"device": "CPU (Triton interpreter smoke run)" if args.cpu_smoke else torch.cuda.get_device_name(0),
            "sms": 3 if args.cpu_smoke else torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "triton": triton.__version__, "python": platform.python_version(), "capability": list(cap), "B": B, "H": H,
            "args": vars(args)}
    print("device:", info, flush=True)
    os.makedirs(args.out, exist_ok=True)
    steps = [s for s in STEP_KEYS if s in args.steps]
    use_fp8 = not args.no_fp8 and cap >= (8, 9)
    state = {"info": info, "rows": [], "steps": steps, "fp8": use_fp8, "failures": [], "started": started,
             "step_names": {s.key: s.name for s in hopper.LADDER + hopper.EXTRAS},
             "step_changes": {s.key: s.change for s in hopper.LADDER + hopper.EXTRAS},
             "generic_config": hopper.GENERIC_CONFIG.label(), "configs": {}, "fp8_configs": {}, "sweep": {},
             "fp8_sweep": {},
             "contract": {}, "fp8_accuracy": []}
    if not use_fp8 and not args.no_fp8:
        state["failures"].append(f"fp8: needs compute capability 8.9 or more, this GPU has {cap}")

    def over_budget() -> bool:
        return time.time() - started > args.budget_s

    def sweep(candidates, runner):
        """Time ``runner(cfg)()`` for each candidate until the budget runs out: ({label: ms or why not}, fastest)."""
        results: dict[str, object] = {}
        best = None
        for cfg in candidates:
            if over_budget():
                break
            try:
                fn = runner(cfg)
                with time_guard(args.compile_guard_s):
                    fn()
                    sync()
                ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
                results[cfg.label()] = ms
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            except Exception as error:  # noqa: BLE001 - a config that does not compile here
                results[cfg.label()] = "did not compile: " + short(error)
        return results, None if best is None else best[1]

    chosen: dict[int, hopper.KernelConfig] = {}
    gen = torch.Generator(device=dev).manual_seed(0)

    def step_forward(key, d):
        cfg = chosen[d] if hopper.ladder_step(key).tuned else hopper.GENERIC_CONFIG
        return lambda q, k, v, causal: hopper.ladder_forward(q, k, v, key, causal=causal, config=cfg)

    chosen8: dict[int, hopper.KernelConfig] = {}

    def fp8_forward(q, k, v, causal):
        return fp8_triton.fp8_flash_forward(q, k, v, causal=causal, config=chosen8.get(q.shape[-1]))

    # 1. step (d)'s configuration per head dimension
    for d in args.dims:
        chosen[d] = hopper.tuned_config(d)
        if args.no_sweep or "d" not in steps:
            continue
        q, k, v = (torch.randn(B, H, args.lengths[0], d, device=dev, dtype=torch.float16, generator=gen)
                   for _ in range(3))
        results, best = sweep(hopper.sweep_candidates(d),
                              lambda cfg: lambda: hopper.ladder_forward(q, k, v, "d", config=cfg)[0])
        if best is not None:
            chosen[d] = best
        state["sweep"][str(d)] = results
        print(f"sweep D={d}: {results} -> {chosen[d].label()}", flush=True)
        del q, k, v
    state["configs"] = {str(d): chosen[d].label() for d in args.dims}
    # 1b. the FP8 kernel's configuration per head dimension, the same way
    for d in args.dims if use_fp8 else []:
        if d not in fp8_triton.FP8_CONFIGS:
            continue
        chosen8[d] = fp8_triton.fp8_config(d)
        if args.no_sweep:
            continue
        q, k, v = (torch.randn(B, H, args.lengths[0], d, device=dev, dtype=torch.float16, generator=gen)
                   for _ in range(3))
        def fp8_runner(cfg):
            packed = fp8_triton.quantize_for_kernel(q, k, v, block_m=cfg.block_m, block_n=cfg.block_n)
            return lambda: fp8_triton.fp8_forward_quantized(packed, num_warps=cfg.num_warps,
                                                            num_stages=cfg.num_stages)[0]

        results, best = sweep(fp8_triton.fp8_sweep_candidates(d), fp8_runner)
        if best is not None:
            chosen8[d] = best
        state["fp8_sweep"][str(d)] = results
        print(f"FP8 sweep D={d}: {results} -> {chosen8[d].label()}", flush=True)
        del q, k, v
    state["fp8_configs"] = {str(d): c.label() for d, c in chosen8.items()}

    # 2. the contract (fp16, against float64): before timing on tile-multiple lengths (the kernels the timing
    # uses, fully masked rows included), after timing on ragged ones (other kernels: 3-D TMA descriptors)
    variants = {s: (lambda d, s=s: step_forward(s, d)) for s in steps}
    if use_fp8:
        variants["fp8"] = lambda d: fp8_forward
    disabled: dict[tuple, str] = {}  # (name, dtype, D, causal) or (name,) -> reason

    def run_contract(label: str, shapes, deadline: float, block: bool) -> None:
        for name, make in variants.items():
            for d in args.dims:
                if name == "fp8" and d not in fp8_triton.FP8_CONFIGS:
                    continue
                for causal in (False, True):
                    key = f"{name} D={d} causal={causal} ({label})"
                    if (name,) in disabled:
                        state["contract"][key] = "skipped: " + disabled[(name,)][:60]
                        continue
                    if time.time() - started > deadline:
                        state["contract"][key] = "not reached (time budget)"
                        continue
                    try:
                        with time_guard(args.compile_guard_s):
                            reason = contract_check(name, make(d), d, causal, torch.float16, naive_attention, dev,
                                                    shapes)
                    except GuardTimeout as error:
                        reason = "compile guard: " + str(error)
                        disabled[(name,)] = reason
                    except Exception as error:  # noqa: BLE001
                        reason = "did not compile: " + short(error)
                    state["contract"][key] = reason or "ok"
                    if reason and name == "h":
                        disabled[(name,)] = reason
                    if reason and block:  # a variant that fails here is not timed at this (D, causal)
                        for dname in args.dtypes:
                            disabled.setdefault((name, dname, d, causal), reason)
                    if reason:
                        state["failures"].append(f"contract {key}: {reason}")
                    print(f"contract {key}: {reason or 'ok'}", flush=True)

    run_contract("tile multiples", ((32, 48), (48, 32)) if args.cpu_smoke else ((256, 384), (384, 256)),
                 args.budget_s, block=True)

    # 3. the timed grid
    for n in args.lengths:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            for d in args.dims:
                for causal in (False, True):
                    if dev == "cuda":
                        torch.cuda.empty_cache()
                    q, k, v = (torch.randn(B, H, n, d, device=dev, dtype=dtype, generator=gen) for _ in range(3))
                    ref = reference_slice(q, k, v, causal)
                    row: dict[str, object] = {"dtype": dname, "D": d, "N": n, "causal": causal,
                                              "flops": 4 * B * H * n * n * d * (0.5 if causal else 1.0)}
                    fns = {"sdpa_default": lambda: sdpa(None)(q, k, v, causal),
                           "sdpa_flash": lambda: sdpa("FLASH_ATTENTION")(q, k, v, causal)}
                    for s in steps:
                        fns[s] = (lambda f: (lambda: f(q, k, v, causal)[0]))(step_forward(s, d))
                    if use_fp8 and d in chosen8:
                        cfg8 = chosen8[d]
                        try:
                            packed = fp8_triton.quantize_for_kernel(q, k, v, block_m=cfg8.block_m,
                                                                    block_n=cfg8.block_n)
                            row["ms_fp8_quantize"] = do_bench(
                                lambda: fp8_triton.quantize_for_kernel(q, k, v, block_m=cfg8.block_m,
                                                                       block_n=cfg8.block_n),
                                warmup=5, rep=20, return_mode="median")
                            fns["fp8"] = lambda: fp8_triton.fp8_forward_quantized(
                                packed, causal=causal, num_warps=cfg8.num_warps, num_stages=cfg8.num_stages)[0]
                        except Exception as error:  # noqa: BLE001
                            row["note_fp8"] = "quantisation failed: " + short(error)
                    for name, fn in fns.items():
                        reason = disabled.get((name,)) or disabled.get((name, dname, d, causal))
                        if reason:
                            row[f"note_{name}"] = "skipped: " + reason[:60]
                            continue
                        if over_budget():
                            row[f"note_{name}"] = "not reached"
                            continue
                        try:
                            t0 = time.time()
                            with time_guard(args.compile_guard_s):
                                out = fn()
                                sync()
                            row[f"first_call_s_{name}"] = round(time.time() - t0, 3)
                            err = row[f"err_{name}"] = rel_err(out, ref)
                            del out
                            if not err < (0.1 if name == "fp8" else 2e-2):  # NaN fails too
                                row[f"note_{name}"] = f"wrong result (rel. error {err:.1e})"
                                state["failures"].append(f"{name} {dname} D={d} N={n} causal={causal}: "
                                                         f"wrong result, rel. error {err:.1e}; not timed")
                                continue
                            row[f"ms_{name}"] = do_bench(fn, warmup=10, rep=60, return_mode="median")
                        except GuardTimeout as error:
                            disabled[(name,)] = str(error)
                            row[f"note_{name}"] = "compile guard"
                            state["failures"].append(f"{name}: {error}; disabled for the rest of the run")
                        except Exception as error:  # noqa: BLE001 - did not compile, or out of resources
                            reason = "did not compile: " + short(error)
                            disabled[(name, dname, d, causal)] = reason
                            if name == "h":  # warp specialisation: one failure is enough to know
                                disabled[(name,)] = reason
                            row[f"note_{name}"] = "did not compile"
                            state["failures"].append(f"{name} {dname} D={d} causal={causal}: {reason}")
                    state["rows"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if not k.startswith("first")}), flush=True)
                    write_report(state, args.out)
                    del q, k, v, ref, fns
                    packed = None

    run_contract("ragged", ((40, 56), (56, 40)) if args.cpu_smoke else ((272, 400), (400, 272)),
                 args.budget_s + 25, block=False)

    # 4. FP8 accuracy (PyTorch emulation, float64 on the CPU: a few seconds)
    for d in args.dims:
        for r in fp8.precision_error_table(length=512, d=d, heads=4, causal=True):
            state["fp8_accuracy"].append({"D": d, **r})
    write_report(state, args.out, echo=True)


if __name__ == "__main__":
    main()
