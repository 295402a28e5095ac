"""Chapter 06 expert parallelism (labsupport.moe.parallel): gloo processes give the single-process layer.

Forward and backward, 2 and 4 processes, a skewed router, a rank that fails, and the launcher's guards.
The same code runs over NCCL on GPUs (``benchmarks/moe_expert_parallel_gpu.py``); here it runs on gloo.
"""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from labsupport.harness.costs import expert_parallel_bytes
from labsupport.harness.numerics import rel_err
from labsupport.harness.settings import seed_everything
from labsupport.moe import MoELayer, sort_by_expert
from labsupport.moe.parallel import (
    EXPERT_WEIGHTS,
    NO_MULTICAST_ENV,
    ExpertParallelMoE,
    all_to_all,
    backend_for,
    check_against_single_process,
    equality_tolerance,
    expert_parallel_forward,
    launch,
    run_expert_parallel,
)
from labsupport.moe.parallel import _require_backend


def _tokens(world: int, rows: int, d: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.randn(rows, d, dtype=dtype, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]


def _single_process(layer: MoELayer, inputs: list[torch.Tensor], grads: list[torch.Tensor]):
    """The reference: one layer on every rank's tokens at once, and its gradients."""
    x = torch.cat(inputs).requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(torch.cat(grads))
    return y.detach().split([t.shape[0] for t in inputs]), x.grad.split([t.shape[0] for t in inputs])


def test_four_processes_forward_and_backward_equal_the_single_process_layer() -> None:
    seed_everything(0)
    layer = MoELayer(16, 8, 2, 24, n_shared=1, balance="none")
    with torch.no_grad():
        layer.router.weight.mul_(50)  # spread the routing so every rank gets work and routing weights matter
    inputs, grads = _tokens(4, 12, 16), _tokens(4, 12, 16)
    run = run_expert_parallel(layer, inputs, grad_outputs=grads)
    outputs, input_grads = _single_process(layer, inputs, grads)
    tol = equality_tolerance(torch.float32)
    for r in range(4):
        assert rel_err(run.outputs[r], outputs[r]) < tol
        assert rel_err(run.input_grads[r], input_grads[r]) < tol
    assert run.param_grads is not None
    for name, p in layer.named_parameters():
        assert rel_err(run.param_grads[name], p.grad) < tol, name
    # and the gradients are not trivially zero: the router's and every expert's moved
    assert float(run.param_grads["router.weight"].abs().sum()) > 0
    assert all(float(g.abs().sum()) > 0 for g in run.param_grads["w_up"])
    assert run.total("dispatch_bytes") == run.total("combine_bytes") > 0  # what goes out comes back
    assert run.total("assignments") == run.total("received") == 4 * 12 * 2


def _balanced_layer() -> MoELayer:
    seed_everything(3)
    layer = MoELayer(8, 4, 2, 8, n_shared=1, balance="none").double()
    with torch.no_grad():
        layer.router.weight.mul_(50)
    return layer


def _skewed_layer() -> MoELayer:
    seed_everything(1)
    layer = MoELayer(8, 4, 2, 16, balance="none", n_null=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2:4] = 1.0       # experts 2 and 3 (rank 1's) win every positive token...
        layer.router.weight[4] = 0.5         # ...and the null expert sometimes takes a slot
    return layer


def _two_rank_tokens(rank: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(3, 5, 8, dtype=dtype, generator=torch.Generator().manual_seed(rank))


def _host_reads_in(fn) -> dict[str, int]:
    """How often ``fn`` read a tensor's value into Python (each one a device synchronisation on a GPU)."""
    names = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")
    counts = dict.fromkeys(names, 0)
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)
        return wrapper

    try:
        for name in names:
            setattr(torch.Tensor, name, counting(name))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts


def _scenarios(rank: int, world: int, device: torch.device) -> dict[str, object]:
    """Everything the two-process tests look at, from one launch (starting processes is the slow part)."""
    import os

    out: dict[str, object] = {"env": {k: os.environ.get(k) for k in NO_MULTICAST_ENV}, "backend": dist.get_backend()}
    layer = _balanced_layer()
    x = _two_rank_tokens(rank, torch.float64)
    sharded = ExpertParallelMoE(layer)
    out["balanced"] = check_against_single_process(sharded, layer, x, torch.randn_like(x))
    out["stats"] = dict(sharded.last_stats)
    out["shapes"] = [tuple(p.shape) for p in sharded.local_experts()]
    functional, _ = expert_parallel_forward(layer, x, timed=False)
    out["functional"] = rel_err(functional, layer(x))

    skewed = _skewed_layer()
    xs = _two_rank_tokens(rank, torch.float32).abs() + 0.1
    sharded_skewed = ExpertParallelMoE(skewed)
    out["skewed"] = check_against_single_process(sharded_skewed, skewed, xs, torch.randn_like(xs))
    out["skewed_stats"] = dict(sharded_skewed.last_stats)
    out["skewed_zero_grad"] = bool(torch.all(sharded_skewed.local_experts()[0].grad == 0))

    out["host_reads"] = _host_reads_in(lambda: sharded(x))

    half = _balanced_layer().to(torch.bfloat16)  # the GPU runs' dtype, over gloo: the bf16 tolerance path
    xh = _two_rank_tokens(rank, torch.bfloat16)
    out["bf16"] = check_against_single_process(ExpertParallelMoE(half), half, xh, torch.randn_like(xh))

    out["moved"] = all_to_all(torch.full((world, 2), float(rank)), [1] * world, [1] * world)
    try:
        sharded(torch.randn(5, 7))
    except ValueError as error:
        out["refused"] = str(error)
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, object]]:
    return launch(_scenarios, 2)


def test_two_processes_forward_and_backward_equal_the_single_process_layer(two_ranks) -> None:
    for result in two_ranks:
        errors = result["balanced"]
        assert set(errors) == {"output", "grad_x", "grad_router.weight", "grad_shared.0.weight", "grad_shared.0.bias",
                               "grad_shared.2.weight", "grad_shared.2.bias"} | {f"grad_{n}" for n in EXPERT_WEIGHTS}
        assert max(errors.values()) < equality_tolerance(torch.float64), errors
        assert result["functional"] < equality_tolerance(torch.float64)
        assert result["shapes"] == [(2, 8, 8), (2, 8), (2, 8, 8), (2, 8)]  # only this rank's two experts


def test_two_processes_in_bfloat16_agree_within_the_bf16_tolerance(two_ranks) -> None:
    for result in two_ranks:
        errors = result["bf16"]
        assert len(errors) == 11 and max(errors.values()) < equality_tolerance(torch.bfloat16), errors


def test_two_processes_count_their_bytes(two_ranks) -> None:
    layer = _balanced_layer()
    for rank, result in enumerate(two_ranks):
        stats = result["stats"]
        routing, _, _ = layer.route(_two_rank_tokens(rank, torch.float64).reshape(-1, 8))
        counts = sort_by_expert(routing, 4)[3]
        remote = int(counts.sum() - counts[2 * rank: 2 * rank + 2].sum())
        assert 0 < remote < 30
        assert stats["dispatch_bytes"] == remote * 8 * 8
        assert stats["assignments"] == 15 * 2
        assert stats["metadata_bytes"] == 2 * 8
    assert sum(r["stats"]["dispatch_bytes"] for r in two_ranks) == sum(r["stats"]["combine_bytes"] for r in two_ranks)


def test_a_router_that_sends_everything_to_one_rank_still_works_forward_and_backward(two_ranks) -> None:
    rank0, rank1 = (r["skewed_stats"] for r in two_ranks)
    assert rank0["received"] == 0                       # rank 0's experts got nothing...
    assert rank1["received"] == rank0["assignments"] + rank1["assignments"] > 0
    assert two_ranks[0]["skewed_zero_grad"]             # ...so their gradient is zero, and nothing hung
    for result in two_ranks:
        assert max(result["skewed"].values()) < equality_tolerance(torch.float32), result["skewed"]


def test_a_forward_pass_reads_the_device_once_for_its_split_sizes(two_ranks) -> None:
    for result in two_ranks:
        assert result["host_reads"] == {"tolist": 1, "item": 0, "__bool__": 0, "__int__": 0, "__float__": 0,
                                        "__index__": 0}


def test_collectives_and_guards_inside_the_group(two_ranks) -> None:
    for result in two_ranks:
        assert result["moved"].tolist() == [[0.0, 0.0], [1.0, 1.0]]   # row r came from rank r
        assert "d_model=8" in result["refused"]
        assert result["env"] == NO_MULTICAST_ENV
        assert result["backend"] == "gloo"


def _fail_on_rank_one(rank: int, world: int, device: torch.device) -> float:
    start = time.monotonic()
    if rank == 1:
        time.sleep(0.2)  # rank 0 is already waiting in the collective
        raise RuntimeError("rank 1 gave up on purpose")
    x = torch.zeros(world)
    dist.all_to_all_single(torch.empty_like(x), x)  # rank 0 waits here for a rank that is gone
    return time.monotonic() - start


def test_a_rank_that_raises_ends_every_process_and_reaches_the_caller() -> None:
    start = time.monotonic()
    with pytest.raises(ProcessRaisedException, match="rank 1 failed first:(.|\n)*rank 1 gave up on purpose"):
        launch(_fail_on_rank_one, 2, timeout_s=60)
    assert time.monotonic() - start < 30  # the waiting rank was ended, not left to its 60 s timeout


def test_launcher_refuses_what_cannot_be_split_or_run() -> None:
    with pytest.raises(ValueError, match="divisible"):
        run_expert_parallel(MoELayer(8, 3, 1), [torch.randn(2, 8), torch.randn(2, 8)])
    with pytest.raises(TypeError, match="MoELayer"):
        run_expert_parallel(torch.nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match=r"inputs\[1\] must be .*d_model=8"):
        run_expert_parallel(MoELayer(8, 2, 1), [torch.randn(4, 8), torch.randn(4, 5)])
    with pytest.raises(ValueError, match="capacity"):
        run_expert_parallel(MoELayer(8, 2, 1, capacity_factor=1.0), [torch.randn(4, 8)])
    with pytest.raises(ValueError, match="grad_outputs"):
        run_expert_parallel(MoELayer(8, 2, 1), [torch.randn(4, 8)], grad_outputs=[torch.randn(3, 8)])
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        launch(_fail_on_rank_one, 0)
    with pytest.raises(TypeError, match="fn must be callable"):
        launch("not a function", 2)
    with pytest.raises(ValueError, match="timeout_s"):
        launch(_fail_on_rank_one, 2, timeout_s=0)
    with pytest.raises(ValueError, match="deadline_s"):
        launch(_fail_on_rank_one, 2, deadline_s=-1.0)
    if torch.cuda.device_count() < 64:
        with pytest.raises(RuntimeError, match="needs 64 GPUs"):
            launch(_fail_on_rank_one, 64, device_type="cuda")
    with pytest.raises(RuntimeError, match="initialised"):
        expert_parallel_forward(MoELayer(8, 2, 1), torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="initialised"):
        ExpertParallelMoE(MoELayer(8, 2, 1))


def test_backend_follows_the_device_and_tolerances_follow_the_dtype() -> None:
    assert backend_for("cpu") == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    _require_backend(torch.device("cpu"), "gloo")
    _require_backend(torch.device("cuda", 0), "cpu:gloo,cuda:nccl")
    with pytest.raises(RuntimeError, match="tokens on cuda:0 need a nccl process group.*'gloo'"):
        _require_backend(torch.device("cuda", 0), "gloo")
    with pytest.raises(RuntimeError, match="tokens on cpu need a gloo process group"):
        _require_backend(torch.device("cpu"), "nccl")
    with pytest.raises(ValueError, match="device type"):
        backend_for("meta")
    assert equality_tolerance(torch.float32) < equality_tolerance(torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        equality_tolerance(torch.int64)


def test_uniform_routing_byte_formula() -> None:
    assert expert_parallel_bytes(1024, 256, 2, 4, bytes_per_element=4) == 2 * 1024 * 2 * 256 * 4 * 3 // 4
    assert expert_parallel_bytes(1024, 256, 2, 1) == 0


def _hang_on_rank_one(rank: int, world: int, device: torch.device) -> None:
    if rank == 1:
        time.sleep(600)  # never enters the barrier rank 0 waits in
    dist.barrier()


def test_a_hanging_rank_is_ended_at_the_deadline_and_no_process_is_left() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="still running after 3 s; all terminated"):
        launch(_hang_on_rank_one, 2, deadline_s=3)
    assert time.monotonic() - start < 30
    assert not multiprocessing.active_children()
