"""Chapter 05 on a GPU: the course's block-sparse Triton kernel against FlexAttention with the same block mask.

    python3 benchmarks/sparse_attention_gpu.py [--out DIR]      # needs a CUDA GPU, triton, torch >= 2.5; exits 0 without

A causal sliding window of ``--window`` (default 1,024) at L ∈ {8K, 32K}, fp16, B = 1, 16 heads, head
dimension 64 and 128. Times are medians of ``triton.testing.do_bench`` (CUDA events). Compared in one run:

* **course kernel**: ``labsupport.sparse.triton.triton_block_sparse_forward`` with a ``WindowPattern``; a few
  tile configurations are tried and the fastest is reported (named in the table);
* **FlexAttention**: ``torch.compile(flex_attention)`` with ``create_block_mask`` from the same rule
  (its default 128 × 128 blocks);
* **SDPA, causal dense**: ``scaled_dot_product_attention(is_causal=True)``, the work sparsity avoids.

Errors are max |difference| against FlexAttention's output. Writes ``DIR/sparse_gpu.json`` and prints a markdown
table. No plotly: runs where only torch and triton are installed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # runs from a plain checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="folder for the results")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--configs", type=int, default=5, help="how many of the tile configurations to try")
    parser.add_argument("--densities", type=int, nargs="*", default=[],
                        help="instead of one --window: for each x, a window of L/(2x) tokens, i.e. 1/x of the "
                             "causal triangle's query-key pairs (e.g. 2 4 8 16 32)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one and a Triton install; nothing was measured "
              "(the CPU benchmark is benchmarks/sparse_attention_cpu.py)")
        return
    import triton
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    build_mask = torch.compile(create_block_mask)   # traced once per length; never an L × L boolean mask

    from labsupport import sparse
    from labsupport.sparse import triton as sparse_triton

    device = torch.device("cuda")
    flex = torch.compile(flex_attention)
    # the window lives in a device tensor read by the mask rule, so a new window is a new BlockMask, not a recompile
    window_t = torch.tensor(args.window, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window_t)

    rows = []
    cases = [(d, length, w) for d in args.head_dims for length in args.lengths
             for w in ([max(128, length // (2 * x)) for x in args.densities] or [args.window])]
    for d, length, window in cases:
            window_t.fill_(window)
            pattern = sparse.WindowPattern(window)
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(1, 16, length, d, generator=gen, device=device, dtype=torch.float16) for _ in range(3))
            block_mask = build_mask(mask_mod, None, None, length, length, device="cuda")  # compiled: no dense L² mask
            ref = flex(q, k, v, block_mask=block_mask)
            flex_ms = triton.testing.do_bench(lambda: flex(q, k, v, block_mask=block_mask))
            sdpa_ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            best = None
            for bm, bn, warps, stages in ((128, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                                          (64, 128, 4, 2))[: args.configs]:
                try:
                    lists = sparse_triton.block_lists(pattern.layout(length, length, bm, bn), device)

                    def run(bm=bm, bn=bn, warps=warps, stages=stages, lists=lists):
                        return sparse_triton.triton_block_sparse_forward(q, k, v, pattern, block_m=bm, block_n=bn,
                                                                         num_warps=warps, num_stages=stages,
                                                                         lists=lists)
                    out, _ = run()
                    ms = triton.testing.do_bench(run)
                except Exception as error:  # noqa: BLE001 - a configuration that does not fit is skipped
                    print(f"  config {bm}x{bn} w{warps} s{stages}: {type(error).__name__}", flush=True)
                    continue
                err = float((out.float() - ref.float()).abs().max())
                if best is None or ms < best["ms"]:
                    best = {"ms": ms, "config": f"{bm}x{bn}, {warps} warps, {stages} stages", "max_abs_err": err}
            visited = pattern.layout(length, length, 128, 128).tile_density
            flops = 4 * 16 * d * sum(min(i + 1, window) for i in range(0, length, 1)) / 1e12  # visible pairs only
            row = {"head_dim": d, "length": length, "window": window, "course_ms": best["ms"] if best else math.nan,
                   "course_config": best["config"] if best else "none ran", "course_max_abs_err": best["max_abs_err"] if best else math.nan,
                   "flex_ms": flex_ms, "sdpa_causal_ms": sdpa_ms, "tile_density_128": visited,
                   "useful_tflops_course": flops / (best["ms"] / 1e3) if best else math.nan,
                   "useful_tflops_flex": flops / (flex_ms / 1e3)}
            row["flex_over_course"] = flex_ms / row["course_ms"]
            row["pair_density"] = sum(min(i + 1, window) for i in range(length)) / (length * (length + 1) / 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name()}
    (args.out / "sparse_gpu.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(f"\n{info}\n")
    print("| D | L | window (pair density) | course kernel ms (config) | FlexAttention ms | flex / course | "
          "SDPA causal dense ms | useful TFLOP/s course / flex | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head_dim']} | {r['length']:,} | {r['window']:,} ({r['pair_density']:.3f}) | {r['course_ms']:.3f} ({r['course_config']}) | {r['flex_ms']:.3f} | "
              f"{r['flex_over_course']:.2f}× | {r['sdpa_causal_ms']:.3f} | {r['useful_tflops_course']:.0f} / "
              f"{r['useful_tflops_flex']:.0f} | {r['course_max_abs_err']:.1e} |")


if __name__ == "__main__":
    main()
