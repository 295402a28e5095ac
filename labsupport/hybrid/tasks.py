"""The frontier's quality suite: MAD-style synthetic tasks at laptop scale, as probe tasks, and decode-time scoring.

MAD (Poli et al., arXiv:2403.17844) scores a design on six synthetic tasks. Built here, small:

* ``in_context_recall`` — MQAR (Zoology's generator, :func:`labsupport.lm.tasks.make_mqar`);
* ``fuzzy_recall`` — keys of two tokens: the value follows a two-token key seen earlier (:func:`make_fuzzy_recall`);
* ``noisy_recall`` — key-value pairs scattered among noise tokens from their own vocabulary (:func:`make_noisy_recall`);
* ``selective_copy`` — :func:`labsupport.lm.tasks.make_selective_copy`;
* ``memorization`` — a fixed key→value table, the same in every example: it lives in the weights, not the
  context (:func:`make_memorization`).

MAD's *compression* task (squeeze a sequence into one token, reconstruct it with an MLP) needs a
different head and is not built. :class:`SuiteTask` wraps any generator as a :class:`~labsupport.lm.probe.ProbeTask`
(training batches from the caller's generator, a fixed held-out batch), and :func:`decode_recall` scores a model
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

__all__ = ["SUITE", "SuiteTask", "decode_recall", "make_fuzzy_recall", "make_memorization", "make_noisy_recall",
           "make_random_needle"]


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


def make_random_needle(num_examples: int, seq_len: int, vocab_size: int, *, generator: torch.Generator | None = None,
                       seed: int | None = None) -> TaskBatch:
    """Needle in a haystack with the depth drawn per batch from ``[0, 1]`` (training) — the needle task at any depth."""
    gen = _gen(generator, seed)
    depth = float(torch.rand((), generator=gen))
    return make_needle(num_examples, seq_len, depth, vocab_size, generator=gen)


@dataclass(frozen=True)
class SuiteTask:
    """A synthetic task of the suite as a :class:`~labsupport.lm.probe.ProbeTask`.

    ``make(num_examples, generator=, seed=)`` builds batches; ``eval_make`` (default: ``make``) the held-out one.
    """

    name: str
    make: Callable[..., TaskBatch]
    vocab_size: int
    seq_len: int
    eval_examples: int = 256
    eval_seed: int = 1234
    eval_make: Callable[..., TaskBatch] | None = None
    metric: Literal["recall", "perplexity"] = field(default="recall", init=False)

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
        "needle": lambda L: SuiteTask("needle", lambda b, **g: make_random_needle(b, L, vocab, **g), vocab, L,
                                      eval_make=lambda b, seed: _needle_eval(b, seq_len=L, vocab_size=vocab,
                                                                             seed=seed)),
    }


#: Task name → ``seq_len -> SuiteTask``: mqar, fuzzy_recall, noisy_recall, selective_copy, memorization, needle.
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
