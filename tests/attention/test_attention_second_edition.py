"""Chapter 00, second edition: the FLOP split of real shapes, the largest batch, the timed split of a tiny model."""

from __future__ import annotations

import pytest
import torch

from labsupport.attention.exercises_core import check_largest_batch
from labsupport.attention.timesplit import SPLIT_PARTS, time_split
from labsupport.harness.costs import MODEL_PRESETS, TransformerShape
from labsupport.lm.model import TinyLM

LLAMA = MODEL_PRESETS["LLaMA-2-7B"]


@pytest.mark.parametrize(("context", "share"), [(512, 0.020), (2048, 0.075), (8192, 0.245), (32768, 0.562)])
def test_attention_share_of_llama2_flops_by_context(context, share) -> None:
    split = LLAMA.flops_split(context)
    assert set(split) == set(SPLIT_PARTS)
    assert split["attention"] / sum(split.values()) == pytest.approx(share, abs=0.002)
    assert split["weight matmuls"] == 2 * LLAMA.params
    assert split["the rest"] < 0.01 * sum(split.values())


def test_flops_split_agrees_with_flops_per_token() -> None:
    split = LLAMA.flops_split(1000)
    assert split["attention"] + split["weight matmuls"] == LLAMA.flops_per_token(1000)
    with pytest.raises(ValueError):
        LLAMA.flops_split(0)


def test_max_batch_counts_weights_once_and_a_cache_per_sequence() -> None:
    per_seq = 4096 * LLAMA.kv_bytes_per_token()
    assert LLAMA.max_batch(LLAMA.weight_bytes + 5 * per_seq, 4096) == 5
    assert LLAMA.max_batch(LLAMA.weight_bytes + 5 * per_seq - 1, 4096) == 4
    assert LLAMA.max_batch(24 * 2**30, 4096) == 5 and LLAMA.max_batch(80 * 2**30, 32768) == 4
    assert MODEL_PRESETS["Mistral-7B"].max_batch(80 * 2**30, 32768) == 16  # GQA: a 4x smaller cache
    assert LLAMA.max_batch(8 * 2**30, 1024) == 0  # the weights alone do not fit
    for bad in (0, -1, "24GB", True):
        with pytest.raises(ValueError):
            LLAMA.max_batch(bad, 1024)


def test_largest_batch_checker_passes_the_reference_and_fails_wrong_answers(capsys) -> None:
    def largest_batch_written_out(shape, memory_bytes, context):  # the library's shape.max_batch is refused
        spare = memory_bytes - shape.weight_bytes
        return 0 if spare <= 0 else int(spare // (context * shape.kv_bytes_per_token()))

    assert check_largest_batch(largest_batch_written_out)
    wrong = {
        "weights counted per sequence": lambda s, m, c: int(m // (s.weight_bytes + c * s.kv_bytes_per_token())),
        "weights forgotten": lambda s, m, c: int(m // (c * s.kv_bytes_per_token())),
        "negative when the weights do not fit": lambda s, m, c: int((m - s.weight_bytes) // (c * s.kv_bytes_per_token())),
        "a float": lambda s, m, c: (m - s.weight_bytes) / (c * s.kv_bytes_per_token()),
        "rounds up": lambda s, m, c: max(0, -(-(m - s.weight_bytes) // (c * s.kv_bytes_per_token()))),
        "None": lambda s, m, c: None,
    }
    for name, fn in wrong.items():
        result = check_largest_batch(fn)
        assert result.status == "failed", name
    out = capsys.readouterr().out
    assert "Traceback" not in out

    def not_done(shape, memory_bytes, context):
        raise NotImplementedError

    assert check_largest_batch(not_done).status == "not done"


def test_time_split_parts_add_up_to_the_total() -> None:
    torch.manual_seed(0)
    model = TinyLM(vocab_size=32, d_model=32, n_layers=2, max_len=64, sequence_mixer="attention", n_heads=2,
                   channel_mixer="mlp")
    split = time_split(model, torch.randint(0, 32, (1, 64)), repeats=2)
    assert set(split) == {*SPLIT_PARTS, "total"}
    assert all(split[part] >= 0 for part in SPLIT_PARTS)
    assert sum(split[part] for part in SPLIT_PARTS) == pytest.approx(split["total"], rel=1e-6)
    assert split["attention"] > 0 and split["weight matmuls"] > 0
    # hooks are removed afterwards
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_time_split_rejects_bad_input() -> None:
    with pytest.raises(TypeError):
        time_split("model", torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mixer"):
        time_split(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    model = TinyLM(vocab_size=8, d_model=8, n_layers=1, max_len=8, sequence_mixer="attention", n_heads=1)
    with pytest.raises(ValueError):
        time_split(model, torch.zeros(1, 4, dtype=torch.long), repeats=0)


def test_shape_of_the_tiny_model_matches_its_parameters() -> None:
    """The notebook describes its timed model with a TransformerShape; both must count the same weights."""
    model = TinyLM(vocab_size=256, d_model=64, n_layers=2, max_len=64, sequence_mixer="attention", n_heads=4,
                   channel_mixer="mlp")
    shape = TransformerShape(layers=2, d_model=64, q_heads=4, kv_heads=4, head_dim=16, d_ff=256, vocab=256,
                             bytes_per_element=4, gated_mlp=False)
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert shape.params == linear_weights
