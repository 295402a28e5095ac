"""Chapter 00's recall baseline over several seeds: when does softmax attention solve MQAR, and how does it
generalise to more pairs than it was trained on?

Usage::

    python benchmarks/ch00_mqar_baseline_seeds.py --workers 5 --out ch00_mqar.jsonl   # about 2 minutes on 5 cores
    python benchmarks/ch00_mqar_baseline_seeds.py --summarise ch00_mqar.jsonl          # the tables again

Each run is the chapter's own training cell with another seed: ``labsupport.lm.probe.probe("attention", ...)``
on MQAR (64 tokens, 8 pairs, vocabulary 128), 2 layers of width 64, one head, a short convolution, no MLP,
batch 64, lr 6e-3 (10% warm-up, cosine), 400 steps, held-out recall every 40 steps; then the trained model is
scored with 2 to 16 pairs. One torch thread per worker process. The summary gives, over the seeds, the median and range of the
recall at every evaluation step, the first step at which recall passed 99%, and the recall by number of pairs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import grid_runner  # benchmarks/grid_runner.py: the pool, the JSONL file, --resume and --only

SEEDS = (0, 1, 2, 3, 4)
STEPS, EVAL_EVERY, LR = 400, 40, 6e-3
PAIRS = (2, 4, 8, 12, 16)


def run(job: tuple[int]) -> dict:
    """One seed's training run; returns its row for the JSONL file."""
    import torch

    (seed,) = job

    torch.set_num_threads(1)
    from labsupport.lm.probe import MQARProbe, probe
    from labsupport.lm.tasks import make_mqar
    from labsupport.lm.training import evaluate_recall

    task = MQARProbe(seq_len=64, num_pairs=8, vocab_size=128, eval_seed=1234)
    start = time.perf_counter()
    result = probe("attention", task, steps=STEPS, lr=LR, seed=seed, d_model=64, n_heads=1,
                   eval_every=EVAL_EVERY, label=f"softmax attention (seed {seed})", progress=False)
    by_pairs = {pairs: evaluate_recall(result.model, make_mqar(256, task.seq_len, pairs, task.vocab_size, seed=99))
                for pairs in PAIRS}
    return {"seed": seed, "recall": result.score, "eval_steps": list(result.history.eval_steps),
            "eval_recall": list(result.history.eval_accuracy), "by_pairs": {str(p): r for p, r in by_pairs.items()},
            "seconds": time.perf_counter() - start}


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1%} ({min(values):.1%}–{max(values):.1%})"


def summarise(rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda row: row["seed"])
    print(f"softmax attention on MQAR (64 tokens, 8 pairs), {len(rows)} seeds: median (range)\n")
    print("| step | held-out recall |\n|---|---|")
    for i, step in enumerate(rows[0]["eval_steps"]):
        print(f"| {step} | {_cell([row['eval_recall'][i] for row in rows])} |")
    firsts = [next((s for s, r in zip(row["eval_steps"], row["eval_recall"]) if r >= 0.99), None) for row in rows]
    print(f"\nfirst evaluation step with recall ≥ 99%, per seed: {firsts}")
    print("\n| pairs at test | recall |\n|---|---|")
    for pairs in PAIRS:
        print(f"| {pairs} | {_cell([row['by_pairs'][str(pairs)] for row in rows])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid_runner.add_arguments(parser, "ch00_mqar.jsonl", default_workers=min(len(SEEDS), max(1, (mp.cpu_count() or 2) - 1)))
    args = parser.parse_args()
    if args.summarise:
        summarise(grid_runner.read_rows(args.summarise))
        return
    rows = grid_runner.run_grid(args, [(seed,) for seed in SEEDS], run, key=lambda row: f"seed {row['seed']}",
                                describe=lambda job: f"seed {job[0]}",
                                report=lambda row: f"seed {row['seed']}: recall {row['recall']:.1%} "
                                                   f"({row['seconds']:.0f} s)")
    summarise(rows)


if __name__ == "__main__":
    main()
