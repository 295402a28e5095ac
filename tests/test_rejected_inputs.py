"""Bad input to the public functions of chapters 00-03 gets a clear error naming what was expected.

Each call here once failed inside torch, or was accepted and computed something wrong.
"""

from __future__ import annotations

import pytest
import torch

from labsupport import attention, grouped
from labsupport.grouped.mixers import latent_mixer
from labsupport.linear_attention import reference as lin
from labsupport.linear_attention.mixers import linear_mixer
from labsupport.lm.layers import SoftmaxAttention
from labsupport.lm.objectives import sequence_loss

Q = torch.randn(1, 2, 4, 8)

BAD_CALLS = {
    "latent_mixer(head_dim=4.0)": (lambda: latent_mixer(4, 8, 4, head_dim=4.0), TypeError, "head_dim must be an int"),
    "linear_mixer(n_heads=True)": (lambda: linear_mixer("linear", True), TypeError, "n_heads must be an int"),
    "linear_mixer(chunk_size=0)": (lambda: linear_mixer("linear", 2, chunk_size=0), ValueError, "chunk_size"),
    "ttt_inner_loss with mismatched shapes": (
        lambda: lin.ttt_inner_loss(torch.randn(1, 2, 4, 3), torch.randn(1, 1, 4), torch.randn(1, 2, 1)),
        ValueError, "k \\(B, H, D_k\\)"),
    "initial_state in float64 for float32 inputs": (
        lambda: lin.linear_attention_recurrent(Q, Q, Q, initial_state=torch.zeros(1, 2, 8, 8, dtype=torch.float64)),
        TypeError, "initial_state must have the dtype of q"),
    "log_decay in float64 for float32 inputs": (
        lambda: lin.linear_attention_chunkwise(Q, Q, Q, torch.zeros(1, 2, 4, dtype=torch.float64)),
        TypeError, "log_decay must have the dtype of q"),
    "beta in float64 for float32 inputs": (
        lambda: lin.delta_rule_recurrent(Q, Q, Q, torch.ones(1, 2, 4, dtype=torch.float64)),
        TypeError, "beta must have the dtype of q"),
    "log_decay with NaN": (
        lambda: lin.linear_attention_parallel(Q, Q, Q, torch.full((1, 2, 4), float("nan"))),
        ValueError, "log_decay must be <= 0"),
    "SoftmaxAttention on activations of the wrong width": (
        lambda: SoftmaxAttention(16, 2)(torch.randn(1, 3, 8)), ValueError, "d_model=16"),
    "causal_attention with Lq != Lk": (
        lambda: attention.causal_attention(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)),
        ValueError, "Lq == Lk"),
    "latent_attention_core with rows of another width": (
        lambda: grouped.latent_attention_core(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 4, 0.5),
        ValueError, "expected rows \\(B, 1, T, d_c \\+ d_R\\)"),
    "latent_attention_core with latent_dim wider than a row": (
        lambda: grouped.latent_attention_core(torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), 9, 0.5),
        ValueError, "latent_dim must be <= 8"),
    "sequence_loss with float targets": (
        lambda: sequence_loss(torch.randn(1, 3, 5), torch.zeros(1, 3)), TypeError, "int64"),
}


@pytest.mark.parametrize("call", sorted(BAD_CALLS))
def test_bad_input_is_refused_clearly(call):
    fn, error, message = BAD_CALLS[call]
    with pytest.raises(error, match=message):
        fn()


def test_grouped_attention_refuses_a_cache_of_another_batch():
    with pytest.raises(ValueError, match="batch"):
        grouped.grouped_attention(torch.randn(2, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))


def test_sizes_refuse_bools_and_floats():
    with pytest.raises(TypeError, match="n_heads must be an int, got bool"):
        SoftmaxAttention(16, True)
    with pytest.raises(ValueError, match="n_heads must be >= 1"):
        SoftmaxAttention(16, -1)
    with pytest.raises(ValueError, match="n_heads must be >= 1"):
        SoftmaxAttention(16, 0)


def test_expert_parallel_refuses_bad_input_before_starting_processes():
    from labsupport.moe import MoELayer
    from labsupport.moe.parallel import all_to_all, backend_for, equality_tolerance, launch, run_expert_parallel

    with pytest.raises(ValueError, match="device type must be one of 'cpu', 'cuda'"):
        backend_for("meta")
    with pytest.raises(TypeError, match="dtype must be one of"):
        equality_tolerance(torch.int32)
    with pytest.raises(TypeError, match="world_size must be an int"):
        launch(print, 2.0)
    with pytest.raises(ValueError, match="device_type must be one of"):
        launch(print, 2, device_type="tpu")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        all_to_all(torch.randn(2, 3), [2], [2])
    with pytest.raises(ValueError, match="token-choice routing without a capacity limit"):
        run_expert_parallel(MoELayer(8, 2, 1, router="expert_choice"), [torch.randn(4, 8)])
    with pytest.raises(TypeError, match="inputs must be a list of tensors"):
        run_expert_parallel(MoELayer(8, 2, 1), torch.randn(4, 8))
    with pytest.raises(ValueError, match="repeats must be >= 0"):
        run_expert_parallel(MoELayer(8, 2, 1), [torch.randn(4, 8)], repeats=-1)
