"""Chapter 04's MQAR grid: recall of Mamba against attention and chapter 03's mixers as pairs and state grow.

Usage::

    python benchmarks/ssm_mqar_grid.py --workers 30 --out mqar_grid.jsonl     # about 8 minutes on 32 cores
    python benchmarks/ssm_mqar_grid.py --summarise mqar_grid.jsonl            # the table again, from the file
    python benchmarks/ssm_mqar_grid.py --only 'd_state 16' --resume --out mqar_grid.jsonl   # add missing rows

Every run is one ``labsupport.lm.probe.probe`` call (one torch thread per worker process): a 2-layer TinyLM
of width 32 with a short convolution and no MLP, 64 tokens, batch 64, 600 steps, warm-up + cosine schedule.
The grid: designs × pairs {2, 4, 8} × learning rate {3e-3, 1e-2} × seeds {0, 1, 2}. Mamba runs without a
position table (its convolution and scan see order); the others with the learned one, as in the probe.
The summary reports, per design and number of pairs, the learning rate with the best mean recall over the
three seeds, with that mean and the range — so every design gets the same budget and the same small tuning.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import grid_runner  # benchmarks/grid_runner.py: the pool, the JSONL file, --resume and --only

DESIGNS = ("Mamba (d_state 16)", "Mamba (d_state 4)", "softmax attention", "ch03 linear attention",
           "ch03 DeltaNet")
PAIRS = (2, 4, 8)
LRS = (3e-3, 1e-2)
SEEDS = (0, 1, 2)
STEPS, BATCH, WIDTH, SEQ_LEN = 600, 64, 32, 64


def state_numbers(design: str, seq_len: int = SEQ_LEN, width: int = WIDTH) -> int:
    """Numbers one layer keeps per sequence while decoding, at ``seq_len`` tokens."""
    if design == "softmax attention":
        return 2 * width * seq_len
    if design.startswith("ch03"):
        return width * width
    d_state = int(design.split()[-1].rstrip(")"))
    return 2 * width * d_state + 2 * width * 3  # d_inner × N, plus the conv window of 3 tokens


def run(job: tuple[str, int, float, int]) -> dict:
    import torch

    torch.set_num_threads(1)
    from labsupport.lm.probe import MQARProbe, probe

    design, pairs, lr, seed = job
    if design == "softmax attention":
        mixer, positional = "attention", "learned"
    elif design.startswith("ch03"):
        from labsupport.linear_attention import linear_mixer

        mixer = linear_mixer("linear" if "linear" in design else "deltanet", n_heads=1)
        positional = "learned"
    else:
        from labsupport.ssm.mixers import mamba_mixer

        mixer, positional = mamba_mixer(int(design.split()[-1].rstrip(")"))), "none"
    start = time.perf_counter()
    result = probe(mixer, MQARProbe(seq_len=SEQ_LEN, num_pairs=pairs), steps=STEPS, lr=lr, seed=seed,
                   batch_size=BATCH, d_model=WIDTH, positional=positional, label=design, progress=False)
    return {"design": design, "pairs": pairs, "lr": lr, "seed": seed, "recall": result.score,
            "seconds": time.perf_counter() - start}


def summarise(rows: list[dict]) -> None:
    groups: dict[tuple[str, int, float], list[float]] = defaultdict(list)
    for row in rows:
        groups[(row["design"], row["pairs"], row["lr"])].append(row["recall"])
    print(f"| design | state numbers / layer | " + " | ".join(f"{p} pairs" for p in PAIRS) + " |")
    print("|---|---|" + "---|" * len(PAIRS))
    for design in DESIGNS:
        cells = []
        for pairs in PAIRS:
            options = [(statistics.fmean(v), lr, v) for (d, p, lr), v in groups.items() if d == design and p == pairs]
            if not options:
                cells.append("—")
                continue
            mean, lr, scores = max(options)
            cells.append(f"{mean:.1%} ({min(scores):.0%}–{max(scores):.0%}, lr {lr:g}, {len(scores)} seeds)")
        print(f"| {design} | {state_numbers(design):,} | " + " | ".join(cells) + " |")


def _describe(job: tuple[str, int, float, int]) -> str:
    design, pairs, lr, seed = job
    return f"{design} pairs {pairs} lr {lr:g} seed {seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid_runner.add_arguments(parser, "mqar_grid.jsonl")
    args = parser.parse_args()
    if args.summarise:
        summarise(grid_runner.read_rows(args.summarise))
        return
    # the slow Mamba runs first, so the pool's last wave holds short runs
    jobs = [(d, p, lr, s) for d in DESIGNS for p in PAIRS for lr in LRS for s in SEEDS]
    rows = grid_runner.run_grid(
        args, jobs, run, key=lambda r: _describe((r["design"], r["pairs"], r["lr"], r["seed"])),
        describe=_describe, report=lambda r: f"{_describe((r['design'], r['pairs'], r['lr'], r['seed']))}: "
                                             f"recall {r['recall']:.1%} ({r['seconds']:.0f} s)")
    summarise(rows)


if __name__ == "__main__":
    main()
