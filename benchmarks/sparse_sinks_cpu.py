"""Look for attention sinks: train a character LM, measure the attention its heads park on position 0, and what
removing the first tokens from a sliding window does to its perplexity.

    python benchmarks/sparse_sinks_cpu.py --d-model 128 --layers 4 --heads 4 --length 128 --batch 32 --steps 1500
    python benchmarks/sparse_sinks_cpu.py ... --sink-token          # every window opened by a dedicated sink token

Chapter 05 quotes these runs (``benchmarks/BENCHMARKS.md``, "Looking for attention sinks"): StreamingLLM's collapse
needs a model that parks surplus attention on its first tokens, and the course's small models were checked for one.
The model is ``labsupport.sparse.checkpoints.char_model`` (RoPE attention + MLP) trained by ``labsupport.lm.train``
on the shipped Shakespeare corpus (seed 0, one torch thread). Printed: validation perplexity at four points, the
share of each head's attention on position 0 (queries from ``length / 4`` on, 16 held-out windows), and perplexity
over the same queries with the full causal mask, a window of 16, and the window with the first tokens kept.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from labsupport import sparse
from labsupport.harness.settings import seed_everything
from labsupport.lm.tasks import CharCorpus
from labsupport.lm.training import evaluate_perplexity, train
from labsupport.sparse.checkpoints import char_model, with_sink_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--sink-token", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seed_everything(0)
    corpus = CharCorpus.from_data("shakespeare.txt")
    sink = int(args.sink_token)
    model = char_model(corpus.vocab_size + sink, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads)
    length = args.length
    val = corpus.sample_batch(16, length, split="val", seed=1234)
    val = with_sink_token(val, corpus.vocab_size) if sink else val

    def batches(g: torch.Generator):
        batch = corpus.sample_batch(args.batch, length, generator=g)
        return with_sink_token(batch, corpus.vocab_size) if sink else batch

    start = time.time()
    history = train(model, batches, steps=args.steps, lr=args.lr, seed=0, eval_batch=val,
                    eval_every=max(1, args.steps // 4), evaluate=evaluate_perplexity, label="sinks", progress=False)
    print(f"trained in {time.time() - start:.0f} s; validation perplexity {history.eval_accuracy}")

    layers = [block.mixer for block in model.blocks]
    model.eval()
    for module in layers:
        module.record_attention = True
    with torch.no_grad():
        model(val.inputs)
    shares = [module.last_attention[:, :, length // 4:, 0].mean(dim=(0, 2)) for module in layers]
    for module in layers:
        module.record_attention = False
    uniform = float(sum(1 / (i + 1) for i in range(length // 4, length)) / (length - length // 4))
    for index, share in enumerate(shares):
        print(f"layer {index}: attention on position 0 by head " + ", ".join(f"{float(x):.1%}" for x in share)
              + f" (uniform: {uniform:.1%})")

    def perplexity(mask: torch.Tensor | None) -> float:
        sparse.set_static_mask(model, mask)
        with torch.no_grad():
            logits = model(val.inputs)
        sparse.set_static_mask(model, None)
        q0 = length // 4
        return math.exp(float(F.cross_entropy(logits[:, q0:].flatten(0, 1), val.targets[:, q0:].flatten())))

    w = args.window
    print(f"perplexity (queries from {length // 4}): full {perplexity(None):.3f}; window {w} "
          f"{perplexity(sparse.sliding_window_mask(length, window=w)):.3f}; 4 first tokens + window {w - 4} "
          f"{perplexity(sparse.sink_window_mask(length, sinks=4, window=w - 4)):.3f}; first token + window {w - 1} "
          f"{perplexity(sparse.sink_window_mask(length, sinks=1, window=w - 1)):.3f}")


if __name__ == "__main__":
    main()
