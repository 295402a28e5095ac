"""Chapter 03 on a GPU: the course's chunkwise (gated) delta rule against flash-linear-attention's chunk kernels.

Run from the repository root on a machine with a CUDA GPU (exits 0 without one):

    python3 benchmarks/linear_attention_gpu.py [--out DIR] [--lengths 4096 16384] [--batch 2]
        [--eager-backward auto|on|off] [--fla-backward on|off] [--variants NAME ...] [--rep-ms 60]

Workload (the issue's): H = 16 heads, D_k = D_v = 128, bf16 inputs, keys L2-normalised, β = sigmoid(·),
gated variant with log-decays ``logsigmoid(·)``, no 1/√d scaling (the course's convention; fla gets
``scale=1``). For T in ``--lengths`` it times the forward pass, median of ``triton.testing.do_bench``:

* **fla**: ``fla.ops.delta_rule.chunk_delta_rule`` and ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``
  (Triton, fused chunk kernels; an anchor carried to the device as a wheel, not a dependency of the course;
  without it the course's rows are still measured, with no ratio);
* **course, eager**: ``labsupport.linear_attention.reference.delta_rule_chunkwise`` (the WY/UT chunkwise form the
  chapter derives: batched matrix products inside chunks of 64, a Python loop over chunks, float32 inside);
* **course, CUDA graph**: the same function captured once in a CUDA graph and replayed (input validation,
  which syncs with the host, runs once before capture and is switched off inside the graph);
* **course, Triton state pass** (and variants): ``labsupport.linear_attention.triton_delta`` — one kernel that
  prepares every chunk at once (decays, ``(I + A)⁻¹`` by blocks, ``W``, ``U``, scores), then ONE kernel that
  walks the chunks with the state on chip. The first variant (the library's defaults) always runs, also without
  the value check of ``log_decay`` (``check_values=False``: the check costs two host syncs per call); the
  others change warps, the value-block width, the dtype of the intermediates, whether the output is computed
  inside the pass, and the inverse. Each is guarded (a failure is recorded as ``failed: <error>`` in the
  table, the run goes on), records its kernels' registers, spills and shared memory, and has its preparation
  kernel timed alone (the state pass is the rest). The first is also timed captured in a CUDA graph.

Correctness: every output against a float64 evaluation of the course's chunkwise form on the same inputs
(relative Frobenius error); bf16 operands land near 1e-2, float32 arithmetic far below. Also the forward +
backward time of fla (``--fla-backward``) and of the eager course form (``--eager-backward``; ``auto``: only for
T ≤ 4096, since at 16K one call takes about half a second).

Time: Triton compiles every kernel on first use, and fla autotunes its kernels there: in fla 0.6.0 the forward
alone lists about a hundred configurations across its kernels (the state pass 12, the output kernel about 30,
the triangular solve 16 per variant, ...), each compiled and timed for about 0.1 s, and the backward more;
the keys hold the head sizes, not T, so all of it lands on the first length. That, not the measurements, is
the likely reason the first version of this script overran 90 s at T = 4096 (the per-step seconds below will
say).
Each row records the wall seconds of each step (``seconds``). The essential steps always run (the float64
reference, fla's forward, the first Triton variant, or its fallbacks if it fails); the optional ones (other
variants, CUDA graphs, the eager form, backward passes) are skipped once a length has used ``--budget-s``
seconds (80 by default; the first row of a length stops its optional steps at half of it; fla's first call,
which autotunes, is not charged) and recorded as skipped. The results are rewritten after each row's forward and backward
(``DIR/linear_attention_gpu.json`` and ``.md``), so a time limit loses at most the step in progress.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # runs from a plain checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

H, D = 16, 128  # the workload; --cpu-smoke shrinks them

# name → keyword arguments of delta_rule_chunkwise_triton (the first is the library's default settings).
# Each variant is compiled on first use (a few seconds per kernel, twice: gated and not), so the default run
# times the first seven, most promising first (the H100 run at 16K: the preparation kernel spills registers and
# takes over half the time; without the scores it spills less); the others are for --variants all.
VARIANTS = {
    # the column-piece preparation (the default since the fifth GPU session: 32 columns, 1 warp)
    "Triton, preparation in pieces of 32 columns, 1 warp": {"prep_columns": 32, "prep_warps": 1},
    "Triton, preparation in pieces of 16 columns, 1 warp": {"prep_columns": 16, "prep_warps": 1},
    "Triton state pass": {"prep_columns": None, "prep_warps": 4},  # whole rows: the default until then
    "Triton, preparation in pieces of 16 columns, 2 warps": {"prep_columns": 16, "prep_warps": 2},
    "Triton, preparation in pieces of 32 columns, 2 warps": {"prep_columns": 32, "prep_warps": 2},
    "Triton, preparation in pieces of 16 columns, 4 warps": {"prep_columns": 16, "prep_warps": 4},
    "Triton, preparation in pieces of 32 columns, 4 warps": {"prep_columns": 32, "prep_warps": 4},
    "Triton, preparation in pieces of 16 columns, 4 warps, bf16 intermediates": {
        "prep_columns": 16, "prep_warps": 4, "intermediate_dtype": torch.bfloat16},
    "Triton, preparation in pieces of 16 columns, 4 warps, output kernel apart, bf16 intermediates": {
        "prep_columns": 16, "prep_warps": 4, "fused_output": False, "intermediate_dtype": torch.bfloat16},
    # the whole-row preparation
    "Triton, output kernel apart, bf16 intermediates": {
        "prep_columns": None, "fused_output": False, "intermediate_dtype": torch.bfloat16},
    "Triton, output kernel apart, bf16 intermediates, preparation in 8 warps": {
        "prep_columns": None, "fused_output": False, "intermediate_dtype": torch.bfloat16, "prep_warps": 8},
    "Triton, output kernel apart, preparation in 8 warps": {"prep_columns": None, "fused_output": False,
                                                            "prep_warps": 8},
    "Triton, preparation in 8 warps": {"prep_columns": None, "prep_warps": 8},
    "Triton, 8 warps (both kernels)": {"prep_columns": None, "num_warps": 8, "prep_warps": 8},
    "Triton, BV=16 (two programs per SM)": {"prep_columns": None, "block_v": 16},
    "Triton, bf16 intermediates, 8 warps": {"prep_columns": None, "intermediate_dtype": torch.bfloat16,
                                            "num_warps": 8, "prep_warps": 8},
    "Triton, bf16 intermediates": {"prep_columns": None, "intermediate_dtype": torch.bfloat16},
    "Triton, bf16 intermediates, BV=64, 8 warps": {"prep_columns": None, "intermediate_dtype": torch.bfloat16,
                                                   "block_v": 64, "num_warps": 8, "prep_warps": 8},
    "Triton, inverse by doubling on 64 × 64": {"inverse": "doubling"},
    "Triton, inverse in tf32x3": {"prep_columns": None, "inverse_precision": "tf32x3"},
}
DEFAULT_VARIANTS = list(VARIANTS)[:5]
# tried in turn when the first variant fails (a compile or launch error on this GPU)
FALLBACKS = [("Triton, inverse by doubling on 64 × 64", {"inverse": "doubling"}),
             ("Triton, float32 products (no tensor cores)", {"precision": "ieee", "inverse": "doubling"})]


def make_inputs(batch: int, length: int, gen: torch.Generator) -> dict:
    """Course layout (B, H, T, D) in bf16; β in (0, 1); log-decays ≤ 0 near Gated DeltaNet's range."""
    def randn(*shape):
        return torch.randn(*shape, device=gen.device, generator=gen)
    q = randn(batch, H, length, D).bfloat16()
    k = F.normalize(randn(batch, H, length, D), dim=-1).bfloat16()
    v = randn(batch, H, length, D).bfloat16()
    beta = torch.sigmoid(randn(batch, H, length)).bfloat16()
    log_decay = F.logsigmoid(randn(batch, H, length) + 4.0).bfloat16()  # decays mostly in 0.9-1.0
    return {"q": q, "k": k, "v": v, "beta": beta, "log_decay": log_decay}


def to_fla(t: torch.Tensor) -> torch.Tensor:
    """(B, H, T, ...) → (B, T, H, ...), contiguous, as fla expects."""
    return t.transpose(1, 2).contiguous()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def failed(error: BaseException) -> str:
    return f"failed: {type(error).__name__}: {' '.join(str(error).split())[:240]}"


def graph_of(fn):
    """``fn`` captured in a CUDA graph (after two warm-up calls on a side stream): ``(replay, output)``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


class Results:
    """Rows of one run, rewritten to ``DIR/linear_attention_gpu.{json,md}`` after every row."""

    def __init__(self, out_dir: str, info: dict) -> None:
        self.out_dir, self.info, self.rows = out_dir, info, []

    def add(self, row: dict) -> None:
        """Append ``row`` (it may still grow: call :meth:`write` again) and write the files."""
        timed = [m for m in row["forward"] if m["name"].startswith("course, Triton") and m.get("ms")
                 and "preparation kernel only" not in m["name"]]
        if timed:
            best = min(timed, key=lambda m: m["ms"])
            row["best_triton"] = {"name": best["name"], "ms": best["ms"], "over_fla": best.get("over_fla"),
                                  "err": best.get("err")}
        self.rows.append(row)
        self.write()

    def table(self) -> str:
        i = self.info
        lines = [f"Device: {i['device']}; torch {i['torch']}, triton {i['triton']}, fla {i['fla']}. "
                 f"B={i['B']}, H={i['H']}, D_k=D_v={i['D']}, bf16 inputs; ms = median of do_bench.", "",
                 "Forward:", "", "| T | gated | method | ms | ÷ fla | rel. error vs float64 | of which preparation kernel, ms |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            for m in r["forward"]:
                ms = m.get("error") or f"{m['ms']:.3f}"
                ratio = "—" if m.get("over_fla") is None else f"{m['over_fla']:.2f}×"
                err = "—" if m.get("err") is None else f"{m['err']:.1e}"
                prep = m.get("prep_ms")
                prep = "—" if prep is None else (prep if isinstance(prep, str) else f"{prep:.3f}")
                lines.append(f"| {r['T']} | {'yes' if r['gated'] else 'no'} | {m['name']} | {ms} | {ratio} | {err} | "
                             f"{prep} |")
        lines += ["", "Best course Triton forward per row:", ""]
        for r in self.rows:
            b = r.get("best_triton")
            if b:
                ratio = "—" if b.get("over_fla") is None else f"{b['over_fla']:.2f}× fla"
                lines.append(f"- T={r['T']}, gated={'yes' if r['gated'] else 'no'}: {b['name']}, {b['ms']:.3f} ms, "
                             f"{ratio}")
        lines += ["", "Kernel resources (registers per thread, spilled registers, shared memory bytes), first length:", ""]
        for r in self.rows[:2]:
            for m in r["forward"]:
                if isinstance(m.get("kernels"), dict) and m["kernels"]:
                    parts = "; ".join(f"{k} {v['registers']}/{v['spills']}/{v['shared_bytes']}"
                                      for k, v in m["kernels"].items())
                    lines.append(f"- gated={'yes' if r['gated'] else 'no'}, {m['name']}: {parts}")
        lines += ["", "Forward + backward (gradients of q, k, v):", "", "| T | gated | method | ms |", "|---|---|---|---|"]
        for r in self.rows:
            for m in r["backward"]:
                ms = m.get("error") or f"{m['ms']:.3f}"
                lines.append(f"| {r['T']} | {'yes' if r['gated'] else 'no'} | {m['name']} | {ms} |")
        lines += ["", "Wall seconds per step (compiles and autotuning included):", ""]
        for r in self.rows:
            steps = ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items())
            lines.append(f"- T={r['T']}, gated={'yes' if r['gated'] else 'no'}: {steps}")
        return "\n".join(lines)

    def write(self) -> None:
        with open(os.path.join(self.out_dir, "linear_attention_gpu.md"), "w") as fh:
            fh.write(self.table() + "\n")
        with open(os.path.join(self.out_dir, "linear_attention_gpu.json"), "w") as fh:
            json.dump({"info": self.info, "rows": self.rows}, fh, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--eager-backward", choices=("auto", "on", "off"), default="auto",
                        help="time the eager course form's forward + backward (auto: only for T <= 4096)")
    parser.add_argument("--fla-backward", choices=("on", "off"), default="on")
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, metavar="NAME",
                        help=f"Triton variants to time (default the first five; 'all' for every one): {list(VARIANTS)}")
    parser.add_argument("--rep-ms", type=float, default=60.0, help="do_bench's time budget per timing, ms")
    parser.add_argument("--budget-s", type=float, default=80.0,
                        help="seconds per length after which optional steps (variants past the first, CUDA graphs, "
                             "the eager form, backward passes) are skipped; fla and the first variant always run")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every step once on the CPU under TRITON_INTERPRET=1 with tiny shapes (a test of "
                             "the script, not a measurement; fla is replaced by the course's reference if absent)")
    args = parser.parse_args()
    global H, D
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        H, D = 2, 16
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one; nothing was measured")
        return
    else:
        device = torch.device("cuda")
    if args.variants == ["all"]:
        args.variants = list(VARIANTS)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    try:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        import fla
        fla_version = getattr(fla, "__version__", "?")
    except ImportError as error:
        print(f"flash-linear-attention is not installed ({error}): the course's rows are measured without the anchor")
        chunk_delta_rule = chunk_gated_delta_rule = None
        fla_version = "not installed"
    import triton
    from triton.testing import do_bench

    from labsupport.linear_attention import reference as ref
    from labsupport.linear_attention import triton_delta

    if args.cpu_smoke and chunk_delta_rule is None:  # stand-ins with fla's layout, to run the script's own code
        def chunk_delta_rule(q, k, v, beta, scale):
            o = ref.delta_rule_chunkwise(*(t.transpose(1, 2) for t in (q, k, v, beta)))
            return o.transpose(1, 2), None

        def chunk_gated_delta_rule(q, k, v, g, beta, scale):
            o = ref.delta_rule_chunkwise(*(t.transpose(1, 2) for t in (q, k, v, beta, g)))
            return o.transpose(1, 2), None

        fla_version = "stand-in (CPU smoke test)"

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bench(fn, slow=False):
        if device.type == "cpu":  # the smoke test: one call, wall clock
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)
        return do_bench(fn, warmup=5 if slow else 20, rep=args.rep_ms, return_mode="median")

    name_of_device = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU smoke test ({platform.machine()})"
    info = {"device": name_of_device, "torch": torch.__version__, "triton": triton.__version__,
            "fla": fla_version, "python": platform.python_version(), "B": args.batch, "H": H, "D": D}
    print("device:", info, flush=True)
    os.makedirs(args.out, exist_ok=True)
    results = Results(args.out, info)
    gen = torch.Generator(device=device).manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    lengths = [70] if args.cpu_smoke else args.lengths
    for length in lengths:
        start_of_length = time.perf_counter()
        for gated in (False, True):
            # optional steps of the first row stop at half the budget, those of the second at all of it
            deadline = start_of_length + args.budget_s * (0.5 if not gated else 1.0)
            x = make_inputs(args.batch, length, gen)
            row = {"T": length, "gated": gated, "forward": [], "backward": [], "seconds": {}}
            decay = x["log_decay"] if gated else None
            clock = [time.perf_counter()]

            def lap(name):
                now = time.perf_counter()
                row["seconds"][name] = round(now - clock[0], 2)
                clock[0] = now

            def skipped(name, table="forward"):
                """Past this length's time budget an optional step is recorded as skipped, not run."""
                if time.perf_counter() < deadline:
                    return False
                row[table].append({"name": name, "error": f"skipped: past the {args.budget_s:.0f} s budget of T={length}"})
                return True

            def record(name, fn, slow=False, check=True):
                """Time ``fn`` (forward): error against ``exact``, ms, ratio to fla; a failure is recorded."""
                entry = {"name": name}
                try:
                    with torch.no_grad():
                        if check:
                            entry["err"] = rel_err(fn(), exact)
                        entry["ms"] = bench(fn, slow)
                except Exception as error:  # noqa: BLE001 - recorded in the table, the run goes on
                    entry["error"] = failed(error)
                    sync()
                fla_ms = next((m.get("ms") for m in row["forward"] if m["name"] == "fla"), None)
                if fla_ms and entry.get("ms"):
                    entry["over_fla"] = entry["ms"] / fla_ms
                row["forward"].append(entry)
                lap(name)
                return entry

            with torch.no_grad():
                exact = ref.delta_rule_chunkwise(*(x[n].double() for n in ("q", "k", "v", "beta")),
                                                 None if decay is None else decay.double(), chunk_size=64)
            lap("float64 reference")

            fq, fk, fv, fb, fg = (to_fla(x[n]) for n in ("q", "k", "v", "beta", "log_decay"))

            def fla_fwd():
                if gated:
                    return chunk_gated_delta_rule(fq, fk, fv, fg, fb, scale=1.0)[0].transpose(1, 2)
                return chunk_delta_rule(fq, fk, fv, fb, scale=1.0)[0].transpose(1, 2)

            if chunk_delta_rule is not None:
                before = time.perf_counter()
                record("fla", fla_fwd)
                deadline += time.perf_counter() - before  # fla's autotuning is not charged to the budget

            def prep_time(entry, settings):
                """The variant's preparation kernel alone, in ms (the state pass is the rest)."""
                kw = {"chunk": 64, "precision": settings.get("precision", "tf32"),
                      "inverse_precision": settings.get("inverse_precision", settings.get("precision", "tf32")),
                      "intermediate_dtype": settings.get("intermediate_dtype", torch.float32),
                      "store_scores": settings.get("fused_output", True),
                      "inverse": settings.get("inverse", "blocked"), "prep_columns": settings.get("prep_columns", 32)}
                if kw["inverse"] != "blocked":
                    kw["prep_columns"] = None
                kw["prep_warps"] = settings.get("prep_warps", 4 if kw["prep_columns"] is None else 1)
                try:
                    with torch.no_grad():
                        entry["prep_ms"] = bench(lambda: triton_delta._prepare(
                            x["q"], x["k"], x["v"], x["beta"], decay, **kw))
                except Exception as error:  # noqa: BLE001
                    entry["prep_ms"] = failed(error)
                    sync()

            def triton_fn(settings):
                return lambda: triton_delta.delta_rule_chunkwise_triton(
                    x["q"], x["k"], x["v"], x["beta"], decay, chunk_size=64, **settings)

            # essential: the first variant (and, if it fails, the fallbacks in turn until one runs)
            chosen = [(name, VARIANTS[name]) for name in args.variants]
            working = None
            for name, settings in chosen[:1] + (FALLBACKS if chosen else []):
                entry = record(f"course, {name}", triton_fn(settings))
                try:  # registers, spills and shared memory of its kernels (from the compiled kernels)
                    entry["kernels"] = triton_delta.last_kernel_resources()
                except Exception as error:  # noqa: BLE001
                    entry["kernels"] = failed(error)
                if entry.get("ms"):
                    working = (name, settings)
                    prep_time(entry, settings)
                    # the same kernels without the value check of log_decay (two host syncs per call)
                    record(f"course, {name}, values unchecked", triton_fn({**settings, "check_values": False}))
                    break
            # optional, while the time budget of this length lasts
            for name, settings in chosen[1:]:
                if not skipped(f"course, {name}"):
                    entry = record(f"course, {name}", triton_fn(settings))
                    entry["kernels"] = triton_delta.last_kernel_resources()
                    if entry.get("ms"):
                        prep_time(entry, settings)
            if working is not None:  # the first working variant in a CUDA graph
                name, settings = working
                if not skipped(f"course, {name}, CUDA graph"):
                    try:
                        graph, graph_out = graph_of(triton_fn({**settings, "check_values": False}))
                        entry = record(f"course, {name}, CUDA graph", graph.replay, check=False)
                        entry["err"] = rel_err(graph_out, exact)
                        del graph, graph_out
                    except Exception as error:  # noqa: BLE001
                        row["forward"].append({"name": f"course, {name}, CUDA graph", "error": failed(error)})
                        lap(f"course, {name}, CUDA graph")

            def course():
                return ref.delta_rule_chunkwise(x["q"], x["k"], x["v"], x["beta"], decay, chunk_size=64)

            if not skipped("course, eager"):
                record("course, eager", course, slow=True)
            if not skipped("course, eager, CUDA graph"):
                # validation off inside the capture (it syncs with the host)
                saved = (ref._require_beta, ref._require_log_decay)
                try:
                    ref._require_beta = lambda beta, k, name="beta": beta  # type: ignore[assignment]
                    ref._require_log_decay = lambda d, k, vector_ok=False: d  # type: ignore[assignment]
                    graph, _ = graph_of(course)
                    record("course, eager, CUDA graph", graph.replay, slow=True, check=False)
                    del graph
                except Exception as error:  # noqa: BLE001
                    row["forward"].append({"name": "course, eager, CUDA graph", "error": failed(error)})
                    lap("course, eager, CUDA graph")
                finally:
                    ref._require_beta, ref._require_log_decay = saved

            # forward + backward
            def timed_backward(name, fn):
                try:
                    row["backward"].append({"name": name, "ms": bench(fn, slow=True)})
                except Exception as error:  # noqa: BLE001
                    row["backward"].append({"name": name, "error": failed(error)})
                    sync()
                lap(f"{name} fwd+bwd")

            leaves = {n: x[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "beta", "log_decay")}
            dout = torch.randn(args.batch, H, length, D, device=device, generator=gen).bfloat16()
            results.add(row)  # the forward numbers are on disk before the backward passes start
            if chunk_delta_rule is not None and args.fla_backward == "on" and not skipped("fla", "backward"):
                fl = {n: to_fla(t).detach().requires_grad_() for n, t in leaves.items()}
                dout_fla = to_fla(dout)

                def fla_fb():
                    if gated:
                        o = chunk_gated_delta_rule(fl["q"], fl["k"], fl["v"], fl["log_decay"], fl["beta"], scale=1.0)[0]
                    else:
                        o = chunk_delta_rule(fl["q"], fl["k"], fl["v"], fl["beta"], scale=1.0)[0]
                    return torch.autograd.grad(o, [fl[n] for n in ("q", "k", "v")], dout_fla)

                timed_backward("fla", fla_fb)
            if (args.eager_backward == "on" or (args.eager_backward == "auto" and length <= 4096)) \
                    and not skipped("course, eager", "backward"):
                def course_fb():
                    o = ref.delta_rule_chunkwise(leaves["q"], leaves["k"], leaves["v"], leaves["beta"],
                                                 leaves["log_decay"] if gated else None, chunk_size=64)
                    return torch.autograd.grad(o, [leaves[n] for n in ("q", "k", "v")], dout)

                timed_backward("course, eager", course_fb)
            results.write()
            print(json.dumps(row), flush=True)
            del x, exact, leaves, dout
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\n" + results.table())


if __name__ == "__main__":
    main()
