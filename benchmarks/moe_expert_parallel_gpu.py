"""Chapter 06 on several GPUs: the expert-parallel MoE layer over NCCL, all-to-all against expert compute.

Run from the repository root on one machine with 2 or more CUDA GPUs:

    python3 benchmarks/moe_expert_parallel_gpu.py [--worlds 2,4] [--tokens 16384,65536] [--experts 8,32]
                                                 [--out DIR] [--quick]

It starts one process per GPU itself (``labsupport.moe.parallel.launch``: NCCL, NVLink multicast off,
every process ended and the group destroyed even when one fails). For every world size ``W``
(processes = GPUs), expert count ``E`` and tokens per rank ``T`` (d = 1024, top-2, expert width
4·d, bf16, ``ExpertParallelMoE`` on every rank) it

1. checks the layer against the single-process ``MoELayer`` on the same tokens (1,024 per rank):
   output, input gradient, expert and router gradients, relative error against the bf16 tolerance;
2. times one training step (forward + backward, slowest rank, median of ``--repeats``) with a
   balanced router and with skewed ones that send ``--skew`` of the assignments to rank 0's experts
   (the busiest rank sets the pace);
   and counts the device synchronisations of one forward pass (CUDA's sync debug mode; expected: 1,
   the split sizes);
3. splits a forward pass into all-to-all time (count exchange, dispatch, combine; waiting for a
   slower rank included) and compute time (routing, experts, combine), with the bytes each rank
   sends to the others, and times a bare all-to-all of the balanced dispatch volume (bandwidth);
4. times the same step on one GPU holding all ``E`` experts (rank 0, the plain ``MoELayer``) on
   ``T`` tokens, and reports the throughput ``W·T / step`` against ``T / single-GPU step``.

It prints markdown tables and writes ``moe_expert_parallel.json`` / ``.md`` to ``--out``
(default ``$OUT`` or the current folder). With fewer than 2 GPUs it prints why and exits 0.

Smoke mode, on the CPU over gloo (tiny sizes, a few seconds; what the tests run):

    python3 benchmarks/moe_expert_parallel_gpu.py --backend gloo --cpu

On a single GPU, ``--worlds 1 --quick`` runs the same NCCL code path in a group of one (the all-to-alls
are local copies): a check that the GPU side works, not a measurement of expert parallelism.

Under ``torchrun --nproc-per-node W benchmarks/moe_expert_parallel_gpu.py --worlds W`` the script
runs as one rank of torchrun's group instead of starting its own processes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from labsupport.moe.layer import MoELayer  # noqa: E402
from labsupport.moe.parallel import (  # noqa: E402
    ExpertParallelMoE,
    backend_for,
    check_against_single_process,
    equality_tolerance,
    launch,
    run_rank,
)

CHECK_TOKENS = 1024


def build_layer(d: int, experts: int, hidden: int, seed: int) -> MoELayer:
    """The same layer on every rank (same seed); ``balance="bias"`` so a selection bias can skew it."""
    torch.manual_seed(seed)
    layer = MoELayer(d, experts, 2, hidden, balance="bias")
    with torch.no_grad():
        layer.router.weight.normal_(0.0, d ** -0.5)  # logits of order 1: a router that has learnt something
    return layer


def skew_bias(layer: MoELayer, world: int, share: float, seed: int) -> float:
    """The selection bias on rank 0's experts that sends about ``share`` of the assignments there.

    Found by bisection on a fixed sample of tokens, so every rank finds the same bias; ``share >= 1`` gives
    a bias far above any logit (every assignment goes to rank 0).
    """
    if share >= 1.0:
        return 1e4
    sample = torch.randn(4096, layer.d_model, generator=torch.Generator().manual_seed(seed))
    per_rank = layer.n_experts // world
    probe = copy.deepcopy(layer).float().cpu()

    def share_at(bias: float) -> float:
        probe.selection_bias.zero_()
        probe.selection_bias[:per_rank] = bias
        with torch.no_grad():
            routing, _ = probe.select(sample)
        return float((routing.experts < per_rank).float().mean())

    lo, hi = 0.0, 50.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share_at(mid) < share else (lo, mid)
    return hi


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(seconds: float, device: torch.device) -> float:
    """The largest of every rank's ``seconds``."""
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def time_step(step, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median over ``repeats`` of the slowest rank's time for ``step()`` (all ranks start together)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(_slowest(time.perf_counter() - start, device))
    return statistics.median(times)


def host_syncs(fn, device: torch.device) -> int:
    """Device synchronisations ``fn`` caused (CUDA's sync debug mode; -1 where there is no device to wait for)."""
    if device.type != "cuda":
        return -1
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def rank_main(rank: int, world: int, device: torch.device, config: dict) -> dict:
    """One rank's whole benchmark for one world size: every (E, T, router) case; rank 0 returns the rows."""
    dtype = getattr(torch, config["dtype"])
    d, hidden, repeats = config["d"], config["hidden"], config["repeats"]
    rows, checks = [], []
    for experts in config["experts"]:
        layer = build_layer(d, experts, hidden, seed=0)

        # 1. equality with the single-process layer, forward and backward (small T: the reference holds all ranks')
        sharded = ExpertParallelMoE(layer).to(device=device, dtype=dtype)
        full = copy.deepcopy(layer).to(device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(1000 + rank)
        x = torch.randn(CHECK_TOKENS, d, device=device, dtype=dtype, generator=gen)
        errors = check_against_single_process(sharded, full, x, torch.randn(x.shape, device=device, dtype=dtype,
                                                                             generator=gen))
        del full
        syncs = host_syncs(lambda: sharded(x), device)
        checks.append({"world": world, "experts": experts, "dtype": config["dtype"], "errors": errors,
                       "host_syncs_per_forward": syncs,
                       "tolerance": equality_tolerance(dtype), "ok": max(errors.values()) < equality_tolerance(dtype)})

        biases = {share: skew_bias(layer, world, share, seed=7) for share in config["skew"]}
        for tokens in config["tokens"]:
            x = torch.randn(tokens, d, device=device, dtype=dtype, generator=gen).requires_grad_(True)
            grad = torch.randn(tokens, d, device=device, dtype=dtype, generator=gen)

            # 4. one GPU holding every expert, the plain layer, T tokens (rank 0 only; the others wait)
            single = float("nan")
            if rank == 0 and config["single"]:
                one = copy.deepcopy(layer).to(device=device, dtype=dtype)
                xs = x.detach().clone().requires_grad_(True)
                times = []
                for i in range(repeats + 2):
                    _sync(device)
                    start = time.perf_counter()
                    one(xs).backward(grad)
                    _sync(device)
                    if i >= 2:
                        times.append(time.perf_counter() - start)
                single = statistics.median(times)
                del one
            dist.barrier()

            # bare all-to-all of the balanced dispatch volume: T·k rows, an equal share to every rank
            buffer = torch.randn(tokens * 2, d, device=device, dtype=dtype, generator=gen)
            received = torch.empty_like(buffer)
            bare = time_step(lambda: dist.all_to_all_single(received, buffer), device, repeats)
            bare_bytes = buffer.numel() * buffer.element_size() * (world - 1) / world
            del buffer, received

            for share in [None, *config["skew"]]:
                with torch.no_grad():
                    if share is None:
                        sharded.layer.selection_bias.zero_()
                    else:
                        sharded.layer.selection_bias.zero_()
                        sharded.layer.selection_bias[: experts // world] = biases[share]

                def step() -> None:
                    sharded(x).backward(grad)

                step_s = time_step(step, device, repeats)
                sharded.zero_grad(set_to_none=True)
                # 3. one timed forward pass: all-to-all against compute (device-synchronised phases)
                sharded.timed = True
                with torch.no_grad():
                    phases = []
                    for _ in range(repeats):
                        dist.barrier()
                        sharded(x)
                        phases.append(dict(sharded.last_stats))
                sharded.timed = False
                stats = min(phases, key=lambda s: s["comm_seconds"] + s["compute_seconds"])
                mine = torch.tensor([stats["comm_seconds"], stats["compute_seconds"], stats["received"],
                                     stats["dispatch_bytes"] + stats["combine_bytes"]], dtype=torch.float64,
                                    device=device)
                every = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(every, mine)
                every = torch.stack(every).cpu()
                rows.append({
                    "world": world, "experts": experts, "tokens_per_rank": tokens, "d": d, "hidden": hidden,
                    "top_k": 2, "dtype": config["dtype"],
                    "router": "balanced" if share is None else f"skewed {share:.2f}",
                    "step_ms": 1e3 * step_s,
                    "single_gpu_step_ms": 1e3 * single,
                    "throughput_tokens_per_s": world * tokens / step_s,
                    "single_gpu_tokens_per_s": tokens / single,
                    "share_received": (every[:, 2] / every[:, 2].sum()).tolist(),
                    "fwd_comm_ms": (1e3 * every[:, 0]).tolist(),
                    "fwd_compute_ms": (1e3 * every[:, 1]).tolist(),
                    "bytes_sent_per_rank": every[:, 3].tolist(),
                    "bare_all_to_all_ms": 1e3 * bare,
                    "bare_all_to_all_bytes": bare_bytes,
                })
                if rank == 0:
                    print(json.dumps(rows[-1]), flush=True)
        del sharded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "checks": checks} if rank == 0 else {}


def tables(rows: list[dict], checks: list[dict]) -> str:
    mib = 2 ** 20
    lines = ["Equality with the single-process layer (1,024 tokens per rank; worst relative error over output, "
             "input gradient, expert and router gradients):", "",
             "| GPUs | experts | dtype | worst rel. error | tolerance | ok | host syncs per forward |",
             "|---:|---:|---|---:|---:|---|---:|"]
    for c in checks:
        syncs = c["host_syncs_per_forward"] if c["host_syncs_per_forward"] >= 0 else "–"
        lines.append(f"| {c['world']} | {c['experts']} | {c['dtype']} | {max(c['errors'].values()):.1e} | "
                     f"{c['tolerance']:.0e} | {'yes' if c['ok'] else 'NO'} | {syncs} |")
    lines += ["", "Training step (forward + backward, slowest rank, median), all-to-all against compute "
              "(one forward pass, per rank: slowest shown), throughput against one GPU holding every expert:", "",
              "| GPUs | experts | tokens / rank | router | share of assignments per rank | sent per rank | "
              "fwd all-to-all ms | fwd compute ms | bare all-to-all ms (GB/s) | step ms | 1-GPU step ms | "
              "throughput vs 1 GPU |",
              "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        shares = " / ".join(f"{s:.2f}" for s in r["share_received"])
        gbps = r["bare_all_to_all_bytes"] / (r["bare_all_to_all_ms"] / 1e3) / 1e9
        speedup = r["throughput_tokens_per_s"] / r["single_gpu_tokens_per_s"]
        lines.append(
            f"| {r['world']} | {r['experts']} | {r['tokens_per_rank']} | {r['router']} | {shares} | "
            f"{max(r['bytes_sent_per_rank']) / mib:.1f} MiB | {max(r['fwd_comm_ms']):.2f} | "
            f"{max(r['fwd_compute_ms']):.2f} | {r['bare_all_to_all_ms']:.2f} ({gbps:.0f}) | {r['step_ms']:.2f} | "
            f"{r['single_gpu_step_ms']:.2f} | {speedup:.2f}× |")
    balanced = {(r["world"], r["experts"], r["tokens_per_rank"]): r["step_ms"] for r in rows
                if r["router"] == "balanced"}
    skewed = [r for r in rows if r["router"] != "balanced"]
    if skewed:
        lines += ["", "| GPUs | experts | tokens / rank | router | step / balanced step |", "|---:|---:|---:|---|---:|"]
        for r in skewed:
            base = balanced[(r["world"], r["experts"], r["tokens_per_rank"])]
            lines.append(f"| {r['world']} | {r['experts']} | {r['tokens_per_rank']} | {r['router']} | "
                         f"{r['step_ms'] / base:.2f} |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results")
    parser.add_argument("--quick", action="store_true", help="16K tokens per rank and 8 experts only")
    parser.add_argument("--worlds", default="2,4", help="processes (GPUs) per run, comma-separated")
    parser.add_argument("--tokens", default="16384,65536", help="tokens per rank, comma-separated")
    parser.add_argument("--experts", default="8,32", help="experts, comma-separated")
    parser.add_argument("--d", type=int, default=1024, help="model width")
    parser.add_argument("--hidden", type=int, default=None, help="expert width (default 4·d)")
    parser.add_argument("--skew", default="0.5,1.0", help="shares of assignments sent to rank 0's experts")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats (median)")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                        help="nccl (CUDA, the default) or gloo (with --cpu)")
    parser.add_argument("--cpu", action="store_true", help="smoke mode: tiny sizes on CPU processes over gloo")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait")
    args = parser.parse_args()

    device_type = "cpu" if args.cpu else "cuda"
    backend = args.backend or backend_for(device_type)
    if backend != backend_for(device_type):
        parser.error(f"--backend {backend} does not go with {'--cpu' if args.cpu else 'CUDA tensors'}: "
                     f"the backend follows the device (gloo for --cpu, nccl on GPUs)")
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    if args.cpu:
        config = {"d": 32, "hidden": 64, "experts": [4], "tokens": [64], "dtype": "float32", "repeats": 2,
                  "skew": [1.0], "single": True}
        worlds = [2]
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU: expert parallelism over NCCL needs 2 or more GPUs; skipped "
                  "(the CPU version runs with --backend gloo --cpu)")
            return
        gpus = torch.cuda.device_count()
        if gpus < 2 and not torchrun and _ints(args.worlds) != [1]:
            print(f"only {gpus} CUDA GPU: expert parallelism over NCCL needs 2 or more; skipped "
                  "(--worlds 1 runs the NCCL code path in a group of one)")
            return
        config = {"d": args.d, "hidden": args.hidden or 4 * args.d, "dtype": "bfloat16", "repeats": args.repeats,
                  "experts": [8] if args.quick else _ints(args.experts),
                  "tokens": [16384] if args.quick else _ints(args.tokens),
                  "skew": [float(s) for s in args.skew.split(",") if s], "single": True}
        worlds = [w for w in _ints(args.worlds) if w <= gpus]
        skipped = [w for w in _ints(args.worlds) if w > gpus]
        if skipped:
            print(f"skipping {skipped} processes: only {gpus} GPUs")
    if not all(e % w == 0 for e in config["experts"] for w in worlds):
        parser.error(f"every expert count {config['experts']} must be divisible by every world size {worlds}")

    info = {"device": torch.cuda.get_device_name(0) if device_type == "cuda" else platform.processor() or "cpu",
            "gpus": torch.cuda.device_count() if device_type == "cuda" else 0, "backend": backend,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device_type == "cuda" else None}
    print(json.dumps(info), flush=True)
    rows: list[dict] = []
    checks: list[dict] = []
    if torchrun:
        world = int(os.environ["WORLD_SIZE"])
        result = run_rank(int(os.environ["RANK"]), world, rank_main, (config,), device_type=device_type,
                          timeout_s=args.timeout)
        if int(os.environ["RANK"]) != 0:
            return
        rows, checks = result["rows"], result["checks"]
    else:
        for world in worlds:
            result = launch(rank_main, world, (config,), device_type=device_type, timeout_s=args.timeout)[0]
            rows += result["rows"]
            checks += result["checks"]
    table = tables(rows, checks)
    print()
    print(table)
    if not all(c["ok"] for c in checks):
        print("\nFAILED: the expert-parallel layer differs from the single-process layer beyond the tolerance")
    if not args.cpu or args.out != ".":
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "moe_expert_parallel.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "moe_expert_parallel.json"), "w") as f:
            json.dump({"info": info, "config": config, "rows": rows, "checks": checks}, f, indent=1)
    if not all(c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
