"""Chapter 06 benchmark: mixture-of-experts dispatch, the MoE layer against a dense FFN, expert-parallel traffic.

Run from the repository root::

    python benchmarks/moe_cpu.py            # about 2 minutes on 2 cores
    python benchmarks/moe_cpu.py --quick

Prints three tables (one torch thread, minimum of several calls):

1. dispatch: the per-token loop against the sorted grouped-matmul path (same routing, same output);
2. the MoE layer (8 experts, top-2, expert width h) against a dense FFN of width 2h, the same active
   parameters and FLOPs per token, forward and forward+backward;
3. expert parallelism on gloo (127.0.0.1): bytes each rank sends, all-to-all time against expert compute
   time, for 2 and 4 processes;
4. the time cost of imbalance: the same 2-process layer with a router skewed towards rank 0's experts;
5. fine-grained experts: 8 × h top-2 against 32 × h/4 top-8 and 64 × h/8 top-16 (same active width).

Table 2 runs at T = 2048 (the notebook's largest size) and T = 4096, so the notebook's ratio can be read
against both.
"""

from __future__ import annotations

import argparse
import platform

import torch

from labsupport.harness.costs import expert_parallel_bytes, format_bytes, moe_parameters
from labsupport.harness.measuring import time_callable
from labsupport.harness.settings import seed_everything
from labsupport.lm.layers import MLP
import copy

from labsupport.moe import MoELayer, moe_loop, moe_sorted
from labsupport.moe.parallel import run_expert_parallel


def dispatch_table(tokens: int, d: int, experts: int, k: int, hidden: int) -> None:
    seed_everything(0)
    layer = MoELayer(d, experts, k, hidden).eval()
    x = torch.randn(tokens, d)
    with torch.no_grad():
        routing, _, _ = layer.route(x)
        w = (layer.w_up, layer.b_up, layer.w_down, layer.b_down)
        loop_s = time_callable(lambda: moe_loop(x, routing, *w), warmup=0, repeats=2)
        fast_s = time_callable(lambda: moe_sorted(x, routing, *w), repeats=7)
        err = float((moe_loop(x, routing, *w) - moe_sorted(x, routing, *w)).abs().max())
    print(f"\n## dispatch, T={tokens}, d={d}, E={experts}, top-{k}, h={hidden}")
    print("| path | ms | speed-up |\n|---|---|---|")
    print(f"| per-token loop | {1e3 * loop_s:.1f} | 1.0× |")
    print(f"| sorted + grouped matmul | {1e3 * fast_s:.2f} | {loop_s / fast_s:.0f}× |")
    print(f"max |difference| = {err:.1e}")


def layer_table(tokens: int, d: int, experts: int, k: int, hidden: int) -> None:
    seed_everything(0)
    moe = MoELayer(d, experts, k, hidden, balance="none")
    dense = MLP(d, expansion=k * hidden // d)
    x = torch.randn(1, tokens, d)
    counts = moe_parameters(d, hidden, experts, k)

    def fwd(module):
        def run():
            with torch.no_grad():
                module(x)
        return run

    def fwd_bwd(module):
        def run():
            module.zero_grad(set_to_none=True)
            module(x).square().mean().backward()
        return run

    print(f"\n## MoE layer vs dense FFN with the same active parameters, T={tokens}, d={d}")
    print(f"MoE: {experts} experts of width {hidden}, top-{k}: {counts['total']:,} parameters, "
          f"{counts['active']:,} active; dense FFN width {k * hidden}: "
          f"{sum(p.numel() for p in dense.parameters()):,} parameters")
    print("| pass | dense ms | MoE ms | MoE / dense |\n|---|---|---|---|")
    for name, make in (("forward", fwd), ("forward + backward", fwd_bwd)):
        dense_s = time_callable(make(dense), repeats=7)
        moe_s = time_callable(make(moe), repeats=7)
        print(f"| {name} | {1e3 * dense_s:.1f} | {1e3 * moe_s:.1f} | {moe_s / dense_s:.2f} |")


def parallel_table(tokens: int, d: int, experts: int, k: int, hidden: int, worlds: list[int]) -> None:
    seed_everything(0)
    layer = MoELayer(d, experts, k, hidden).eval()
    print(f"\n## expert parallelism on gloo, {tokens} tokens per rank, d={d}, E={experts}, top-{k}, float32")
    print("| ranks | sent per rank (dispatch + combine) | uniform-routing formula | all-to-all ms | "
          "expert compute ms |\n|---|---|---|---|---|")
    for world in worlds:
        inputs = [torch.randn(tokens, d, generator=torch.Generator().manual_seed(r)) for r in range(world)]
        run = run_expert_parallel(layer, inputs, repeats=5)
        sent = (run.total("dispatch_bytes") + run.total("combine_bytes")) / world
        formula = expert_parallel_bytes(tokens, d, k, world, bytes_per_element=4)
        comm = max(s["comm_seconds"] for s in run.stats)
        compute = max(s["compute_seconds"] for s in run.stats)
        print(f"| {world} | {format_bytes(sent)} | {format_bytes(formula)} | {1e3 * comm:.1f} | {1e3 * compute:.1f} |")


def imbalance_table(tokens: int, d: int, experts: int, k: int, hidden: int) -> None:
    seed_everything(0)
    balanced = MoELayer(d, experts, k, hidden, balance="none").eval()
    skewed = copy.deepcopy(balanced)
    with torch.no_grad():
        skewed.router.weight[: experts // 2] += 1.6 / d    # rank 0's experts like the tokens' common direction (~85%)
    plain = [torch.randn(tokens, d, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    print(f"\n## imbalance on gloo, 2 ranks, {tokens} tokens per rank, d={d}, E={experts}, top-{k}")
    print("| router | share of assignments on rank 0 / 1 | compute ms rank 0 / 1 | all-to-all ms rank 0 / 1 | "
          "step ms (slowest rank, compute + all-to-all) |\n|---|---|---|---|---|")
    for name, layer, inputs in (("balanced", balanced, plain), ("skewed", skewed, [x + 0.5 for x in plain])):
        with torch.no_grad():
            counts = sum(torch.bincount(layer.route(x)[0].experts.flatten(), minlength=experts) for x in inputs)
        share = counts.view(2, -1).sum(1).double() / counts.sum()
        run = run_expert_parallel(layer, inputs, repeats=5)
        compute = [s["compute_seconds"] for s in run.stats]
        comm = [s["comm_seconds"] for s in run.stats]
        step = max(a + b for a, b in zip(compute, comm))
        print(f"| {name} | {share[0]:.2f} / {share[1]:.2f} | {1e3 * compute[0]:.1f} / {1e3 * compute[1]:.1f} | "
              f"{1e3 * comm[0]:.1f} / {1e3 * comm[1]:.1f} | {1e3 * step:.1f} |")


def fine_grained_table(tokens: int, d: int, hidden: int) -> None:
    x = torch.randn(1, tokens, d)
    print(f"\n## fine-grained experts, T={tokens}, d={d}, same active width {2 * hidden}, forward")
    print("| experts | width | top-k | ms | vs 8 experts |\n|---|---|---|---|---|")
    base = None
    for experts, k in ((8, 2), (32, 8), (64, 16)):
        seed_everything(0)
        layer = MoELayer(d, experts, k, 2 * hidden // k, balance="none").eval()
        with torch.no_grad():
            seconds = time_callable(lambda: layer(x), repeats=7)
        base = base or seconds
        print(f"| {experts} | {2 * hidden // k} | {k} | {1e3 * seconds:.2f} | {seconds / base:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    parser.add_argument("--tables", default="dispatch,layer,parallel,imbalance,fine",
                        help="comma-separated tables to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, 1 thread")
    tokens = 1024 if args.quick else 4096
    tables = set(args.tables.split(","))
    if "dispatch" in tables:
        dispatch_table(tokens, 256, 8, 2, 512)
    if "layer" in tables:
        for size in ([tokens] if args.quick else [2048, 4096]):
            layer_table(size, 256, 8, 2, 512)
    if "parallel" in tables:
        parallel_table(tokens, 256, 8, 2, 512, [2] if args.quick else [2, 4])
    if "imbalance" in tables:
        imbalance_table(tokens, 256, 8, 2, 512)
    if "fine" in tables:
        fine_grained_table(tokens // 4, 128, 256)


if __name__ == "__main__":
    main()
