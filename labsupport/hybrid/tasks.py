"""The frontier's quality suite: MAD-style synthetic tasks at laptop scale, as probe tasks, and decode-time scoring.

MAD (Poli et al., arXiv:2403.17844) scores a design on six synthetic tasks. Built here, small:

* ``in_context_recall`` — MQAR (Zoology's generator, :func:`labsupport.lm.tasks.make_mqar`);
* ``fuzzy_recall`` — keys of two tokens: the value follows a two-token key seen earlier (:func:`make_fuzzy_recall`);
* ``noisy_recall`` — key-value pairs scattered among noise tokens from their own vocabulary (:func:`make_noisy_recall`);
* ``selective_copy`` — :func:`labsupport.lm.tasks.make_selective_copy`;
* ``memorization`` — a fixed key→value table, the same in every example: it lives in the weights, not the
  context (:func:`make_memorization`);
* ``compression`` — a sequence, then a compression token; every token must be rebuilt from that one position's
  output alone, by a small MLP given the slot (:func:`make_compression`, :class:`CompressionModel`).

Beyond MAD the suite holds ``needle`` (needle in a haystack at a random depth). :class:`SuiteTask` wraps any
generator as a :class:`~labsupport.lm.probe.ProbeTask` (training batches from the caller's generator, a fixed
held-out batch), and :func:`decode_recall` scores a model
by decoding token by token — the score that counts for a decode-time eviction policy (h2o, tova, quest).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from labsupport.harness.validation import require_int, require_positive_int
from labsupport.lm.tasks import IGNORE_INDEX, TaskBatch, make_mqar, make_needle, make_selective_copy

__all__ = ["SUITE", "CompressionModel", "SuiteTask", "decode_recall", "make_compression", "make_fuzzy_recall",
           "make_memorization", "make_noisy_recall", "make_random_needle"]


def _gen(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else seed)


def make_fuzzy_recall(num_examples: int, seq_len: int, num_pairs: int, vocab_size: int, *,
                      generator: torch.Generator | None = None, seed: int | None = None) -> TaskBatch:
    """Pairs ``a b v`` (a two-token key, one value), then every key again in random order; score the value.

    Keys use tokens ``[1, V/2)``, values ``[V/2, V)``; a key is a distinct ordered pair. Filler is token 0.
    """
    num_examples, num_pairs = require_positive_int("num_examples", num_examples), \
        require_positive_int("num_pairs", num_pairs)
    seq_len, vocab_size = require_int("seq_len", seq_len, minimum=6), require_int("vocab_size", vocab_size, minimum=8)
    if 6 * num_pairs > seq_len:
        raise ValueError(f"fuzzy recall needs 6 * num_pairs <= seq_len, got {num_pairs} pairs in {seq_len}")
    gen, half = _gen(generator, seed), vocab_size // 2
    b, n = num_examples, num_pairs
    codes = torch.rand(b, (half - 1) ** 2, generator=gen).argsort(dim=1)[:, :n]
    keys = torch.stack([codes // (half - 1) + 1, codes % (half - 1) + 1], dim=-1)      # (b, n, 2)
    values = torch.randint(half, vocab_size, (b, n, 1), generator=gen)
    inputs = torch.zeros(b, seq_len, dtype=torch.long)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    inputs[:, : 3 * n] = torch.cat([keys, values], dim=-1).reshape(b, 3 * n)
    order = torch.rand(b, n, generator=gen).argsort(dim=1)
    query = torch.cat([keys, values], dim=-1).gather(1, order[..., None].expand(-1, -1, 3)).reshape(b, 3 * n)
    start = seq_len - 3 * n
    inputs[:, start:] = query
    targets[:, start + 1::3] = query[:, 2::3]   # after the second key token, predict the value
    return TaskBatch(inputs, targets, {"task": "fuzzy_recall", "seq_len": seq_len, "num_pairs": n})


def make_noisy_recall(num_examples: int, seq_len: int, num_pairs: int, vocab_size: int, *,
                      noise_fraction: float = 0.5, generator: torch.Generator | None = None,
                      seed: int | None = None) -> TaskBatch:
    """MQAR whose context pairs sit among noise tokens drawn from a vocabulary of their own (the top eighth).

    Keys ``[1, 3V/8)``, values ``[3V/8, 7V/8)``, noise ``[7V/8, V)``; ``noise_fraction`` of the context
    positions are noise. Queries repeat each key once; the value is scored.
    """
    num_examples, num_pairs = require_positive_int("num_examples", num_examples), \
        require_positive_int("num_pairs", num_pairs)
    seq_len, vocab_size = require_int("seq_len", seq_len, minimum=8), require_int("vocab_size", vocab_size, minimum=16)
    gen, b, n = _gen(generator, seed), num_examples, num_pairs
    k_hi, v_hi = 3 * vocab_size // 8, 7 * vocab_size // 8
    context_len = seq_len - 2 * n
    if 2 * n > context_len * (1 - noise_fraction) or k_hi - 1 < n:
        raise ValueError(f"noisy recall: {n} pairs do not fit {seq_len} tokens at noise {noise_fraction}")
    keys = torch.rand(b, k_hi - 1, generator=gen).argsort(dim=1)[:, :n] + 1
    values = torch.randint(k_hi, v_hi, (b, n), generator=gen)
    inputs = torch.randint(v_hi, vocab_size, (b, seq_len), generator=gen)
    slots = torch.rand(b, context_len // 2, generator=gen).argsort(dim=1)[:, :n].sort(dim=1).values * 2
    inputs.scatter_(1, slots, keys)
    inputs.scatter_(1, slots + 1, values)
    order = torch.rand(b, n, generator=gen).argsort(dim=1)
    q_pos = context_len + 2 * torch.arange(n)
    inputs[:, q_pos] = keys.gather(1, order)
    inputs[:, q_pos + 1] = values.gather(1, order)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, q_pos] = values.gather(1, order)
    return TaskBatch(inputs, targets, {"task": "noisy_recall", "seq_len": seq_len, "num_pairs": n})


def make_memorization(num_examples: int, seq_len: int, vocab_size: int, *, table_seed: int = 7,
                      generator: torch.Generator | None = None, seed: int | None = None) -> TaskBatch:
    """``k v k v …`` where ``v = table[k]``, one fixed table (``table_seed``) for every example: score each ``v``."""
    num_examples = require_positive_int("num_examples", num_examples)
    seq_len, vocab_size = require_int("seq_len", seq_len, minimum=2), require_int("vocab_size", vocab_size, minimum=4)
    half = vocab_size // 2
    table = torch.randint(half, vocab_size, (half,), generator=torch.Generator().manual_seed(table_seed))
    gen = _gen(generator, seed)
    keys = torch.randint(1, half, (num_examples, seq_len // 2), generator=gen)
    inputs = torch.stack([keys, table[keys]], dim=-1).reshape(num_examples, -1)
    if inputs.shape[1] < seq_len:
        inputs = torch.cat([inputs, inputs.new_zeros(num_examples, 1)], dim=1)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, 0:2 * (seq_len // 2):2] = table[keys]
    return TaskBatch(inputs, targets, {"task": "memorization", "seq_len": seq_len})


def make_compression(num_examples: int, seq_len: int, vocab_size: int, *, generator: torch.Generator | None = None,
                     seed: int | None = None) -> TaskBatch:
    """MAD's compression: ``x_1 … x_n``, the compression token ``V − 1``, then ``n`` slots to fill with ``x_1 … x_n``.

    ``n = (seq_len − 1) // 2``; data tokens come from ``[1, V − 1)``, the slots hold token 0 and a trailing pad (if
    any) is ignored. The targets sit on the slots; :class:`CompressionModel` predicts them from the compression
    token's output only, so the whole sequence must pass through one position's vector.
    """
    num_examples = require_positive_int("num_examples", num_examples)
    seq_len, vocab_size = require_int("seq_len", seq_len, minimum=3), require_int("vocab_size", vocab_size, minimum=4)
    n = (seq_len - 1) // 2
    gen = _gen(generator, seed)
    data = torch.randint(1, vocab_size - 1, (num_examples, n), generator=gen)
    inputs = torch.zeros(num_examples, seq_len, dtype=torch.long)
    inputs[:, :n] = data
    inputs[:, n] = vocab_size - 1
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, n + 1:2 * n + 1] = data
    return TaskBatch(inputs, targets, {"task": "compression", "seq_len": seq_len, "num_tokens": n})


class CompressionModel(nn.Module):
    """A TinyLM whose slots are read from the compression token's output alone (MAD's compression head).

    ``forward(tokens)`` runs the TinyLM's embedding and blocks, takes the normalised output ``h`` at the
    compression position ``n``, and for slot ``i`` predicts ``head(norm(h + MLP(h + slot_i)))``. Every other
    position gets zero logits (they are never scored), so the usual recall metric and loss apply.
    """

    def __init__(self, body: nn.Module, seq_len: int) -> None:
        super().__init__()
        for part in ("embed", "blocks", "norm", "head"):
            if not hasattr(body, part):
                raise TypeError(f"CompressionModel wraps a TinyLM; {type(body).__name__} has no {part!r}")
        self.body = body
        self.n = (require_int("seq_len", seq_len, minimum=3) - 1) // 2
        d_model = body.embed.embedding_dim
        self.slots = nn.Embedding(self.n, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        body = self.body
        x = body.embed(tokens)
        if getattr(body, "pos", None) is not None:
            x = x + body.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in body.blocks:
            x = block(x)
        h = body.norm(x)[:, self.n]                                         # (B, d): the compressed sequence
        queries = h[:, None] + self.slots.weight[None]                      # (B, n, d)
        decoded = body.head(body.norm(queries + self.mlp(queries)))         # (B, n, V)
        logits = decoded.new_zeros(tokens.shape[0], tokens.shape[1], decoded.shape[-1])
        logits[:, self.n + 1:2 * self.n + 1] = decoded
        return logits


def make_random_needle(num_examples: int, seq_len: int, vocab_size: int, *, generator: torch.Generator | None = None,
                       seed: int | None = None) -> TaskBatch:
    """Needle in a haystack with the depth drawn per batch from ``[0, 1]`` (training) — the needle task at any depth."""
    gen = _gen(generator, seed)
    depth = float(torch.rand((), generator=gen))
    return make_needle(num_examples, seq_len, depth, vocab_size, generator=gen)


@dataclass(frozen=True)
class SuiteTask:
    """A synthetic task of the suite as a :class:`~labsupport.lm.probe.ProbeTask`.

    ``make(num_examples, generator=, seed=)`` builds batches; ``eval_make`` (default: ``make``) the held-out one;
    ``wrap`` (optional) puts the task's own head around the TinyLM (:meth:`model`; compression has one).
    """

    name: str
    make: Callable[..., TaskBatch]
    vocab_size: int
    seq_len: int
    eval_examples: int = 256
    eval_seed: int = 1234
    eval_make: Callable[..., TaskBatch] | None = None
    wrap: Callable[[nn.Module], nn.Module] | None = None
    metric: Literal["recall", "perplexity"] = field(default="recall", init=False)

    def model(self, body: nn.Module) -> nn.Module:
        """The model to train: ``body`` itself, or ``wrap(body)`` for a task with its own head (compression)."""
        return body if self.wrap is None else self.wrap(body)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        return self.make(batch_size, generator=generator)

    def eval_batch(self) -> TaskBatch:
        return (self.eval_make or self.make)(self.eval_examples, seed=self.eval_seed)


def _needle_eval(num_examples: int, *, seq_len: int, vocab_size: int, seed: int) -> TaskBatch:
    parts = [make_needle(num_examples // 4, seq_len, depth, vocab_size, seed=seed + i)
             for i, depth in enumerate((0.0, 0.33, 0.66, 0.95))]
    return TaskBatch(torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts]),
                     {"task": "needle", "seq_len": seq_len, "depths": (0.0, 0.33, 0.66, 0.95)})


def _suite(vocab: int = 64) -> dict[str, Callable[[int], SuiteTask]]:
    """Task name → ``seq_len -> SuiteTask`` (the difficulty knob is the length; pairs grow with it)."""
    def mqar(seq_len: int, pairs: int | None = None) -> SuiteTask:
        n = pairs or max(2, seq_len // 16)
        v = max(vocab, 2 * (n + 1) + 2)
        return SuiteTask(f"mqar", lambda b, **g: make_mqar(b, seq_len, n, v, **g), v, seq_len)

    return {
        "mqar": mqar,
        "fuzzy_recall": lambda L: SuiteTask("fuzzy_recall",
                                            lambda b, **g: make_fuzzy_recall(b, L, max(2, L // 16), vocab, **g),
                                            vocab, L),
        "noisy_recall": lambda L: SuiteTask("noisy_recall",
                                            lambda b, **g: make_noisy_recall(b, L, max(2, L // 16), vocab, **g),
                                            vocab, L),
        "selective_copy": lambda L: SuiteTask("selective_copy",
                                              lambda b, **g: make_selective_copy(b, L, max(2, L // 8), vocab, **g),
                                              vocab, L),
        "memorization": lambda L: SuiteTask("memorization", lambda b, **g: make_memorization(b, L, vocab, **g),
                                            vocab, L),
        "compression": lambda L: SuiteTask("compression", lambda b, **g: make_compression(b, L, vocab, **g), vocab,
                                           L, wrap=lambda body: CompressionModel(body, L)),
        "needle": lambda L: SuiteTask("needle", lambda b, **g: make_random_needle(b, L, vocab, **g), vocab, L,
                                      eval_make=lambda b, seed: _needle_eval(b, seq_len=L, vocab_size=vocab,
                                                                             seed=seed)),
    }


#: Task name → ``seq_len -> SuiteTask``: mqar, fuzzy_recall, noisy_recall, selective_copy, memorization,
#: compression, needle.
SUITE: Mapping[str, Callable[..., SuiteTask]] = _suite()


@torch.no_grad()
def decode_recall(model: nn.Module, batch: TaskBatch, *, chunk: int = 128) -> float:
    """Recall at the scored positions when the model *decodes* token by token (its decode states, its policies).

    For a mixer whose decode step equals its forward pass this is :func:`~labsupport.lm.training.evaluate_recall`;
    for a decode-time eviction policy it is the honest score.
    """
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"decode_recall expects a TaskBatch, got {type(batch).__name__}")
    model.eval()
    correct = total = 0
    for start in range(0, len(batch), chunk):
        inputs, targets = batch.inputs[start:start + chunk], batch.targets[start:start + chunk]
        states: list[Any] = [None] * len(model.blocks)
        predictions = []
        for t in range(inputs.shape[1]):
            logits, states = model.decode_step(inputs[:, t], states, t)
            predictions.append(logits.argmax(-1))
        scored = targets != IGNORE_INDEX
        correct += int((torch.stack(predictions, 1)[scored] == targets[scored]).sum())
        total += int(scored.sum())
    return correct / total
