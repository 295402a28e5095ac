"""Chapter 07: is the course's Mamba right before it is ranked? MQAR-64 (4 pairs) at longer budgets and wider.

The frontier's laptop grid trains 400 steps; Zoology's MQAR runs train for thousands (e.g. 20 epochs of 10,000
examples). This script trains the registry's Mamba (and attention, as the control) for ``--steps`` at widths and
learning rates given on the command line, seed 0, one row per run in ``--out`` (JSONL)::

    python benchmarks/hybrid_mamba_check.py --steps 1200 --widths 32 64 --lrs 3e-3 1e-2 \\
        --out benchmarks/results/hybrid_mamba_check.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    parser.add_argument("--designs", nargs="+", default=["mamba", "attention"],
                        help="registry names, or mamba_refinit: the registry's Mamba with reference_init=True")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/hybrid_mamba_check.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from labsupport.hybrid import registry
    from labsupport.hybrid.tasks import SUITE
    from labsupport.lm.probe import probe

    task = SUITE["mqar"](64)
    with open(args.out, "a") as out:
        for width in args.widths:
            for design in args.designs:
                for lr in args.lrs:
                    if design == "mamba_refinit":
                        from labsupport.ssm.mixers import MambaMixer

                        spec = registry.get("mamba")
                        build = lambda d, i: MambaMixer(d, registry.MAMBA_STATE, reference_init=True)  # noqa: E731
                    else:
                        spec = registry.get(design)
                        build = spec.build
                    start = time.perf_counter()
                    result = probe(build, task, steps=args.steps, lr=lr, seed=0, batch_size=args.batch,
                                   d_model=width, positional=spec.positional, progress=False,
                                   eval_every=args.steps // 4)
                    row = {"kind": "mamba_check", "design": design, "width": width, "lr": lr, "seed": 0,
                           "steps": args.steps, "batch": args.batch, "task": "mqar", "seq_len": 64,
                           "recall": result.score, "curve": result.history.eval_accuracy,
                           "seconds": time.perf_counter() - start}
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(f"{design} width {width} lr {lr:g}: recall {result.score:.3f} "
                          f"(curve {[round(x, 3) for x in result.history.eval_accuracy]}, {row['seconds']:.0f} s)",
                          flush=True)


if __name__ == "__main__":
    main()
