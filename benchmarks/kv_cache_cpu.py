"""Chapter 02 on a CPU: decode-step time and cache bytes for MHA, GQA, MQA and absorbed MLA.

One attention layer's decode step (the part whose cost grows with the context: one new
token's queries against the cache) at a few context lengths, with 16 query heads of
dimension 64 in fp32:

* MHA: 16 KV heads (2·16·64 = 2048 numbers cached per token),
* GQA: 4 KV heads (512), MQA: 1 KV head (128),
* MLA, absorbed: a latent of d_c = 256 plus a RoPE key of d_R = 32 (288 numbers per token);
  the query is mapped into latent space, every head attends over the cached rows, and the
  value up-projection is applied after attention.

For each design the table gives the median time of a decode step, the cache bytes read by
it, the effective bandwidth (bytes read / time) and the FLOPs per byte; the machine's copy
bandwidth (read + write of a 256 MB buffer) is measured in the same run, before and after.

Run:  .venv/bin/python benchmarks/kv_cache_cpu.py [--threads 1] [--contexts 1024 4096 16384 32768]
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform

import torch

from labsupport.grouped import grouped_decode_step, latent_attention_core
from labsupport.harness.costs import cache_elements_per_token, format_bytes, mla_elements_per_token
from labsupport.harness.hardware import copy_bandwidth_gbs
from labsupport.harness.measuring import fit_power_law, time_callable

HEADS, HEAD_DIM, LATENT, ROPE = 16, 64, 256, 32
DESIGNS = {"MHA (16 KV heads)": 16, "GQA (4 KV heads)": 4, "MQA (1 KV head)": 1, "MLA absorbed (d_c=256, d_R=32)": None}


def elements_per_token(kv_heads: int | None) -> int:
    return mla_elements_per_token(LATENT, ROPE) if kv_heads is None else cache_elements_per_token(kv_heads, HEAD_DIM)


def flops_per_token(kv_heads: int | None) -> int:
    """Multiply-adds × 2 per cached token: scores and weighted sum, for every query head."""
    if kv_heads is None:
        return 2 * HEADS * ((LATENT + ROPE) + LATENT)
    return 2 * HEADS * 2 * HEAD_DIM


def make_step(kv_heads: int | None, context: int):
    gen = torch.Generator().manual_seed(context)
    if kv_heads is None:
        q = torch.randn(1, HEADS, 1, LATENT + ROPE, generator=gen)
        rows = torch.randn(1, 1, context, LATENT + ROPE, generator=gen)
        w_uv = torch.randn(HEADS, HEAD_DIM, LATENT, generator=gen) / math.sqrt(LATENT)
        scale = 1 / math.sqrt(HEAD_DIM + ROPE)
        return lambda: latent_attention_core(q, rows, LATENT, scale) @ w_uv.transpose(-1, -2)
    q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen)
    k, v = (torch.randn(1, kv_heads, context, HEAD_DIM, generator=gen) for _ in range(2))
    return lambda: grouped_decode_step(q, k, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} thread(s), fp32")
    copy_before = copy_bandwidth_gbs()
    rows, fits = [], {}
    for name, kv_heads in DESIGNS.items():
        seconds = []
        for context in args.contexts:
            step = make_step(kv_heads, context)
            t = time_callable(step, warmup=2, repeats=args.repeats, statistic="median")
            seconds.append(t)
            nbytes = elements_per_token(kv_heads) * 4 * context
            rows.append((name, context, elements_per_token(kv_heads), t, nbytes, flops_per_token(kv_heads) / (4 * elements_per_token(kv_heads))))
        fits[name] = fit_power_law(args.contexts, seconds, tail=min(3, len(seconds)))[0]
    copy_after = copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write, 256 MB): {copy_before:.1f} GB/s before, {copy_after:.1f} GB/s after\n")
    print("| design | context | cached numbers per token | decode step (ms) | cache read | effective GB/s | FLOP/byte |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, context, elements, t, nbytes, intensity in rows:
        print(f"| {name} | {context:,} | {elements:,} | {t * 1e3:.3f} | {format_bytes(nbytes)} | "
              f"{nbytes / t / 1e9:.1f} | {intensity:.1f} |")
    print("\nfitted exponent of time vs context (3 largest contexts): "
          + ", ".join(f"{name.split(' (')[0]} {slope:.2f}" for name, slope in fits.items()))


if __name__ == "__main__":
    main()
