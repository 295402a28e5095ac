"""Chapter 02's quality table over seeds: the four cache designs, the mean-pool conversion and the KIVI cache.

Usage::

    python benchmarks/grouped_quality_seeds.py --workers 1 --out benchmarks/results/grouped_quality_seeds.jsonl
    python benchmarks/grouped_quality_seeds.py --summarise benchmarks/results/grouped_quality_seeds.jsonl
    python benchmarks/grouped_quality_seeds.py --summarise benchmarks/results/grouped_quality_seeds.jsonl --python

One job is one seed, and it repeats section 6 of ``notebooks/02_kv_cache_and_grouped_attention.ipynb`` with
that seed (seed 0 is the notebook's own run, number for number on the same machine):

* MHA, GQA with 2 KV heads, MQA and MLA (``d_c`` = 32, ``d_R`` = 8), each a 2-layer ``TinyLM`` of width 64 with 4
  query heads of 16, a short convolution of 4 and no MLP, trained on MQAR (64 tokens, 8 pairs, vocabulary 128,
  batches of 64) until held-out recall reaches 99% (checked every ``EVAL_EVERY`` steps), at most ``STEPS``
  steps, each design at the learning rate the notebook uses (``LR``);
* the trained MHA model mean-pooled to 2 and to 1 KV heads: recall right after, and after ``UPTRAIN`` steps;
* the trained MHA and GQA models with a KIVI-style cache (groups of 8 tokens, a full-precision window of 0 or 8
  tokens) at 8, 4, 3 and 2 bits, without retraining.

``--python`` prints the ``STORED_QUALITY`` literal that the notebook reads. Every run uses one torch thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import grid_runner  # benchmarks/grid_runner.py: the pool, the JSONL file, --resume and --only

SEEDS = (0, 1, 2, 3, 4)
STEPS = int(os.environ.get("GROUPED_SEEDS_STEPS", "1200"))  # the cap; the variable only for a smoke test
EVAL_EVERY, TARGET, UPTRAIN = int(os.environ.get("GROUPED_SEEDS_EVAL", "100")), 0.99, 80
SEQ_LEN, PAIRS, VOCAB, EVAL_SEED, WIDTH = 64, 8, 128, 1234, 64
LR = {"MHA": 1e-2, "GQA (2 KV heads)": 1e-2, "MQA": 3e-3, "MLA (d_c=32, d_R=8)": 3e-3}
KIVI_GROUP, WINDOWS, BITS = 8, (0, 8), (8, 4, 3, 2)


def _designs() -> dict:
    from labsupport import grouped as ga

    return {"MHA": ga.grouped_mixer(4, 4), "GQA (2 KV heads)": ga.grouped_mixer(4, 2), "MQA": ga.grouped_mixer(4, 1),
            "MLA (d_c=32, d_R=8)": ga.latent_mixer(4, latent_dim=32, rope_dim=8)}


def run(job: tuple[int]) -> dict:
    """Everything section 6 measures, for one seed; returns its row for the JSONL file."""
    import torch

    torch.set_num_threads(1)
    from labsupport import grouped as ga
    from labsupport.harness.settings import seed_everything
    from labsupport.lm.model import TinyLM
    from labsupport.lm.probe import MQARProbe, probe
    from labsupport.lm.training import evaluate_recall, train

    (seed,) = job
    start = time.perf_counter()
    task = MQARProbe(seq_len=SEQ_LEN, num_pairs=PAIRS, vocab_size=VOCAB, eval_seed=EVAL_SEED)
    eval_batch = task.eval_batch()
    designs, trained = {}, {}
    for name, mixer in _designs().items():
        result = probe(mixer, task, steps=STEPS, lr=LR[name], seed=seed, d_model=WIDTH, eval_every=EVAL_EVERY,
                       label=name, stop_at=TARGET, progress=False)
        reached = next((s for s, a in zip(result.history.eval_steps, result.history.eval_accuracy) if a >= TARGET),
                       None)
        designs[name] = {"recall": result.score, "stopped": result.history.steps[-1], "reached_99": reached,
                         "seconds": result.seconds}
        trained[name] = result.model

    conversion = {}
    for n_kv in (2, 1):
        seed_everything(seed)
        new = TinyLM(VOCAB, d_model=WIDTH, n_layers=2, max_len=SEQ_LEN, sequence_mixer=ga.grouped_mixer(4, n_kv),
                     channel_mixer=None, short_conv=4)
        new.load_state_dict({k: v for k, v in trained["MHA"].state_dict().items() if ".mixer." not in k},
                            strict=False)
        for old_block, new_block in zip(trained["MHA"].blocks, new.blocks):
            new_block.mixer = ga.mean_pool_kv_heads(old_block.mixer, n_kv)
        before = evaluate_recall(new, eval_batch)
        history = train(new, lambda g: task.train_batch(64, g), steps=UPTRAIN, lr=3e-3, eval_batch=eval_batch,
                        eval_every=UPTRAIN, label=f"uptrain to {n_kv}", seed=seed + 1, progress=False)
        conversion[str(n_kv)] = {"before": before, "after": history.final_accuracy}

    kivi = {}
    for name in ("MHA", "GQA (2 KV heads)"):
        model = trained[name]
        for window in WINDOWS:
            recalls = []
            for bits in BITS:
                for block in model.blocks:
                    block.mixer.kv_quant = ga.QuantSpec(bits, group=KIVI_GROUP, residual=window)
                recalls.append(evaluate_recall(model, eval_batch))
            for block in model.blocks:
                block.mixer.kv_quant = None
            kivi[f"{name}; window {window}"] = recalls
    return {"seed": seed, "steps_cap": STEPS, "designs": designs, "conversion": conversion, "uptrain": UPTRAIN,
            "kivi": kivi, "kivi_bits": list(BITS), "seconds": time.perf_counter() - start}


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.1%} ({min(values):.1%}–{max(values):.1%})"


def summarise(rows: list[dict]) -> None:
    """Markdown tables: median (min–max) over the seeds."""
    rows = sorted(rows, key=lambda r: r["seed"])
    seeds = [r["seed"] for r in rows]
    print(f"MQAR L={SEQ_LEN}, {PAIRS} pairs, width {WIDTH}; seeds {seeds}; cap {rows[0]['steps_cap']} steps\n")
    print("| design | recall | 99% first reached at step (per seed) |\n|---|---|---|")
    for name in LR:
        recalls = [r["designs"][name]["recall"] for r in rows]
        steps = [r["designs"][name]["reached_99"] for r in rows]
        print(f"| {name} | {_median_range(recalls)} | {', '.join('—' if s is None else str(s) for s in steps)} |")
    print(f"\n| mean-pool MHA to | right after | after {rows[0]['uptrain']} steps |\n|---|---|---|")
    for n_kv in ("2", "1"):
        print(f"| {n_kv} KV head(s) | {_median_range([r['conversion'][n_kv]['before'] for r in rows])} | "
              f"{_median_range([r['conversion'][n_kv]['after'] for r in rows])} |")
    bits = rows[0]["kivi_bits"]
    print("\n| model, KIVI window | " + " | ".join(f"{b} bits" for b in bits) + " |\n|---|" + "---|" * len(bits))
    for key in rows[0]["kivi"]:
        print(f"| {key} | " + " | ".join(_median_range([r["kivi"][key][i] for r in rows]) for i in range(len(bits)))
              + " |")


def as_python(rows: list[dict]) -> None:
    """The notebook's literal: per-seed recalls, in seed order."""
    rows = sorted(rows, key=lambda r: r["seed"])
    print(f"STORED_QUALITY = {{  # benchmarks/grouped_quality_seeds.py, seeds {[r['seed'] for r in rows]}, "
          f"cap {rows[0]['steps_cap']} steps")
    print("    'designs': {")
    for name in LR:
        print(f"        {name!r}: {{'recall': {[round(r['designs'][name]['recall'], 3) for r in rows]}, "
              f"'reached_99': {[r['designs'][name]['reached_99'] for r in rows]}}},")
    print("    },\n    'conversion': {")
    for n_kv in ("2", "1"):
        print(f"        {int(n_kv)}: {{'before': {[round(r['conversion'][n_kv]['before'], 3) for r in rows]}, "
              f"'after': {[round(r['conversion'][n_kv]['after'], 3) for r in rows]}}},")
    print("    },\n    'kivi': {")
    for key in rows[0]["kivi"]:
        name, window = key.split("; window ")
        print(f"        ({name!r}, {int(window)}): {[[round(r['kivi'][key][i], 3) for r in rows] for i in range(len(rows[0]['kivi_bits']))]},")
    print("    },\n}")


def _describe(job: tuple[int]) -> str:
    return f"seed {job[0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid_runner.add_arguments(parser, "grouped_quality_seeds.jsonl", default_workers=1)
    parser.add_argument("--python", action="store_true", help="with --summarise: print the notebook's literal")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="the seeds to run")
    args = parser.parse_args()
    if args.summarise:
        (as_python if args.python else summarise)(grid_runner.read_rows(args.summarise))
        return
    rows = grid_runner.run_grid(
        args, [(s,) for s in args.seeds], run, key=lambda r: _describe((r["seed"],)), describe=_describe,
        report=lambda r: f"seed {r['seed']}: " + ", ".join(
            f"{n} {d['recall']:.1%} (99% at {d['reached_99']})" for n, d in r["designs"].items())
        + f" ({r['seconds']:.0f} s)")
    summarise(rows)
    as_python(rows)


if __name__ == "__main__":
    main()
