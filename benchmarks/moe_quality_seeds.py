"""Chapter 06's quality table: dense vs MoE at equal FLOPs per token on a task that rewards capacity, 3 seeds.

Usage::

    python benchmarks/moe_quality_seeds.py --workers 1 --out benchmarks/results/moe_lookup_seeds.jsonl  # ~6 min
    python benchmarks/moe_quality_seeds.py --summarise benchmarks/results/moe_lookup_seeds.jsonl

The task (``labsupport.moe.quality``): a fixed random table ``g: V × V → V`` (table seed 0) generates every
sequence, ``x_{t+1} = g(x_{t-1}, x_t)``; only memorising the table predicts it. Every run is a 2-layer TinyLM of
width ``D`` (4 heads, learned positions) trained for ``STEPS`` AdamW steps of ``BATCH`` sequences of ``LENGTH``
tokens, learning rate 3e-3 (warm-up + cosine), scored on 256 held-out sequences (data seed 999): next-token loss
and accuracy at the scored positions. The models differ only in the channel mixer:

* dense, MLP width 4D — the reference at equal FLOPs;
* MoE, 8 experts of width 2D, top-2, Switch loss — the same active parameters and FLOPs, 4× the FFN parameters;
* MoE, 16 experts of width 2D, top-2, Switch loss — 8× the FFN parameters, same FLOPs;
* dense, MLP width 16D — as many FFN parameters as the 8-expert MoE, 4× its FLOPs (the upper reference).

Seeds {0, 1, 2} set the initialisation and the training data stream (the table and the held-out set are fixed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import grid_runner  # benchmarks/grid_runner.py: the pool, the JSONL file, --resume and --only

VOCAB, D, LENGTH, BATCH, STEPS, LR = 64, 32, 16, 32, 800, 3e-3
MODELS = ("dense, width 4d", "MoE 8 × 2d, top-2", "MoE 16 × 2d, top-2", "dense, width 16d (MoE-8's parameters)")
SEEDS = (0, 1, 2)


def run(job: tuple[str, int]) -> dict:
    """One training run; returns its row for the JSONL file."""
    import torch

    torch.set_num_threads(1)
    from labsupport.harness.settings import seed_everything
    from labsupport.lm.layers import MLP
    from labsupport.lm.model import TinyLM
    from labsupport.lm.training import train
    from labsupport.moe import MoELayer, moe_mixer
    from labsupport.moe.quality import lookup_batch, lookup_table

    name, seed = job
    mixer = {
        MODELS[0]: "mlp",
        MODELS[1]: moe_mixer(8, 2, 2 * D),
        MODELS[2]: moe_mixer(16, 2, 2 * D),
        MODELS[3]: lambda d_model, i: MLP(d_model, expansion=16),
    }[name]
    table = lookup_table(VOCAB, 0)
    val = lookup_batch(table, 256, LENGTH, torch.Generator().manual_seed(999))
    seed_everything(seed)
    model = TinyLM(VOCAB, d_model=D, n_layers=2, max_len=LENGTH, channel_mixer=mixer)
    start = time.perf_counter()
    history = train(model, lambda g: lookup_batch(table, BATCH, LENGTH, g), steps=STEPS, lr=LR, seed=seed,
                    eval_batch=val, eval_every=STEPS, label=name, progress=False)
    mixers = [b.channel_mixer for b in model.blocks]
    if isinstance(mixers[0], MoELayer):
        counts = [m.parameter_counts() for m in mixers]
        active, total = sum(c["active"] for c in counts), sum(c["total"] for c in counts)
    else:
        active = total = sum(p.numel() for m in mixers for p in m.parameters())
    return {"model": name, "seed": seed, "steps": STEPS, "vocab": VOCAB, "d_model": D, "length": LENGTH,
            "batch": BATCH, "lr": LR, "ffn_active": active, "ffn_total": total,
            "val_loss": history.eval_loss[-1], "val_accuracy": history.eval_accuracy[-1],
            "seconds": time.perf_counter() - start}


def summarise(rows: list[dict]) -> None:
    """A markdown table: mean ± sd over the seeds, per model."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["model"]].append(row)
    print("| model | FFN active | FFN total | seeds | val loss | val accuracy |\n|---|---:|---:|---:|---:|---:|")
    for name in MODELS:
        if name not in groups:
            continue
        g = groups[name]
        loss, acc = [r["val_loss"] for r in g], [r["val_accuracy"] for r in g]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        print(f"| {name} | {g[0]['ffn_active']:,} | {g[0]['ffn_total']:,} | {len(g)} | "
              f"{statistics.mean(loss):.3f} ± {sd(loss):.3f} | {statistics.mean(acc):.3f} ± {sd(acc):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid_runner.add_arguments(parser, "moe_lookup_seeds.jsonl", default_workers=1)
    args = parser.parse_args()
    if args.summarise:
        summarise(grid_runner.read_rows(args.summarise))
        return
    jobs = [(name, seed) for seed in SEEDS for name in MODELS]
    rows = grid_runner.run_grid(
        args, jobs, run, key=lambda row: f"{row['model']} seed {row['seed']}",
        describe=lambda job: f"{job[0]} seed {job[1]}",
        report=lambda row: f"{row['model']:40s} seed {row['seed']}: loss {row['val_loss']:.3f}, "
                           f"accuracy {row['val_accuracy']:.3f} ({row['seconds']:.0f} s)")
    summarise(rows)


if __name__ == "__main__":
    main()
