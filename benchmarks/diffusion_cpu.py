"""Chapter 08 benchmark: the shipped masked-diffusion denoiser against the same-size AR model, on a CPU.

Measures, in one run, on held-out windows of data/shakespeare.txt:

1. likelihood: the AR model's exact NLL per character and the denoiser's bound (Monte-Carlo ELBO);
2. continuation (96-character prompt, 32 new characters, temperature 1): for 1, 2, 4, 8 tokens per step with
   low-confidence and random remasking, and blocks of 8 with the cache, the judge NLL (nats/char under the AR
   model) and the entropy of the generated characters, and the wall time / tokens per second for one prompt
   (batch 1) and for a batch of 16; the AR model decoding with its KV cache beside them;
3. infilling (a gap of 1, 4, 8, 16 characters in the middle of a 128-character window): characters right (greedy,
   one token per step) and nats per character of the true gap (denoiser bound given both sides; AR exact NLL
   given the left side).

Times are the minimum of ``--repeats`` calls on one torch thread (labsupport.harness.measuring.time_callable).
Usage: ``python benchmarks/diffusion_cpu.py [--windows 256] [--prompts 64] [--repeats 5] [--out result.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from labsupport import diffusion as dif  # noqa: E402
from labsupport.diffusion.evaluation import judge_nll, span_accuracy, span_nll, unigram_entropy_bits  # noqa: E402
from labsupport.harness.measuring import time_callable  # noqa: E402
from labsupport.lm.tasks import CharCorpus  # noqa: E402

PROMPT, NEW = 96, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    corpus = CharCorpus.from_data()
    denoiser, config = dif.load_checkpoint(dif.DIFFUSION_CHECKPOINT)
    ar, _ = dif.load_checkpoint(dif.AR_CHECKPOINT)
    mask, seq = denoiser.mask_id, config["max_len"]
    result: dict = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": args.threads, "date": time.strftime("%Y-%m-%d")}

    val = corpus.sample_batch(args.windows, seq, split="val", seed=2024).inputs
    ar_nll = judge_nll(ar, val, 1)
    bound = float(dif.elbo_per_sequence(denoiser, val, samples=16, generator=torch.Generator().manual_seed(0)).mean())
    result["likelihood"] = {"ar_nll": ar_nll, "ar_ppl": math.exp(ar_nll), "diffusion_bound": bound / seq,
                            "diffusion_ppl_bound": math.exp(bound / seq), "windows": args.windows}
    print(f"likelihood on {args.windows} held-out windows: AR {ar_nll:.3f} nats/char (ppl {math.exp(ar_nll):.2f}); "
          f"denoiser bound {bound / seq:.3f} (ppl ≤ {math.exp(bound / seq):.2f})")

    prompts = val[:args.prompts]
    canvas = prompts.clone()
    canvas[:, PROMPT:] = mask
    grid = [(k, rem, None) for rem in ("low_confidence", "random") for k in (1, 2, 4, 8)]
    grid += [(2, "low_confidence", 8), (8, "low_confidence", 8)]
    rows = []
    for per_step, remasking, block in grid:
        kwargs = dict(steps=NEW // per_step, remasking=remasking, block_length=block, cache=block is not None)
        out = dif.diffusion_sample(denoiser, canvas, temperature=1.0, generator=torch.Generator().manual_seed(0),
                                   **kwargs)
        one = time_callable(lambda: dif.diffusion_sample(denoiser, canvas[:1], **kwargs), repeats=args.repeats)
        sixteen = time_callable(lambda: dif.diffusion_sample(denoiser, canvas[:16], **kwargs), repeats=args.repeats)
        rows.append({"sampler": f"diffusion {remasking}" + (f" blocks {block} + cache" if block else ""),
                     "tokens_per_step": per_step, "calls": NEW // per_step, "judge_nll": judge_nll(ar, out.tokens, PROMPT),
                     "entropy_bits": unigram_entropy_bits(out.tokens[:, PROMPT:]), "ms_batch1": 1e3 * one,
                     "tok_s_batch1": NEW / one, "tok_s_batch16": 16 * NEW / sixteen})
    gen = dif.ar_generate(ar, prompts[:, :PROMPT], NEW, temperature=1.0, generator=torch.Generator().manual_seed(0))
    one = time_callable(lambda: dif.ar_generate(ar, prompts[:1, :PROMPT], NEW), repeats=args.repeats)
    sixteen = time_callable(lambda: dif.ar_generate(ar, prompts[:16, :PROMPT], NEW), repeats=args.repeats)
    rows.append({"sampler": "AR + KV cache", "tokens_per_step": 1, "calls": NEW,
                 "judge_nll": judge_nll(ar, gen, PROMPT), "entropy_bits": unigram_entropy_bits(gen[:, PROMPT:]),
                 "ms_batch1": 1e3 * one, "tok_s_batch1": NEW / one, "tok_s_batch16": 16 * NEW / sixteen})
    truth = {"judge_nll": judge_nll(ar, prompts, PROMPT), "entropy_bits": unigram_entropy_bits(prompts[:, PROMPT:])}
    result["continuation"] = {"rows": rows, "real_text": truth, "prompts": args.prompts}
    print(f"\ncontinuation: {args.prompts} prompts of {PROMPT} characters, {NEW} new, temperature 1")
    print("| sampler | tokens/step | calls | ms (batch 1) | tok/s (batch 1) | tok/s (batch 16) | judge NLL | entropy (bits) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['tokens_per_step']} | {r['calls']} | {r['ms_batch1']:.1f} | "
              f"{r['tok_s_batch1']:.0f} | {r['tok_s_batch16']:.0f} | {r['judge_nll']:.3f} | {r['entropy_bits']:.2f} |")
    print(f"| the real text | | | | | | {truth['judge_nll']:.3f} | {truth['entropy_bits']:.2f} |")

    windows = corpus.sample_batch(args.windows, seq, split="val", seed=77).inputs
    infill = []
    for gap in (1, 4, 8, 16):
        start, end = seq // 2 - gap // 2, seq // 2 - gap // 2 + gap
        filled = dif.diffusion_sample(denoiser, dif.infill_canvas(windows, start, end, mask), steps=gap).tokens
        continued = dif.ar_generate(ar, windows[:, :start], gap)
        infill.append({"gap": gap, "diffusion_acc": span_accuracy(filled, windows, start, end),
                       "ar_acc": span_accuracy(continued, windows, start, end),
                       "diffusion_bound": float(span_nll(denoiser, windows, start, end, samples=16,
                                                         generator=torch.Generator().manual_seed(0)).mean()),
                       "ar_nll": float(span_nll(ar, windows, start, end).mean())})
    result["infilling"] = infill
    print(f"\ninfilling: {args.windows} windows, gap in the middle")
    print("| gap | diffusion chars right | AR chars right (left side only) | diffusion bound (nats/char) | AR exact NLL |")
    print("|---|---|---|---|---|")
    for r in infill:
        print(f"| {r['gap']} | {r['diffusion_acc']:.3f} | {r['ar_acc']:.3f} | {r['diffusion_bound']:.3f} | "
              f"{r['ar_nll']:.3f} |")
    result["seconds"] = time.perf_counter() - started
    print(f"\n{result['seconds']:.0f} s in all; {result['machine']}, torch {result['torch']}, {args.threads} thread(s)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
