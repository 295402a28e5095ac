"""Chapter 08 benchmark, second edition: the samplers the chapter adds, over 3 sampling seeds, on a CPU.

The chapter's continuation task (held-out prompts of 96 characters, 32 new characters, everyone sampling at
temperature 1): the judge NLL (nats/char of the generated text under the shipped AR model) and the entropy of the
generated characters, as a mean ± sd over ``--seeds`` sampling seeds (each seed: every prompt), for

1. ReMDM-style revision of committed tokens (``labsupport.diffusion.revision_sample``) against plain low-confidence
   remasking at the same number of denoiser calls (16 and 32), and with twice as many calls as tokens (64);
2. LLaDA's classifier-free guidance (``diffusion_sample(guidance=w)``) at 2 tokens per step;
3. block decoding (blocks of 8, 2 tokens per step): bidirectional uncached / approximate cache, and BD3-LM's
   block-causal attention uncached / with the exact cache — positions processed, batch-1 wall time, quality;
4. speculative decoding of the AR model with a character n-gram draft (``speculative_generate``): acceptance
   rate, target calls, judge NLL, and batch-1 wall time and tokens/s against plain cached AR decoding, timed the way
   ``benchmarks/diffusion_cpu.py`` times every sampler (fastest of ``--repeats`` calls, one torch thread);
5. the likelihood of the early-stopped AR checkpoint beside the shipped models on the same positions (1..127 of
   each held-out window given position 0), when ``data/diffusion_ar_early_stopped.safetensors`` is present.

Usage: ``python benchmarks/diffusion_samplers_seeds.py [--prompts 32] [--seeds 3] [--repeats 3]
[--jsonl benchmarks/results/diffusion_samplers_seeds.jsonl]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from labsupport import diffusion as dif  # noqa: E402
from labsupport.diffusion.evaluation import judge_nll, unigram_entropy_bits  # noqa: E402
from labsupport.harness.data import read_manifest, data_dir  # noqa: E402
from labsupport.harness.measuring import time_callable  # noqa: E402
from labsupport.lm.tasks import CharCorpus  # noqa: E402

PROMPT, NEW = 96, 32


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jsonl", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    corpus = CharCorpus.from_data()
    denoiser, config = dif.load_checkpoint(dif.DIFFUSION_CHECKPOINT)
    ar, _ = dif.load_checkpoint(dif.AR_CHECKPOINT)
    mask, seq = denoiser.mask_id, config["max_len"]
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": args.threads, "date": time.strftime("%Y-%m-%d"), "prompts": args.prompts,
            "seeds": args.seeds}
    rows: list[dict] = []
    prompts = corpus.sample_batch(args.prompts, seq, split="val", seed=2024).inputs
    canvas = prompts.clone()
    canvas[:, PROMPT:] = mask
    seeds = list(range(args.seeds))

    def quality(section: str, name: str, run, **extra) -> dict:
        judges, entropies, info = [], [], {}
        for seed in seeds:
            out = run(torch.Generator().manual_seed(seed))
            tokens = out.tokens if hasattr(out, "tokens") else out
            judges.append(judge_nll(ar, tokens, PROMPT))
            entropies.append(unigram_entropy_bits(tokens[:, PROMPT:]))
            if hasattr(out, "forward_tokens"):
                info["positions_per_prompt"] = out.forward_tokens // tokens.shape[0]
        row = {"section": section, "sampler": name, **extra, **info,
               "judge_nll": mean_sd(judges), "entropy_bits": mean_sd(entropies), "judge_per_seed": judges, **meta}
        rows.append(row)
        print(f"{section:12s} {name:58s} judge {row['judge_nll'][0]:.3f} ± {row['judge_nll'][1]:.3f}   "
              f"entropy {row['entropy_bits'][0]:.2f} ± {row['entropy_bits'][1]:.2f}", flush=True)
        return row

    truth = {"judge_nll": judge_nll(ar, prompts, PROMPT), "entropy_bits": unigram_entropy_bits(prompts[:, PROMPT:])}
    rows.append({"section": "reference", "sampler": "the real text", **truth, **meta})
    print(f"the real continuation: judge {truth['judge_nll']:.3f}, entropy {truth['entropy_bits']:.2f}")

    # 1. ReMDM-style revision against plain low-confidence remasking, at equal denoiser calls.
    for calls in (16, 32):
        quality("revision", f"low-confidence, {calls} calls", lambda g, c=calls: dif.diffusion_sample(
            denoiser, canvas, steps=c, temperature=1.0, generator=g), calls=calls, loop_steps=0, remask=0)
        for choose in dif.REVISION:
            quality("revision", f"revision ({choose}), {calls} calls: {calls // 2} decode + {calls // 2} loop, 2",
                    lambda g, c=calls, ch=choose: dif.revision_sample(
                        denoiser, canvas, steps=c, loop_steps=c // 2, remask=2, choose=ch, temperature=1.0,
                        generator=g), calls=calls, loop_steps=calls // 2, remask=2, choose=choose)
    for choose in dif.REVISION:
        quality("revision", f"revision ({choose}), 64 calls: 32 decode + 32 loop, 2",
                lambda g, ch=choose: dif.revision_sample(denoiser, canvas, steps=64, loop_steps=32, remask=2,
                                                         choose=ch, temperature=1.0, generator=g),
                calls=64, loop_steps=32, remask=2, choose=choose)

    # 2. LLaDA's classifier-free guidance.
    for w in (0.0, 0.5, 1.0, 2.0):
        quality("guidance", f"guidance w = {w}, 2 tokens/step", lambda g, w=w: dif.diffusion_sample(
            denoiser, canvas, steps=NEW // 2, temperature=1.0, guidance=w, generator=g), guidance=w, calls=NEW // 2)

    # 3. Block decoding: approximate vs exact cache.
    one = canvas[:1]
    for name, kwargs in (("bidirectional, no cache", dict()),
                         ("bidirectional, approximate cache", dict(cache="approximate")),
                         ("block-causal, no cache", dict(attention="block_causal")),
                         ("block-causal, exact cache (BD3-LM)", dict(attention="block_causal", cache="exact"))):
        settings = dict(steps=NEW // 2, block_length=8, temperature=1.0, **kwargs)
        row = quality("blocks", f"blocks of 8, 2 tokens/step, {name}", lambda g, s=settings: dif.diffusion_sample(
            denoiser, canvas, generator=g, **s), cache=kwargs.get("cache", False),
                      attention=kwargs.get("attention", "bidirectional"))
        seconds = time_callable(lambda s=settings: dif.diffusion_sample(
            denoiser, one, generator=torch.Generator().manual_seed(0), **s), repeats=args.repeats)
        row.update(ms_batch1=1e3 * seconds, tok_s_batch1=NEW / seconds)
        print(f"{'':12s} {'':58s} {row['positions_per_prompt']} positions, {1e3 * seconds:.1f} ms (batch 1)")

    # 4. Speculative decoding against cached AR decoding, batch 1, timed the same way.
    def ar_run(g: torch.Generator) -> torch.Tensor:
        return dif.ar_generate(ar, prompts[:, :PROMPT], NEW, temperature=1.0, generator=g)

    row = quality("speculative", "AR + KV cache", ar_run)
    seconds = time_callable(lambda: dif.ar_generate(ar, prompts[:1, :PROMPT], NEW, temperature=1.0,
                                                    generator=torch.Generator().manual_seed(0)),
                            repeats=args.repeats)
    row.update(ms_batch1=1e3 * seconds, tok_s_batch1=NEW / seconds, target_calls=NEW)
    print(f"{'':12s} AR: {1e3 * seconds:.1f} ms, {NEW / seconds:.0f} tok/s (batch 1)")
    drafter = dif.NGramDrafter(corpus.train_data, corpus.vocab_size, order=4)
    for k in (2, 4, 6):
        traces: list = []

        def spec_run(g: torch.Generator, k: int = k) -> torch.Tensor:
            outs = []
            for b in range(prompts.shape[0]):
                trace = dif.speculative_generate(ar, drafter, prompts[b:b + 1, :PROMPT], NEW, draft_length=k,
                                                 temperature=1.0, generator=g)
                traces.append(trace)
                outs.append(trace.tokens)
            return torch.cat(outs)

        row = quality("speculative", f"speculative, 4-gram draft, k = {k}", spec_run, draft_length=k)
        seconds = time_callable(lambda k=k: dif.speculative_generate(
            ar, drafter, prompts[:1, :PROMPT], NEW, draft_length=k, temperature=1.0,
            generator=torch.Generator().manual_seed(0)), repeats=args.repeats)
        row.update(ms_batch1=1e3 * seconds, tok_s_batch1=NEW / seconds,
                   acceptance=statistics.fmean(t.acceptance_rate for t in traces),
                   target_calls=statistics.fmean(t.target_calls for t in traces))
        print(f"{'':12s} k = {k}: acceptance {row['acceptance']:.2f}, {row['target_calls']:.1f} target calls, "
              f"{1e3 * seconds:.1f} ms, {NEW / seconds:.0f} tok/s (batch 1)")

    # 5. The early-stopped AR model on the same positions as the others.
    if dif.AR_EARLY_CHECKPOINT in read_manifest(data_dir()):
        early, early_config = dif.load_checkpoint(dif.AR_EARLY_CHECKPOINT)
        val = corpus.sample_batch(args.windows, seq, split="val", seed=2024).inputs
        scored = torch.ones_like(val, dtype=torch.bool)
        scored[:, 0] = False
        bound = float(dif.elbo_per_sequence(denoiser, val, samples=16, where=scored,
                                            generator=torch.Generator().manual_seed(0)).mean()) / (seq - 1)
        likelihood = {"section": "likelihood", "windows": args.windows, "positions": f"1..{seq - 1} given 0",
                      "ar_3000_nll": judge_nll(ar, val, 1), "ar_early_nll": judge_nll(early, val, 1),
                      "ar_early_steps": early_config["settings"].get("stop_after"), "diffusion_bound": bound, **meta}
        rows.append(likelihood)
        print(f"likelihood, {args.windows} windows: AR 3,000 steps {likelihood['ar_3000_nll']:.3f}, AR early-stopped "
              f"{likelihood['ar_early_nll']:.3f}, denoiser bound {bound:.3f} nats/char")
    print(f"{time.perf_counter() - started:.0f} s in all; {meta['machine']}, torch {meta['torch']}, "
          f"{args.threads} thread(s)")
    if args.jsonl:
        args.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with args.jsonl.open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
