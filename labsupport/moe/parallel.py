"""Chapter 06, expert parallelism: the experts of one layer spread over processes, tokens sent by all-to-all.

With ``W`` processes ("ranks") and ``E`` experts, rank ``r`` holds experts
``r·E/W … (r+1)·E/W − 1`` and its own share of the tokens. One forward pass:

1. route the local tokens (the router is replicated on every rank);
2. sort the assignments by expert, which also groups them by destination rank;
3. **all-to-all** the per-expert counts (one small message of ``E`` integers),
   read them on the host, then all-to-all the token vectors with uneven splits;
4. run the local experts on what arrived (one grouped matmul);
5. **all-to-all** the answers back along the reversed splits;
6. add them up with the routing weights, as the single-process layer does.

Steps 3 and 5 are the whole communication cost: every assignment whose expert
lives on another rank crosses the network twice, ``d_model`` numbers each way.

**One code path, two engines.** The same calls (``torch.distributed.all_to_all_single``)
run over gloo for CPU tensors and over NCCL for CUDA tensors; :func:`backend_for`
picks the backend from the device, :func:`launch` starts the processes.

**Backward.** Both token all-to-alls go through :class:`AllToAll`, an autograd
function whose backward is the same collective with the splits reversed (the
gradient of "send row block ``i`` to rank ``j``" is "send it back"). So
``loss.backward()`` gives every rank the gradient of its own tokens and of its own
experts, equal to the single-process layer's. The router (and any shared experts)
is replicated: each rank holds the gradient of its own tokens only, and
:meth:`ExpertParallelMoE.all_reduce_replicated_grads` sums them over the group,
as data parallelism would. Every rank must call forward and backward the same number of times and in the same
grad mode (a collective that only some ranks enter waits for the others until the timeout).

**One host synchronisation per forward.** An uneven all-to-all needs its split
sizes as Python integers, which a GPU tensor can only give by waiting for the
device. The counts are exchanged with one small all-to-all and read with a single
``.tolist()`` (sent and received counts together); everything else, including
the permutation of the received rows into expert order, stays on the device.
Timing a pass (``timed=True``) adds device synchronisations around each phase;
leave it off outside measurements.

What is not handled here: capacity limits and expert-choice routing (both need
the whole batch), and the auxiliary losses (a rank can compute only its own
tokens' balancing loss; the single-process layer's is over the whole batch).
Router jitter draws random noise per process, so it breaks equality with the
single-process layer; the comparisons use ``jitter=0`` or ``eval()``.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from labsupport.harness.numerics import rel_err
from labsupport.harness.validation import require_callable, require_choice, require_int, require_positive_int
from labsupport.moe.dispatch import grouped_expert_mlp, sort_by_expert
from labsupport.moe.layer import MoELayer

__all__ = [
    "AllToAll",
    "EXPERT_WEIGHTS",
    "ExpertParallelMoE",
    "NO_MULTICAST_ENV",
    "ParallelRun",
    "all_to_all",
    "backend_for",
    "check_against_single_process",
    "equality_tolerance",
    "expert_parallel_forward",
    "launch",
    "run_expert_parallel",
    "run_rank",
]

#: Set in every process :func:`launch` or :func:`run_rank` starts: NVLink multicast (NVLS) stays off.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

#: The names of a :class:`~labsupport.moe.layer.MoELayer`'s stacked expert parameters (first dimension: expert).
EXPERT_WEIGHTS = ("w_up", "b_up", "w_down", "b_down")

_TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def equality_tolerance(dtype: torch.dtype) -> float:
    """The relative error (``‖a − b‖ / ‖b‖``) allowed between the expert-parallel and single-process layers.

    The two compute the same sums in other orders (rows grouped by source rank,
    matmuls of other heights, atomics on a GPU), so they agree to rounding:
    ``1e-12`` in float64, ``1e-5`` in float32, ``2e-2`` in bfloat16 (8 bits of mantissa) and ``5e-3`` in float16.
    """
    if dtype not in _TOLERANCES:
        raise TypeError(f"dtype must be one of {', '.join(str(d) for d in _TOLERANCES)}, got {dtype}")
    return _TOLERANCES[dtype]


def backend_for(device: torch.device | str) -> str:
    """The ``torch.distributed`` backend for tensors on ``device``: ``"nccl"`` for CUDA, ``"gloo"`` for the CPU."""
    kind = torch.device(device).type
    require_choice("device type", kind, ("cpu", "cuda"))
    return "nccl" if kind == "cuda" else "gloo"


def _require_backend(device: torch.device, backend: str) -> None:
    """Refuse tensors the group's backend cannot move (CUDA tensors need NCCL, CPU tensors gloo)."""
    wanted = backend_for(device)
    if wanted not in str(backend).lower():
        raise RuntimeError(f"tokens on {device} need a {wanted} process group, but this group's backend is "
                           f"{backend!r}; start the processes with launch(device_type={device.type!r})")


# --------------------------------------------------------------------------- the differentiable all-to-all


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward is the same exchange reversed.

    Forward: rank ``r`` sends rows ``input_splits[j]`` of its input to rank ``j``
    and receives ``output_splits[i]`` rows from rank ``i``. The gradient of what
    it received goes back to where it came from, so the backward is an
    all-to-all with ``input_splits`` and ``output_splits`` swapped.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        output_splits, input_splits = ctx.splits
        back = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable uneven all-to-all of the rows of ``x`` (see :class:`AllToAll`); call on every rank."""
    if not dist.is_initialized():
        raise RuntimeError("all_to_all needs an initialised torch.distributed process group")
    world = dist.get_world_size(group)
    if len(output_splits) != world or len(input_splits) != world:
        raise ValueError(f"need one split per rank ({world}), got {len(output_splits)} output and "
                         f"{len(input_splits)} input splits")
    if sum(input_splits) != x.shape[0]:
        raise ValueError(f"input_splits sum to {sum(input_splits)} but x has {x.shape[0]} rows")
    return AllToAll.apply(x, list(output_splits), list(input_splits), group)


# --------------------------------------------------------------------------- the layer


def _local_slice(n_experts: int, rank: int, world_size: int) -> tuple[int, int]:
    if n_experts % world_size:
        raise ValueError(f"n_experts={n_experts} must be divisible by world_size={world_size}")
    per_rank = n_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


def _require_expert_parallel_layer(layer: object) -> MoELayer:
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a MoELayer, got {type(layer).__name__}")
    if layer.router_kind == "expert_choice" or layer.capacity_factor is not None:
        raise ValueError("expert parallelism here supports token-choice routing without a capacity limit "
                         f"(got router={layer.router_kind!r}, capacity_factor={layer.capacity_factor})")
    return layer


class _Clock:
    """Phase timer: adds wall time to ``comm`` or ``compute``, synchronising the device first (only if on)."""

    def __init__(self, on: bool, device: torch.device) -> None:
        self.on, self.cuda = on, device.type == "cuda"
        self.seconds = {"comm": 0.0, "compute": 0.0}
        self._start = 0.0

    def start(self) -> None:
        if self.on:
            if self.cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

    def stop(self, phase: str) -> None:
        if self.on:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - self._start


def _expert_parallel(layer: MoELayer, local: Sequence[torch.Tensor], x: torch.Tensor,
                     group: dist.ProcessGroup | None, timed: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """The one code path: ``layer`` routes (and runs shared experts), ``local`` are this rank's expert weights."""
    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process group "
                           "(start the processes with labsupport.moe.parallel.launch)")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != layer.d_model:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"rank {dist.get_rank()}: tokens must be a floating-point tensor (..., "
                         f"d_model={layer.d_model}), got {getattr(x, 'dtype', '')} {shape}")
    _require_backend(x.device, dist.get_backend(group))
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n_experts = layer.n_experts
    per_rank = n_experts // world
    tokens = x.reshape(-1, layer.d_model)
    clock = _Clock(timed, tokens.device)

    clock.start()
    routing, _ = layer.select(tokens)
    # Sort the T·k assignments by expert (inactive ones, for null experts, last under the key E). No boolean
    # mask and no bincount: both would make a GPU wait for the host.
    key = torch.where(routing.active, routing.experts, n_experts).reshape(-1)
    order = torch.argsort(key, stable=True)
    token = torch.div(order, routing.k, rounding_mode="floor")
    weight = routing.weights.reshape(-1)[order].to(tokens.dtype)
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=tokens.device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:n_experts]
    clock.stop("compute")

    clock.start()
    # counts.view(W, E/W)[j] goes to rank j; rank r receives (W, E/W): row i = what rank i sends to r's experts.
    send_matrix = counts.view(world, per_rank).contiguous()
    recv_matrix = torch.empty_like(send_matrix)
    dist.all_to_all_single(recv_matrix, send_matrix, group=group)
    sent, received = torch.stack([send_matrix, recv_matrix]).tolist()  # the one host synchronisation
    send_split = [sum(row) for row in sent]
    recv_split = [sum(row) for row in received]
    n_active = sum(send_split)
    token, weight = token[:n_active], weight[:n_active]
    recv_tokens = all_to_all(tokens[token], recv_split, send_split, group)
    clock.stop("comm")

    clock.start()
    # Received rows come grouped by source rank, then by local expert: put them in expert order.
    block_expert = torch.arange(per_rank, device=tokens.device).repeat(world)
    row_expert = torch.repeat_interleave(block_expert, recv_matrix.reshape(-1), output_size=sum(recv_split))
    local_order = torch.argsort(row_expert, stable=True)
    local_counts = [sum(row[e] for row in received) for e in range(per_rank)]
    answers_sorted = grouped_expert_mlp(recv_tokens[local_order], local_counts, *local)
    if not sum(local_counts):
        # Nothing arrived: keep the (empty) answers attached to the received rows and the local experts, so this
        # rank's backward still enters both reversed all-to-alls that the other ranks enter.
        answers_sorted = recv_tokens[local_order] + sum(w.reshape(-1)[:0].sum() for w in local)
    answers = torch.empty_like(answers_sorted).index_copy(0, local_order, answers_sorted)
    clock.stop("compute")

    clock.start()
    returned = all_to_all(answers, send_split, recv_split, group)
    clock.stop("comm")

    clock.start()
    out = torch.zeros_like(tokens).index_add(0, token, returned * weight[:, None])
    if layer.shared is not None:
        out = out + layer.shared(tokens)
    clock.stop("compute")

    element = tokens.element_size()
    remote_sent = n_active - send_split[rank]
    remote_returned = sum(recv_split) - recv_split[rank]
    stats = {
        "dispatch_bytes": float(remote_sent * layer.d_model * element),
        "combine_bytes": float(remote_returned * layer.d_model * element),
        "metadata_bytes": float((world - 1) * per_rank * send_matrix.element_size()),
        "assignments": float(n_active),
        "received": float(sum(recv_split)),
        "comm_seconds": clock.seconds["comm"],
        "compute_seconds": clock.seconds["compute"],
    }
    return out.view_as(x), stats


def expert_parallel_forward(layer: MoELayer, x: torch.Tensor, *, group: dist.ProcessGroup | None = None,
                            timed: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """This rank's output for its tokens ``x (..., d_model)``, with the experts spread over the group.

    Call on every rank with the same ``layer`` (each holds all experts and uses
    only its own block; :class:`ExpertParallelMoE` holds only its block). The
    result equals ``layer(x)`` computed in one process, and it is differentiable.

    Returns the output and a dict of what this rank did: ``dispatch_bytes`` and
    ``combine_bytes`` sent to *other* ranks (token vectors), ``metadata_bytes``
    (the counts), ``assignments`` sent and ``received``, and with ``timed`` the
    ``comm_seconds`` and ``compute_seconds`` (device-synchronised on a GPU).
    """
    layer = _require_expert_parallel_layer(layer)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    lo, hi = _local_slice(layer.n_experts, dist.get_rank(group) if dist.is_initialized() else 0, world)
    local = [getattr(layer, name)[lo:hi] for name in EXPERT_WEIGHTS]
    return _expert_parallel(layer, local, x, group, timed)


class ExpertParallelMoE(nn.Module):
    """A :class:`MoELayer` with its experts sharded over the ranks of a process group.

    ``ExpertParallelMoE(layer)`` (inside an initialised group) keeps a copy of
    ``layer`` whose stacked expert weights hold only this rank's ``E/W``
    experts; the router, selection bias and shared experts are copied whole
    (replicated). ``forward(x)`` is the expert-parallel layer on this rank's
    tokens, equal to ``layer(x)`` in one process; ``last_stats`` holds the
    bytes (and, with ``timed=True``, seconds) of the latest pass.
    """

    def __init__(self, layer: MoELayer, group: dist.ProcessGroup | None = None, *, timed: bool = False) -> None:
        super().__init__()
        layer = _require_expert_parallel_layer(layer)
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs an initialised torch.distributed process group")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.expert_range = _local_slice(layer.n_experts, self.rank, self.world_size)
        lo, hi = self.expert_range
        # deepcopy with the expert weights pre-filled in the memo: only this rank's block is copied.
        memo: dict[int, Any] = {}
        for name in EXPERT_WEIGHTS:
            full = getattr(layer, name)
            memo[id(full)] = nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad)
        self.layer = copy.deepcopy(layer, memo)
        self.timed = timed
        self.last_stats: dict[str, float] = {}

    def local_experts(self) -> list[torch.Tensor]:
        """This rank's expert weights, in :data:`EXPERT_WEIGHTS` order (first dimension ``E/W``)."""
        return [getattr(self.layer, name) for name in EXPERT_WEIGHTS]

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every rank holds whole (router, shared experts)."""
        return [p for name, p in self.layer.named_parameters() if name not in EXPERT_WEIGHTS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.last_stats = _expert_parallel(self.layer, self.local_experts(), x, self.group, self.timed)
        return out

    def all_reduce_replicated_grads(self) -> None:
        """Sum the replicated parameters' gradients over the group (each rank saw only its own tokens)."""
        for p in self.replicated_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.group)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, experts={self.expert_range}"


def check_against_single_process(sharded: ExpertParallelMoE, full: MoELayer, x: torch.Tensor,
                                 grad_output: torch.Tensor) -> dict[str, float]:
    """Relative errors of the expert-parallel layer against ``full`` in one process, forward and backward.

    Call on every rank with this rank's tokens ``x`` and an output gradient of
    the same shape. Each rank gathers every rank's tokens and gradients (equal
    shapes across ranks), runs ``full`` on all of them, and compares its own
    output, its tokens' gradient, its experts' gradients and the summed
    router / shared-expert gradients. ``sharded`` and ``full`` must start with
    equal weights; ``full`` should be on the same device and dtype as ``x``.
    Gradients already held by ``sharded`` and ``full`` are cleared.
    """
    if not isinstance(sharded, ExpertParallelMoE):
        raise TypeError(f"sharded must be an ExpertParallelMoE, got {type(sharded).__name__}")
    full = _require_expert_parallel_layer(full)
    if not isinstance(grad_output, torch.Tensor) or grad_output.shape != x.shape:
        raise ValueError("grad_output must be a tensor of the shape of x")
    group, world = sharded.group, sharded.world_size
    sharded.zero_grad(set_to_none=True)
    full.zero_grad(set_to_none=True)
    x_local = x.detach().clone().requires_grad_(True)
    y_local = sharded(x_local)
    y_local.backward(grad_output)
    sharded.all_reduce_replicated_grads()

    xs = [torch.empty_like(x) for _ in range(world)]
    gs = [torch.empty_like(grad_output) for _ in range(world)]
    dist.all_gather(xs, x.detach().contiguous(), group=group)
    dist.all_gather(gs, grad_output.contiguous(), group=group)
    x_all = torch.cat(xs).requires_grad_(True)
    y_all = full(x_all)
    y_all.backward(torch.cat(gs))
    rows = x.shape[0]
    mine = slice(sharded.rank * rows, (sharded.rank + 1) * rows)
    errors = {"output": rel_err(y_local, y_all[mine]), "grad_x": rel_err(x_local.grad, x_all.grad[mine])}
    lo, hi = sharded.expert_range
    for name, p in zip(EXPERT_WEIGHTS, sharded.local_experts()):
        errors[f"grad_{name}"] = rel_err(p.grad, getattr(full, name).grad[lo:hi])
    full_params = dict(full.named_parameters())
    for name, p in sharded.layer.named_parameters():
        if name not in EXPERT_WEIGHTS:
            errors[f"grad_{name}"] = rel_err(p.grad, full_params[name].grad)
    return errors


# --------------------------------------------------------------------------- the launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_rank(rank: int, world_size: int, fn: Callable[..., Any], args: Sequence[Any] = (), *,
             device_type: str = "cpu", timeout_s: float = 120.0) -> Any:
    """Join the group as ``rank`` of ``world_size``, run ``fn(rank, world_size, device, *args)``, always leave.

    The group is found through ``MASTER_ADDR`` / ``MASTER_PORT`` (set by
    :func:`launch`, or by ``torchrun``); the backend follows ``device_type``
    (:func:`backend_for`), a CUDA rank uses GPU ``LOCAL_RANK`` (else ``rank``).
    NVLink multicast is switched off (:data:`NO_MULTICAST_ENV`) before anything
    touches NCCL, collectives give up after ``timeout_s``, and the process group
    is destroyed in ``finally``, whether ``fn`` returned or raised.
    """
    os.environ.update(NO_MULTICAST_ENV)
    backend = backend_for(device_type)
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        return fn(rank, world_size, device, *args)
    except BaseException as error:
        # When this rank raises, its peers fail next inside a collective ("connection closed") once the group
        # is destroyed below; stamp the moment, so a launcher can tell which failure came first (the cause).
        error.__dict__.setdefault("failed_at", time.time())
        raise
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: Sequence[Any],
             device_type: str, timeout_s: float, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    try:
        result = run_rank(rank, world_size, fn, args, device_type=device_type, timeout_s=timeout_s)
    except BaseException as error:
        when = getattr(error, "failed_at", time.time())
        Path(out_dir, f"rank{rank}.error").write_text(f"{when!r}\n{traceback.format_exc()}")
        raise
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _failure_report(out_dir: str) -> str | None:
    failures = []
    for path in Path(out_dir).glob("rank*.error"):
        when, _, trace = path.read_text().partition("\n")
        failures.append((float(when), int(path.stem.removeprefix("rank")), trace.rstrip()))
    if not failures:
        return None
    failures.sort()
    _, first, trace = failures[0]
    lines = [f"rank {first} failed first:", trace]
    for _, rank, other in failures[1:]:
        lines.append(f"then rank {rank}: {other.splitlines()[-1]}")
    return "\n".join(lines)


def launch(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *, device_type: str = "cpu",
           timeout_s: float = 120.0, deadline_s: float | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, device, *args)`` in ``world_size`` fresh processes; return each rank's result.

    The processes are started with ``torch.multiprocessing`` (spawn) on this
    machine and meet on 127.0.0.1; see :func:`run_rank` for what each does.
    ``fn`` must be importable by name (a module-level function) and return
    something ``torch.load(weights_only=True)`` reads back (tensors, numbers,
    strings, lists, dicts). If any rank raises, the others are terminated and
    the error is raised here (``torch.multiprocessing.ProcessRaisedException``
    with the traceback of the rank that failed first: its peers then fail in a
    collective, and their one-line errors follow). A collective that waits longer
    than ``timeout_s`` for its peers fails (a hang becomes an error); with
    ``deadline_s``, ranks still running after that many seconds are all
    terminated and ``TimeoutError`` is raised.
    With ``device_type="cuda"`` rank ``r`` uses GPU ``r`` over NCCL.
    """
    require_callable("fn", fn)
    world_size = require_positive_int("world_size", world_size)
    require_choice("device_type", device_type, ("cpu", "cuda"))
    if device_type == "cuda" and torch.cuda.device_count() < world_size:
        raise RuntimeError(f"launch(device_type='cuda') needs {world_size} GPUs, found {torch.cuda.device_count()}")
    for name, value in (("timeout_s", timeout_s), ("deadline_s", 1.0 if deadline_s is None else deadline_s)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    with tempfile.TemporaryDirectory(prefix="moe-ep-") as out_dir:
        context = mp.start_processes(_spawned, args=(world_size, _free_port(), fn, tuple(args), device_type,
                                                     float(timeout_s), out_dir),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        try:
            while not context.join(timeout=1.0, grace_period=5.0):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} processes still running after {deadline_s} s; all terminated")
        except mp.ProcessRaisedException as error:
            report = _failure_report(out_dir)
            if report is None:
                raise
            raise mp.ProcessRaisedException(report, error.error_index, error.error_pid) from None
        finally:
            for process in context.processes:  # nothing outlives the call, whatever happened
                if process.is_alive():
                    process.terminate()
                    process.join(5.0)
                if process.is_alive():
                    process.kill()
                    process.join()
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


# --------------------------------------------------------------------------- the chapter's entry point


@dataclass
class ParallelRun:
    """What :func:`run_expert_parallel` brought back, one entry per rank.

    ``outputs`` and ``stats`` always; with ``grad_outputs`` also ``input_grads``
    (each rank's tokens) and ``param_grads``: the layer's gradients by parameter
    name, expert blocks put back together and replicated ones summed over ranks.
    """

    outputs: list[torch.Tensor]
    stats: list[dict[str, float]]
    input_grads: list[torch.Tensor] | None = None
    param_grads: dict[str, torch.Tensor] | None = None

    def total(self, key: str) -> float:
        """``key`` summed over ranks (e.g. ``"dispatch_bytes"``)."""
        return sum(s[key] for s in self.stats)


def _chapter_worker(rank: int, world_size: int, device: torch.device, layer: MoELayer,
                    inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor] | None, repeats: int,
                    dtype: torch.dtype | None) -> dict[str, Any]:
    sharded = ExpertParallelMoE(layer.to(device=device, dtype=dtype), timed=True)
    x = inputs[rank].to(device=device, dtype=dtype)
    result: dict[str, Any] = {}
    if grad_outputs is not None:
        sharded.train(layer.training)
        x.requires_grad_(True)
        output = sharded(x)
        output.backward(grad_outputs[rank].to(device=device, dtype=dtype))
        sharded.all_reduce_replicated_grads()
        result["input_grad"] = x.grad.cpu()
        result["grads"] = {name: p.grad.cpu() for name, p in sharded.layer.named_parameters()
                           if p.grad is not None and (name in EXPERT_WEIGHTS or rank == 0)}
    else:
        sharded.eval()
        with torch.no_grad():
            output = sharded(x)
    stats = dict(sharded.last_stats)
    with torch.no_grad():
        for _ in range(repeats):  # keep the fastest of several passes (other programs only ever add time)
            dist.barrier()
            sharded(x)
            stats["comm_seconds"] = min(stats["comm_seconds"], sharded.last_stats["comm_seconds"])
            stats["compute_seconds"] = min(stats["compute_seconds"], sharded.last_stats["compute_seconds"])
    result.update(output=output.detach().cpu(), stats=stats)
    return result


def run_expert_parallel(layer: MoELayer, inputs: list[torch.Tensor], *, repeats: int = 0,
                        grad_outputs: list[torch.Tensor] | None = None, device_type: str = "cpu",
                        dtype: torch.dtype | None = None, timeout_s: float = 120.0) -> ParallelRun:
    """Run ``layer`` expert-parallel over ``len(inputs)`` local processes (gloo on CPU, NCCL on GPUs).

    Args:
        layer: the layer; every process gets a copy and keeps only its own experts.
        inputs: one ``(..., d_model)`` tensor of tokens per rank.
        repeats: extra timed forward passes per rank (the fastest is kept in ``stats``).
        grad_outputs: one output gradient per rank (shapes of ``inputs``): also run the backward pass
            in the layer's own mode (train or eval) and bring the gradients back; otherwise forward only, in eval mode.
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, rank ``r`` on GPU ``r``).
        dtype: run in this dtype (default: the layer's and the inputs').
        timeout_s: how long a collective may wait for the other ranks.

    If one process fails, the others are terminated and the error is raised here.
    """
    layer = _require_expert_parallel_layer(layer)
    if not isinstance(inputs, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("inputs must be a list of tensors, one per process")
    world_size = require_positive_int("number of inputs (processes)", len(inputs))
    _local_slice(layer.n_experts, 0, world_size)
    for r, x in enumerate(inputs):
        if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != layer.d_model:
            raise ValueError(f"inputs[{r}] must be a floating-point tensor (..., d_model={layer.d_model}), "
                             f"got {x.dtype} of shape {tuple(x.shape)}")
    if grad_outputs is not None:
        if (not isinstance(grad_outputs, (list, tuple)) or len(grad_outputs) != world_size
                or not all(isinstance(g, torch.Tensor) and g.shape == x.shape for g, x in zip(grad_outputs, inputs))):
            raise ValueError("grad_outputs must be a list with one tensor per rank, each of its input's shape")
    repeats = require_int("repeats", repeats, minimum=0)
    results = launch(_chapter_worker, world_size, (layer, list(inputs), grad_outputs, repeats, dtype),
                     device_type=device_type, timeout_s=timeout_s)
    run = ParallelRun([r["output"] for r in results], [r["stats"] for r in results])
    if grad_outputs is not None:
        run.input_grads = [r["input_grad"] for r in results]
        grads = dict(results[0]["grads"])
        for name in EXPERT_WEIGHTS:
            if name in grads:
                grads[name] = torch.cat([r["grads"][name] for r in results])
        run.param_grads = grads
    return run
