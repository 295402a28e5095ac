"""Chapter 07's frontier: every registered mixer and the hybrid presets on one quality suite and one cost sheet.

The full grid is ``benchmarks/hybrid_grid.py`` (tiers under a time budget, a rate search then three seeds, MAD's
six tasks, the attention-fraction stacks, the Mamba check); this script keeps the laptop grid (``--small``), the
cost rows (``--costs-only``; ``run_cost`` is shared with the full grid) and their summaries.

Usage::

    python benchmarks/hybrid_frontier.py --workers 15 --out benchmarks/results/hybrid_frontier.jsonl
    python benchmarks/hybrid_frontier.py --device cuda --workers 12 ...     # train on a GPU, costs still on CPU
    python benchmarks/hybrid_frontier.py --summarise benchmarks/results/hybrid_frontier.jsonl

Two kinds of row, both through ``grid_runner`` (resumable with ``--resume``, filtered with ``--only``):

* ``kind = "quality"`` — one ``labsupport.lm.training.train`` run: a TinyLM (no MLP, short conv 4, as the
  probe) around the design, on one task of ``labsupport.hybrid.tasks.SUITE`` (MQAR at 64 and 256 tokens,
  fuzzy / noisy recall, selective copy, memorisation, needle at 128 tokens) or char-LM perplexity; seeds
  {0, 1, 2}; MQAR over a learning-rate grid, the rest at one rate. Eviction policies (h2o, tova, quest) are
  scored by decoding token by token (``decode_recall``): their training forward is dense attention.
* ``kind = "cost"`` — one layer of each registered mixer at ``d_model`` (one CPU thread, batch 1): prefill time
  at 1K/4K/16K tokens, decode time per token at 1K and 16K (measured; 128K extrapolated by the bytes read),
  the state bytes held and read per token (bf16, Based's formulas), parameters.

A design is a registry name (``DEPTH`` layers of it), a preset of ``labsupport.hybrid.stacks.PRESETS`` (its own
pattern length), a placement variant (``place:AMMM``), or a parent at a preset's depth (``name@8``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import grid_runner  # benchmarks/grid_runner.py

DEPTH, WIDTH, BATCH = 4, 64, 64
SEEDS = (0, 1, 2)
MQAR_LRS = (1e-3, 3e-3, 1e-2)
OTHER_LR = 3e-3
STEPS = {"mqar": 800, "char_lm": 600}
DEFAULT_STEPS = 600
PLACEMENTS = ("AMMM", "MAMM", "MMMA")          # where one attention layer sits in a 4-layer Mamba stack
FRACTIONS = ("MMMMMMMM", "MMMMMMMA", "MMMAMMMA", "MAMAMAMA")  # 0, 1/8, 2/8, 4/8 attention, 8 layers
MAMBA_WIDTHS = (128, 256)                      # Zoology's widths, for Mamba's check (MQAR only)


def tasks() -> list[tuple[str, int]]:
    return [("mqar", 64), ("mqar", 256), ("fuzzy_recall", 128), ("noisy_recall", 128), ("selective_copy", 128),
            ("memorization", 128), ("needle", 128), ("char_lm", 128)]


def designs() -> list[str]:
    from labsupport.hybrid import PRESETS, registry

    names = registry.names()
    out = list(names) + list(PRESETS)
    out += [f"place:{p}" for p in PLACEMENTS] + [f"frac:{p}" for p in FRACTIONS]
    out += ["mamba@8", "attention@8", "linear@8", "sliding_window@6", "attention@6", "gated_deltanet@4"]
    return out


def build_design(design: str):
    """``(factory, n_layers, positional, layer names)`` of a design."""
    from labsupport.hybrid import PRESETS, registry
    from labsupport.hybrid.stacks import layer_names, pattern_factory

    legend = {"M": "mamba", "A": "attention"}
    if design.startswith(("place:", "frac:")):
        pattern = design.split(":", 1)[1]
        return pattern_factory(pattern, legend), len(pattern), "learned", layer_names(pattern, legend, len(pattern))
    if design in PRESETS:
        preset = PRESETS[design]
        return preset.factory(), len(preset.pattern), preset.positional, preset.layer_names()
    name, _, depth = design.partition("@")
    spec = registry.get(name)
    depth_ = int(depth) if depth else DEPTH
    return spec.build, depth_, spec.positional, [name] * depth_


def quality_jobs() -> list[tuple]:
    """Every quality run, ordered so that a run cut off by a time limit holds whole (task, lr, seed) slices:
    MQAR-64 first, then the needle, MQAR-256, char-LM, the MAD-style tasks; seeds before learning rates."""
    order = ["mqar 64", "needle", "mqar 256", "char_lm", "fuzzy_recall", "noisy_recall", "selective_copy",
             "memorization"]
    ranked = sorted(tasks(), key=lambda tl: next(i for i, o in enumerate(order) if f"{tl[0]} {tl[1]}".startswith(o)))
    jobs = []
    for task, length in ranked:
        lrs = MQAR_LRS if task == "mqar" else (OTHER_LR,)
        for lr in sorted(lrs, key=lambda x: x != 3e-3):
            for seed in SEEDS:
                for design in designs():
                    if design.startswith("frac:") and task != "mqar":
                        continue
                    jobs.append(("quality", design, task, length, lr, seed, WIDTH))
        if task == "mqar" and length == 64:
            jobs += [("quality", "mamba", "mqar", 64, lr, seed, width)
                     for width in MAMBA_WIDTHS for lr in MQAR_LRS for seed in SEEDS]
    return jobs


def cost_jobs() -> list[tuple]:
    from labsupport.hybrid import registry

    return [("cost", name, "cost", 0, 0.0, 0, WIDTH) for name in registry.names()]


def run(job: tuple) -> dict:
    import torch

    torch.set_num_threads(1)
    try:
        return run_cost(job) if job[0] == "cost" else run_quality(job)
    except Exception as error:  # noqa: BLE001 - one broken design must not stop the grid; its row says why
        import traceback

        kind, design, task, length, lr, seed, width = job
        return {"kind": kind, "design": design, "task": task, "seq_len": length, "lr": lr, "seed": seed,
                "width": width, "metric": "recall", "score": None, "failed": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()[-2000:]}


def run_quality(job: tuple) -> dict:
    import torch

    from labsupport.harness.settings import seed_everything
    from labsupport.hybrid import registry
    from labsupport.hybrid.tasks import SUITE, decode_recall
    from labsupport.lm.model import TinyLM, count_parameters
    from labsupport.lm.probe import CharLMProbe
    from labsupport.lm.tasks import CharCorpus, TaskBatch
    from labsupport.lm.training import evaluate_perplexity, evaluate_recall, train

    _, design, task_name, length, lr, seed, width = job
    device = torch.device(DEVICE)
    factory, n_layers, positional, names = build_design(design)
    if task_name == "char_lm":
        task = CharLMProbe(CharCorpus.from_data(), seq_len=length)
    else:
        task = SUITE[task_name](length)
    steps = STEPS.get(task_name, DEFAULT_STEPS)
    seed_everything(seed)
    model = TinyLM(task.vocab_size, d_model=width, n_layers=n_layers, max_len=length, sequence_mixer=factory,
                   channel_mixer=None, short_conv=4, positional=positional).to(device)

    def moved(batch: TaskBatch) -> TaskBatch:
        return TaskBatch(batch.inputs.to(device), batch.targets.to(device), batch.info)

    inexact = any(registry.get(n).exact_until is not None for n in names)
    evaluate = evaluate_perplexity if task.metric == "perplexity" else evaluate_recall
    eval_batch = moved(task.eval_batch())
    start = time.perf_counter()
    error = None
    try:
        history = train(model, lambda g: moved(task.train_batch(BATCH, g)), steps=steps, lr=lr, seed=seed,
                        eval_batch=eval_batch, eval_every=steps, evaluate=evaluate, progress=False)
        score = history.eval_accuracy[-1]
        if inexact and task.metric == "recall":
            score = decode_recall(model, eval_batch)
        final_loss = history.losses[-1]
    except FloatingPointError as exc:  # a diverged run scores zero recall (or no perplexity) at this lr
        score, final_loss, error = (0.0 if task.metric == "recall" else float("inf")), float("nan"), str(exc)
    return {"kind": "quality", "design": design, "task": task_name, "seq_len": length, "lr": lr, "seed": seed,
            "width": width, "layers": n_layers, "layer_names": names, "steps": steps, "batch": BATCH,
            "metric": task.metric, "score": score, "final_loss": final_loss, "error": error,
            "parameters": count_parameters(model), "decode_scored": bool(inexact),
            "seconds": time.perf_counter() - start, "device": str(device)}


def _timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_cost(job: tuple) -> dict:
    import torch

    from labsupport.hybrid import registry

    _, name, _, _, _, _, width = job
    spec = registry.get(name)
    torch.manual_seed(0)
    layer = spec.build(width, 0).eval()
    row = {"kind": "cost", "design": name, "family": spec.family, "width": width,
           "parameters": sum(p.numel() for p in layer.parameters())}
    with torch.no_grad():
        for length in (1024, 4096, 16384):
            x = torch.randn(1, length, width)
            row[f"prefill_ms_{length}"] = 1e3 * _timed(lambda: layer(x), 2 if length > 4096 else 3)
        for context in (1024, 16384):
            x = torch.randn(1, context, width)
            if callable(getattr(layer, "prefill", None)):
                _, state = layer.prefill(x)
            else:  # step through (the eviction caches have no prefill)
                state = None
                for t in range(context):
                    _, state = layer.decode_step(x[:, t:t + 1], state)
            token = torch.randn(1, 1, width)
            times = []
            for _ in range(20):
                start = time.perf_counter()
                _, state = layer.decode_step(token, state)
                times.append(time.perf_counter() - start)
            row[f"decode_ms_{context}"] = 1e3 * min(times)
            row[f"held_bytes_fp32_{context}"] = registry.held_bytes(layer, state)
    for context in (1024, 16384, 131072):
        row[f"state_bytes_{context}"] = spec.state_bytes(context, width)
        row[f"read_bytes_{context}"] = spec.read_bytes(context, width)
    grow = row["read_bytes_131072"] / max(1, row["read_bytes_16384"])
    row["decode_ms_131072_extrapolated"] = row["decode_ms_16384"] * grow if grow > 1 else row["decode_ms_16384"]
    return row


# --------------------------------------------------------------------------- summary


def best_lr_means(rows: list[dict]) -> dict[tuple, tuple[float, float, list[float]]]:
    """(design, task, seq_len, width) → (mean over seeds at the best lr, that lr, the seed scores)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    metric: dict[tuple, str] = {}
    for r in rows:
        if r["kind"] != "quality" or r.get("score") is None:
            continue
        key = (r["design"], r["task"], r["seq_len"], r["width"])
        groups[key + (r["lr"],)].append(r["score"])
        metric[key] = r["metric"]
    best: dict[tuple, tuple[float, float, list[float]]] = {}
    for key5, scores in groups.items():
        key, lr = key5[:4], key5[4]
        mean = statistics.fmean(scores)
        if key not in best or ((mean > best[key][0]) if metric[key] == "recall" else (mean < best[key][0])):
            best[key] = (mean, lr, scores)
    return best


def summarise(rows: list[dict]) -> None:
    global tasks
    if os.environ.get("HYBRID_FRONTIER_SMALL") is None and all(r.get("width") == 32 for r in rows
                                                               if r["kind"] == "quality"):
        tasks = lambda: [("mqar", 64)]  # noqa: E731 - a laptop file: its one task
    best = best_lr_means(rows)
    widths = [r["width"] for r in rows if r["kind"] == "quality"]
    width = max(set(widths), key=widths.count) if widths else WIDTH
    cols = [(t, L) for t, L in tasks()]
    print("| design | " + " | ".join(f"{t} {L}" for t, L in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for design in dict.fromkeys(r["design"] for r in rows if r["kind"] == "quality"):
        cells = []
        for t, L in cols:
            hit = best.get((design, t, L, width))
            if hit is None:
                cells.append("—")
            elif t == "char_lm":
                cells.append(f"{hit[0]:.2f} ({len(hit[2])})")
            else:
                cells.append(f"{hit[0]:.0%} ({min(hit[2]):.0%}–{max(hit[2]):.0%})")
        print(f"| {design} | " + " | ".join(cells) + " |")
    for width in MAMBA_WIDTHS:
        hit = best.get(("mamba", "mqar", 64, width))
        if hit:
            print(f"mamba width {width}: MQAR-64 {hit[0]:.1%} at lr {hit[1]:g} ({hit[2]})")
    costs = [r for r in rows if r["kind"] == "cost" and not r.get("failed")]
    if costs:
        print("\n| mixer | prefill ms 1K/4K/16K | decode ms 1K/16K/128K* | read B/token 1K/16K/128K |")
        print("|---|---|---|---|")
        for r in costs:
            print(f"| {r['design']} | {r['prefill_ms_1024']:.1f} / {r['prefill_ms_4096']:.1f} / "
                  f"{r['prefill_ms_16384']:.0f} | {r['decode_ms_1024']:.3f} / {r['decode_ms_16384']:.3f} / "
                  f"{r['decode_ms_131072_extrapolated']:.2f} | {r['read_bytes_1024']:,} / {r['read_bytes_16384']:,} / "
                  f"{r['read_bytes_131072']:,} |")


def frontier_table(rows: list[dict], task: str = "mqar", seq_len: int = 64) -> None:
    """The frontier as a markdown table: recall (best-lr mean, seed range), state per token, decode time, Pareto."""
    from labsupport.hybrid.widget import frontier_points, pareto_mask

    points = {c: frontier_points(rows, task=task, seq_len=seq_len, context=c) for c in (1024, 16384, 131072)}
    by_bytes = points[16384]
    if not by_bytes:
        return
    on_bytes = dict(zip((p.design for p in by_bytes),
                        pareto_mask([p.bytes_per_token for p in by_bytes], [p.recall for p in by_bytes])))
    timed = [p for p in by_bytes if p.decode_ms is not None]
    on_time = dict(zip((p.design for p in timed), pareto_mask([p.decode_ms for p in timed], [p.recall for p in timed])))
    print(f"\n| design | family | layers | {task}-{seq_len} recall (3 seeds) | state B/token at 1K / 16K / 128K | "
          "decode ms/token at 16K | Pareto: bytes, time |")
    print("|---|---|---|---|---|---|---|")
    for p in sorted(by_bytes, key=lambda p: -p.recall):
        per_c = [next(q for q in points[c] if q.design == p.design).bytes_per_token for c in (1024, 16384, 131072)]
        decode = "—" if p.decode_ms is None else f"{p.decode_ms:.3f}"
        marks = ("●" if on_bytes.get(p.design) else "·") + ", " + ("●" if on_time.get(p.design) else "·")
        print(f"| {p.design} | {p.family} | {' '.join(p.layers)} | {p.recall:.1%} ({min(p.seed_scores):.0%}–"
              f"{max(p.seed_scores):.0%}, lr {p.lr:g}) | {per_c[0]:,.1f} / {per_c[1]:,.1f} / {per_c[2]:,.1f} | "
              f"{decode} | {marks} |")


def _describe(job: tuple) -> str:
    kind, design, task, length, lr, seed, width = job
    if kind == "cost":
        return f"cost {design} width {width}"
    return f"{design} {task} {length} lr {lr:g} seed {seed} width {width}"


def _key(row: dict) -> str:
    if row["kind"] == "cost":
        return f"cost {row['design']} width {row['width']}"
    return f"{row['design']} {row['task']} {row['seq_len']} lr {row['lr']:g} seed {row['seed']} width {row['width']}"


def _report(row: dict) -> str:
    if row.get("failed"):
        return f"{_key(row)}: FAILED {row['failed']}"
    if row["kind"] == "cost":
        return f"cost {row['design']}: decode 16K {row['decode_ms_16384']:.3f} ms"
    return f"{_key(row)}: {row['metric']} {row['score']:.3f} ({row['seconds']:.0f} s)"


DEVICE = "cpu"


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid_runner.add_arguments(parser, "benchmarks/results/hybrid_frontier.jsonl")
    parser.add_argument("--device", default="cpu", help="where the quality runs train (costs are always CPU)")
    parser.add_argument("--costs-only", action="store_true")
    parser.add_argument("--small", action="store_true",
                        help="the laptop grid (see _small)")
    parser.add_argument("--quality-only", action="store_true")
    args = parser.parse_args()
    if args.summarise:
        rows = []
        for path in args.summarise.split(","):
            rows += grid_runner.read_rows(path)
        summarise(rows)
        frontier_table(rows)
        return
    DEVICE = args.device
    import os

    os.environ["HYBRID_FRONTIER_DEVICE"] = args.device
    if args.small:
        os.environ["HYBRID_FRONTIER_SMALL"] = "1"
        _small()
    jobs = ([] if args.quality_only else cost_jobs()) + ([] if args.costs_only else quality_jobs())
    rows = grid_runner.run_grid(args, jobs, run, key=_key, describe=_describe, report=_report)
    summarise(rows)


def _small() -> None:
    """Shrink the grid to what a shared 2-core laptop runs in about 40 minutes on one core (``--small``):
    width 32, registry rows at depth 2, the hybrids without Mamba layers (a Mamba layer costs ~10 attention
    layers on a CPU), MQAR at 64 tokens (4 pairs) only, one learning rate (1e-2), 400 steps of batch 32, 3 seeds."""
    global DEPTH, WIDTH, BATCH, MQAR_LRS, STEPS, DEFAULT_STEPS, FRACTIONS, MAMBA_WIDTHS, tasks, designs
    DEPTH, WIDTH, BATCH, MQAR_LRS, DEFAULT_STEPS = 2, 32, 32, (1e-2,), 400
    STEPS = {"mqar": 400}
    FRACTIONS, MAMBA_WIDTHS = (), ()
    full_designs = designs
    tasks = lambda: [("mqar", 64)]  # noqa: E731
    designs = lambda: [d for d in full_designs()  # noqa: E731
                       if "@" not in d and not d.startswith(("frac:", "place:")) and d != "jamba"]


if __name__ != "__main__":  # a spawned worker reads the device and the grid's size from the environment
    import os as _os

    DEVICE = _os.environ.get("HYBRID_FRONTIER_DEVICE", "cpu")
    if _os.environ.get("HYBRID_FRONTIER_SMALL"):
        _small()

if __name__ == "__main__":
    main()
