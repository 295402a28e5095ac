"""Chapter 05's shipped models: they load (checksummed), match their recorded settings, and behave."""

from __future__ import annotations

import pytest
import torch

from labsupport import sparse
from labsupport.harness.data import read_manifest
from labsupport.lm.tasks import CharCorpus, make_mqar
from labsupport.lm.training import evaluate_perplexity, evaluate_recall
from labsupport.sparse.checkpoints import CHECKPOINTS, load_checkpoint, with_sink_token


def test_every_checkpoint_is_in_the_manifest():
    listed = read_manifest()
    assert all(name in listed for name in CHECKPOINTS.values())


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_checkpoints_load_with_their_settings(name):
    ck = load_checkpoint(name)
    assert not ck.model.training and ck.settings["seed"] == 0 and ck.settings["steps"] > 0
    assert all(isinstance(m, sparse.SparseAttention) for m in (b.mixer for b in ck.model.blocks))


def test_char_models_reach_their_recorded_perplexity():
    corpus = CharCorpus.from_data("shakespeare.txt")
    for name in ("char", "char_sink"):
        ck = load_checkpoint(name)
        val = corpus.sample_batch(32, ck.settings["train_len"], split="val", seed=1234)
        if ck.settings["sink_token"] >= 0:
            val = with_sink_token(val, ck.settings["sink_token"])
        assert evaluate_perplexity(ck.model, val) == pytest.approx(ck.settings["val_perplexity"], rel=1e-3)


def test_recall_model_recalls():
    ck = load_checkpoint("mqar")
    s = ck.settings
    batch = make_mqar(64, s["seq_len"], s["num_pairs"], s["vocab_size"], seed=99)
    assert evaluate_recall(ck.model, batch) > 0.5


def test_load_guards():
    with pytest.raises(ValueError, match="name"):
        load_checkpoint("gpt2")
