"""Train chapter 08's shipped checkpoints: a masked-diffusion denoiser and the same-size autoregressive model.

Both are TinyLM backbones of the same shape (softmax attention + MLP blocks, learned positions) trained on
the same character windows of ``data/shakespeare.txt`` with the same optimiser, schedule, batch and number of
steps (``labsupport.lm.training.train``): the denoiser with the ``1/t``-weighted masked objective
(``labsupport.diffusion.DiffusionObjective``), the autoregressive model with next-character cross-entropy.
Equal budgets, so the likelihood comparison is at equal training compute.

Deterministic for given settings on a given machine (seeded data stream, masks drawn from a CPU generator,
deterministic algorithms requested). Runs on a CPU with small settings::

    python benchmarks/train_diffusion_checkpoints.py --kind diffusion --d-model 32 --n-layers 2 \\
        --steps 40 --batch 16 --seq-len 64 --out /tmp/ckpt

and on a GPU with the shipped ones (the exact command is in data/PROVENANCE.md). Each run writes
``<out>/<checkpoint>.safetensors`` (float16 weights, config + settings in the metadata) and
``<out>/<kind>_summary.json`` (losses, validation numbers, time, machine). ``--stop-after N`` keeps the
schedule of the ``--steps`` run and stops after ``N`` steps: the early-stopped AR model
(``diffusion_ar_early_stopped.safetensors``, summary ``autoregressive_stopped_N_summary.json``). Afterwards copy the files into
``data/`` and regenerate ``data/MANIFEST.sha256`` (command in data/PROVENANCE.md).

Needs only torch, safetensors and tqdm (no plotly): it can run on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from labsupport.diffusion.checkpoints import (  # noqa: E402
    AR_CHECKPOINT,
    AR_EARLY_CHECKPOINT,
    DIFFUSION_CHECKPOINT,
    build_model,
    save_checkpoint,
)
from labsupport.diffusion.process import DiffusionObjective, elbo_per_sequence  # noqa: E402
from labsupport.lm.objectives import next_token_loss  # noqa: E402
from labsupport.lm.tasks import CharCorpus, TaskBatch  # noqa: E402
from labsupport.lm.training import evaluate_perplexity, train  # noqa: E402


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("diffusion", "autoregressive"), required=True)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3_000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--t-min", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-windows", type=int, default=256)
    parser.add_argument("--elbo-samples", type=int, default=16)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="early stopping: keep the learning-rate schedule of a --steps run but stop and save "
                             "after this many steps (a multiple of --eval-every); the run is then exactly the "
                             "first part of the full one, and its checkpoint is the early-stopped one")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.stop_after is not None and (args.stop_after <= 0 or args.stop_after > args.steps
                                        or args.stop_after % args.eval_every):
        raise SystemExit(f"--stop-after must be a multiple of --eval-every ({args.eval_every}) in 1..--steps "
                         f"({args.steps}); got {args.stop_after}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    corpus = CharCorpus.from_data("shakespeare.txt")
    config = {
        "kind": args.kind, "vocab_size": corpus.vocab_size, "d_model": args.d_model, "n_layers": args.n_layers,
        "n_heads": args.n_heads, "max_len": args.seq_len, "chars": "".join(corpus.chars),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    torch.manual_seed(args.seed)
    model = build_model(config).to(device)

    def make_batch(generator: torch.Generator) -> TaskBatch:
        batch = corpus.sample_batch(args.batch, args.seq_len, generator=generator)
        return TaskBatch(batch.inputs.to(device), batch.targets.to(device), batch.info)

    objective = (DiffusionObjective(corpus.vocab_size, t_min=args.t_min) if args.kind == "diffusion"
                 else next_token_loss)
    # Validation during training: the objective on 64 held-out windows (for the denoiser a one-sample estimate of
    # its bound per character, for the AR model its next-character loss), every --eval-every steps.
    watch = corpus.sample_batch(64, args.seq_len, split="val", seed=4321)
    watch = TaskBatch(watch.inputs.to(device), watch.targets.to(device), watch.info)

    evaluations = []

    def steps_done(model: torch.nn.Module, batch: TaskBatch) -> float:
        """The "score" train() compares with stop_at: the steps done so far (train evaluates every eval_every)."""
        evaluations.append(None)
        return float(len(evaluations) * args.eval_every)

    start = time.perf_counter()
    history = train(model, make_batch, steps=args.steps, objective=objective, lr=args.lr,
                    weight_decay=args.weight_decay, seed=args.seed, label=args.kind, progress=False,
                    eval_batch=watch, eval_every=args.eval_every, evaluate=steps_done,
                    stop_at=None if args.stop_after is None else float(args.stop_after))
    seconds = time.perf_counter() - start
    done_steps = history.steps[-1]
    if args.stop_after is not None:
        name = AR_EARLY_CHECKPOINT if args.kind == "autoregressive" else f"diffusion_denoiser_step{done_steps}.safetensors"
    else:
        name = DIFFUSION_CHECKPOINT if args.kind == "diffusion" else AR_CHECKPOINT
    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args.out / name, config)

    # Evaluate the weights as shipped (rounded to float16), on held-out windows.
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    model.eval()
    val = corpus.sample_batch(args.val_windows, args.seq_len, split="val", seed=1234)
    val = TaskBatch(val.inputs.to(device), val.targets.to(device), val.info)
    if args.kind == "diffusion":
        bound = elbo_per_sequence(model, val.inputs, samples=args.elbo_samples,
                                  generator=torch.Generator().manual_seed(99))
        val_nats = float(bound.mean()) / args.seq_len
        val_metric = {"val_elbo_nats_per_char": val_nats, "val_perplexity_bound": math.exp(val_nats)}
    else:
        ppl = evaluate_perplexity(model, val)
        val_metric = {"val_nll_nats_per_char": math.log(ppl), "val_perplexity": ppl}
    tail = history.losses[-200:]
    summary = {
        "checkpoint": name, "config": {k: v for k, v in config.items() if k != "chars"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss_mean_last_200": sum(tail) / len(tail),
        "train_loss_first": history.losses[0], **val_metric,
        "steps_done": done_steps, "seconds": seconds, "steps_per_second": done_steps / seconds,
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or platform.machine()),
        "torch": torch.__version__, "python": platform.python_version(),
        "losses_every_100": history.losses[::100],
        "val_curve": {"steps": history.eval_steps, "val_objective_nats_per_char": history.eval_loss},
    }
    suffix = "" if args.stop_after is None else f"_stopped_{done_steps}"
    (args.out / f"{args.kind}{suffix}_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("losses_every_100", "config")}, indent=1))


if __name__ == "__main__":
    main()
