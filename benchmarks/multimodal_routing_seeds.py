"""Chapter 09's seeded studies: scan orders against attention, and Mixture-of-Depths capacity, 3 seeds.

Usage::

    python benchmarks/multimodal_routing_seeds.py --workers 1 --out benchmarks/results/multimodal_routing_seeds.jsonl
    python benchmarks/multimodal_routing_seeds.py --summarise benchmarks/results/multimodal_routing_seeds.jsonl

Two studies, each the notebook's own configuration (the notebook runs one seed of a slice of them live):

* ``mod`` — ``mm.MoDViT`` on the 8×8 digits (64 pixel tokens, width 32, 3 blocks of 4 heads, every block routed)
  at capacity 1, 0.5 and 0.25, trained from scratch at two budgets (150 steps, the notebook's, and 600) of 32
  images, AdamW lr 3e-3. Each row holds the test accuracy at the trained capacity, the same model's accuracy run
  at capacity 1 (every token through every block, never seen in training), and the forward FLOPs relative to
  capacity 1 (``harness.costs.encoder_layer_flops`` at the routed token count plus the router's ``2·N·d``).
* ``scan`` — ``mm.PatchClassifier`` (2 blocks, width 32) on ``mm.segment_task`` (6×6, 3,000 training and 600
  test images, one pixel per token) with the mixer ``mm.scan_mixer(order, 6, 6)`` (the chapter's gated
  recurrence) for the orders row, column, snake, bidirectional and cross; bidirectional ``SoftmaxAttention``
  (4 heads); and chapter 07's registry entry ``gated_deltanet`` inside ``mm.scan_mixer("row", …)``. 150 steps of
  32 images, lr 3e-3. Each row holds the test accuracy and the recall of each class (horizontal, vertical, none).

Seeds {0, 1, 2} set the initialisation and the minibatch stream; the data are fixed. One torch thread per run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import grid_runner  # benchmarks/grid_runner.py: the pool, the JSONL file, --resume and --only

SEEDS = (0, 1, 2)
CAPACITIES = (1.0, 0.5, 0.25)
MOD_BUDGETS = (150, 600)
SCAN_MIXERS = ("row", "column", "snake", "bidirectional", "cross", "attention", "row, gated_deltanet")
SCAN_STEPS, BATCH, LR, GRID = 150, 32, 3e-3, 6


def mod_flops(capacity: float, n: int = 64, d: int = 32, layers: int = 3) -> float:
    """Forward FLOPs of one image through the routed ViT (every block at ``capacity``)."""
    from labsupport.harness.costs import encoder_layer_flops
    from labsupport.multimodal import kept_count

    k = kept_count(n, capacity)
    return layers * (encoder_layer_flops(k, d, mlp_ratio=2)["total"] + 2 * n * d)


def _test_accuracy(model, images, labels, **kwargs) -> float:
    import torch

    with torch.no_grad():
        return float((model(images, **kwargs).argmax(-1) == labels).float().mean())


def run(job: tuple) -> dict:
    """One training run; returns its row for the JSONL file."""
    import torch

    torch.set_num_threads(1)
    from labsupport import hybrid
    from labsupport import multimodal as mm

    study = job[0]
    start = time.perf_counter()
    if study == "mod":
        _, capacity, steps, seed = job
        digits = mm.load_digits()
        model = mm.seeded(lambda: mm.MoDViT(image_size=8, patch=1, channels=1, d_model=32, n_layers=3, n_heads=4,
                                            n_classes=10, capacity=capacity), seed)
        mm.train_classifier(model, digits.train_images, digits.train_labels, steps=steps, batch=BATCH, lr=LR,
                            seed=seed)
        model.eval()
        return {"study": "mod", "capacity": capacity, "steps": steps, "seed": seed,
                "accuracy": _test_accuracy(model, digits.test_images, digits.test_labels),
                "accuracy_run_at_1": _test_accuracy(model, digits.test_images, digits.test_labels, capacity=1.0),
                "flops_vs_full": mod_flops(capacity) / mod_flops(1.0), "batch": BATCH, "lr": LR,
                "seconds": time.perf_counter() - start}
    _, mixer_name, seed = job
    from labsupport.lm.layers import attention_mixer

    train_set, test_set = mm.segment_task(3000, GRID, seed=1), mm.segment_task(600, GRID, seed=2)
    if mixer_name == "attention":
        mixer = attention_mixer(4, causal=False)
    elif mixer_name == "row, gated_deltanet":
        mixer = mm.scan_mixer("row", GRID, GRID, inner=hybrid.get("gated_deltanet").build)
    else:
        mixer = mm.scan_mixer(mixer_name, GRID, GRID)
    model = mm.seeded(lambda: mm.PatchClassifier(image_size=GRID, patch=1, channels=1, d_model=32, n_layers=2,
                                                 n_classes=3, mixer=mixer), seed)
    mm.train_classifier(model, *train_set, steps=SCAN_STEPS, batch=BATCH, lr=LR, seed=seed)
    model.eval()
    with torch.no_grad():
        pred = model(test_set[0]).argmax(-1)
    recall = [float((pred[test_set[1] == c] == c).float().mean()) for c in range(3)]
    return {"study": "scan", "mixer": mixer_name, "steps": SCAN_STEPS, "seed": seed,
            "accuracy": float((pred == test_set[1]).float().mean()), "recall": recall, "batch": BATCH, "lr": LR,
            "seconds": time.perf_counter() - start}


def describe(job: tuple) -> str:
    if job[0] == "mod":
        return f"mod capacity {job[1]} steps {job[2]} seed {job[3]}"
    return f"scan {job[1]} seed {job[2]}"


def key(row: dict) -> str:
    if row["study"] == "mod":
        return f"mod capacity {row['capacity']} steps {row['steps']} seed {row['seed']}"
    return f"scan {row['mixer']} seed {row['seed']}"


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def summarise(rows: list[dict]) -> None:
    """Markdown tables: mean ± sd over the seeds."""
    mod: dict[tuple, list[dict]] = defaultdict(list)
    scan: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        (mod[(row["steps"], row["capacity"])] if row["study"] == "mod" else scan[row["mixer"]]).append(row)
    print("| steps | capacity | FLOPs vs c = 1 | seeds | accuracy | run at c = 1 | seconds |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")
    for (steps, capacity), group in sorted(mod.items(), key=lambda item: (item[0][0], -item[0][1])):
        print(f"| {steps} | {capacity} | {group[0]['flops_vs_full']:.0%} | {len(group)} | "
              f"{_mean_sd([r['accuracy'] for r in group])} | {_mean_sd([r['accuracy_run_at_1'] for r in group])} | "
              f"{statistics.mean(r['seconds'] for r in group):.0f} |")
    print("\n| mixer | seeds | accuracy | recall horizontal / vertical / none | seconds |\n|---|---:|---:|---:|---:|")
    for name in SCAN_MIXERS:
        group = scan.get(name, [])
        if not group:
            continue
        recall = " / ".join(f"{statistics.mean(r['recall'][c] for r in group):.2f}" for c in range(3))
        print(f"| {name} | {len(group)} | {_mean_sd([r['accuracy'] for r in group])} | {recall} | "
              f"{statistics.mean(r['seconds'] for r in group):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid_runner.add_arguments(parser, "multimodal_routing_seeds.jsonl", default_workers=1)
    args = parser.parse_args()
    if args.summarise:
        summarise(grid_runner.read_rows(args.summarise))
        return
    jobs = [("scan", name, seed) for seed in SEEDS for name in SCAN_MIXERS]
    jobs += [("mod", c, steps, seed) for steps in MOD_BUDGETS for seed in SEEDS for c in CAPACITIES]
    rows = grid_runner.run_grid(
        args, jobs, run, key=key, describe=describe,
        report=lambda row: f"{key(row):45s} accuracy {row['accuracy']:.3f} ({row['seconds']:.0f} s)")
    summarise(rows)


if __name__ == "__main__":
    main()
