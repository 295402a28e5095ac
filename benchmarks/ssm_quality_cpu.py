"""Chapter 04's quality measurements on CPU: selective copying (LTI vs selective SSM) and MQAR recall.

Usage::

    python benchmarks/ssm_quality_cpu.py                          # both parts, about 30 minutes on one core
    python benchmarks/ssm_quality_cpu.py --part copy              # selective copying only
    python benchmarks/ssm_quality_cpu.py --part mqar --designs "Mamba (d_state 16)"   # one MQAR row

Both experiments train the same TinyLM (2 layers, no MLP, no position table) with equal budgets
from several seeds, and print one line per design with the mean and range.

* Selective copying (Mamba paper, Table 1, at laptop scale): sequences of 24 tokens hiding 3 data
  tokens (vocabulary 8) among noise; copy them in order. The same gated Mamba block with its SSM
  time-invariant (S4D-Real, an FFT convolution) or selective (S6). 800 steps, batch 32, lr 5e-3.
* MQAR (labsupport.lm.probe): 64 tokens, 4 pairs, d_model 32, 600 steps, batch 64, lr 1e-2, two
  seeds, through ``probe_seeds``: softmax attention, chapter 03's linear attention and DeltaNet,
  Mamba with d_state 4 and 16 (the Mamba runs dominate the time: a selective scan updates
  ``64 × d_state`` numbers per token and layer).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from labsupport.harness.settings import seed_everything
from labsupport.lm.model import TinyLM
from labsupport.lm.probe import MQARProbe, probe_seeds
from labsupport.lm.tasks import make_selective_copy
from labsupport.lm.training import evaluate_recall, train
from labsupport.ssm.mixers import mamba_mixer

SEEDS = (0, 1, 2)


def selective_copy(selective: bool, seed: int) -> float:
    seed_everything(seed)
    model = TinyLM(8, d_model=32, n_layers=2, max_len=24, channel_mixer=None, positional="none",
                   sequence_mixer=mamba_mixer(8, selective=selective))
    eval_batch = make_selective_copy(512, 24, 3, 8, seed=1234)
    train(model, lambda g: make_selective_copy(32, 24, 3, 8, generator=g), steps=800, lr=5e-3, seed=seed,
          progress=False)
    return evaluate_recall(model, eval_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("copy", "mqar", "both"), default="both")
    parser.add_argument("--designs", nargs="*", default=None, help="MQAR rows to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, python {sys.version.split()[0]}, "
          f"1 thread, {time.strftime('%Y-%m-%d')}")
    if args.part in ("copy", "both"):
        copy_rows()
    if args.part in ("mqar", "both"):
        mqar_rows(args.designs)


def copy_rows() -> None:
    for selective in (False, True):
        start = time.perf_counter()
        scores = [selective_copy(selective, s) for s in SEEDS]
        name = "selective (S6)" if selective else "time-invariant (S4D)"
        print(f"selective copying | {name:22s} | mean {sum(scores) / len(scores):.1%} | "
              f"range {min(scores):.1%}-{max(scores):.1%} | {time.perf_counter() - start:.0f} s", flush=True)


def mqar_rows(only: list[str] | None) -> None:
    try:  # chapter 03 (a benchmark may import any family)
        from labsupport.linear_attention import linear_mixer
    except ImportError:
        from labsupport.linear_attention_mixers import linear_mixer

    designs = {"softmax attention": "attention", "ch03 linear attention": linear_mixer("linear", n_heads=1),
               "ch03 DeltaNet": linear_mixer("deltanet", n_heads=1),
               "Mamba (d_state 4)": mamba_mixer(4), "Mamba (d_state 16)": mamba_mixer(16)}
    for pairs in (4,):
        for label, mixer in designs.items():
            if only and label not in only:
                continue
            start = time.perf_counter()
            summary = probe_seeds(mixer, MQARProbe(seq_len=64, num_pairs=pairs), steps=600, seeds=(0, 1),
                                  batch_size=64, d_model=32, positional="none" if label.startswith("Mamba") else "learned",
                                  label=label, progress=False)
            print(f"MQAR {pairs} pairs | {label:22s} | mean {summary.mean:.1%} | range {summary.low:.1%}-"
                  f"{summary.high:.1%} | {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
