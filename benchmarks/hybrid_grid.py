"""Chapter 07's full frontier grid, sharded over worker processes, in priority tiers under a time budget.

One command runs it from the repository root (torch and numpy are all it needs; the repo is put on the path)::

    python benchmarks/hybrid_grid.py --workers 14 --budget-s 390 --out $OUT/hybrid_grid.jsonl
    python benchmarks/hybrid_grid.py --estimate                      # the plan and its estimated time, no training
    python benchmarks/hybrid_grid.py --summarise benchmarks/results/hybrid_grid.jsonl

Every run is one JSONL row, flushed as it finishes; ``--resume`` skips the rows already in ``--out`` (the same
keys as :mod:`hybrid_frontier`, whose summary and the widget read these rows too). Each quality configuration
(design, task, length, width) gets the best of a learning-rate grid *and* three seeds in two phases: phase 1
trains seed 0 at every rate of ``LRS``; as soon as those rows are in, phase 2 trains seeds 1 and 2 at the rate
that won. The scheduler runs the tiers in order (longest job first inside a tier, phase-2 jobs as they become
ready) and starts no job that its cost model says would end after ``--budget-s``; whatever does not fit is
listed at the end, so a second call with ``--resume`` continues where the first stopped.

The tiers (width 64, batch 32, 300 steps, two layers unless a pattern says otherwise; no position table, as in
Zoology — the short convolution and the sparse rows' RoPE carry order):

1. costs of every registered mixer; MQAR-64 (4 pairs, Zoology's generator) for every registry row, every preset of
   :data:`labsupport.hybrid.stacks.PRESETS` and three two-layer hybrids (``pair:X+attention``); Mamba at width
   128 (Zoology's widths);
2. the MAD-style tasks (fuzzy and noisy recall, selective copy, compression, memorisation; MQAR is the
   in-context recall) for the MAD set: the parents and their two-layer hybrids;
3. MQAR at growing length and pairs (128 / 8, 256 / 16) for the recall set;
4. where attention goes and how much of it a fixed-state stack needs: four-layer linear-attention stacks
   (``stack:PATTERN/hH``: ``L`` linear attention with ``H`` heads, state ``d²/H`` per layer; ``A`` attention)
   on MQAR-128; Mamba at width 256;
5. needle in a haystack (128 tokens) and char-LM perplexity (128 characters of data/shakespeare.txt).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grid_runner  # noqa: E402 - benchmarks/grid_runner.py

WIDTH, BATCH, STEPS, DEPTH = 64, 32, int(os.environ.get("HYBRID_GRID_STEPS", "300")), 2
#: where the quality runs train (``--device``; the spawned workers read it from the environment); cost rows
#: always time the CPU
DEVICE = os.environ.get("HYBRID_GRID_DEVICE", "cpu")
LRS = (3e-3, 1e-2)
SEEDS = (0, 1, 2)
PAIRS = ("linear+attention", "gated_deltanet+attention", "mamba+attention")
MAMBA_BEARING = ("mamba", "hymba_attention+mamba", "hymba_sliding_window+mamba", "pair:mamba+attention", "jamba",
                 "mamba_refinit")
MAD_TASKS = (("fuzzy_recall", 64), ("noisy_recall", 64), ("selective_copy", 64), ("compression", 32),
             ("memorization", 64))
# the MAD set: three hybrids and their parents (gpt_oss is sliding window + attention, 1 : 1, two layers)
# the MAD set: two hybrids and their parents (gpt_oss is sliding window + attention, 1 : 1, two layers);
# MAD_MORE adds a third (gated DeltaNet + attention) in a later tier
MAD_SET = ("attention", "sliding_window", "linear", "pair:linear+attention", "gpt_oss")
MAD_MORE = ("gated_deltanet", "pair:gated_deltanet+attention")
RECALL_SET = ("attention", "sliding_window", "linear", "deltanet", "gated_deltanet", "pair:linear+attention",
              "pair:gated_deltanet+attention")
STACKS = tuple(f"stack:{p}/h{h}" for h in (1, 16) for p in ("LLLL", "LLLA", "LALA")) + \
    ("stack:AAAA/h1", "stack:ALLL/h1", "stack:LALL/h1")
#: The Mamba-bearing designs train at one rate (1e-2: the better of 3e-3 and 1e-2 for Mamba at widths 32 and 64
#: in benchmarks/results/hybrid_mamba_check.jsonl), three seeds started at once: one of their runs costs ten of
#: the others', and a two-phase rate search would not end inside the window. Jamba runs at width 32, with
#: Mamba and attention at width 32 beside it (same rate): its eight layers at width 64 outlast the window.
FIXED_RATE = 1e-2
JAMBA_WIDTH = 32
#: cost rows at once (a 16K-token attention prefill holds a 16K × 16K score matrix per head: ~4 GB)
COST_AT_ONCE = 3

#: No position table for any design, as Zoology's MQAR models (``max_position_embeddings=0``): order comes from the
#: short convolution in front of every mixer (and RoPE inside the sparse rows). The laptop grid gave chapter 00's
#: attention a learned table and it lost to the same attention with RoPE (28% against 84%): a position confound.
POSITIONAL = "none"

#: one layer's training-step cost relative to the reference model (attention, 2 layers, L = 128, width 64,
#: batch 32) on one core: measured on the 2-core dev machine (ms per step at L = 128, width 64: attention 62 for
#: the whole 2-layer model, of which ~16 is embedding, head and conv).
LAYER_COST = {"attention": 23, "gqa": 20, "mqa": 19, "mla": 20, "sliding_window": 26, "sinks": 34, "h2o": 33,
              "tova": 25, "quest": 25, "linear": 28, "retnet": 24, "gla": 194, "deltanet": 77,
              "gated_deltanet": 100, "ttt": 73, "mamba": 673, "s4d": 70, "ssd": 111,
              "hymba_attention+mamba": 640, "hymba_sliding_window+mamba": 650}
MODEL_OVERHEAD, REFERENCE_MS = 16.0, 62.0


# --------------------------------------------------------------------------- designs


def _stack(design: str):
    """``stack:PATTERN/hH``: ``L`` = linear attention with ``H`` heads, ``A`` = the registry's attention."""
    from labsupport.hybrid import registry
    from labsupport.linear_attention.mixers import LinearAttentionMixer

    pattern, heads = design.split(":", 1)[1].split("/h")
    heads_ = int(heads)

    def build(d_model: int, layer_index: int):
        if pattern[layer_index] == "A":
            return registry.get("attention").build(d_model, layer_index)
        return LinearAttentionMixer(d_model, heads_, mechanism="linear")
    names = ["attention" if c == "A" else "linear" for c in pattern]
    return build, len(pattern), "learned", names


def build_design(design: str):
    """``(factory, n_layers, positional, layer names)``: a registry row (2 layers), a preset, a pair, a stack,
    or ``mamba_refinit`` (the registry's Mamba with Mamba's reference initialisation of its projections)."""
    from labsupport.hybrid import PRESETS, registry
    from labsupport.hybrid.stacks import layer_names, pattern_factory

    if design.startswith("stack:"):
        return _stack(design)
    if design == "mamba_refinit":
        from labsupport.hybrid.registry import MAMBA_STATE, own_conv
        from labsupport.ssm.mixers import MambaMixer

        return ((lambda d, i: own_conv(MambaMixer(d, MAMBA_STATE, reference_init=True))), DEPTH, "none",
                ["mamba"] * DEPTH)
    if design.startswith("pair:"):
        first, second = design[5:].split("+")
        legend = {"X": first, "Y": second}
        wanted = {registry.get(n).positional for n in (first, second)}
        return (pattern_factory("XY", legend), 2, "learned" if "learned" in wanted else "none",
                layer_names("XY", legend, 2))
    if design in PRESETS:
        preset = PRESETS[design]
        return preset.factory(), len(preset.pattern), preset.positional, preset.layer_names()
    spec = registry.get(design)
    return spec.build, DEPTH, spec.positional, [design] * DEPTH


def _layers(design: str) -> list[str]:
    if design.startswith("stack:"):
        pattern = design.split(":", 1)[1].split("/h")[0]
        return ["attention" if c == "A" else "linear" for c in pattern]
    return build_design(design)[3]


def estimate(job: tuple) -> float:
    """Seconds the job takes on the reference core (scaled by the calibration at start)."""
    kind, design, task, length, lr, seed, width = job
    if kind == "cost":
        return 45.0 if design in ("h2o", "tova", "quest") else 20.0
    step_ms = MODEL_OVERHEAD + sum(LAYER_COST.get(n, 100) for n in _layers(design))
    scale = (length / 128) * (width / 64)
    seconds = STEPS * step_ms * scale / 1000 + 2.0
    from labsupport.hybrid import registry

    if task != "char_lm" and any(registry.get(n).exact_until is not None for n in _layers(design)):
        seconds += 0.02 * length * len(_layers(design))   # token-by-token scoring
    return seconds


# --------------------------------------------------------------------------- the plan


def configurations() -> list[tuple[str, str, int, int, int]]:
    """(design, task, seq_len, width, tier) of every quality configuration; a lower tier starts first.

    Tier 0: the frontier's Mamba-bearing designs (the longest runs, started at once so that they end in the
    window) and Jamba with its parents at width 32; tier 1: the rest of the frontier (MQAR-64); tier 2: the
    MAD-style tasks for the MAD set (and the cost rows); tier 3: the attention fraction and placement stacks;
    tier 4: the MAD set's third hybrid, MQAR at 128 and 256 tokens; tier 5: Mamba at width 128, needle, char-LM.
    """
    from labsupport.hybrid import PRESETS, registry

    frontier = [d for d in list(registry.names()) + list(PRESETS) + [f"pair:{p}" for p in PAIRS] if d != "jamba"]
    out = [(d, "mqar", 64, WIDTH, 0) for d in frontier if d in MAMBA_BEARING]
    out += [(d, "mqar", 64, JAMBA_WIDTH, 0) for d in ("jamba", "mamba", "attention")]
    # is the course's Mamba right? the same block started as Mamba's reference code starts it (issue 21 (b))
    out += [("mamba_refinit", "mqar", 64, w, 0) for w in (WIDTH, JAMBA_WIDTH)]
    out += [(d, "mqar", 64, WIDTH, 1) for d in frontier if d not in MAMBA_BEARING]
    out += [(d, t, L, WIDTH, 2) for t, L in MAD_TASKS for d in MAD_SET]
    out += [(d, "mqar", 128, WIDTH, 3) for d in STACKS]
    out += [(d, t, L, WIDTH, 4) for t, L in MAD_TASKS for d in MAD_MORE]
    out += [(d, "mqar", L, WIDTH, 4) for L in (128, 256) for d in RECALL_SET]
    out += [(d, "mqar", 64, 128, 5) for d in ("mamba", "mamba_refinit")]
    out += [(d, t, 128, WIDTH, 5) for t in ("needle", "char_lm") for d in MAD_SET]
    return out


def fixed_rate(design: str, width: int, task: str = "mqar") -> bool:
    """Whether the configuration trains at :data:`FIXED_RATE` only (three seeds at once, no rate search)."""
    return width == JAMBA_WIDTH or (design in MAMBA_BEARING and width == WIDTH and task == "mqar")


def rates(design: str, width: int = WIDTH, task: str = "mqar") -> tuple[float, ...]:
    return (FIXED_RATE,) if fixed_rate(design, width, task) else LRS


def runs_per_config(design: str, width: int = WIDTH, task: str = "mqar") -> int:
    return len(SEEDS) if fixed_rate(design, width, task) else len(LRS) + len(SEEDS) - 1


def cost_jobs() -> list[tuple]:
    from labsupport.hybrid import registry

    return [("cost", name, "cost", 0, 0.0, 0, WIDTH) for name in registry.names()]


# --------------------------------------------------------------------------- the runs (in the workers)


def run(job: tuple) -> dict:
    import torch

    torch.set_num_threads(1)
    deadline = float(os.environ.get("HYBRID_GRID_DEADLINE", "inf"))
    try:
        if job[0] == "cost":
            from hybrid_frontier import run_cost

            return run_cost(job)
        return run_quality(job, deadline)
    except Exception as error:  # noqa: BLE001 - one broken design must not stop the grid; its row says why
        import traceback

        kind, design, task, length, lr, seed, width = job
        return {"kind": kind, "design": design, "task": task, "seq_len": length, "lr": lr, "seed": seed,
                "width": width, "metric": "recall", "score": None, "failed": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()[-2000:]}


def run_quality(job: tuple, deadline: float = float("inf")) -> dict:
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

    def moved(batch: TaskBatch) -> TaskBatch:
        return batch if device.type == "cpu" else TaskBatch(batch.inputs.to(device), batch.targets.to(device),
                                                             batch.info)
    factory, n_layers, positional, names = build_design(design)
    if task_name == "char_lm":
        task = CharLMProbe(CharCorpus.from_data(), seq_len=length)
    else:
        task = SUITE[task_name](length)
    seed_everything(seed)
    body = TinyLM(task.vocab_size, d_model=width, n_layers=n_layers, max_len=length, sequence_mixer=factory,
                  channel_mixer=None, short_conv=4, positional=POSITIONAL)
    model = (task.model(body) if hasattr(task, "model") else body).to(device)
    inexact = any(registry.get(n).exact_until is not None for n in names if n in registry.names())
    evaluate = evaluate_perplexity if task.metric == "perplexity" else evaluate_recall
    eval_batch = moved(task.eval_batch())
    start = time.perf_counter()
    error = None
    try:
        history = train(model, lambda g: moved(task.train_batch(BATCH, g)), steps=STEPS, lr=lr, seed=seed,
                        eval_batch=eval_batch, eval_every=STEPS, evaluate=evaluate, progress=False)
        score = history.eval_accuracy[-1]
        if inexact and task.metric == "recall" and model is body:
            score = decode_recall(model, eval_batch)
        final_loss = history.losses[-1]
    except FloatingPointError as exc:  # a diverged run scores zero recall (or no perplexity) at this lr
        score, final_loss, error = (0.0 if task.metric == "recall" else float("inf")), float("nan"), str(exc)
    return {"kind": "quality", "design": design, "task": task_name, "seq_len": length, "lr": lr, "seed": seed,
            "width": width, "layers": n_layers, "layer_names": names, "steps": STEPS, "batch": BATCH,
            "positional": POSITIONAL, "short_conv": 4,
            "metric": task.metric, "score": score, "final_loss": final_loss, "error": error,
            "parameters": count_parameters(model), "decode_scored": bool(inexact and model is body),
            "seconds": time.perf_counter() - start, "estimate_s": estimate(job), "device": str(device),
            "family": _family(design)}


def _family(design: str) -> str:
    from labsupport.hybrid import registry

    if design == "mamba_refinit":
        return "ssm"
    if design.startswith(("pair:", "stack:")) or design not in registry.names():
        return "hybrid"
    return registry.get(design).family


# --------------------------------------------------------------------------- the scheduler


def _describe(job: tuple) -> str:
    kind, design, task, length, lr, seed, width = job
    if kind == "cost":
        return f"cost {design} width {width}"
    return f"{design} {task} {length} lr {lr:g} seed {seed} width {width}"


def _key(row: dict) -> str:
    if row["kind"] == "cost":
        return f"cost {row['design']} width {row['width']}"
    return f"{row['design']} {row['task']} {row['seq_len']} lr {row['lr']:g} seed {row['seed']} width {row['width']}"


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if metric == "recall" else a < b


def best_lr(rows: list[dict], config: tuple) -> float | None:
    """The rate whose seed-0 run scored best for ``config`` (design, task, seq_len, width); None until all are in."""
    design, task, length, width = config
    scores = {}
    for r in rows:
        if (r["kind"] == "quality" and r["design"] == design and r["task"] == task and r["seq_len"] == length
                and r["width"] == width and r["seed"] == 0 and r.get("score") is not None):
            scores[r["lr"]] = (r["score"], r["metric"])
    grid = rates(design, width, task)
    if any(lr not in scores for lr in grid):
        return None
    metric = next(iter(scores.values()))[1]
    best = grid[0]
    for lr in grid[1:]:
        if _better(metric, scores[lr][0], scores[best][0]):
            best = lr
    return best


def calibrate() -> float:
    """Seconds per step of the reference model here, over REFERENCE_MS: the factor every estimate is scaled by."""
    import torch

    from labsupport.hybrid import registry
    from labsupport.lm.model import TinyLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyLM(64, d_model=64, n_layers=2, max_len=128, sequence_mixer=registry.get("attention").build,
                   channel_mixer=None, short_conv=4)
    optimiser = torch.optim.AdamW(model.parameters(), 1e-3)
    tokens = torch.randint(0, 64, (BATCH, 128))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(10):
        step()
    return (time.perf_counter() - start) / 10 * 1000 / REFERENCE_MS


def plan(rows: list[dict], configs: list[tuple]) -> list[tuple[int, tuple]]:
    """(tier, job) of every job not yet in ``rows`` that can run now: phase 1 always, phase 2 once its rate is known."""
    done = {_key(r) for r in rows}
    out = []
    for design, task, length, width, tier in configs:
        if fixed_rate(design, width, task):
            jobs = [("quality", design, task, length, FIXED_RATE, s, width) for s in SEEDS]
        else:
            lr = best_lr(rows, (design, task, length, width))
            jobs = [("quality", design, task, length, x, 0, width) for x in LRS]
            if lr is not None:
                jobs += [("quality", design, task, length, lr, s, width) for s in SEEDS[1:]]
        out += [(tier, j) for j in jobs if _describe(j) not in done]
    return out


def run_scheduled(args: argparse.Namespace) -> list[dict]:
    configs = [c for c in configurations() if all(t in " ".join(map(str, c)) for t in args.only)
               and (not args.designs or c[0] in args.designs.split(","))
               and (not args.widths or c[3] in [int(w) for w in args.widths.split(",")])
               and c[0] not in args.exclude.split(",")]
    rows = grid_runner.read_rows(args.out) if args.resume and Path(args.out).exists() else []
    factor = args.factor if args.factor is not None else calibrate() * args.contention
    total_full = sum(estimate(j) for j in cost_jobs()) + sum(
        estimate(("quality", d, t, L, 0.0, 0, w)) * runs_per_config(d, w, t) for d, t, L, w, _ in configs)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
          f"{sys.version.split()[0]}, torch {__import__('torch').__version__}; {args.workers} workers of 1 thread; "
          f"calibration x{factor:.2f} of the dev machine's core (contention allowance x{args.contention}); "
          f"the whole grid is ~{total_full * factor / 60:.0f} worker-minutes, ~{total_full * factor / 60 / args.workers:.1f} "
          f"min of wall time with {args.workers} workers; budget {args.budget_s:.0f} s; {len(rows)} rows already in "
          f"{args.out}", flush=True)
    if args.estimate:
        tiers: dict[int, float] = defaultdict(float)
        for d, t, L, w, tier in configs:
            tiers[tier] += estimate(("quality", d, t, L, 0.0, 0, w)) * runs_per_config(d, w, t) * factor
        tiers[2] += sum(estimate(j) for j in cost_jobs()) * factor
        for tier, seconds in sorted(tiers.items()):
            print(f"tier {tier}: ~{seconds / 60:.0f} worker-minutes")
        return rows
    start = time.time()
    deadline = start + args.budget_s
    os.environ["HYBRID_GRID_DEADLINE"] = str(deadline)
    costs = [] if args.quality_only else [j for j in cost_jobs() if all(t in _describe(j) for t in args.only)]
    in_flight: dict[str, object] = {}
    skipped: set[str] = set()
    mode = "a" if args.resume else "w"
    with mp.get_context("spawn").Pool(args.workers) as pool, open(args.out, mode) as out:
        def ready() -> list[tuple]:
            todo = [(2, j) for j in costs if _describe(j) not in {_key(r) for r in rows}] + plan(rows, configs)
            todo = [(t, j) for t, j in todo if _describe(j) not in in_flight and _describe(j) not in skipped]
            todo.sort(key=lambda tj: (tj[0], -estimate(tj[1])))
            return [j for _, j in todo]

        while True:
            for job in ready():
                if len(in_flight) >= args.workers:
                    break
                if job[0] == "cost" and sum(k.startswith("cost ") for k in in_flight) >= COST_AT_ONCE:
                    continue
                if time.time() + estimate(job) * factor > deadline + args.grace_s:
                    skipped.add(_describe(job))
                    continue
                in_flight[_describe(job)] = pool.apply_async(run, (job,))
            if not in_flight:
                break
            finished = [k for k, res in in_flight.items() if res.ready()]  # type: ignore[attr-defined]
            if not finished:
                if time.time() > deadline + args.grace_s + 30:
                    print(f"# hard stop: {len(in_flight)} runs still going after the budget and grace; they are "
                          "dropped (rerun with --resume)", flush=True)
                    pool.terminate()
                    break
                time.sleep(0.2)
                continue
            for k in finished:
                row = in_flight.pop(k).get()  # type: ignore[attr-defined]
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"[{time.time() - start:5.0f} s] {_report(row)}", flush=True)
    left = ready_after = plan(rows, configs)
    print(f"# done in {time.time() - start:.0f} s: {len(rows)} rows in {args.out}; {len(left)} runs not started "
          f"(over budget, or phase 2 waiting on them){'; rerun with --resume' if left else ''}", flush=True)
    del ready_after
    return rows


def _report(row: dict) -> str:
    if row.get("failed"):
        return f"{_key(row)}: FAILED {row['failed']}"
    if row["kind"] == "cost":
        return f"cost {row['design']}: decode 16K {row['decode_ms_16384']:.3f} ms"
    return f"{_key(row)}: {row['metric']} {row['score']:.3f} ({row['seconds']:.0f} s, est {row['estimate_s']:.0f})"


# --------------------------------------------------------------------------- summary


def _cell(hit) -> str:
    if hit is None:
        return "—"
    if hit.metric == "perplexity":
        return f"{hit.mean:.2f} ({hit.seeds})"
    spread = f"{min(hit.scores):.0%}–{max(hit.scores):.0%}" if hit.seeds > 1 else "1 seed"
    return f"{hit.mean:.0%} ({spread})"


def summarise(rows: list[dict]) -> None:
    """Markdown tables: every configuration, the MQAR-64 frontier with its costs and Pareto marks, MAD averages."""
    from labsupport.hybrid import registry
    from labsupport.hybrid.results import mad_average, stack_state_numbers, summaries
    from labsupport.hybrid.widget import frontier_points, pareto_mask

    results = summaries(rows)
    for width in sorted({c[3] for c in results}):
        tasks = list(dict.fromkeys((c[1], c[2]) for c in results if c[3] == width))
        designs = list(dict.fromkeys(c[0] for c in results if c[3] == width))
        print(f"\nWidth {width} (mean over seeds at the winning rate; seed range):\n")
        print("| design | " + " | ".join(f"{t} {L}" for t, L in tasks) + " |")
        print("|---|" + "---|" * len(tasks))
        for d in designs:
            print(f"| {d} | " + " | ".join(_cell(results.get((d, t, L, width))) for t, L in tasks) + " |")
    averages = {d: mad_average(results, d) for d in MAD_SET + MAD_MORE}
    if any(v is not None for v in averages.values()):
        print("\nMAD average (six tasks, width 64):", ", ".join(f"{d} {v:.1%}" for d, v in averages.items()
                                                              if v is not None))
    stacks = sorted(c for c in results if c[0].startswith("stack:"))
    for c in stacks:
        print(f"{c[0]}: state {stack_state_numbers(c[0], 16384, c[3]) * 2 / 16384:,.1f} B/token at 16K, "
              f"MQAR-{c[2]} {_cell(results[c])}")
    costs = [r for r in rows if r["kind"] == "cost" and not r.get("failed")]
    if costs:
        print("\n| mixer | prefill ms 1K/4K/16K | decode ms 1K/16K/128K* | read B/token 1K/16K/128K |")
        print("|---|---|---|---|")
        for r in costs:
            print(f"| {r['design']} | {r['prefill_ms_1024']:.1f} / {r['prefill_ms_4096']:.1f} / "
                  f"{r['prefill_ms_16384']:.0f} | {r['decode_ms_1024']:.3f} / {r['decode_ms_16384']:.3f} / "
                  f"{r['decode_ms_131072_extrapolated']:.2f} | {r['read_bytes_1024']:,} / {r['read_bytes_16384']:,} / "
                  f"{r['read_bytes_131072']:,} |")
    for width in sorted({c[3] for c in results if c[1:3] == ("mqar", 64)}):
        points = [p for p in frontier_points(rows, task="mqar", seq_len=64, width=width)
                  if all(n in registry.names() for n in p.layers)]
        if len(points) < 2:
            continue
        on_bytes = pareto_mask([p.bytes_per_token for p in points], [p.recall for p in points])
        timed = [p for p in points if p.decode_ms is not None]
        on_time = dict(zip((p.design for p in timed),
                           pareto_mask([p.decode_ms for p in timed], [p.recall for p in timed])))
        print(f"\nMQAR-64 frontier at width {width}:\n")
        print("| design | family | recall (seeds, lr) | state B/token 16K | decode ms/token 16K | Pareto: bytes, time |")
        print("|---|---|---|---|---|---|")
        for p, ob in sorted(zip(points, on_bytes), key=lambda x: -x[0].recall):
            decode = "—" if p.decode_ms is None else f"{p.decode_ms:.3f}"
            print(f"| {p.design} | {p.family} | {p.recall:.1%} ({min(p.seed_scores):.0%}–{max(p.seed_scores):.0%}, "
                  f"{len(p.seed_scores)}, lr {p.lr:g}) | {p.bytes_per_token:,.1f} | {decode} | "
                  f"{'●' if ob else '·'}, {'●' if on_time.get(p.design) else '·'} |")


def main() -> None:
    global STEPS, DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid_runner.add_arguments(parser, "benchmarks/results/hybrid_grid.jsonl")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="the time budget in seconds: no run starts that the cost model says would end after "
                             "budget + grace; at budget + grace + 30 s the runs still going are dropped")
    parser.add_argument("--grace-s", type=float, default=90.0, help="see --budget-s")
    parser.add_argument("--contention", type=float, default=1.3,
                        help="allowance for many workers sharing memory bandwidth (multiplies the calibration)")
    parser.add_argument("--estimate", action="store_true", help="print the plan's estimated time and exit")
    parser.add_argument("--quality-only", action="store_true", help="skip the cost rows")
    parser.add_argument("--designs", default="", help="comma-separated designs: keep only their configurations")
    parser.add_argument("--exclude", default="", help="comma-separated designs: drop their configurations")
    parser.add_argument("--device", default="cpu",
                        help="where the quality runs train (e.g. cuda; the cost rows always time the CPU)")
    parser.add_argument("--factor", type=float, default=None,
                        help="scale the cost model by this instead of calibrating on the CPU (e.g. for --device cuda)")
    parser.add_argument("--widths", default="", help="comma-separated widths: keep only configurations at them")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per run (default {STEPS}; a smaller number only to test the script)")
    args = parser.parse_args()
    if args.summarise:
        rows = []
        for path in args.summarise.split(","):
            rows += grid_runner.read_rows(path)
        summarise(rows)
        return
    if args.workers < 1:
        raise SystemExit(f"--workers must be at least 1, got {args.workers}")
    if args.steps is not None:
        STEPS = args.steps
        os.environ["HYBRID_GRID_STEPS"] = str(args.steps)   # the spawned workers read it on import
    DEVICE = args.device
    os.environ["HYBRID_GRID_DEVICE"] = args.device   # the spawned workers read it on import
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = run_scheduled(args)
    if not args.estimate:
        summarise(rows)


if __name__ == "__main__":
    main()
