"""Chapter 00 references, cost model and checkers (checkers fed wrong answers)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labsupport import attention as A
from labsupport.harness.hardware import MachineProfile, copy_bandwidth_gbs, matmul_gflops


def test_causal_attention_matches_sdpa():
    q, k, v = (torch.randn(2, 3, 11, 8, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(A.causal_attention(q, k, v), ref, atol=1e-12)


def test_decode_step_equals_last_row():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    full = A.causal_attention(q, k, v)
    for t in range(9):
        step = A.attention_decode_step(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1])
        assert torch.allclose(step, full[:, :, t : t + 1], atol=1e-12)


def test_jamba_figures():
    gib = 2**30
    assert A.kv_cache_bytes_reference(32, 32, 128, 262_144, 2) == 128 * gib
    assert A.kv_cache_bytes_reference(32, 8, 128, 262_144, 2) == 32 * gib
    assert A.kv_cache_bytes_reference(4, 8, 128, 262_144, 2) == 4 * gib


def test_transformer_shape_counts():
    llama = A.MODEL_PRESETS["LLaMA-2-7B"]
    assert 6.4e9 < llama.params < 6.8e9  # ~6.6B weights used per token (embedding lookup excluded)
    flops, moved = llama.decode_step(context=1, batch=1)
    assert 0.9 < flops / moved < 1.1  # about one FLOP per byte at batch 1 in fp16
    flops64, moved64 = llama.decode_step(context=1, batch=64)
    assert flops64 / moved64 > 50 * flops / moved * 0.9
    pf, pm = llama.prefill(4096)
    assert pf / pm > 1000  # prefill is compute-bound
    with pytest.raises(ValueError, match="multiple"):
        A.TransformerShape(2, 64, 6, 4, 16, 128, 100)
    with pytest.raises(ValueError):
        llama.decode_step(0)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="batch, heads, length, head_dim"):
        A.causal_attention(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="one position"):
        A.attention_decode_step(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))


def test_hardware_probes_are_positive_and_validate():
    assert matmul_gflops(64, repeats=1) > 0
    assert copy_bandwidth_gbs(8, repeats=1) > 0
    m = MachineProfile(100.0, 10.0)
    assert m.balance_flops_per_byte == 10.0
    assert m.attainable_gflops(1.0) == 10.0 and m.attainable_gflops(100.0) == 100.0
    with pytest.raises(ValueError):
        matmul_gflops(4)
    with pytest.raises(ValueError):
        m.attainable_gflops(0)


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
    assert A.check_attention_decode_step(A.attention_decode_step)
    wrong_axis = lambda q, k, v: (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-2) @ v  # noqa: E731
    assert A.check_attention_decode_step(wrong_axis).status == "failed"
    only_last = lambda q, k, v: v[:, :, -1:]  # noqa: E731
    assert A.check_attention_decode_step(only_last).status == "failed"


def test_check_kv_cache_bytes():
    assert A.check_kv_cache_bytes(A.kv_cache_bytes_reference)
    assert A.check_kv_cache_bytes(lambda layers, kv_heads, head_dim, context, b: layers * kv_heads * head_dim * context * b).status == "failed"
    r = A.check_kv_cache_bytes(lambda *a: str(A.kv_cache_bytes_reference(*a)))
    assert r.status == "failed" and "expected a number" in r.message


def test_check_decode_intensity():
    assert A.check_decode_intensity(A.decode_intensity_reference)

    def weights_per_sequence(shape, context, batch):  # reads the weights once per sequence: wrong
        flops, _ = shape.decode_step(context, batch)
        moved = batch * (shape.params * shape.bytes_per_element + context * shape.kv_bytes_per_token())
        return flops / moved

    def ignores_kv(shape, context, batch):
        return batch * 2 * shape.params / (shape.params * shape.bytes_per_element)

    assert A.check_decode_intensity(weights_per_sequence).status == "failed"
    r = A.check_decode_intensity(ignores_kv)
    assert r.status == "failed" and "expected 0.500662, got 0.5" in r.message
