"""Chapter 00 references (labsupport.attention.reference): attention, the decode step, the exercises' formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labsupport import attention as A
from labsupport.attention import _solutions as _answers
from labsupport.harness.costs import MODEL_PRESETS


def test_causal_attention_matches_sdpa():
    q, k, v = (torch.randn(2, 3, 11, 8, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(A.causal_attention(q, k, v), ref, atol=1e-12)


def test_decode_step_equals_last_row():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    full = A.causal_attention(q, k, v)
    for t in range(9):
        step = _answers.decode_step_answer(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1])
        assert torch.allclose(step, full[:, :, t : t + 1], atol=1e-12)


def test_jamba_figures():
    gib = 2**30
    assert _answers.kv_cache_bytes_answer(32, 32, 128, 262_144, 2) == 128 * gib
    assert _answers.kv_cache_bytes_answer(32, 8, 128, 262_144, 2) == 32 * gib
    assert _answers.kv_cache_bytes_answer(4, 8, 128, 262_144, 2) == 4 * gib


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="batch, heads, length, head_dim"):
        A.causal_attention(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="one position"):
        _answers.decode_step_answer(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))


def test_bad_inputs_name_the_argument():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        A.causal_attention(q, [[0.0]], q)
    with pytest.raises(TypeError, match="floating-point"):
        A.causal_attention(q, q.long(), q)
    with pytest.raises(ValueError, match=r"same number of heads.*\(batch, heads, length, head_dim\)"):
        _answers.decode_step_answer(q[:, :, :1], torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 3, 4))


def test_decode_intensity_reference():
    llama = MODEL_PRESETS["LLaMA-2-7B"]
    flops, moved = llama.decode_step(1024, 16)
    assert _answers.decode_intensity_answer(llama, 1024, 16) == flops / moved
    with pytest.raises(TypeError, match="TransformerShape"):
        _answers.decode_intensity_answer({"layers": 32}, 1024, 16)


def test_the_written_out_cost_answers_equal_the_library_methods():
    for shape in MODEL_PRESETS.values():
        for context, batch in ((1, 1), (1024, 16), (32768, 3)):
            flops, moved = shape.decode_step(context, batch)
            assert _answers.decode_intensity_answer(shape, context, batch) == flops / moved
        for memory in (8 * 2**30, 24 * 2**30, 80 * 2**30):
            assert _answers.largest_batch_answer(shape, memory, 4096) == shape.max_batch(memory, 4096)
