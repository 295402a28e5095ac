"""Chapter 06, expert parallelism: the experts of one layer spread over processes, tokens sent by all-to-all.

With ``W`` processes ("ranks") and ``E`` experts, rank ``r`` holds experts
``r·E/W … (r+1)·E/W − 1`` and its own share of the tokens. One forward pass:

1. route the local tokens (the router is replicated on every rank);
2. sort the assignments by expert, which also groups them by destination rank;
3. **all-to-all** the per-rank counts, then the token vectors and their expert ids
   (``torch.distributed.all_to_all_single`` with uneven splits);
4. run the local experts on what arrived (one grouped matmul);
5. **all-to-all** the answers back along the reversed splits;
6. add them up with the routing weights, as the single-process layer does.

Steps 3 and 5 are the whole communication cost: every assignment whose expert
lives on another rank crosses the network twice, ``d_model`` numbers each way.

:func:`run_expert_parallel` is the launcher: it starts ``W`` processes with
``torch.multiprocessing.spawn``, joins them with the gloo backend on 127.0.0.1,
and tears the group down even when a rank fails (``spawn`` then terminates the
others and re-raises in the caller).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from labsupport.harness.validation import require_int, require_positive_int
from labsupport.moe.dispatch import grouped_expert_mlp, sort_by_expert
from labsupport.moe.layer import MoELayer

__all__ = ["ParallelRun", "expert_parallel_forward", "run_expert_parallel"]


def _local_slice(layer: MoELayer, rank: int, world_size: int) -> tuple[int, int]:
    if layer.n_experts % world_size:
        raise ValueError(f"n_experts={layer.n_experts} must be divisible by world_size={world_size}")
    per_rank = layer.n_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


def expert_parallel_forward(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """This rank's output for its tokens ``x (..., d_model)``, computed with experts spread over the group.

    Call inside an initialised process group, on every rank, with the same
    ``layer`` (token-choice routing, no capacity limit, so the result equals
    ``layer(x)`` computed in one process). Only this rank's experts are used
    here; the others' are reached through all-to-all.

    Returns the output and a dict of what this rank did: ``dispatch_bytes`` and
    ``combine_bytes`` sent to *other* ranks (token vectors), ``metadata_bytes``
    (counts and expert ids), ``comm_seconds`` and ``compute_seconds``.
    """
    if not dist.is_initialized():
        raise RuntimeError("expert_parallel_forward needs an initialised torch.distributed process group")
    if layer.router_kind == "expert_choice" or layer.capacity_factor is not None:
        raise ValueError("expert_parallel_forward supports token-choice routing without a capacity limit")
    rank, world = dist.get_rank(), dist.get_world_size()
    lo, hi = _local_slice(layer, rank, world)
    tokens = x.reshape(-1, layer.d_model)
    element = tokens.element_size()
    comm = compute = 0.0

    start = time.perf_counter()
    with torch.no_grad():
        routing, _, _ = layer.route(tokens)
    token, expert, weight, counts = sort_by_expert(routing, layer.n_experts)
    send_counts = counts.view(world, -1).sum(dim=1)                  # assignments for each rank
    send_tokens = tokens[token]
    compute += time.perf_counter() - start

    start = time.perf_counter()
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
    recv_tokens = tokens.new_empty(sum(recv_split), layer.d_model)
    dist.all_to_all_single(recv_tokens, send_tokens.contiguous(), recv_split, send_split)
    recv_expert = expert.new_empty(sum(recv_split))
    dist.all_to_all_single(recv_expert, expert.contiguous(), recv_split, send_split)
    comm += time.perf_counter() - start

    start = time.perf_counter()
    local = recv_expert - lo
    order = torch.argsort(local, stable=True)
    local_counts = torch.bincount(local, minlength=hi - lo).tolist()
    with torch.no_grad():
        answers_sorted = grouped_expert_mlp(recv_tokens[order], local_counts, layer.w_up[lo:hi],
                                            layer.b_up[lo:hi], layer.w_down[lo:hi], layer.b_down[lo:hi])
    answers = torch.empty_like(answers_sorted)
    answers[order] = answers_sorted
    compute += time.perf_counter() - start

    start = time.perf_counter()
    returned = tokens.new_empty(send_tokens.shape)
    dist.all_to_all_single(returned, answers, send_split, recv_split)
    comm += time.perf_counter() - start

    start = time.perf_counter()
    out = torch.zeros_like(tokens).index_add(0, token, returned * weight.to(tokens.dtype)[:, None])
    if layer.shared is not None:
        with torch.no_grad():
            out = out + layer.shared(tokens)
    compute += time.perf_counter() - start

    remote_sent = sum(send_split) - send_split[rank]
    remote_returned = sum(recv_split) - recv_split[rank]
    stats = {
        "dispatch_bytes": float(remote_sent * layer.d_model * element),
        "combine_bytes": float(remote_returned * layer.d_model * element),
        "metadata_bytes": float((world - 1) * send_counts.element_size() + remote_sent * expert.element_size()),
        "assignments": float(sum(send_split)),
        "comm_seconds": comm,
        "compute_seconds": compute,
    }
    return out.view_as(x), stats


@dataclass
class ParallelRun:
    """What :func:`run_expert_parallel` brought back: one output and one stats dict per rank."""

    outputs: list[torch.Tensor]
    stats: list[dict[str, float]]

    def total(self, key: str) -> float:
        """``key`` summed over ranks (e.g. ``"dispatch_bytes"``)."""
        return sum(s[key] for s in self.stats)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, layer: MoELayer, inputs: list[torch.Tensor],
            repeats: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    x = inputs[rank]
    if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != layer.d_model:
        # Refuse bad tokens before joining the group: the other ranks then wait in the rendezvous (and are
        # terminated by the launcher) instead of failing in a collective, so the caller sees this error.
        raise ValueError(f"rank {rank}: tokens must be a floating-point tensor (..., d_model={layer.d_model}), "
                         f"got {x.dtype} of shape {tuple(x.shape)}")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        layer.eval()
        output, stats = expert_parallel_forward(layer, inputs[rank])
        for _ in range(repeats):  # keep the fastest of several passes (other programs only ever add time)
            dist.barrier()
            _, again = expert_parallel_forward(layer, inputs[rank])
            stats["comm_seconds"] = min(stats["comm_seconds"], again["comm_seconds"])
            stats["compute_seconds"] = min(stats["compute_seconds"], again["compute_seconds"])
        torch.save({"output": output, "stats": stats}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_expert_parallel(layer: MoELayer, inputs: list[torch.Tensor], *, repeats: int = 0) -> ParallelRun:
    """Run ``layer`` expert-parallel over ``len(inputs)`` local processes (gloo, 127.0.0.1).

    Args:
        layer: the layer; every process gets a copy and uses only its own experts.
        inputs: one ``(..., d_model)`` tensor of tokens per rank.
        repeats: extra timed passes per rank (the fastest is kept in ``stats``).

    Processes are started with ``torch.multiprocessing.spawn`` and always
    leave their process group; if one fails, the others are terminated and the
    error is raised here.
    """
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a MoELayer, got {type(layer).__name__}")
    if not isinstance(inputs, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("inputs must be a list of tensors, one per process")
    world_size = require_positive_int("number of inputs (processes)", len(inputs))
    _local_slice(layer, 0, world_size)
    repeats = require_int("repeats", repeats, minimum=0)
    with tempfile.TemporaryDirectory(prefix="moe-ep-") as out_dir:
        mp.spawn(_worker, args=(world_size, _free_port(), layer, list(inputs), repeats, out_dir),
                 nprocs=world_size, join=True)
        results = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    return ParallelRun([r["output"] for r in results], [r["stats"] for r in results])
