"""Chapter 06, a task that rewards feed-forward capacity: a memorised two-token lookup table.

A fixed random table ``g: V × V → V`` (drawn once from ``table_seed``) generates
every sequence: two random tokens, then ``x_{t+1} = g(x_{t-1}, x_t)``. Nothing
about ``g`` can be inferred from the context; a model scores well only by storing
the ``V²`` entries in its weights, which is the feed-forward block's job. So at
equal FLOPs per token an MoE (more feed-forward parameters) should beat a dense
model here once the table outgrows the dense MLP, which character-level text of
the chapter's size does not show.
"""

from __future__ import annotations

import torch

from labsupport.harness.validation import require_int, require_positive_int
from labsupport.lm.tasks import IGNORE_INDEX, TaskBatch

__all__ = ["lookup_batch", "lookup_table"]


def lookup_table(vocab: int, table_seed: int = 0) -> torch.Tensor:
    """``(V, V)`` int64: the random next token of every pair of tokens."""
    vocab = require_int("vocab", vocab, minimum=2)
    gen = torch.Generator().manual_seed(require_int("table_seed", table_seed))
    return torch.randint(0, vocab, (vocab, vocab), generator=gen)


def lookup_batch(table: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> TaskBatch:
    """``batch`` sequences of ``length`` tokens that follow ``table``; the first target is not scored.

    ``targets[:, t]`` is ``inputs[:, t + 1]`` (the next token); position 0 is ignored,
    since one token does not determine the next.
    """
    batch = require_positive_int("batch", batch)
    length = require_int("length", length, minimum=2)
    if table.dim() != 2 or table.shape[0] != table.shape[1]:
        raise ValueError(f"table must be a square (V, V) tensor, got shape {tuple(table.shape)}")
    vocab = table.shape[0]
    seq = torch.empty(batch, length + 1, dtype=torch.long)
    seq[:, :2] = torch.randint(0, vocab, (batch, 2), generator=generator)
    for t in range(2, length + 1):
        seq[:, t] = table[seq[:, t - 2], seq[:, t - 1]]
    targets = seq[:, 1:].clone()
    targets[:, 0] = IGNORE_INDEX
    return TaskBatch(seq[:, :-1].contiguous(), targets, {"task": "lookup", "vocab": vocab})
