"""Chapter 05 on the CPU: block-sparse time against density, a sliding window against FlexAttention, decode budgets.

    python benchmarks/sparse_attention_cpu.py [--length 8192] [--out results.json] [--no-flex]

1. **Time against tile density.** ``labsupport.sparse.block_sparse_attention`` (gathered key blocks, tiles of 64)
   on banded block patterns of exact tile density 1, 1/2, …, 1/16 at ``--length`` tokens, 4 heads of 64, fp32,
   one thread (the fastest of ``--repeats`` calls). The speed-up over the same code at density 1 is compared with
   ``1/density``; PyTorch's dense ``scaled_dot_product_attention`` is timed in the same run.
2. **A sliding window of 1,024, causal**, at the same length: ours (``WindowPattern``, no mask stored), SDPA with
   the dense boolean mask, and FlexAttention (``torch.compile(flex_attention)`` with a ``BlockMask`` from the same
   rule) where it runs on this CPU (it needs a C++ compiler; the first call compiles).
3. **Decode budgets.** Tokens and bytes one decode step reads per policy against context, for a 32-layer model with
   8 KV heads of 128 in fp16 (from ``labsupport.harness.costs``), and the tokens the library's ``PolicyKVCache``
   really read at the last step of a 2,048-token decode (they must agree).

Prints markdown tables (for ``benchmarks/BENCHMARKS.md``) and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from labsupport import sparse
from labsupport.harness.costs import decode_read_bytes, format_bytes, policy_tokens_per_step
from labsupport.harness.measuring import fit_power_law, time_callable


def band_mask(length: int, per_row: int, block: int = 64) -> torch.Tensor:
    n = length // block
    blocks = torch.arange(n)
    keep = (blocks[:, None] - blocks[None, :]) % n < per_row
    return keep.repeat_interleave(block, 0).repeat_interleave(block, 1)


def density_sweep(length: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, length, 64, generator=gen) for _ in range(3))
    n = length // 64
    rows = []
    with torch.no_grad():
        for per_row in (n, n // 2, n // 4, n // 8, n // 16):
            mask = band_mask(length, per_row)
            layout = sparse.block_layout(mask, 64, 64)
            seconds = time_callable(lambda: sparse.block_sparse_attention(q, k, v, mask, layout=layout), repeats=repeats)
            rows.append({"tile_density": layout.tile_density, "seconds": seconds})
            print(f"  density {layout.tile_density:.4f}: {seconds * 1e3:.1f} ms", flush=True)
        sdpa = time_callable(lambda: F.scaled_dot_product_attention(q, k, v), repeats=repeats)
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
        row["ideal"] = 1 / row["tile_density"]
        row["ideal_over_measured"] = row["ideal"] / row["speedup"]
    slope, _ = fit_power_law([r["tile_density"] for r in rows], [r["seconds"] for r in rows])
    return {"rows": rows, "sdpa_dense_seconds": sdpa, "slope": slope}


def window_comparison(length: int, window: int, repeats: int, flex: bool) -> dict:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, length, 64, generator=gen) for _ in range(3))
    rule = sparse.WindowPattern(window)
    layout = rule.layout(length, length, 64, 64)
    result: dict = {"window": window, "tile_density": layout.tile_density}
    with torch.no_grad():
        ours, _ = sparse.block_sparse_attention(q, k, v, rule, layout=layout)
        result["ours_seconds"] = time_callable(lambda: sparse.block_sparse_attention(q, k, v, rule, layout=layout),
                                               repeats=repeats)
        mask = rule.mask(length, length)
        result["sdpa_mask_seconds"] = time_callable(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                                    repeats=repeats)
        sdpa_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        result["sdpa_vs_ours_max_abs"] = float((sdpa_out - ours).abs().max())
    if not flex:
        result["flex"] = "skipped (--no-flex)"
        return result
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        block_mask = create_block_mask(mask_mod, None, None, length, length, device="cpu")
        compiled = torch.compile(flex_attention)
        start = time.perf_counter()
        with torch.no_grad():
            flex_out = compiled(q, k, v, block_mask=block_mask)
            result["flex_first_call_seconds"] = time.perf_counter() - start
            result["flex_seconds"] = time_callable(lambda: compiled(q, k, v, block_mask=block_mask), repeats=repeats)
        result["flex_vs_ours_max_abs"] = float((flex_out - ours).abs().max())
        result["ours_over_flex"] = result["ours_seconds"] / result["flex_seconds"]
    except Exception as error:  # noqa: BLE001 - report why FlexAttention does not run here
        result["flex"] = f"does not run: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return result


def decode_budgets() -> dict:
    shape = dict(layers=32, kv_heads=8, head_dim=128, bytes_per_element=2)
    table = []
    for context in (8192, 32768, 131072):
        row = {"context": context}
        for name in ("full", "sinks", "h2o", "quest"):
            t = policy_tokens_per_step(name, context, 2048, page=16)
            row[name] = {"tokens": t["tokens"], "bytes": decode_read_bytes(t["tokens"], pages=t["pages"], **shape)}
        nsa = sparse.nsa_token_counts(context)["total"]
        row["nsa"] = {"tokens": nsa, "bytes": decode_read_bytes(nsa, **shape)}
        table.append(row)
    measured = {}
    gen = torch.Generator().manual_seed(2)
    for name in ("full", "sinks", "h2o", "tova", "quest"):
        policy = sparse.CachePolicy(name, budget=256, page=16)
        cache = sparse.PolicyKVCache(policy, 1, 2, 16)
        for _ in range(2048):
            cache.attend(*(torch.randn(1, 2, 1, 16, generator=gen) for _ in range(3)))
        expected = policy_tokens_per_step(name if name != "tova" else "h2o", 2048, 256, page=16)["tokens"]
        measured[name] = {"read_at_last_step": cache.tokens_read[-1], "formula": expected, "held": cache.length}
    return {"table": table, "measured_at_2048": measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "threads": args.threads, "length": args.length, "date": time.strftime("%Y-%m-%d")}
    print(f"# chapter 05 sparse attention, CPU — {info}", flush=True)
    sweep = density_sweep(args.length, args.repeats)
    print(f"\n## Block-sparse time against tile density (L = {args.length:,}, 4 heads × 64, fp32)\n")
    print("| tile density | ms | speed-up over density 1 | 1/density | (1/density) / speed-up |")
    print("|---|---|---|---|---|")
    for r in sweep["rows"]:
        print(f"| {r['tile_density']:.4f} | {r['seconds'] * 1e3:.1f} | {r['speedup']:.2f}× | {r['ideal']:.0f}× | "
              f"{r['ideal_over_measured']:.2f} |")
    print(f"\nfitted slope {sweep['slope']:.2f}; dense SDPA {sweep['sdpa_dense_seconds'] * 1e3:.1f} ms "
          f"(our density-1 time / SDPA = {sweep['rows'][0]['seconds'] / sweep['sdpa_dense_seconds']:.2f})", flush=True)
    window = window_comparison(args.length, args.window, args.repeats, not args.no_flex)
    print(f"\n## Causal sliding window {args.window} at L = {args.length:,} (tile density {window['tile_density']:.4f})\n")
    print(f"- ours (WindowPattern, gathered blocks): {window['ours_seconds'] * 1e3:.1f} ms")
    print(f"- SDPA with the dense boolean mask: {window['sdpa_mask_seconds'] * 1e3:.1f} ms "
          f"(max |difference| {window['sdpa_vs_ours_max_abs']:.1e})")
    if "flex_seconds" in window:
        print(f"- FlexAttention (compiled): {window['flex_seconds'] * 1e3:.1f} ms after a first call of "
              f"{window['flex_first_call_seconds']:.1f} s; ours / flex = {window['ours_over_flex']:.2f} "
              f"(max |difference| {window['flex_vs_ours_max_abs']:.1e})")
    else:
        print(f"- FlexAttention: {window['flex']}")
    budgets = decode_budgets()
    print("\n## Decode: tokens and bytes read per step (32 layers × 8 KV heads × 128, fp16; budget 2,048)\n")
    print("| context | full | sinks / window / H2O / TOVA | Quest (pages of 16) | NSA |")
    print("|---|---|---|---|---|")
    for row in budgets["table"]:
        cells = [f"{row[n]['tokens']:,} tok, {format_bytes(row[n]['bytes'])}" for n in ("full", "sinks", "quest", "nsa")]
        print(f"| {row['context']:,} | " + " | ".join(cells) + " |")
    print("\nmeasured at step 2,048 with a budget of 256 (PolicyKVCache):",
          json.dumps(budgets["measured_at_2048"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"info": info, "density": sweep, "window": window, "decode": budgets}, indent=1))


if __name__ == "__main__":
    main()
