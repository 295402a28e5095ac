"""Chapter 03 on a GPU: the course's chunkwise (gated) delta rule against flash-linear-attention's chunk kernels.

Run from the repository root on a machine with a CUDA GPU (exits 0 without one, or without ``fla``):

    python3 benchmarks/linear_attention_gpu.py [--out DIR] [--lengths 4096 16384] [--batch 2]

Workload (the issue's): H = 16 heads, D_k = D_v = 128, bf16 inputs, keys L2-normalised, β = sigmoid(·),
gated variant with log-decays ``logsigmoid(·)``, no 1/√d scaling (the course's convention; fla gets
``scale=1``). For T in ``--lengths`` it times the forward pass, median of ``triton.testing.do_bench``:

* **fla**: ``fla.ops.delta_rule.chunk_delta_rule`` and ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``
  (Triton, fused chunk kernels; an anchor carried to the device as a wheel, not a dependency of the course);
* **course, eager**: ``labsupport.linear_attention.reference.delta_rule_chunkwise`` (the WY/UT chunkwise form the
  chapter derives: batched matrix products inside chunks of 64, a Python loop over chunks, float32 inside);
* **course, CUDA graph**: the same function captured once in a CUDA graph and replayed, which removes the
  kernel-launch overhead of the chunk loop. Input validation syncs with the host (it checks β and the
  decays on the device), so it runs once before capture and is switched off inside the graph.

Correctness: every output against a float64 evaluation of the course's chunkwise form on the same inputs
(relative Frobenius error); bf16 operands land near 1e-2, float32 arithmetic far below. Also the forward +
backward time of fla and of the eager course form (autograd). Writes ``DIR/linear_attention_gpu.json`` and
``DIR/linear_attention_gpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # runs from a plain checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

H, D = 16, 128


def make_inputs(batch: int, length: int, gen: torch.Generator) -> dict:
    """Course layout (B, H, T, D) in bf16; β in (0, 1); log-decays ≤ 0 near Gated DeltaNet's range."""
    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one; nothing was measured")
        return
    try:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        import fla
    except ImportError as error:
        print(f"flash-linear-attention is not installed ({error}); it is the anchor here, so nothing was measured")
        return
    import triton
    from triton.testing import do_bench

    from labsupport.linear_attention import reference as ref

    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "fla": getattr(fla, "__version__", "?"), "python": platform.python_version(), "B": args.batch,
            "H": H, "D": D}
    print("device:", info, flush=True)
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for length in args.lengths:
        for gated in (False, True):
            x = make_inputs(args.batch, length, gen)
            row = {"T": length, "gated": gated}
            decay = x["log_decay"] if gated else None

            def course():
                return ref.delta_rule_chunkwise(x["q"], x["k"], x["v"], x["beta"], decay, chunk_size=64)

            fq, fk, fv, fb, fg = (to_fla(x[n]) for n in ("q", "k", "v", "beta", "log_decay"))

            def fla_fwd():
                if gated:
                    return chunk_gated_delta_rule(fq, fk, fv, fg, fb, scale=1.0)[0]
                return chunk_delta_rule(fq, fk, fv, fb, scale=1.0)[0]

            with torch.no_grad():
                exact = ref.delta_rule_chunkwise(*(x[n].double() for n in ("q", "k", "v", "beta")),
                                                 None if decay is None else decay.double(), chunk_size=64)
                out_course = course()
                out_fla = fla_fwd().transpose(1, 2)
                row["err_course"] = rel_err(out_course, exact)
                row["err_fla"] = rel_err(out_fla, exact)
                row["course_vs_fla"] = rel_err(out_course, out_fla.double())
                del exact, out_course, out_fla
                row["fwd_ms_fla"] = do_bench(fla_fwd, warmup=25, rep=100, return_mode="median")
                row["fwd_ms_course_eager"] = do_bench(course, warmup=5, rep=50, return_mode="median")
                # CUDA graph: validation off inside the capture (it syncs with the host to check the values)
                saved = (ref._require_beta, ref._require_log_decay)
                try:
                    ref._require_beta = lambda beta, k, name="beta": beta  # type: ignore[assignment]
                    ref._require_log_decay = lambda d, k, vector_ok=False: d  # type: ignore[assignment]
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        for _ in range(2):
                            course()
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        graph_out = course()
                    graph.replay()
                    torch.cuda.synchronize()
                    row["err_course_graph"] = rel_err(graph_out, course().double())
                    row["fwd_ms_course_graph"] = do_bench(graph.replay, warmup=5, rep=50, return_mode="median")
                    del graph, graph_out
                except Exception as error:  # noqa: BLE001 - informative: the eager number still stands
                    row["graph_error"] = f"{type(error).__name__}: {str(error)[:200]}"
                finally:
                    ref._require_beta, ref._require_log_decay = saved
            # forward + backward
            try:
                leaves = {n: x[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "beta", "log_decay")}
                fl = {n: to_fla(t).detach().requires_grad_() for n, t in leaves.items()}
                dout = torch.randn(args.batch, H, length, D, device="cuda", generator=gen).bfloat16()
                dout_fla = to_fla(dout)

                def course_fb():
                    o = ref.delta_rule_chunkwise(leaves["q"], leaves["k"], leaves["v"], leaves["beta"],
                                                 leaves["log_decay"] if gated else None, chunk_size=64)
                    return torch.autograd.grad(o, [leaves[n] for n in ("q", "k", "v")], dout)

                def fla_fb():
                    if gated:
                        o = chunk_gated_delta_rule(fl["q"], fl["k"], fl["v"], fl["log_decay"], fl["beta"], scale=1.0)[0]
                    else:
                        o = chunk_delta_rule(fl["q"], fl["k"], fl["v"], fl["beta"], scale=1.0)[0]
                    return torch.autograd.grad(o, [fl[n] for n in ("q", "k", "v")], dout_fla)

                row["fb_ms_fla"] = do_bench(fla_fb, warmup=10, rep=50, return_mode="median")
                row["fb_ms_course_eager"] = do_bench(course_fb, warmup=3, rep=20, return_mode="median")
            except Exception as error:  # noqa: BLE001
                row["fb_error"] = f"{type(error).__name__}: {str(error)[:200]}"
            best = min(v for k, v in row.items() if k.startswith("fwd_ms_course") and v is not None)
            row["best_course_over_fla"] = best / row["fwd_ms_fla"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del x
            torch.cuda.empty_cache()

    lines = [f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}, fla {info['fla']}. "
             f"B={args.batch}, H={H}, D_k=D_v={D}, bf16 inputs; forward ms, median of do_bench.", "",
             "| T | gated | fla | course eager | course CUDA graph | best course / fla | fwd+bwd fla | "
             "fwd+bwd course eager | err course | err fla | course vs fla |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt="{:.3f}"):
        return "—" if v is None else fmt.format(v)
    for r in rows:
        lines.append(f"| {r['T']} | {'yes' if r['gated'] else 'no'} | {f(r.get('fwd_ms_fla'))} | "
                     f"{f(r.get('fwd_ms_course_eager'))} | {f(r.get('fwd_ms_course_graph'))} | "
                     f"{r['best_course_over_fla']:.2f}× | {f(r.get('fb_ms_fla'))} | {f(r.get('fb_ms_course_eager'))} | "
                     f"{r['err_course']:.1e} | {r['err_fla']:.1e} | {r['course_vs_fla']:.1e} |")
    errors = sorted({f"{k}: {v}" for r in rows for k, v in r.items() if k.endswith("error")})
    lines += ["", "Did not run:", *[f"- {e}" for e in errors]]
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(args.out, "linear_attention_gpu.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(args.out, "linear_attention_gpu.json"), "w") as fh:
        json.dump({"info": info, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
