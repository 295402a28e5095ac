"""Chapter 06 expert parallelism (labsupport.moe.parallel): two gloo processes give the single-process layer."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from labsupport.harness.costs import expert_parallel_bytes
from labsupport.harness.settings import seed_everything
from labsupport.moe import MoELayer, sort_by_expert
from labsupport.moe.parallel import run_expert_parallel


def test_two_process_all_to_all_equals_the_single_process_layer_and_counts_its_bytes() -> None:
    seed_everything(0)
    layer = MoELayer(16, 4, 2, 32, n_shared=1).double()
    inputs = [torch.randn(3, 7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
              for r in range(2)]
    run = run_expert_parallel(layer, inputs)
    with torch.no_grad():
        for x, y in zip(inputs, run.outputs):
            assert torch.allclose(y, layer(x), atol=1e-13, rtol=0)
    for rank, (x, stats) in enumerate(zip(inputs, run.stats)):
        routing, _, _ = layer.route(x.reshape(-1, 16))
        counts = sort_by_expert(routing, 4)[3]
        remote = int(counts.sum() - counts[2 * rank: 2 * rank + 2].sum())
        assert stats["dispatch_bytes"] == remote * 16 * 8
        assert stats["assignments"] == 21 * 2
    assert run.total("dispatch_bytes") == run.total("combine_bytes")  # what goes out comes back


def test_a_failing_rank_is_reported_to_the_caller_and_nothing_hangs() -> None:
    layer = MoELayer(8, 2, 1)
    with pytest.raises(ProcessRaisedException, match=r"rank 1: tokens must be .*d_model=8"):
        run_expert_parallel(layer, [torch.randn(4, 8), torch.randn(4, 5)])


def test_launcher_refuses_what_cannot_be_split() -> None:
    with pytest.raises(ValueError, match="divisible"):
        run_expert_parallel(MoELayer(8, 3, 1), [torch.randn(2, 8), torch.randn(2, 8)])
    with pytest.raises(TypeError, match="MoELayer"):
        run_expert_parallel(torch.nn.Linear(2, 2), [torch.randn(2, 2)])


def test_uniform_routing_byte_formula() -> None:
    assert expert_parallel_bytes(1024, 256, 2, 4, bytes_per_element=4) == 2 * 1024 * 2 * 256 * 4 * 3 // 4
    assert expert_parallel_bytes(1024, 256, 2, 1) == 0
