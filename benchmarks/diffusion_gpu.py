"""Chapter 08 on a GPU: the shipped masked-diffusion denoiser's decoding speed against the AR model with its KV cache.

Run from the repository root on a machine with a CUDA GPU (exits 0 without one):

    python3 benchmarks/diffusion_gpu.py [--out DIR] [--repeats 10]

The shipped checkpoints (``data/``: the denoiser and the AR model of the same size), moved to the GPU in
float32. Continuation of a 96-character prompt by 32 characters, everyone sampling at temperature 1 from a
seeded generator, as ``benchmarks/diffusion_cpu.py`` does on a CPU: the denoiser at 1, 2, 4, 8 tokens per step
(low-confidence remasking), with blocks of 8 and the cache, and the AR model decoding with its KV cache. For
batch 1 and batch 16: wall time per call (median of ``--repeats``, the device synchronised before the clock is
read) and tokens per second. These models are tiny (a few hundred thousand parameters), so every call is bound
by kernel launches, not by the GPU's arithmetic or memory: the table says how many calls each sampler makes,
which is what sets its time here. Writes ``DIR/diffusion_gpu.json`` and ``DIR/diffusion_gpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # runs from a plain checkout

import torch  # noqa: E402

PROMPT, NEW = 96, 32


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up, the device synchronised around each."""
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cpu-smoke", action="store_true", help="run every row once on the CPU (a test of the script)")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.repeats = 1
    elif not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one; nothing was measured (benchmarks/diffusion_cpu.py runs on a CPU)")
        return
    from labsupport import diffusion as dif
    from labsupport.lm.tasks import CharCorpus

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    info = {"device": "cpu (smoke run)" if args.cpu_smoke else torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
            "prompt": PROMPT, "new": NEW}
    print("device:", info, flush=True)
    os.makedirs(args.out, exist_ok=True)
    denoiser, config = dif.load_checkpoint(dif.DIFFUSION_CHECKPOINT)
    ar, _ = dif.load_checkpoint(dif.AR_CHECKPOINT)
    denoiser, ar = denoiser.to(device).eval(), ar.to(device).eval()
    mask, seq = denoiser.mask_id, config["max_len"]
    windows = CharCorpus.from_data().sample_batch(16, seq, split="val", seed=2024).inputs.to(device)
    canvas = windows.clone()
    canvas[:, PROMPT:PROMPT + NEW] = mask
    canvas = canvas[:, :PROMPT + NEW]
    prompts = windows[:, :PROMPT]
    rows = []

    def gen():  # the samplers draw their random numbers on the CPU (a CPU generator), whatever the model's device
        return torch.Generator().manual_seed(0)

    with torch.no_grad():
        for per_step, block in ((1, None), (2, None), (4, None), (8, None), (1, 8), (4, 8)):
            row = {"sampler": "diffusion low-confidence" + (f", blocks {block} + cache" if block else ""),
                   "tokens_per_step": per_step, "calls": NEW // per_step}
            try:
                def run(batch, per_step=per_step, block=block):
                    return dif.diffusion_sample(denoiser, canvas[:batch], steps=NEW // per_step, generator=gen(),
                                                temperature=1.0, block_length=block, cache=block is not None)
                for batch in (1, 16):
                    seconds = timed(lambda: run(batch), args.repeats)
                    row[f"ms_batch{batch}"] = 1e3 * seconds
                    row[f"tok_s_batch{batch}"] = batch * NEW / seconds
            except Exception as error:  # noqa: BLE001 - a sampler option this version does not take
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        for threshold in (0.9, 0.5):
            row = {"sampler": f"diffusion threshold {threshold} (blocks 8)", "tokens_per_step": "varies", "calls": "—"}
            try:
                for batch in (1, 16):
                    seconds = timed(lambda: dif.threshold_sample(denoiser, canvas[:batch], threshold=threshold,
                                                                 block_length=8, temperature=1.0, generator=gen()),
                                    args.repeats)
                    row[f"ms_batch{batch}"] = 1e3 * seconds
                    row[f"tok_s_batch{batch}"] = batch * NEW / seconds
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        row = {"sampler": "AR + KV cache", "tokens_per_step": 1, "calls": NEW}
        try:
            for batch in (1, 16):
                seconds = timed(lambda: dif.ar_generate(ar, prompts[:batch], NEW, generator=gen(), temperature=1.0),
                                args.repeats)
                row[f"ms_batch{batch}"] = 1e3 * seconds
                row[f"tok_s_batch{batch}"] = batch * NEW / seconds
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)

    def f(v):
        return "—" if v is None else f"{v:.1f}"
    lines = [f"Device: {info['device']}; torch {info['torch']}; prompt {PROMPT}, {NEW} new characters, temperature 1, "
             "float32; median wall time of the call (device synchronised).", "",
             "| sampler | tokens/step | calls | ms (batch 1) | tok/s (batch 1) | ms (batch 16) | tok/s (batch 16) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['tokens_per_step']} | {r['calls']} | {f(r.get('ms_batch1'))} | "
                     f"{f(r.get('tok_s_batch1'))} | {f(r.get('ms_batch16'))} | {f(r.get('tok_s_batch16'))} |")
    errors = [f"{r['sampler']}: {r['error']}" for r in rows if "error" in r]
    lines += ["", "Did not run:", *[f"- {e}" for e in errors]]
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(args.out, "diffusion_gpu.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(args.out, "diffusion_gpu.json"), "w") as fh:
        json.dump({"info": info, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
