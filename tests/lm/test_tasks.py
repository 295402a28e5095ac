"""Tasks: MQAR follows Zoology's construction; bad parameters get clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labsupport.lm.tasks import IGNORE_INDEX, CharCorpus, TaskBatch, make_mqar, make_needle, make_selective_copy


@settings(max_examples=25, deadline=None)
@given(
    num_pairs=st.integers(1, 8),
    extra=st.integers(0, 40),
    vocab_half=st.integers(10, 60),
    seed=st.integers(0, 10_000),
)
def test_mqar_structure(num_pairs, extra, vocab_half, seed):
    seq_len = 4 * num_pairs + extra
    vocab = 2 * vocab_half
    batch = make_mqar(3, seq_len, num_pairs, vocab, seed=seed)
    assert batch.inputs.shape == batch.targets.shape == (3, seq_len)
    for b in range(3):
        x, y = batch.inputs[b], batch.targets[b]
        keys, values = x[0 : 2 * num_pairs : 2], x[1 : 2 * num_pairs : 2]
        # disjoint halves; keys distinct
        assert bool(((keys >= 1) & (keys < vocab_half)).all())
        assert bool(((values >= vocab_half) & (values < vocab)).all())
        assert len(set(keys.tolist())) == num_pairs
        binding = dict(zip(keys.tolist(), values.tolist()))
        scored = (y != IGNORE_INDEX).nonzero().flatten().tolist()
        # each key queried exactly once, after the context, with its value as target and next input
        assert len(scored) == num_pairs
        assert sorted(x[scored].tolist()) == sorted(keys.tolist())
        for t in scored:
            assert t >= 2 * num_pairs
            assert y[t].item() == binding[x[t].item()]
            assert x[t + 1].item() == binding[x[t].item()]


def test_mqar_gaps_follow_a_power_law():
    batch = make_mqar(2000, 256, 4, 64, seed=0)
    pos = (batch.targets != IGNORE_INDEX).nonzero()[:, 1]
    slots = (pos - 8) // 2
    counts = torch.bincount(slots, minlength=124).float()
    # short gaps dominate; the frequency falls monotonically on average
    assert counts[0] > counts[10] > counts[100]
    assert counts[:20].sum() > 5 * counts[-20:].sum()


def test_mqar_is_seeded():
    a = make_mqar(4, 32, 4, 32, seed=7)
    b = make_mqar(4, 32, 4, 32, generator=torch.Generator().manual_seed(7))
    c = make_mqar(4, 32, 4, 32, seed=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_examples=2, seq_len=15, num_pairs=4, vocab_size=64), "4 \\* num_pairs <= seq_len"),
        (dict(num_examples=2, seq_len=16, num_pairs=4, vocab_size=63), "must be even"),
        (dict(num_examples=2, seq_len=64, num_pairs=16, vocab_size=20), "distinct keys"),
        (dict(num_examples=0, seq_len=16, num_pairs=4, vocab_size=64), "num_examples must be >= 1"),
        (dict(num_examples=2, seq_len=16.0, num_pairs=4, vocab_size=64), "seq_len must be an int"),
    ],
)
def test_mqar_bad_parameters(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make_mqar(**kwargs)


def test_mqar_seed_and_generator_exclusive():
    with pytest.raises(ValueError, match="not both"):
        make_mqar(1, 16, 2, 16, seed=1, generator=torch.Generator())


def test_selective_copy():
    batch = make_selective_copy(5, 20, 4, 10, seed=3)
    for x, y in zip(batch.inputs, batch.targets):
        data = x[:16][x[:16] != 0]
        assert data.tolist() == y[16:].tolist()
        assert (x[16:] == 1).all() and (y[:16] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="2 \\* num_tokens"):
        make_selective_copy(1, 6, 4, 10)


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_needle(depth):
    batch = make_needle(6, 40, depth, 32, seed=1)
    pos = batch.info["position"]
    for x, y in zip(batch.inputs, batch.targets):
        key = x[-1].item()
        assert (x == key).nonzero().flatten().tolist() == [pos, 39]
        assert y[-1].item() == x[pos + 1].item()
        assert batch.num_scored == 6
    with pytest.raises(ValueError, match="depth"):
        make_needle(1, 10, 1.5, 32)


def test_taskbatch_validates_shapes():
    with pytest.raises(ValueError, match="same shape"):
        TaskBatch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_char_corpus_roundtrip_and_batches():
    corpus = CharCorpus("to be or not to be, that is the question. " * 20)
    ids = corpus.encode("to be")
    assert corpus.decode(ids) == "to be"
    batch = corpus.sample_batch(4, 16, seed=0)
    assert batch.inputs.shape == (4, 16)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    with pytest.raises(ValueError, match="not in the corpus"):
        corpus.encode("Z")
    with pytest.raises(ValueError, match="split"):
        corpus.sample_batch(1, 4, split="test")
    with pytest.raises(ValueError, match="out of range"):
        corpus.decode([999])
