"""Train the three small models chapter 05 ships in ``data/`` (safetensors), with their settings in the metadata.

    python benchmarks/sparse_train_checkpoints.py --out data/        # ~10 minutes on 2 CPU cores

* ``sparse_char_lm.safetensors`` — a character-level softmax LM (RoPE attention, ``labsupport.sparse``'s
  ``SparseAttention``) on the shipped Shakespeare corpus, trained on windows of ``--char-len`` characters.
* ``sparse_char_lm_sink.safetensors`` — the same model and budget, every training window starting with a
  dedicated sink token (id = corpus vocabulary size), as StreamingLLM's "pre-training with a sink token".
* ``sparse_mqar.safetensors`` — a 2-layer attention model (2 heads, short convolution, no MLP) trained on MQAR
  mixed half and half with needle-in-a-haystack batches at random depths: the recall model of the chapter's
  needle and recall-vs-budget sections.

Everything is seeded (``--seed``); the settings and the final validation figures go into each file's metadata
and are printed. ``data/PROVENANCE.md`` records the command that made the shipped files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from labsupport.harness.settings import seed_everything
from labsupport.lm.probe import MQARProbe
from labsupport.lm.tasks import CharCorpus, TaskBatch, make_needle
from labsupport.lm.training import evaluate_perplexity, evaluate_recall, train
from labsupport.sparse.checkpoints import char_model, mqar_model, with_sink_token

CHAR_MODEL = {"d_model": 96, "n_layers": 2, "n_heads": 4}
MQAR_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 2, "short_conv": 4}
MQAR_TASK = {"seq_len": 128, "num_pairs": 8, "vocab_size": 128}


def recall_batch(task: MQARProbe, batch_size: int, generator: torch.Generator) -> TaskBatch:
    """Half MQAR, half needle-in-a-haystack at a random depth: pairs must be found wherever they sit.

    Trained on MQAR alone, the model learns that pairs always open the sequence (a positional shortcut) and
    misses a needle placed later, even with the full cache.
    """
    mqar = task.train_batch(batch_size // 2, generator)
    depth = float(torch.rand((), generator=generator))
    needle = make_needle(batch_size - batch_size // 2, task.seq_len, depth, task.vocab_size, generator=generator)
    return TaskBatch(torch.cat([mqar.inputs, needle.inputs]), torch.cat([mqar.targets, needle.targets]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--char-steps", type=int, default=1500)
    parser.add_argument("--char-len", type=int, default=256)
    parser.add_argument("--char-batch", type=int, default=16)
    parser.add_argument("--mqar-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["char", "sink", "mqar"], nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = CharCorpus.from_data("shakespeare.txt")
    todo = args.only or ["char", "sink", "mqar"]
    for name in todo:
        seed_everything(args.seed)
        start = time.perf_counter()
        if name in ("char", "sink"):
            sink = name == "sink"
            vocab = corpus.vocab_size + (1 if sink else 0)
            model = char_model(vocab, **CHAR_MODEL)

            def batches(g: torch.Generator, sink: bool = sink) -> TaskBatch:
                batch = corpus.sample_batch(args.char_batch, args.char_len, generator=g)
                return with_sink_token(batch, corpus.vocab_size) if sink else batch

            val = corpus.sample_batch(32, args.char_len, split="val", seed=1234)
            val = with_sink_token(val, corpus.vocab_size) if sink else val
            history = train(model, batches, steps=args.char_steps, lr=3e-3, seed=args.seed, eval_batch=val,
                            eval_every=args.char_steps, evaluate=evaluate_perplexity, label=name)
            score = {"val_perplexity": history.eval_accuracy[-1]}
            settings = {**CHAR_MODEL, "vocab_size": vocab, "train_len": args.char_len, "steps": args.char_steps,
                        "batch": args.char_batch, "lr": 3e-3, "sink_token": corpus.vocab_size if sink else -1}
            filename = "sparse_char_lm_sink.safetensors" if sink else "sparse_char_lm.safetensors"
        else:
            model = mqar_model(MQAR_TASK["vocab_size"], **MQAR_MODEL)
            task = MQARProbe(**MQAR_TASK)
            history = train(model, lambda g: recall_batch(task, 64, g), steps=args.mqar_steps, lr=3e-3,
                            seed=args.seed, eval_batch=task.eval_batch(), eval_every=args.mqar_steps,
                            evaluate=evaluate_recall, label="mqar")
            needle_eval = make_needle(256, MQAR_TASK["seq_len"], 0.5, MQAR_TASK["vocab_size"], seed=4321)
            score = {"val_recall": history.eval_accuracy[-1], "needle_recall_depth_0.5": evaluate_recall(model, needle_eval)}
            settings = {**MQAR_MODEL, **MQAR_TASK, "steps": args.mqar_steps, "batch": 64, "lr": 3e-3,
                        "needle_share": 0.5}
            filename = "sparse_mqar.safetensors"
        settings.update(seed=args.seed, seconds=round(time.perf_counter() - start, 1), **score)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(args.out / filename), metadata={"settings": json.dumps(settings)})
        print(f"{filename}: {json.dumps(settings)}", flush=True)


if __name__ == "__main__":
    main()
