"""Chapter 08 benchmark: the shipped masked-diffusion denoiser against the same-size AR model, on a CPU.

Measures, in one run, on held-out windows of data/shakespeare.txt:

1. likelihood, on the same positions for both (characters 1..127 given character 0): the AR model's exact NLL per
   character and the denoiser's bound (Monte-Carlo ELBO);
2. the cost of one denoiser call over the 128-position canvas against one cached AR decode step (batch 1);
3. continuation (96-character prompt, 32 new characters, everyone sampling at temperature 1 from a seeded
   generator, timed the same way): for 1, 2, 4, 8 tokens per step with low-confidence and random remasking, and
   blocks of 8 with the cache, and Fast-dLLM's confidence threshold, the judge NLL (nats/char under the AR model)
   and the entropy of the generated characters, and the wall time / tokens per second for one prompt (batch 1)
   and for a batch of 16; the AR model decoding with its KV cache beside them;
4. infilling (a gap of 1, 2, 4, 8, 16, 32 characters in the middle of a 128-character window): characters right
   (greedy) and nats per character of the true gap (denoiser bound given both sides; AR exact NLL given the left
   side), each as a mean with a 95% confidence interval over the windows; and, for a one-character gap in a
   49-character window, the AR model's exact ``p(c | left, right)`` by Bayes' rule beside the denoiser's exact
   ``p(c | both sides)``.

Times are the minimum of ``--repeats`` calls on one torch thread (labsupport.harness.measuring.time_callable).
Usage: ``python benchmarks/diffusion_cpu.py [--windows 256] [--prompts 64] [--repeats 5] [--out result.json]
[--jsonl rows.jsonl]`` (``--jsonl`` writes one JSON object per measured row).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from labsupport import diffusion as dif  # noqa: E402
from labsupport.diffusion.evaluation import (  # noqa: E402
    ar_gap_log_posterior,
    judge_nll,
    span_nll,
    unigram_entropy_bits,
)
from labsupport.harness.measuring import time_callable  # noqa: E402
from labsupport.lm.tasks import CharCorpus  # noqa: E402

PROMPT, NEW = 96, 32


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval."""
    values = [float(v) for v in values]
    return statistics.fmean(values), 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--jsonl", type=Path)
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
    scored = torch.ones_like(val, dtype=torch.bool)
    scored[:, 0] = False
    bound = float(dif.elbo_per_sequence(denoiser, val, samples=16, where=scored,
                                        generator=torch.Generator().manual_seed(0)).mean()) / (seq - 1)
    result["likelihood"] = {"ar_nll": ar_nll, "ar_ppl": math.exp(ar_nll), "diffusion_bound": bound,
                            "diffusion_ppl_bound": math.exp(bound), "windows": args.windows,
                            "positions": f"1..{seq - 1} given position 0"}
    print(f"likelihood on {args.windows} held-out windows, characters 1..{seq - 1}: AR {ar_nll:.3f} nats/char "
          f"(ppl {math.exp(ar_nll):.2f}); denoiser bound {bound:.3f} (ppl ≤ {math.exp(bound):.2f})")

    sampling = dict(temperature=1.0)
    first = val[:1].clone()
    first[:, PROMPT:] = mask
    canvas_call = time_callable(lambda: denoiser(first), repeats=args.repeats)
    ar_1 = time_callable(lambda: dif.ar_generate(ar, val[:1, :PROMPT], 1), repeats=args.repeats)
    ar_n = time_callable(lambda: dif.ar_generate(ar, val[:1, :PROMPT], NEW), repeats=args.repeats)
    decode_call = (ar_n - ar_1) / (NEW - 1)
    result["call_cost"] = {"canvas_call_ms": 1e3 * canvas_call, "decode_step_ms": 1e3 * decode_call,
                           "ratio": canvas_call / decode_call}
    print(f"one denoiser call over {seq} positions {1e3 * canvas_call:.2f} ms; one AR decode step "
          f"{1e3 * decode_call:.2f} ms; ratio {canvas_call / decode_call:.1f}")

    prompts = val[:args.prompts]
    canvas = prompts.clone()
    canvas[:, PROMPT:] = mask
    grid = [(k, rem, None) for rem in ("low_confidence", "random") for k in (1, 2, 4, 8)]
    grid += [(2, "low_confidence", 8), (8, "low_confidence", 8)]
    rows = []
    for per_step, remasking, block in grid:
        kwargs = dict(steps=NEW // per_step, remasking=remasking, block_length=block, cache=block is not None)
        out = dif.diffusion_sample(denoiser, canvas, generator=torch.Generator().manual_seed(0), **sampling,
                                   **kwargs)
        one = time_callable(lambda: dif.diffusion_sample(denoiser, canvas[:1], generator=torch.Generator()
                                                         .manual_seed(0), **sampling, **kwargs), repeats=args.repeats)
        sixteen = time_callable(lambda: dif.diffusion_sample(denoiser, canvas[:16], generator=torch.Generator()
                                                             .manual_seed(0), **sampling, **kwargs),
                                repeats=args.repeats)
        rows.append({"sampler": f"diffusion {remasking}" + (f" blocks {block} + cache" if block else ""),
                     "tokens_per_step": per_step, "calls": NEW // per_step, "judge_nll": judge_nll(ar, out.tokens, PROMPT),
                     "entropy_bits": unigram_entropy_bits(out.tokens[:, PROMPT:]), "ms_batch1": 1e3 * one,
                     "tok_s_batch1": NEW / one, "tok_s_batch16": 16 * NEW / sixteen})
    for threshold in (0.9, 0.7, 0.5):
        out = dif.threshold_sample(denoiser, canvas, threshold=threshold, block_length=8, **sampling,
                                   generator=torch.Generator().manual_seed(0))
        one_trace = dif.threshold_sample(denoiser, canvas[:1], threshold=threshold, block_length=8, **sampling,
                                         generator=torch.Generator().manual_seed(0))
        one = time_callable(lambda: dif.threshold_sample(denoiser, canvas[:1], threshold=threshold, block_length=8,
                                                         generator=torch.Generator().manual_seed(0), **sampling),
                            repeats=args.repeats)
        sixteen = time_callable(lambda: dif.threshold_sample(denoiser, canvas[:16], threshold=threshold,
                                                             block_length=8, generator=torch.Generator()
                                                             .manual_seed(0), **sampling), repeats=args.repeats)
        rows.append({"sampler": f"diffusion threshold {threshold} (blocks 8)",
                     "tokens_per_step": round(NEW / one_trace.steps, 2), "calls": one_trace.steps,
                     "judge_nll": judge_nll(ar, out.tokens, PROMPT),
                     "entropy_bits": unigram_entropy_bits(out.tokens[:, PROMPT:]), "ms_batch1": 1e3 * one,
                     "tok_s_batch1": NEW / one, "tok_s_batch16": 16 * NEW / sixteen})
    gen = dif.ar_generate(ar, prompts[:, :PROMPT], NEW, generator=torch.Generator().manual_seed(0), **sampling)
    one = time_callable(lambda: dif.ar_generate(ar, prompts[:1, :PROMPT], NEW, generator=torch.Generator()
                                                .manual_seed(0), **sampling), repeats=args.repeats)
    sixteen = time_callable(lambda: dif.ar_generate(ar, prompts[:16, :PROMPT], NEW, generator=torch.Generator()
                                                    .manual_seed(0), **sampling), repeats=args.repeats)
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
    for gap in (1, 2, 4, 8, 16, 32):
        start, end = seq // 2 - gap // 2, seq // 2 - gap // 2 + gap
        filled = dif.diffusion_sample(denoiser, dif.infill_canvas(windows, start, end, mask), steps=gap).tokens
        continued = dif.ar_generate(ar, windows[:, :start], gap)
        infill.append({"gap": gap,
                       "diffusion_acc": mean_ci((filled[:, start:end] == windows[:, start:end]).double().mean(1)),
                       "ar_acc": mean_ci((continued[:, start:end] == windows[:, start:end]).double().mean(1)),
                       "diffusion_bound": mean_ci(span_nll(denoiser, windows, start, end, samples=16,
                                                           generator=torch.Generator().manual_seed(0))),
                       "ar_nll": mean_ci(span_nll(ar, windows, start, end))})
    result["infilling"] = infill
    print(f"\ninfilling: {args.windows} windows, gap in the middle (mean ± 95% CI over windows)")
    print("| gap | diffusion chars right | AR chars right (left side only) | diffusion bound (nats/char) | AR exact NLL |")
    print("|---|---|---|---|---|")
    for r in infill:
        print(f"| {r['gap']} | " + " | ".join(f"{r[k][0]:.3f} ± {r[k][1]:.3f}" for k in
                                              ("diffusion_acc", "ar_acc", "diffusion_bound", "ar_nll")) + " |")
    exact_windows = windows[:min(args.windows, 64), seq // 2 - 32:seq // 2 + 17]
    with torch.no_grad():
        masked = exact_windows.clone()
        masked[:, 32] = mask
        d_nll = -denoiser(masked)[:, 32].log_softmax(-1).gather(1, exact_windows[:, 32:33]).squeeze(1)
        a_left = -ar(exact_windows[:, :32]).log_softmax(-1)[:, -1].gather(1, exact_windows[:, 32:33]).squeeze(1)
    a_both = -ar_gap_log_posterior(ar, exact_windows, 32).gather(1, exact_windows[:, 32:33]).squeeze(1)
    result["one_char_gap"] = {"windows": exact_windows.shape[0], "context": "32 left, 16 right",
                              "diffusion_exact": mean_ci(d_nll), "ar_left_only": mean_ci(a_left),
                              "ar_both_sides_bayes": mean_ci(a_both)}
    g = result["one_char_gap"]
    print(f"one-character gap, {g['windows']} windows of 49 characters: denoiser {g['diffusion_exact'][0]:.3f} ± "
          f"{g['diffusion_exact'][1]:.3f}, AR left only {g['ar_left_only'][0]:.3f} ± {g['ar_left_only'][1]:.3f}, "
          f"AR both sides (Bayes) {g['ar_both_sides_bayes'][0]:.3f} ± {g['ar_both_sides_bayes'][1]:.3f} nats")
    result["seconds"] = time.perf_counter() - started
    print(f"\n{result['seconds']:.0f} s in all; {result['machine']}, torch {result['torch']}, {args.threads} thread(s)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.jsonl:
        meta = {k: result[k] for k in ("machine", "torch", "threads", "date")}
        with args.jsonl.open("w") as handle:
            handle.write(json.dumps({"section": "likelihood", **meta, **result["likelihood"]}) + "\n")
            handle.write(json.dumps({"section": "call_cost", **meta, **result["call_cost"]}) + "\n")
            for row in result["continuation"]["rows"]:
                handle.write(json.dumps({"section": "continuation", **meta, **row}) + "\n")
            for row in result["infilling"]:
                handle.write(json.dumps({"section": "infilling", **meta, **row}) + "\n")
            handle.write(json.dumps({"section": "one_char_gap", **meta, **result["one_char_gap"]}) + "\n")


if __name__ == "__main__":
    main()
