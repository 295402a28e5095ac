"""Synthetic tasks that expose recall, and the character corpus.

Every task returns a :class:`TaskBatch`: ``inputs`` and ``targets`` of shape
``(batch, length)``. ``targets[b, t]`` is the token the model should predict
after reading ``inputs[b, : t + 1]``; positions that are not scored hold
:data:`IGNORE_INDEX` (−100, what ``torch.nn.functional.cross_entropy`` skips).

* :func:`make_mqar` — multi-query associative recall, built as in Zoology
  (arXiv:2312.04927): keys and values come from disjoint halves of the
  vocabulary; after the key–value pairs, every key is queried once, at gaps
  drawn from a power law, and only the query positions are scored.
* :func:`make_selective_copy` — selective copying (Mamba, arXiv:2312.00752):
  copy the data tokens scattered among noise, in order.
* :func:`make_needle` — needle in a haystack: one key–value pair hidden at a
  chosen depth of a long context, queried at the end.
* :class:`CharCorpus` — a character-level language-modelling corpus over
  ``data/`` (Shakespeare's plays by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from labsupport.harness.validation import require_int, require_positive_int

__all__ = [
    "IGNORE_INDEX",
    "TaskBatch",
    "make_mqar",
    "make_selective_copy",
    "make_needle",
    "CharCorpus",
]

IGNORE_INDEX = -100


@dataclass
class TaskBatch:
    """A batch of a sequence task.

    Attributes:
        inputs: ``(batch, length)`` int64 token ids.
        targets: ``(batch, length)`` int64; the next token to predict, or
            :data:`IGNORE_INDEX` where nothing is scored.
        info: task parameters, for plots and messages.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.inputs.shape != self.targets.shape or self.inputs.dim() != 2:
            raise ValueError(
                "TaskBatch needs inputs and targets of the same shape (batch, length); got "
                f"{tuple(self.inputs.shape)} and {tuple(self.targets.shape)}"
            )

    @property
    def num_scored(self) -> int:
        """How many positions carry a target."""
        return int((self.targets != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return self.inputs.shape[0]


def _generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None and seed is not None:
        raise ValueError("pass either generator= or seed=, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def make_mqar(
    num_examples: int,
    seq_len: int,
    num_pairs: int,
    vocab_size: int,
    *,
    power_a: float = 0.01,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> TaskBatch:
    """Multi-query associative recall (MQAR), as in Zoology.

    Layout of one example (``N = num_pairs``)::

        k1 v1 k2 v2 ... kN vN | noise ... kσ(1) vσ(1) ... noise ... kσ(N) vσ(N) ...

    Keys are distinct tokens from ``[1, vocab_size // 2)``; values are tokens
    from ``[vocab_size // 2, vocab_size)``. The region after the pairs is cut
    into slots of two positions; ``N`` slots are chosen without replacement with
    probability proportional to ``slot_index ** (power_a - 1)`` (short gaps are
    far more likely than long ones, a power law), and each key is queried once,
    in random order, as ``key value`` in its slot. Only the query positions are
    scored: there, the target is the value bound to the key. Unused positions
    hold random noise tokens.

    Args:
        num_examples: batch size.
        seq_len: tokens per example; needs ``4 * num_pairs <= seq_len``.
        num_pairs: key–value pairs per example (``N``).
        vocab_size: even, with at least ``num_pairs + 1`` keys in its first half.
        power_a: exponent of the gap distribution (Zoology's default 0.01).
        generator, seed: the source of randomness (default: seed 0).
    """
    num_examples = require_positive_int("num_examples", num_examples)
    seq_len = require_int("seq_len", seq_len, minimum=4)
    num_pairs = require_positive_int("num_pairs", num_pairs)
    vocab_size = require_int("vocab_size", vocab_size, minimum=4)
    if 4 * num_pairs > seq_len:
        raise ValueError(
            f"MQAR needs 4 * num_pairs <= seq_len (2 tokens per pair in the context and 2 per "
            f"query); got num_pairs={num_pairs}, seq_len={seq_len}. Use seq_len >= {4 * num_pairs}."
        )
    if vocab_size % 2:
        raise ValueError(f"vocab_size must be even (keys and values split it in halves), got {vocab_size}")
    key_vocab = vocab_size // 2
    if key_vocab - 1 < num_pairs:
        raise ValueError(
            f"vocab_size={vocab_size} gives only {key_vocab - 1} distinct keys, fewer than "
            f"num_pairs={num_pairs}; use vocab_size >= {2 * (num_pairs + 1)}"
        )
    if not (0.0 < power_a <= 1.0):
        raise ValueError(f"power_a must be in (0, 1], got {power_a}")
    gen = _generator(generator, seed)
    b, n = num_examples, num_pairs

    keys = torch.rand(b, key_vocab - 1, generator=gen).argsort(dim=1)[:, :n] + 1
    values = torch.randint(key_vocab, vocab_size, (b, n), generator=gen)

    inputs = torch.randint(0, vocab_size, (b, seq_len), generator=gen)
    targets = torch.full((b, seq_len), IGNORE_INDEX, dtype=torch.long)
    context = torch.stack([keys, values], dim=2).reshape(b, 2 * n)
    inputs[:, : 2 * n] = context

    num_slots = (seq_len - 2 * n) // 2
    slot_weights = torch.arange(1, num_slots + 1, dtype=torch.float64) ** (power_a - 1.0)
    slots = torch.multinomial(slot_weights.expand(b, num_slots), n, replacement=False, generator=gen)
    order = torch.rand(b, n, generator=gen).argsort(dim=1)
    query_keys = keys.gather(1, order)
    query_values = values.gather(1, order)
    query_pos = 2 * n + 2 * slots
    inputs.scatter_(1, query_pos, query_keys)
    inputs.scatter_(1, query_pos + 1, query_values)
    targets.scatter_(1, query_pos, query_values)
    return TaskBatch(
        inputs,
        targets,
        {"task": "mqar", "seq_len": seq_len, "num_pairs": n, "vocab_size": vocab_size},
    )


def make_selective_copy(
    num_examples: int,
    seq_len: int,
    num_tokens: int,
    vocab_size: int,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> TaskBatch:
    """Selective copying: reproduce, in order, the data tokens hidden among noise.

    Token 0 is noise and token 1 is the "copy now" marker; data tokens come from
    ``[2, vocab_size)``. The first ``seq_len - num_tokens`` positions hold the
    ``num_tokens`` data tokens at random positions, noise elsewhere; the last
    ``num_tokens`` positions hold markers, and there the targets are the data
    tokens in order. Only those positions are scored.
    """
    num_examples = require_positive_int("num_examples", num_examples)
    seq_len = require_int("seq_len", seq_len, minimum=2)
    num_tokens = require_positive_int("num_tokens", num_tokens)
    vocab_size = require_int("vocab_size", vocab_size, minimum=3)
    if 2 * num_tokens > seq_len:
        raise ValueError(
            f"selective copying needs 2 * num_tokens <= seq_len; got num_tokens={num_tokens}, "
            f"seq_len={seq_len}"
        )
    gen = _generator(generator, seed)
    context_len = seq_len - num_tokens
    data = torch.randint(2, vocab_size, (num_examples, num_tokens), generator=gen)
    positions = torch.rand(num_examples, context_len, generator=gen).argsort(dim=1)[:, :num_tokens]
    positions, _ = positions.sort(dim=1)
    inputs = torch.zeros(num_examples, seq_len, dtype=torch.long)
    inputs.scatter_(1, positions, data)
    inputs[:, context_len:] = 1
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, context_len:] = data
    return TaskBatch(
        inputs,
        targets,
        {"task": "selective_copy", "seq_len": seq_len, "num_tokens": num_tokens, "vocab_size": vocab_size},
    )


def make_needle(
    num_examples: int,
    seq_len: int,
    depth: float,
    vocab_size: int,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> TaskBatch:
    """Needle in a haystack: one key–value pair hidden at ``depth``, queried at the end.

    The haystack is random tokens. The needle ``key value`` sits at position
    ``round(depth * (seq_len - 3))`` (``depth`` 0 is the start, 1 the end of the
    context); the key comes from ``[1, vocab_size // 2)`` and appears nowhere
    else; the value comes from the upper half. The last input is the key again,
    and its target, the only scored position, is the value.
    """
    num_examples = require_positive_int("num_examples", num_examples)
    seq_len = require_int("seq_len", seq_len, minimum=4)
    vocab_size = require_int("vocab_size", vocab_size, minimum=4)
    if not isinstance(depth, (int, float)) or not (0.0 <= float(depth) <= 1.0):
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    if vocab_size % 2:
        raise ValueError(f"vocab_size must be even, got {vocab_size}")
    gen = _generator(generator, seed)
    half = vocab_size // 2
    keys = torch.randint(1, half, (num_examples, 1), generator=gen)
    values = torch.randint(half, vocab_size, (num_examples, 1), generator=gen)
    inputs = torch.randint(0, vocab_size, (num_examples, seq_len), generator=gen)
    # The key must appear only at the needle and at the query; token 0 is never a key.
    inputs = torch.where(inputs == keys, torch.zeros_like(inputs), inputs)
    position = round(float(depth) * (seq_len - 3))
    inputs[:, position] = keys[:, 0]
    inputs[:, position + 1] = values[:, 0]
    inputs[:, -1] = keys[:, 0]
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, -1] = values[:, 0]
    return TaskBatch(
        inputs,
        targets,
        {"task": "needle", "seq_len": seq_len, "depth": float(depth), "position": position},
    )


class CharCorpus:
    """A character-level corpus: vocabulary, encoding, and random training windows.

    Build it from text (``CharCorpus(text)``) or from a file shipped in
    ``data/`` (``CharCorpus.from_data("shakespeare.txt")``). The last
    ``val_fraction`` of the text is held out for validation.
    """

    def __init__(self, text: str, *, val_fraction: float = 0.1) -> None:
        if not isinstance(text, str) or len(text) < 2:
            raise ValueError("CharCorpus needs a text of at least 2 characters")
        if not (0.0 < val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.chars: list[str] = sorted(set(text))
        self._index = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([self._index[c] for c in text], dtype=torch.long)
        split = int(len(data) * (1.0 - val_fraction))
        self.train_data = data[:split]
        self.val_data = data[split:]

    @classmethod
    def from_data(cls, name: str = "shakespeare.txt", *, max_chars: int | None = None) -> CharCorpus:
        """Load a text shipped in ``data/`` (checksummed; see ``data/PROVENANCE.md``)."""
        from labsupport.harness.data import load_text

        text = load_text(name)
        if max_chars is not None:
            text = text[: require_int("max_chars", max_chars, minimum=2)]
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Characters to token ids; unknown characters raise a ValueError naming them."""
        unknown = sorted(set(text) - set(self._index))
        if unknown:
            raise ValueError(f"characters not in the corpus vocabulary: {unknown[:10]}")
        return torch.tensor([self._index[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Token ids back to text."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not (0 <= int(i) < self.vocab_size)]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:10]}")
        return "".join(self.chars[int(i)] for i in ids)

    def sample_batch(
        self,
        batch_size: int,
        seq_len: int,
        *,
        split: str = "train",
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> TaskBatch:
        """Random windows of ``seq_len`` characters; every position is scored (next character)."""
        batch_size = require_positive_int("batch_size", batch_size)
        seq_len = require_positive_int("seq_len", seq_len)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        data = self.train_data if split == "train" else self.val_data
        if len(data) <= seq_len + 1:
            raise ValueError(f"the {split} split has {len(data)} characters, too few for seq_len={seq_len}")
        gen = _generator(generator, seed)
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        offsets = torch.arange(seq_len + 1)
        windows = data[starts[:, None] + offsets]
        return TaskBatch(windows[:, :-1], windows[:, 1:].clone(), {"task": "chars", "split": split})
