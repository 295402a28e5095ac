"""Chapter 06 on a GPU: the routed MoE layer with a grouped GEMM against a dense FFN of equal active FLOPs.

Run from the repository root on a machine with a CUDA GPU (exits 0 without one):

    python3 benchmarks/moe_gpu.py [--out DIR] [--tokens 16384] [--d-model 1024] [--experts 8] [--top-k 2]

Workload (the issue's): T tokens of width d, E experts of hidden width 4·d, top-k routing, bf16, forward +
backward (a sum of squares as the loss). Timed with ``triton.testing.do_bench`` (CUDA events, median):

* **dense FFN** of hidden width k·4·d: the same active FLOPs per token as the MoE layer's experts;
* **MoE layer** (``labsupport.moe.MoELayer``): router, top-k, balance loss, and on CUDA the no-sync dispatch
  ``moe_grouped`` (torch's ``grouped_mm``, one kernel per projection for all experts);
* **dispatch only, grouped**: ``moe_grouped`` on a fixed routing (no router), with the up-projection bias
  folded into the grouped matmul (the default) or a separate one-hot product (``up_bias="one_hot"``), and the
  answers combined by gathers (the default) or by ``index_add_`` (``combine="index_add"``): four variants;
* **CUDA graph**: the dense FFN's and the layer's whole forward + backward captured once in a CUDA graph and
  replayed, which removes the host's kernel launches (it needs a pass with no host synchronisation);
* with ``--compile``, both modules under ``torch.compile`` (the first call's compile time is printed);
* **fused Triton dispatch** (``moe_grouped(..., kernel="triton")``, ``labsupport.moe.triton_dispatch``): grouped
  GEMMs that gather the tokens inside their loads and scatter the answers inside their stores, forward and
  backward; timed as dispatch only and inside the layer (``MoELayer.dispatch_kernel = "triton"``), eager and as
  a CUDA graph, with its autotuned configurations recorded (the first call autotunes: warm-up covers it);
* **dispatch only, per-expert loop**: ``moe_sorted`` (boolean index + ``.tolist()`` of the counts: two
  host syncs per call, then one matmul per expert), the CPU path of the chapter.

Also the forward alone, the FLOPs, and the host syncs counted by ``torch.cuda.set_sync_debug_mode``.
``--only VARIANT ...`` times a subset (the dense FFN always), e.g. ``--only moe_layer moe_layer_triton``.
``--cpu-smoke`` runs the whole script on tiny sizes on the CPU (the Triton path under its interpreter) to
check it without a GPU; its timings mean nothing.
Writes ``DIR/moe_gpu.json`` and ``DIR/moe_gpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # runs from a plain checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def count_syncs(fn) -> int | str:
    """Host synchronisations in one call, as torch's sync-debug mode reports them (warnings)."""
    import warnings
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
            torch.cuda.synchronize()
        return sum("synchroniz" in str(w.message) for w in caught)
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


def cuda_graph(fn: Callable[[], None], holders: list) -> Callable[[], None]:
    """``fn`` (a forward + backward) captured in a CUDA graph; returns its replay.

    Warm-up runs on a side stream first (as torch's docs ask), gradients are set to None so that the
    captured backward allocates them from the graph's pool, and the capture fails loudly if ``fn`` waits
    for the host (a synchronisation is not allowed while capturing).
    """
    def clear():
        for h in holders:
            if isinstance(h, torch.Tensor):
                h.grad = None
            else:
                h.zero_grad(set_to_none=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            clear()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def gradient_gaps(x, routing, weights, moe_grouped) -> dict[str, float]:
    """Relative differences between the fused Triton path's gradients and the torch grouped path's (bf16, same dy)."""
    grads = []
    for kernel in ("torch", "triton"):
        xi = x.detach().clone().requires_grad_()
        leaves = [w.detach().clone().requires_grad_() for w in weights]
        rw = routing.weights.detach().clone().requires_grad_()
        r = type(routing)(routing.experts, rw, routing.active, routing.probs)
        y = moe_grouped(xi, r, *leaves, kernel=kernel)
        y.backward(torch.ones_like(y))
        grads.append([xi.grad, rw.grad, *(w.grad for w in leaves)])
    out = {}
    for name, a, b in zip(("x", "routing_weights", "w_up", "b_up", "w_down", "b_down"), *grads):
        out[f"triton_grad_rel_{name}"] = float((b.float() - a.float()).norm() / a.float().norm())
    out["triton_grad_rel_max"] = max(out.values())
    return out


def triton_configs() -> dict[str, str]:
    """The configurations the fused dispatch's autotuners chose, by kernel and key."""
    try:
        from labsupport.moe import triton_dispatch
        return {f"{name} {key}": str(config) for name, tuner in (("rows", triton_dispatch._rows_tuned),
                                                                 ("weight_grad", triton_dispatch._wgrad_tuned))
                for key, config in tuner.cache.items()}
    except Exception as error:  # noqa: BLE001
        return {"error": f"{type(error).__name__}: {str(error)[:200]}"}


def compiled_layer_fb(compiled, layer, x):
    """Forward + backward of a compiled MoE layer; the balancing loss is read from the eager module."""
    def run():
        y = compiled(x)
        loss = y.float().square().mean() + sum(layer.auxiliary_losses().values())
        loss.backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--experts", type=int, nargs="+", default=[8])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--profile", action="store_true",
                        help="also profile the layer's and the grouped dispatch's forward + backward (torch.profiler) "
                             "and write the top CUDA kernels to DIR/moe_gpu_profile.txt")
    parser.add_argument("--compile", action="store_true",
                        help="also time both modules under torch.compile (compiles take tens of seconds)")
    parser.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                        help="time only these variants (and the dense FFN), e.g. moe_layer moe_layer_triton "
                             "dispatch_grouped dispatch_triton; their CUDA graphs come with them")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="check the script without a GPU: tiny sizes on the CPU in float32, the Triton path "
                             "under TRITON_INTERPRET=1, no graphs or sync counts; the timings mean nothing")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("no CUDA GPU: this benchmark needs one; nothing was measured")
        return
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.tokens, args.d_model, args.experts = [40], 32, [3]
    import triton
    from triton.testing import do_bench as cuda_bench

    def do_bench(fn, warmup, rep, return_mode, grad_to_none=None):
        if cuda:
            return cuda_bench(fn, warmup=warmup, rep=rep, return_mode=return_mode, grad_to_none=grad_to_none)
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)

    from labsupport.moe import MoELayer, moe_grouped, moe_sorted
    from labsupport.moe.routing import top_k_routing

    d, k = args.d_model, args.top_k
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    info = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke run)", "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(), "grouped_mm": hasattr(F, "grouped_mm"), "d": d, "k": k}
    print("device:", info, flush=True)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    rows = []
    for n_experts in args.experts:
        for tokens in args.tokens:
            row = {"T": tokens, "E": n_experts}
            h = 4 * d
            x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
            dense = torch.nn.Sequential(torch.nn.Linear(d, k * h), torch.nn.GELU(), torch.nn.Linear(k * h, d))
            dense = dense.to(device, dtype)
            layer = MoELayer(d, n_experts, k, balance="switch").to(device, dtype)
            row["flops_fwd_dense"] = 2 * 2 * tokens * d * k * h
            row["flops_fwd_moe_experts"] = row["flops_fwd_dense"]  # k experts of width h per token

            def fb(module):
                def run():
                    y = module(x)
                    loss = y.float().square().mean()
                    if module is layer:
                        loss = loss + sum(layer.auxiliary_losses().values())
                    loss.backward()
                return run

            with torch.no_grad():
                logits = layer.router(x)
            routing = top_k_routing(logits.float(), k)
            weights = (layer.w_up, layer.b_up, layer.w_down, layer.b_down)
            # correctness: the grouped path against the per-expert loop, same routing, bf16
            with torch.no_grad():
                a = moe_grouped(x, routing, *weights).float()
                b = moe_sorted(x, routing, *weights).float()
                row["grouped_vs_sorted_rel"] = float((a - b).norm() / b.norm())
                try:
                    c = moe_grouped(x, routing, *weights, kernel="triton").float()
                    row["triton_vs_sorted_rel"] = float((c - b).norm() / b.norm())
                except Exception as error:  # noqa: BLE001
                    row["error_triton_forward"] = f"{type(error).__name__}: {str(error)[:200]}"
                counts = torch.bincount(routing.experts.reshape(-1), minlength=n_experts)
                row["busiest_over_fair"] = float(counts.max()) / (tokens * k / n_experts)
            try:  # gradients of the fused path against the torch grouped path, bf16, same dy
                row.update(gradient_gaps(x, routing, weights, moe_grouped))
            except Exception as error:  # noqa: BLE001
                row["error_triton_gradients"] = f"{type(error).__name__}: {str(error)[:200]}"

            def dispatch(fn):
                def run():
                    y = fn(x, routing, *weights)
                    y.float().square().mean().backward()
                return run

            def grouped_as(up_bias, combine):
                return lambda *a: moe_grouped(*a, up_bias=up_bias, combine=combine)

            def layer_triton():
                layer.dispatch_kernel = "triton"
                try:
                    fb(layer)()
                finally:
                    layer.dispatch_kernel = "torch"

            variants = {"dense": fb(dense), "moe_layer": fb(layer), "moe_layer_triton": layer_triton,
                        "dispatch_triton": dispatch(lambda *a: moe_grouped(*a, kernel="triton")),
                        "dispatch_grouped": dispatch(moe_grouped),
                        "dispatch_grouped_onehot": dispatch(grouped_as("one_hot", "gather")),
                        "dispatch_grouped_indexadd": dispatch(grouped_as("folded", "index_add")),
                        "dispatch_grouped_onehot_indexadd": dispatch(grouped_as("one_hot", "index_add")),
                        "dispatch_loop": dispatch(moe_sorted)}
            if args.only:
                variants = {name: fn for name, fn in variants.items() if name in args.only or name == "dense"}
            graphs = {}
            for name in [n for n in ("dense", "moe_layer", "moe_layer_triton") if n in variants and cuda]:
                try:
                    graphs[f"{name}_graph"] = cuda_graph(variants[name], [x, dense, layer])
                except Exception as error:  # noqa: BLE001
                    row[f"error_{name}_graph"] = f"{type(error).__name__}: {str(error)[:200]}"
            if args.compile and cuda:
                for name, module in (("dense", dense), ("moe_layer", layer)):
                    compiled = torch.compile(module)
                    start = time.perf_counter()
                    try:
                        fn = fb(compiled) if module is dense else compiled_layer_fb(compiled, layer, x)
                        fn()
                        torch.cuda.synchronize()
                        row[f"compile_s_{name}"] = time.perf_counter() - start
                        variants[f"{name}_compiled"] = fn
                    except Exception as error:  # noqa: BLE001
                        row[f"error_{name}_compiled"] = f"{type(error).__name__}: {str(error)[:200]}"
            for name, fn in [*variants.items(), *graphs.items()]:
                try:
                    grads = [] if name.endswith("_graph") else [x]  # a graph's gradients live in its own pool
                    row[f"fb_ms_{name}"] = do_bench(fn, warmup=10, rep=50, return_mode="median", grad_to_none=grads)
                    if not name.endswith("_graph") and cuda:
                        row[f"syncs_{name}"] = count_syncs(fn)
                except Exception as error:  # noqa: BLE001
                    row[f"fb_ms_{name}"] = None
                    row[f"error_{name}"] = f"{type(error).__name__}: {str(error)[:200]}"
            with torch.no_grad():
                for name, fn in {"dense": lambda: dense(x), "moe_layer": lambda: layer(x),
                                 "dispatch_grouped": lambda: moe_grouped(x, routing, *weights),
                                 "dispatch_triton": lambda: moe_grouped(x, routing, *weights, kernel="triton"),
                                 "dispatch_loop": lambda: moe_sorted(x, routing, *weights)}.items():
                    if name not in variants:
                        continue
                    try:
                        row[f"fwd_ms_{name}"] = do_bench(fn, warmup=10, rep=50, return_mode="median")
                    except Exception as error:  # noqa: BLE001
                        row[f"fwd_error_{name}"] = f"{type(error).__name__}: {str(error)[:200]}"
            if args.profile and cuda:
                from torch.profiler import ProfilerActivity, profile

                for name in [n for n in ("moe_layer", "moe_layer_triton", "dispatch_grouped", "dense")
                             if n in variants]:
                    fn = variants[name]
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize()
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(5):
                            fn()
                        torch.cuda.synchronize()
                    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=18,
                                                      max_name_column_width=60)
                    text = f"\n## {name}, T={tokens}, E={n_experts}: 5 forward + backward passes\n{table}\n"
                    print(text, flush=True)
                    with open(os.path.join(args.out, "moe_gpu_profile.txt"), "a") as handle:
                        handle.write(text)
            if row.get("fb_ms_dense") and row.get("fb_ms_moe_layer"):
                row["moe_over_dense_fb"] = row["fb_ms_moe_layer"] / row["fb_ms_dense"]
            if row.get("fb_ms_dense") and row.get("fb_ms_moe_layer_triton"):
                row["moe_triton_over_dense_fb"] = row["fb_ms_moe_layer_triton"] / row["fb_ms_dense"]
            if row.get("fb_ms_dense_graph") and row.get("fb_ms_moe_layer_triton_graph"):
                row["moe_triton_over_dense_fb_graph"] = row["fb_ms_moe_layer_triton_graph"] / row["fb_ms_dense_graph"]
            row["triton_configs"] = triton_configs()
            for mode in ("graph", "compiled"):
                if row.get(f"fb_ms_dense_{mode}") and row.get(f"fb_ms_moe_layer_{mode}"):
                    row[f"moe_over_dense_fb_{mode}"] = row[f"fb_ms_moe_layer_{mode}"] / row[f"fb_ms_dense_{mode}"]
                if row.get("fb_ms_dense") and row.get(f"fb_ms_moe_layer_{mode}"):
                    row[f"moe_{mode}_over_dense_eager_fb"] = row[f"fb_ms_moe_layer_{mode}"] / row["fb_ms_dense"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del x, dense, layer
            if cuda:
                torch.cuda.empty_cache()

    def f(v):
        return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    def e(v):
        return "—" if v is None else f"{v:.1e}"
    lines = [f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}; d={d}, top-{k}, expert "
             f"hidden 4·d, bf16; ms, median of do_bench; dense FFN hidden k·4·d (equal active FLOPs).", "",
             "| T | E | dense fwd+bwd | MoE layer fwd+bwd | MoE / dense | grouped dispatch | loop dispatch | "
             "dense fwd | MoE fwd | syncs (layer, grouped, loop) | grouped vs loop rel. diff | busiest/fair |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['E']} | {f(r.get('fb_ms_dense'))} | {f(r.get('fb_ms_moe_layer'))} | "
                     f"{f(r.get('moe_over_dense_fb'))} | {f(r.get('fb_ms_dispatch_grouped'))} | "
                     f"{f(r.get('fb_ms_dispatch_loop'))} | {f(r.get('fwd_ms_dense'))} | {f(r.get('fwd_ms_moe_layer'))} | "
                     f"{r.get('syncs_moe_layer')}, {r.get('syncs_dispatch_grouped')}, {r.get('syncs_dispatch_loop')} | "
                     f"{r['grouped_vs_sorted_rel']:.1e} | {r['busiest_over_fair']:.2f} |")
    lines += ["", "| T | E | grouped dispatch: folded+gather / one-hot+gather / folded+index_add / one-hot+index_add | dense, MoE layer as CUDA graphs | MoE / dense "
              "(graphs) | MoE graph / dense eager | dense, MoE compiled (compile s) | MoE / dense (compiled) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['E']} | {f(r.get('fb_ms_dispatch_grouped'))} / "
                     f"{f(r.get('fb_ms_dispatch_grouped_onehot'))} / {f(r.get('fb_ms_dispatch_grouped_indexadd'))} / "
                     f"{f(r.get('fb_ms_dispatch_grouped_onehot_indexadd'))} | {f(r.get('fb_ms_dense_graph'))}, "
                     f"{f(r.get('fb_ms_moe_layer_graph'))} | {f(r.get('moe_over_dense_fb_graph'))} | "
                     f"{f(r.get('moe_graph_over_dense_eager_fb'))} | {f(r.get('fb_ms_dense_compiled'))}, "
                     f"{f(r.get('fb_ms_moe_layer_compiled'))} ({f(r.get('compile_s_dense'))}, "
                     f"{f(r.get('compile_s_moe_layer'))}) | {f(r.get('moe_over_dense_fb_compiled'))} |")
    lines += ["", "Fused Triton dispatch (gather in the loads, scatter in the stores; labsupport.moe.triton_dispatch):",
              "",
              "| T | E | MoE layer fwd+bwd, Triton | MoE (Triton) / dense | as CUDA graphs: MoE (Triton) / dense | "
              "dispatch fwd+bwd: Triton / torch grouped | dispatch fwd: Triton / torch grouped | syncs (layer, "
              "dispatch) | fwd rel. diff vs loop | grad rel. diff vs torch grouped (max over x, weights, routing) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['E']} | {f(r.get('fb_ms_moe_layer_triton'))} | "
                     f"{f(r.get('moe_triton_over_dense_fb'))} | {f(r.get('moe_triton_over_dense_fb_graph'))} | "
                     f"{f(r.get('fb_ms_dispatch_triton'))} / {f(r.get('fb_ms_dispatch_grouped'))} | "
                     f"{f(r.get('fwd_ms_dispatch_triton'))} / {f(r.get('fwd_ms_dispatch_grouped'))} | "
                     f"{r.get('syncs_moe_layer_triton')}, {r.get('syncs_dispatch_triton')} | "
                     f"{e(r.get('triton_vs_sorted_rel'))} | {e(r.get('triton_grad_rel_max'))} |")
    errors = sorted({f"{k}: {v}" for r in rows for k, v in r.items() if "error" in k})
    lines += ["", "Did not run:", *[f"- {e}" for e in errors]]
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(args.out, "moe_gpu.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(args.out, "moe_gpu.json"), "w") as fh:
        json.dump({"info": info, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
