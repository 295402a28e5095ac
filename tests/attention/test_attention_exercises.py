"""Chapter 00 checkers (labsupport.attention.exercises): right answers pass, wrong answers are explained."""

from __future__ import annotations

import math

import torch

from labsupport import attention as A
from labsupport.attention import _solutions as _answers


# --- checkers: right answers pass, wrong answers are explained -------------------------------

def test_check_causal_attention(capsys):
    assert A.check_causal_attention(A.causal_attention)

    def unscaled(q, k, v):
        s = q @ k.transpose(-1, -2)
        m = torch.ones(s.shape[-1], s.shape[-1], dtype=torch.bool).triu(1)
        return s.masked_fill(m, float("-inf")).softmax(-1) @ v

    def off_by_one(q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        m = torch.ones(s.shape[-1], s.shape[-1], dtype=torch.bool).triu(0)
        return s.masked_fill(m, float("-inf")).softmax(-1) @ v

    def naive_exp(q, k, v):
        s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).exp()
        s = s * torch.ones(s.shape[-1], s.shape[-1]).tril()
        return s / s.sum(-1, keepdim=True) @ v

    def uses_view(q, k, v):
        return A.causal_attention(q.view(-1).view(q.shape), k, v)

    def todo(q, k, v):
        raise NotImplementedError

    capsys.readouterr()
    assert A.check_causal_attention(unscaled).status == "failed"
    assert A.check_causal_attention(off_by_one).status == "failed"
    assert "NaN" in capsys.readouterr().out
    r = A.check_causal_attention(naive_exp)
    assert r.status == "failed" and "large scores" in r.message
    r = A.check_causal_attention(uses_view)
    assert r.status == "failed" and "non-contiguous" in r.message
    assert A.check_causal_attention(lambda q, k, v: None).status == "failed"
    assert A.check_causal_attention(lambda q, k, v: A.causal_attention(q, k, v).double()).status == "failed"
    assert A.check_causal_attention(todo).status == "not done"
    assert "Traceback" not in capsys.readouterr().out


def test_check_decode_step():
    assert A.check_attention_decode_step(_answers.decode_step_answer)
    wrong_axis = lambda q, k, v: (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-2) @ v  # noqa: E731
    assert A.check_attention_decode_step(wrong_axis).status == "failed"
    only_last = lambda q, k, v: v[:, :, -1:]  # noqa: E731
    assert A.check_attention_decode_step(only_last).status == "failed"


def test_check_kv_cache_bytes():
    assert A.check_kv_cache_bytes(_answers.kv_cache_bytes_answer)
    assert A.check_kv_cache_bytes(lambda layers, kv_heads, head_dim, context, b: layers * kv_heads * head_dim * context * b).status == "failed"
    r = A.check_kv_cache_bytes(lambda *a: str(_answers.kv_cache_bytes_answer(*a)))
    assert r.status == "failed" and "expected a number" in r.message


def written_out_intensity(shape, context, batch):
    """Exercise 3 counted from the shape's fields (the library's shape.decode_step is refused)."""
    flops = batch * (2 * shape.params + 4 * shape.layers * shape.q_heads * shape.head_dim * context)
    moved = shape.params * shape.bytes_per_element + batch * context * shape.kv_bytes_per_token()
    return flops / moved


def test_check_decode_intensity():
    assert A.check_decode_intensity(written_out_intensity)

    def weights_per_sequence(shape, context, batch):  # reads the weights once per sequence: wrong
        flops, _ = shape.decode_step(context, batch)
        moved = batch * (shape.params * shape.bytes_per_element + context * shape.kv_bytes_per_token())
        return flops / moved

    def ignores_kv(shape, context, batch):
        return batch * 2 * shape.params / (shape.params * shape.bytes_per_element)

    assert A.check_decode_intensity(weights_per_sequence).status == "failed"
    r = A.check_decode_intensity(ignores_kv)
    assert r.status == "failed" and "expected 0.500662, got 0.5" in r.message


# ----------------------------------------------------------------------------- library shortcuts (issue 24)


def test_the_decode_step_refuses_pytorchs_kernel(capsys):
    import torch.nn.functional as F

    result = A.check_attention_decode_step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    out = capsys.readouterr().out
    assert result.status == "failed" and "LibraryCallRefused" in out and "from its formula" in out
    assert "Traceback" not in out
    # the refusal ends with the check: PyTorch's kernel works again afterwards
    q, k = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 3, 4)
    assert F.scaled_dot_product_attention(q, k, k).shape == (1, 1, 1, 4)


def test_the_cost_exercises_refuse_the_shapes_one_call_answers(capsys):
    from labsupport.attention.exercises_core import check_largest_batch

    result = check_largest_batch(lambda shape, memory, context: shape.max_batch(memory, context))
    out = capsys.readouterr().out
    assert result.status == "failed" and "shape.max_batch is the library's answer" in out
    result = A.check_decode_intensity(lambda shape, context, batch: (lambda f, b: f / b)(*shape.decode_step(context, batch)))
    out = capsys.readouterr().out
    assert result.status == "failed" and "shape.decode_step is the library's answer" in out
    assert "Traceback" not in out


def test_the_chapter_modules_do_not_hold_the_answers():
    from labsupport.attention import exercises, exercises_core, reference

    for module in (A, exercises, exercises_core, reference):
        for name in ("attention_decode_step", "decode_step_answer", "largest_batch", "largest_batch_reference",
                     "decode_intensity", "decode_intensity_reference", "kv_cache_bytes_reference"):
            assert not hasattr(module, name), (module.__name__, name)
