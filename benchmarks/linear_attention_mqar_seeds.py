"""Chapter 03's recall table: every mechanism on MQAR at two widths and three pair counts, three seeds each.

Usage::

    python benchmarks/linear_attention_mqar_seeds.py --workers 31 --out linear_mqar_seeds.jsonl   # ~17 min, 32 cores
    python benchmarks/linear_attention_mqar_seeds.py --summarise linear_mqar_seeds.jsonl          # the table again
    python benchmarks/linear_attention_mqar_seeds.py --summarise linear_mqar_seeds.jsonl --python # for the notebook

Every run is one ``labsupport.lm.probe.probe`` call in its own worker process with one torch thread: the
notebook's ``train_and_score`` — a 2-layer TinyLM with one head, a short convolution and no MLP, MQAR with
64 tokens and a vocabulary of 128, batches of 64, warm-up + cosine schedule, learning rate 1e-2 — for the
same budget of ``STEPS`` steps for every mechanism (softmax attention included), scored on 512 held-out
sequences (eval seed 99). The grid: softmax + the six mechanisms of ``la.MECHANISMS`` × width {32, 64} ×
pairs {4, 8, 16} × seeds {0, 1, 2} = 126 runs. The summary gives the median and the range over the seeds.
``--python`` prints the ``STORED_RECALL`` literal that chapter 03 reads (paste it into the notebook's cell).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import grid_runner  # benchmarks/grid_runner.py: the pool, the JSONL file, --resume and --only

MECHANISMS = ("softmax", "linear", "retnet", "gla", "deltanet", "gated_deltanet", "ttt")
WIDTHS = (32, 64)
PAIRS = (4, 8, 16)
SEEDS = (0, 1, 2)
STEPS, LR, SEQ_LEN, VOCAB, EVAL_SEED = 1000, 1e-2, 64, 128, 99


def run(job: tuple[str, int, int, int]) -> dict:
    """One training run; returns its row for the JSONL file."""
    import torch

    torch.set_num_threads(1)
    from labsupport.linear_attention import linear_mixer
    from labsupport.lm.probe import MQARProbe, probe

    mechanism, width, pairs, seed = job
    mixer = "attention" if mechanism == "softmax" else linear_mixer(mechanism, n_heads=1)
    start = time.perf_counter()
    result = probe(mixer, MQARProbe(seq_len=SEQ_LEN, num_pairs=pairs, vocab_size=VOCAB, eval_seed=EVAL_SEED),
                   steps=STEPS, lr=LR, seed=seed, d_model=width, n_heads=1, eval_every=STEPS, label=mechanism,
                   progress=False)
    return {"mechanism": mechanism, "width": width, "pairs": pairs, "seed": seed, "steps": STEPS, "lr": LR,
            "recall": result.score, "seconds": time.perf_counter() - start}


def _grouped(rows: list[dict]) -> dict[tuple[int, str, int], list[float]]:
    groups: dict[tuple[int, str, int], list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        groups[(row["width"], row["mechanism"], row["pairs"])].append((row["seed"], row["recall"]))
    return {key: [recall for _, recall in sorted(values)] for key, values in groups.items()}


def summarise(rows: list[dict]) -> None:
    """A markdown table: median (min–max) recall over the seeds, per width, mechanism and pair count."""
    groups = _grouped(rows)
    steps = sorted({row["steps"] for row in rows})
    print(f"MQAR recall, L={SEQ_LEN}, {steps} steps, lr {LR:g}: median (min–max) over seeds")
    print("| width | mechanism | " + " | ".join(f"{p} pairs" for p in PAIRS) + " |")
    print("|---|---|" + "---|" * len(PAIRS))
    for width in WIDTHS:
        for mechanism in MECHANISMS:
            cells = []
            for pairs in PAIRS:
                scores = groups.get((width, mechanism, pairs))
                cells.append("—" if not scores else f"{statistics.median(scores):.1%} "
                             f"({min(scores):.1%}–{max(scores):.1%}, {len(scores)} seeds)")
            print(f"| {width} | {mechanism} | " + " | ".join(cells) + " |")


def as_python(rows: list[dict]) -> None:
    """The notebook's literal: ``{width: {mechanism: [[recall per seed] per pair count]}}``."""
    groups = _grouped(rows)
    steps, seeds = sorted({row["steps"] for row in rows}), sorted({row["seed"] for row in rows})
    print(f"STORED_RECALL = {{  # benchmarks/linear_attention_mqar_seeds.py: {steps} steps, lr {LR:g}, "
          f"seeds {seeds}")
    for width in WIDTHS:
        print(f"    {width}: {{")
        for mechanism in MECHANISMS:
            per_pairs = [[round(r, 3) for r in groups.get((width, mechanism, p), [])] for p in PAIRS]
            print(f"        {mechanism!r}: {per_pairs},")
        print("    },")
    print("}")


def _describe(job: tuple[str, int, int, int]) -> str:
    mechanism, width, pairs, seed = job
    return f"{mechanism} width {width} pairs {pairs} seed {seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid_runner.add_arguments(parser, "linear_mqar_seeds.jsonl")
    parser.add_argument("--python", action="store_true", help="with --summarise: print the notebook's literal")
    args = parser.parse_args()
    if args.summarise:
        (as_python if args.python else summarise)(grid_runner.read_rows(args.summarise))
        return
    # the slowest runs first (GLA's per-dimension gates, the wider model), so the last wave holds short runs
    order = {"gla": 0, "ttt": 1, "gated_deltanet": 2, "deltanet": 3, "retnet": 4, "linear": 5, "softmax": 6}
    jobs = sorted(((m, w, p, s) for m in MECHANISMS for w in WIDTHS for p in PAIRS for s in SEEDS),
                  key=lambda job: (order[job[0]], -job[1]))
    rows = grid_runner.run_grid(
        args, jobs, run, key=lambda r: _describe((r["mechanism"], r["width"], r["pairs"], r["seed"])),
        describe=_describe, report=lambda r: f"{_describe((r['mechanism'], r['width'], r['pairs'], r['seed']))}: "
                                             f"recall {r['recall']:.1%} ({r['seconds']:.0f} s)")
    summarise(rows)
    as_python(rows)


if __name__ == "__main__":
    main()
