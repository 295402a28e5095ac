"""Wrong answers of every kind, built from each checker's own reference, and a count of those that pass.

Used by ``tests/harness/test_wrong_answers.py`` (a hypothesis property test: no wrong answer passes any checker)
and as a script that prints, per checker and per kind, how many wrong answers a checker lets through::

    PYTHONPATH=<checkout> python tests/harness/wrong_answers.py

The script only uses what every version of the checkers offers (a checker is a function of the learner's
function), so it can be run on an older checkout to count the wrong answers that passed before a fix.

A checker's reference function and cases are read by running the checker once with
``labsupport.harness.checking.check_function`` replaced by a spy in the checker's module.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

if not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported: chapter 01's kernels run on the CPU

#: (module, checker name) of every checker of every chapter (the script counts them per family package).
CHECKERS: list[tuple[str, str]] = [
    ("labsupport.attention.exercises", "check_causal_attention"),
    ("labsupport.attention.exercises", "check_attention_decode_step"),
    ("labsupport.attention.exercises", "check_kv_cache_bytes"),
    ("labsupport.attention.exercises", "check_decode_intensity"),
    ("labsupport.flash.exercises", "check_online_softmax_update"),
    ("labsupport.flash.exercises", "check_flash_forward"),
    ("labsupport.flash.exercises", "check_flash_backward"),
    ("labsupport.grouped.exercises", "check_grouped_decode_step"),
    ("labsupport.grouped.exercises", "check_absorb_mla_weights"),
    ("labsupport.grouped.exercises", "check_quantize_dequantize"),
    ("labsupport.linear_attention.exercises", "check_recurrent_step"),
    ("labsupport.linear_attention.exercises", "check_chunkwise_step"),
    ("labsupport.linear_attention.exercises", "check_chunkwise_decay_step"),
    ("labsupport.linear_attention.exercises", "check_delta_rule_step"),
    ("labsupport.attention.exercises_core", "check_largest_batch"),
    ("labsupport.grouped.exercises_core", "check_mean_pool_kv"),
    ("labsupport.grouped.exercises_core", "check_absorbed_mla_decode_step"),
    ("labsupport.linear_attention.exercises_core", "check_gated_delta_chunk_step"),
    ("labsupport.ssm.exercises", "check_zoh"),
    ("labsupport.ssm.exercises", "check_combine"),
    ("labsupport.ssm.exercises", "check_selective_step"),
    ("labsupport.ssm.exercises", "check_fft_conv"),
    ("labsupport.ssm.exercises", "check_chunked_scan"),
    ("labsupport.ssm.exercises", "check_ssd_chunked"),
    ("labsupport.moe.exercises", "check_top_k_router"),
    ("labsupport.moe.exercises", "check_load_balancing_loss"),
    ("labsupport.moe.exercises", "check_capacity_keep"),
    ("labsupport.moe.exercises", "check_update_balance_bias"),
    ("labsupport.sparse.exercises", "check_sink_window_mask"),
    ("labsupport.sparse.exercises", "check_page_upper_bound"),
    ("labsupport.sparse.exercises", "check_h2o_evict"),
    ("labsupport.sparse.exercises", "check_block_sparse_loop"),
    ("labsupport.sparse.exercises", "check_streaming_step"),
    ("labsupport.sparse.exercises", "check_block_select"),
    ("labsupport.sparse.exercises", "check_tova_evict"),
    ("labsupport.moe.exercises", "check_gate_top_k"),
    ("labsupport.moe.exercises", "check_sequence_balance_loss"),
    ("labsupport.moe.exercises", "check_bias_balance"),
    ("labsupport.hybrid.exercises", "check_pattern_builder"),
    ("labsupport.hybrid.exercises", "check_hybrid_bytes_per_token"),
    ("labsupport.hybrid.exercises", "check_pareto_front"),
    ("labsupport.hybrid.exercises", "check_register_gqa"),
    ("labsupport.multimodal.exercises", "check_patches_of"),
    ("labsupport.multimodal.exercises", "check_image_of"),
    ("labsupport.multimodal.exercises", "check_snake_scan"),
    ("labsupport.multimodal.exercises", "check_invert"),
    ("labsupport.multimodal.exercises", "check_merge_step"),
    ("labsupport.multimodal.exercises", "check_fastv_keep_set"),
    ("labsupport.multimodal.exercises", "check_route_tokens"),
    ("labsupport.diffusion.exercises", "check_diffusion_loss"),
    ("labsupport.diffusion.exercises", "check_low_confidence_commit"),
    ("labsupport.diffusion.exercises", "check_threshold_commit"),
    ("labsupport.diffusion.exercises", "check_gap_log_posterior"),
    ("labsupport.diffusion.exercises", "check_mask_tokens"),
    ("labsupport.diffusion.exercises", "check_transfer_schedule"),
    ("labsupport.diffusion.exercises", "check_speculative_verify"),
    ("labsupport.capstone.exercises", "check_bottleneck_terms"),
    ("labsupport.capstone.exercises", "check_cheapest_design"),
]

#: Checkers whose learner returns something other than what is graded (a factory of modules, a registry row): the
#: checker wraps the learner's answer into the compared tensor. For these the reference is read from the module
#: under this name (the learner's form), and their wrong answers are only the chapter-specific ones in SPECIFIC.
LEARNER_FORM = {
    "check_pattern_builder": "_reference_builder",
    "check_register_gqa": "_reference_register_gqa",
    # chapter 01's Triton exercise: the learner writes a @triton.jit kernel; the solution and the wrong kernels are
    # Triton functions, so they live in a file of their own (Triton reads a kernel's source from its file)
    "check_triton_attention_kernel": "tests/flash/test_flash_triton_exercise.py:solution",
}


def _triton_kernels() -> Any:
    """``tests/flash/test_flash_triton_exercise.py``, whose kernels are chapter 01's solution and wrong answers."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flash",
                        "test_flash_triton_exercise.py")
    module = sys.modules.get("_course_triton_kernels")
    if module is None:
        spec = importlib.util.spec_from_file_location("_course_triton_kernels", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["_course_triton_kernels"] = module
        spec.loader.exec_module(module)
    return module


def _triton_runs_here() -> bool:
    """Whether chapter 01's Triton exercise can be graded here (Triton installed, kernels interpreted or on a GPU)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or torch.cuda.is_available()


if _triton_runs_here():
    CHECKERS.append(("labsupport.flash.triton_exercise", "check_triton_attention_kernel"))


#: (checker, kind) pairs a checker accepts on purpose: chapter 04 lets a selective step write into its own h.
EXEMPT = {("check_selective_step", "mutate")}

#: The generic kinds of wrong answer, applicable to every checker (where the output allows).
GENERIC_KINDS = ("shape", "dtype", "nan", "posinf", "neginf", "scaled", "offset", "mutate", "none", "raises",
                 "neginf_to_nan", "neginf_to_posinf", "noncontiguous")


@dataclass
class Spied:
    """What a checker hands to ``check_function``: the reference and the cases."""

    reference: Callable[..., Any]
    cases: list[Any]
    learner_form: bool = False  # the reference is in the learner's form, and the cases are the graded wrapper's


def load_checker(module_name: str, name: str) -> tuple[Callable[..., Any], Spied]:
    """The checker and its reference and cases (read with a spy in place of ``check_function``)."""
    module = importlib.import_module(module_name)
    checker = getattr(module, name)
    seen: list[Spied] = []
    real = module.check_function

    def spy(learner: Any, reference: Callable[..., Any], cases: Any, **kwargs: Any) -> Any:
        seen.append(Spied(reference, list(cases)))
        return real(reference, reference, cases, quiet=True, **{k: v for k, v in kwargs.items() if k == "exercise"})

    module.check_function = spy
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            checker(lambda *a, **k: None)
    finally:
        module.check_function = real
    spied = seen[-1]
    if name in LEARNER_FORM:  # the learner writes a factory, a registration or a kernel, not the graded output
        where = LEARNER_FORM[name]
        reference = (getattr(_triton_kernels(), where.split(":")[1]) if ":" in where else getattr(module, where))
        spied = Spied(reference, spied.cases, learner_form=True)
    return checker, spied


def run_checker(checker: Callable[..., Any], fn: Callable[..., Any]) -> bool:
    """Whether ``checker`` passes ``fn`` (its printing swallowed, strict mode off)."""
    saved = os.environ.pop("LABSUPPORT_STRICT_CHECKS", None)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return bool(checker(fn))
    finally:
        if saved is not None:
            os.environ["LABSUPPORT_STRICT_CHECKS"] = saved


# ----------------------------------------------------------------------------- editing an output


def _first_tensor_path(value: Any, path: tuple[int, ...] = ()) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return path
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            found = _first_tensor_path(v, (*path, i))
            if found is not None:
                return found
    return None


def _replace(value: Any, path: tuple[int, ...], new: Any) -> Any:
    if not path:
        return new
    items = list(value)
    items[path[0]] = _replace(items[path[0]], path[1:], new)
    return type(value)(items) if isinstance(value, tuple) else items


def _get(value: Any, path: tuple[int, ...]) -> Any:
    for i in path:
        value = value[i]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _edit_first(out: Any, on_tensor: Callable[[torch.Tensor], torch.Tensor],
                on_number: Callable[[float], Any] | None) -> Any:
    """``out`` with its first tensor (or, for a number answer, the number) edited."""
    if _is_number(out):
        return on_number(out) if on_number is not None else out
    path = _first_tensor_path(out)
    if path is None:
        return out
    return _replace(out, path, on_tensor(_get(out, path).detach().clone()))


def _position(t: torch.Tensor, where: float, finite_only: bool = True) -> tuple[int, ...] | None:
    """An index of ``t`` chosen by ``where`` in [0, 1), among its finite entries when asked."""
    if t.numel() == 0:
        return None
    if t.is_floating_point() and finite_only:
        candidates = torch.isfinite(t).nonzero()
    else:
        candidates = torch.ones_like(t, dtype=torch.bool).nonzero()
    if len(candidates) == 0:
        return None
    return tuple(int(i) for i in candidates[min(int(where * len(candidates)), len(candidates) - 1)])


def _set_at(t: torch.Tensor, where: float, value: float) -> torch.Tensor:
    if not t.is_floating_point():
        t = t.double()
    index = _position(t, where)
    if index is not None:
        t[index] = value
    return t


def _mutate(args: tuple[Any, ...], which: int) -> None:
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.numel() > 0]
    if not tensors:
        return
    t = tensors[which % len(tensors)]
    with torch.no_grad():
        if t.dtype == torch.bool:
            t.logical_not_()
        else:
            t.add_(1)


def make_wrong(reference: Callable[..., Any], kind: str, *, where: float = 0.5, factor: float = 1.5,
               which: int = 0) -> Callable[..., Any]:
    """A wrong answer of ``kind`` built from ``reference`` (see :data:`GENERIC_KINDS`)."""

    def wrong(*args: Any, **kwargs: Any) -> Any:
        if kind == "none":
            reference(*args, **kwargs)
            return None
        if kind == "raises":
            raise RuntimeError("a bug in the learner's code")
        if kind == "mutate":
            out = reference(*args, **kwargs)
            _mutate(args, which)
            return out
        if kind == "noncontiguous":
            out = reference(*args, **kwargs)
            strided = any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args)
            return _edit_first(out, lambda t: t * 2 + 1, None) if strided else out
        out = reference(*args, **kwargs)
        if kind == "shape":
            return _edit_first(out, lambda t: t[..., :-1] if t.dim() and t.shape[-1] > 1 else t.unsqueeze(-1),
                               lambda x: [x])
        if kind == "dtype":
            return _edit_first(out, lambda t: t.to(torch.float32 if t.dtype == torch.float64 else torch.float64),
                               None)
        if kind in ("nan", "posinf", "neginf"):
            value = {"nan": math.nan, "posinf": math.inf, "neginf": -math.inf}[kind]
            return _edit_first(out, lambda t: _set_at(t, where, value), lambda x: value)
        if kind == "scaled":
            return _edit_first(out, lambda t: t * factor if t.is_floating_point() else t * 2 + 1,
                               lambda x: x * factor)
        if kind == "offset":
            def bump(t: torch.Tensor) -> torch.Tensor:
                index = _position(t, where)
                if index is not None:
                    t[index] = (~t[index]) if t.dtype == torch.bool else t[index] + 1
                return t
            return _edit_first(out, bump, lambda x: x + 1)
        if kind in ("neginf_to_nan", "neginf_to_posinf"):
            value = math.nan if kind == "neginf_to_nan" else math.inf
            return _map_tensors(out, lambda t: t.masked_fill(t == -math.inf, value) if t.is_floating_point() else t)
        raise ValueError(f"unknown kind {kind!r}")

    wrong.__name__ = f"wrong_{kind}"
    return wrong


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value.detach().clone())
    if isinstance(value, (tuple, list)):
        mapped = [_map_tensors(v, fn) for v in value]
        return tuple(mapped) if isinstance(value, tuple) else mapped
    return value


def _has_neginf(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and bool((value == -math.inf).any())
    if isinstance(value, (tuple, list)):
        return any(_has_neginf(v) for v in value)
    return False


def _cloned_call(reference: Callable[..., Any], case: Any) -> Any:
    args = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in case.args)
    with torch.no_grad():
        return reference(*args, **dict(case.kwargs))


def applicable_kinds(spied: Spied) -> list[str]:
    """The generic kinds that make a real wrong answer for this checker (one that differs on some case)."""
    if spied.learner_form:  # the generic kinds edit the graded output, which such a learner never returns
        return []
    outputs = [_cloned_call(spied.reference, case) for case in spied.cases]
    number_answer = _is_number(outputs[0])
    kinds = []
    for kind in GENERIC_KINDS:
        if kind == "dtype" and (number_answer or _first_tensor_path(outputs[0]) is None):
            continue
        if kind in ("neginf_to_nan", "neginf_to_posinf") and not any(_has_neginf(o) for o in outputs):
            continue
        if kind == "mutate" and not any(isinstance(a, torch.Tensor) for c in spied.cases for a in c.args):
            continue
        if kind == "noncontiguous" and not any(
            isinstance(a, torch.Tensor) and not a.is_contiguous() for c in spied.cases for a in c.args
        ):
            continue
        kinds.append(kind)
    return kinds


# ----------------------------------------------------------------------------- chapter-specific shortcuts


def _dense_flash_forward(q, k, v, causal=False, block_q=64, block_k=64):
    """The shortcut chapter 01 teaches against: the whole score matrix, then torch.logsumexp."""
    from labsupport.flash.reference import naive_attention, causal_mask
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    return naive_attention(q, k, v, causal=causal), lse


def _dense_flash_backward(q, k, v, out, lse, dout, causal=False, block_q=64, block_k=64):
    """A dense autograd backward in place of recomputation tile by tile."""
    from labsupport.flash.reference import naive_attention
    with torch.enable_grad():
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        result = naive_attention(*leaves, causal=causal)
        return torch.autograd.grad(result, leaves, dout)


def _unguarded_flash_backward(q, k, v, out, lse, dout, causal=False, block_q=64, block_k=64):
    """The tiled backward without the −inf guard on the logsumexp (NaN on a fully masked row inside a block)."""
    scale = q.shape[-1] ** -0.5
    lq, lk = q.shape[-2], k.shape[-2]
    d_rows = (dout * out).sum(-1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0 in range(0, lq, block_q):
        q1 = min(q0 + block_q, lq)
        for k0 in range(0, lk, block_k):
            k1 = min(k0 + block_k, lk)
            if causal and k0 > (q1 - 1) + lk - lq:
                break
            scores = q[..., q0:q1, :] @ k[..., k0:k1, :].transpose(-1, -2) * scale
            if causal:
                rows = torch.arange(q0, q1)[:, None]
                cols = torch.arange(k0, k1)[None, :]
                scores = scores.masked_fill(cols > rows + lk - lq, -math.inf)
            p = torch.exp(scores - lse[..., q0:q1, None])
            dv[..., k0:k1, :] += p.transpose(-1, -2) @ dout[..., q0:q1, :]
            ds = p * (dout[..., q0:q1, :] @ v[..., k0:k1, :].transpose(-1, -2) - d_rows[..., q0:q1, None])
            dq[..., q0:q1, :] += ds @ k[..., k0:k1, :] * scale
            dk[..., k0:k1, :] += ds.transpose(-1, -2) @ q[..., q0:q1, :] * scale
    return dq, dk, dv



def _query_chunked_flash_forward(q, k, v, causal=False, block_q=64, block_k=64):
    """Chapter 01's half-way shortcut: block_q query rows at a time, each against the whole key axis (no key tiles,
    no online softmax). Right numbers; its score blocks are block_q × Lk, not block_q × block_k."""
    scale = q.shape[-1] ** -0.5
    lq, lk = q.shape[-2], k.shape[-2]
    outs, lses = [], []
    for q0 in range(0, lq, block_q):
        q1 = min(q0 + block_q, lq)
        scores = q[..., q0:q1, :] @ k.transpose(-1, -2) * scale
        if causal:
            rows, cols = torch.arange(q0, q1)[:, None], torch.arange(lk)[None, :]
            scores = scores.masked_fill(cols > rows + lk - lq, -math.inf)
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
        outs.append(probs @ v)
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def _query_chunked_flash_backward(q, k, v, out, lse, dout, causal=False, block_q=64, block_k=64):
    """The backward by recomputation, block_q query rows at a time against the whole key axis (no key tiles)."""
    scale = q.shape[-1] ** -0.5
    lq, lk = q.shape[-2], k.shape[-2]
    d_rows = (dout * out).sum(-1)
    safe_lse = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0 in range(0, lq, block_q):
        q1 = min(q0 + block_q, lq)
        scores = q[..., q0:q1, :] @ k.transpose(-1, -2) * scale
        if causal:
            rows, cols = torch.arange(q0, q1)[:, None], torch.arange(lk)[None, :]
            scores = scores.masked_fill(cols > rows + lk - lq, -math.inf)
        p = torch.exp(scores - safe_lse[..., q0:q1, None])
        dv += p.transpose(-1, -2) @ dout[..., q0:q1, :]
        ds = p * (dout[..., q0:q1, :] @ v.transpose(-1, -2) - d_rows[..., q0:q1, None])
        dq[..., q0:q1, :] = ds @ k * scale
        dk += ds.transpose(-1, -2) @ q[..., q0:q1, :] * scale
    return dq, dk, dv


def _sdpa_decode_step(q_new, k_cache, v_cache):
    """Chapter 00's exercise 1 as PyTorch's one call (right numbers; the exercise asks for the formula)."""
    import torch.nn.functional as F
    return F.scaled_dot_product_attention(q_new, k_cache, v_cache)


def _library_max_batch(shape, memory_bytes, context):
    """Chapter 00's exercise 2 as the library's one call."""
    return shape.max_batch(memory_bytes, context)


def _library_online_update(m, l, acc, scores, v):
    """Chapter 01's exercise 1 as the library's call."""
    from labsupport.flash.reference import online_softmax_update
    return online_softmax_update(m, l, acc, scores, v)


def _library_flash_forward(q, k, v, causal=False, block_q=64, block_k=64):
    """Chapter 01's exercise 2 as the library's call (the tiled forward the chapter uses after the exercise)."""
    from labsupport.flash import flash_attention_forward
    return flash_attention_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)


def _library_flash_backward(q, k, v, out, lse, dout, causal=False, block_q=64, block_k=64):
    """Chapter 01's exercise 3 as the library's call."""
    from labsupport.flash import flash_attention_backward
    return flash_attention_backward(q, k, v, out, lse, dout, causal=causal, block_q=block_q, block_k=block_k)


def _library_decode_intensity(shape, context, batch):
    """Chapter 00's exercise 3 as the library's one call."""
    flops, moved = shape.decode_step(context, batch)
    return flops / moved

def _dense_block_sparse(q, k, v, mask, block_q, block_k):
    """Chapter 05's shortcut: dense attention under the mask, with the NaN of the unread blocks cleaned away."""
    from labsupport.sparse.reference import masked_attention
    return masked_attention(q, torch.nan_to_num(k), torch.nan_to_num(v), mask)


def _tova_per_head(attention, positions, newest):
    """TOVA with each head evicting its own token (the paper averages over the heads)."""
    from labsupport.sparse.policies import tova_victim
    return positions.scatter(-1, tova_victim(attention, positions, newest, per_head=True)[..., None], -1)


def _streaming_slot_positions(positions, incoming, sinks):
    """The cache step with the text positions kept for the model (no re-positioning inside the cache)."""
    from labsupport.sparse.exercises import streaming_step
    after, _ = streaming_step(positions, incoming, sinks)
    return after, after.clone()


def _streaming_evicts_sinks(positions, incoming, sinks):
    """The cache step that evicts the oldest token, sinks included (a plain window)."""
    from labsupport.sparse.exercises import streaming_step
    return streaming_step(positions, incoming, 0)


def _block_select_max_pooled(q, keys, block, top_n):
    """Block selection scored by the largest key of each block instead of the mean."""
    t = keys.shape[-2]
    n_blocks = -(-t // block)
    padded = torch.nn.functional.pad(keys, (0, 0, 0, n_blocks * block - t), value=-1e9)
    scores = (padded.reshape(*keys.shape[:-2], n_blocks, block, keys.shape[-1]) @ q[..., None, :, None])[..., 0]
    scores = scores.amax(-1)
    scores[..., -1] = math.inf
    top = scores.topk(min(top_n, n_blocks), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True).repeat_interleave(block, -1)[..., :t]


def _block_select_without_own_block(q, keys, block, top_n):
    """Block selection that ranks the query's own block like any other."""
    t = keys.shape[-2]
    n_blocks = -(-t // block)
    means = torch.stack([keys[..., b * block:(b + 1) * block, :].mean(-2) for b in range(n_blocks)], dim=-2)
    scores = (means @ q[..., :, None])[..., 0]
    top = scores.topk(min(top_n, n_blocks), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True).repeat_interleave(block, -1)[..., :t]


def _slow(reference: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return reference(*args, **kwargs)
    return slow


def _one_gate_for_all(logits, k, gate):
    """Chapter 06's old rule for every paper: softmax, top-k, renormalise."""
    top, experts = logits.softmax(-1).topk(k, -1)
    return top / top.sum(-1, keepdim=True), experts


def _never_renormalise(logits, k, gate):
    """Softmax probabilities as they are, for every gate (sigmoid and renormalise both wrong)."""
    return logits.softmax(-1).topk(k, -1)


def _batch_wise_sequence_loss(scores, experts):
    """DeepSeek-V3's loss counted over the whole batch, as Switch's is."""
    from labsupport.moe.exercises import reference_sequence_balance_loss
    return reference_sequence_balance_loss(scores.reshape(1, -1, scores.shape[-1]),
                                           experts.reshape(1, -1, experts.shape[-1]))


def _raw_score_sequence_loss(scores, experts):
    """Sigmoid scores averaged without normalising them per token."""
    from labsupport.moe.exercises import reference_sequence_balance_loss
    return reference_sequence_balance_loss(scores, experts) * 0 + _unnormalised(scores, experts)


def _unnormalised(scores, experts):
    b, length, n = scores.shape
    k = experts.shape[-1]
    counts = torch.zeros(b, n, dtype=scores.dtype).scatter_add_(
        1, experts.reshape(b, -1), torch.ones(b, length * k, dtype=scores.dtype))
    return (counts * n / (k * length) * scores.mean(1)).sum(-1).mean()


def _bias_up_when_busy(scores, k, gamma, steps):
    from labsupport.moe.exercises import reference_bias_balance
    return -reference_bias_balance(scores, k, gamma, steps)


def _bias_by_overload(scores, k, gamma, steps):
    """A step proportional to the overload instead of its sign."""
    bias = torch.zeros(scores.shape[1], dtype=scores.dtype)
    for _ in range(steps):
        counts = torch.bincount((scores + bias).topk(k, -1).indices.reshape(-1),
                                minlength=scores.shape[1]).to(scores.dtype)
        bias = bias + gamma * (counts.mean() - counts)
    return bias


def _bias_weighted_selection_once(scores, k, gamma, steps):
    """Counts from the unbiased scores every step (the bias never feeds back into selection)."""
    counts = torch.bincount(scores.topk(k, -1).indices.reshape(-1), minlength=scores.shape[1]).to(scores.dtype)
    return steps * gamma * torch.sign(counts.mean() - counts)


def _token_order_capacity(experts, n_experts, capacity):
    """Slots filled token by token (a token's second choice before the next token's first)."""
    keep = torch.zeros_like(experts, dtype=torch.bool)
    used = [0] * n_experts
    for t in range(experts.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            if used[e] < capacity:
                used[e] += 1
                keep[t, j] = True
    return keep
# chapter 04: the shortcuts its exercises teach against


def _direct_conv(u, kernel):
    """A direct causal convolution (conv1d), handed in as the FFT one."""
    import torch.nn.functional as F
    length, channels = u.shape[1], u.shape[2]
    padded = F.pad(u.transpose(1, 2), (length - 1, 0))
    return F.conv1d(padded, kernel.flip(-1)[:, None, :], groups=channels).transpose(1, 2)


def _direct_conv_with_a_decoy_fft(u, kernel):
    """The direct convolution through an L × L matrix of lags, with an FFT computed and thrown away."""
    torch.fft.rfft(u.transpose(1, 2))
    lags = torch.arange(u.shape[1])[:, None] - torch.arange(u.shape[1])[None, :]
    toeplitz = torch.where(lags >= 0, kernel[:, lags.clamp(min=0)], torch.zeros((), dtype=kernel.dtype))
    return torch.einsum("dts,bsd->btd", toeplitz, u)


def _circular_fft_conv(u, kernel):
    """The FFT convolution without padding: circular, so the end wraps into the start."""
    length = u.shape[1]
    spectrum = torch.fft.rfft(u.transpose(1, 2), n=length) * torch.fft.rfft(kernel, n=length)
    return torch.fft.irfft(spectrum, n=length).transpose(1, 2)


def _scan_loop(a, b, h0, chunk_size):
    """The sequential loop handed in as the chunked scan."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def _scan_closed_form(a, b, h0, chunk_size):
    """h = P · cumsum(b / P) with P = cumprod(a): one line, and 0/0 once P underflows."""
    P = torch.cumprod(a, dim=1)
    h = P * torch.cumsum(b / P, dim=1)
    return h if h0 is None else h + P * h0[:, None]


def _scan_chunked_without_h0(a, b, h0, chunk_size):
    """The library's chunked scan that forgets the initial state."""
    from labsupport.ssm.scans import chunked_scan
    return chunked_scan(a, b, None, chunk_size=chunk_size)


def _ssd_quadratic_answer(x, dt, A, B, C, chunk_size):
    """The whole L × L masked matrix in place of the chunked algorithm."""
    from labsupport.ssm.reference import ssd_quadratic, ssd_recurrent
    return ssd_quadratic(x, dt, A, B, C), ssd_recurrent(x, dt, A, B, C)[1]


def _ssd_chunked_by_differences(x, dt, A, B, C, chunk_size):
    """The chunked SSD with every decay a difference of cumulative sums (what the library did before issue 19)."""
    batch, length, heads, p = x.shape
    q = chunk_size
    pad = -length % q
    if pad:
        x, dt, B, C = (torch.cat([t, t.new_zeros(batch, pad, *t.shape[2:])], dim=1) for t in (x, dt, B, C))
    n = x.shape[1] // q

    def chunks(t):
        return t.reshape(batch, n, q, heads, *t.shape[3:]).movedim(3, 1)

    xc, bc, cc, log_a = chunks(dt[..., None] * x), chunks(B), chunks(C), chunks(dt * A)
    within = log_a.cumsum(-1)
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    segments = (within[..., :, None] - within[..., None, :]).masked_fill(~causal, -math.inf)
    y_intra = ((cc @ bc.transpose(-1, -2)) * torch.exp(segments)) @ xc
    chunk_states = (bc * torch.exp(within[..., -1:] - within)[..., None]).transpose(-1, -2) @ xc
    state = x.new_zeros(batch, heads, B.shape[-1], p)
    entering = []
    for k in range(n):
        entering.append(state)
        state = torch.exp(within[..., k, -1])[..., None, None] * state + chunk_states[:, :, k]
    y_inter = (cc * torch.exp(within)[..., None]) @ torch.stack(entering, dim=2)
    return (y_intra + y_inter).movedim(1, 3).reshape(batch, n * q, heads, p)[:, :length], state


def _ssd_state_not_carried(x, dt, A, B, C, chunk_size):
    """Each chunk computed alone (step 1 only): no state passes between chunks."""
    from labsupport.ssm.reference import ssd_quadratic
    ys = [ssd_quadratic(x[:, s:s + chunk_size], dt[:, s:s + chunk_size], A, B[:, s:s + chunk_size],
                        C[:, s:s + chunk_size]) for s in range(0, x.shape[1], chunk_size)]
    from labsupport.ssm.reference import ssd_recurrent
    return torch.cat(ys, dim=1), ssd_recurrent(x, dt, A, B, C)[1]
# chapter 07: the hybrid exercises' usual mistakes


def _builder_first_letter_only(pattern, legend):
    return lambda d, i: legend[pattern[0]](d, i)


def _builder_no_repeat(pattern, legend):
    return lambda d, i: legend[pattern[i]](d, i)


def _builder_pattern_position(pattern, legend):
    return lambda d, i: legend[pattern[i % len(pattern)]](d, i % len(pattern))


def _builder_reversed(pattern, legend):
    return lambda d, i: legend[pattern[::-1][i % len(pattern)]](d, i)


def _bytes_with(window_rule: str, per_token: bool = True, with_bytes: bool = True):
    def wrong(layers, context, bytes_per_element):
        total = 0
        for kind, *sizes in layers:
            if kind == "attention":
                total += sizes[0] * context
            elif kind == "window":
                total += sizes[0] * {"full_window": sizes[1], "context": context,
                                     "right": min(context, sizes[1])}[window_rule]
            elif kind == "ssm":
                total += sizes[0] * sizes[1]
            else:
                total += sizes[0] * sizes[1] * sizes[2]
        total *= bytes_per_element if with_bytes else 1
        return total / context if per_token else float(total)
    return wrong


def _pareto_drops_duplicates(costs, scores):
    dominated = (costs[None, :] <= costs[:, None]) & (scores[None, :] >= scores[:, None])
    dominated &= ~torch.eye(len(costs), dtype=torch.bool)
    return ~dominated.any(dim=1)


def _pareto_strict_on_both(costs, scores):
    return ~((costs[None, :] < costs[:, None]) & (scores[None, :] > scores[:, None])).any(dim=1)


def _register_with(formula):
    def wrong(n_kv_heads):
        from labsupport.grouped.mixers import GroupedQueryAttention
        from labsupport.hybrid import registry
        return registry.register(f"my_gqa_{n_kv_heads}", lambda d, i: GroupedQueryAttention(d, 4, n_kv_heads),
                                 family="mine", state_numbers=lambda c, d: formula(c, d, n_kv_heads),
                                 replace_existing=True)
    return wrong
def _strip_patches(images, patch):
    """Chapter 09's tempting shortcut: a reshape, which cuts strips of rows instead of p×p squares."""
    b, c, h, w = images.shape
    return images.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def _channels_last_patches(images, patch):
    """Patches with their pixels laid out (p, p, C) instead of (C, p, p)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def _strip_image(patches, patch, height, width):
    b, _, dim = patches.shape
    return patches.reshape(b, dim // (patch * patch), height, width)


def _even_rows_reversed(height, width):
    grid = torch.arange(height * width).view(height, width).clone()
    grid[0::2] = grid[0::2].flip(-1)
    return grid.reshape(-1)


def _snake_swapped(height, width):
    grid = torch.arange(height * width).view(width, height).clone()
    grid[1::2] = grid[1::2].flip(-1)
    return grid.reshape(-1)


def _invert_returns_perm(perm):
    return perm.clone()


def _merge_unweighted(x, size, metric, r):
    from labsupport.multimodal.merging import bipartite_matches, merge_tokens
    src, dst = bipartite_matches(metric[None], r)
    out, new_size = merge_tokens(x[None], torch.ones_like(size)[None], src, dst)
    return out[0], (size[None].scatter_add(1, dst, size[None].gather(1, src)))[0][_survivors(len(x), src[0])]


def _survivors(n, src):
    keep = torch.ones(n, dtype=torch.bool)
    keep[src] = False
    return keep


def _merge_dot_product(x, size, metric, r):
    from labsupport.multimodal.merging import merge_tokens
    scores = metric[0::2] @ metric[1::2].T
    best, partner = scores.max(dim=-1)
    order = best.argsort(descending=True)[:r]
    src, dst = (2 * order)[None], (2 * partner[order] + 1)[None]
    out, new_size = merge_tokens(x[None], size[None], src, dst)
    return out[0], new_size[0]


def _keep_by_rows(attn, image_start, image_end, keep):
    given = attn.mean(0).mean(-1)[image_start:image_end]
    return given.topk(keep).indices.sort().values + image_start


def _keep_last_query(attn, image_start, image_end, keep):
    received = attn.mean(0)[-1, image_start:image_end]
    return received.topk(keep).indices.sort().values + image_start


def _keep_by_rank(attn, image_start, image_end, keep):
    received = attn.mean(0).mean(0)[image_start:image_end]
    return received.topk(keep).indices + image_start


def _mod(gate="update", skipped="x", k_of=lambda c, n: max(1, round(c * n)), ordered=True, on_all=False,
         detach=False):
    """Chapter 09's Mixture-of-Depths routing of one image, written as a learner would, with one slip."""
    def route(x, scores, capacity, update):
        s = scores.detach() if detach else scores
        chosen = s.topk(k_of(capacity, len(x))).indices
        chosen = chosen.sort().values if ordered else chosen
        f = update(x)[chosen] if on_all else update(x[chosen])
        w = torch.sigmoid(s[chosen])[:, None]
        new = {"update": x[chosen] + w * f, "none": x[chosen] + f, "whole": w * (x[chosen] + f),
               "softmax": x[chosen] + s[chosen].softmax(0)[:, None] * f}[gate]
        base = x.clone() if skipped == "x" else torch.zeros_like(x)
        base[chosen] = new
        return base, chosen
    return route
def _gap_left_only(model, tokens, position):
    """p(c | left) alone: the right side of the gap ignored."""
    return model(tokens[:, :position]).double()[:, -1].log_softmax(-1)


def _gap_next_only(model, tokens, position):
    """Scores p(c | left) · p(next character | left, c) only, not the whole right side."""
    vocab = model.vocab_size
    rows = tokens.repeat_interleave(vocab, dim=0)
    rows[:, position] = torch.arange(vocab).repeat(tokens.shape[0])
    log_p = model(rows[:, :position + 1]).double().log_softmax(-1)
    picked = log_p.gather(-1, rows[:, 1:position + 2, None]).squeeze(-1)[:, position - 1:]
    return picked.sum(1).view(tokens.shape[0], vocab).log_softmax(-1)


def _terms_with(**slip: Any) -> Callable[..., Any]:
    """Chapter 10's roofline terms with one slip (see ``labsupport.capstone.exercises._roofline_variant``)."""
    def wrong(workload):
        from labsupport.capstone.exercises import _roofline_variant
        return _roofline_variant(workload, **slip)
    return wrong


def _pick_with(**slip: Any) -> Callable[..., Any]:
    """Chapter 10's cheapest-design pick with one slip: best recall, a constraint ignored, a strict bar, ties."""
    def wrong(costs, recalls, memory, recall_bar, memory_budget):
        from labsupport.capstone.exercises import _pick
        return _pick(costs, recalls, memory, recall_bar, memory_budget, **slip)
    return wrong


def _threshold_strict(canvas, probs, mask_id, threshold):
    """A strict > and no guaranteed progress."""
    confidence, predicted = probs.max(-1)
    return torch.where((canvas == mask_id) & (confidence > threshold), predicted, canvas)


def _verify_accept_if_p_ge_q(p, q, drafted, u):
    """Keeps a drafted token whenever the target gives it at least the draft's probability (no uniform)."""
    rows = torch.arange(drafted.shape[0])
    ok = p[rows, drafted] >= q[rows, drafted]
    bad = (~ok).nonzero()
    if bad.numel() == 0:
        return torch.tensor(drafted.shape[0]), p[-1].clone()
    n = int(bad[0, 0])
    r = (p[n] - q[n]).clamp(min=0)
    return torch.tensor(n), r / r.sum()


def _verify_residual_from_p(p, q, drafted, u):
    """Redraws a rejected token from p itself instead of the residual max(p - q, 0)."""
    from labsupport.diffusion.speculative import verify_draft
    n, probs = verify_draft(p, q, drafted, u)
    return n, (p[int(n)].clone() if int(n) < drafted.shape[0] else probs)


def _verify_ratio_flipped(p, q, drafted, u):
    """Accepts while u < q/p (the ratio upside down)."""
    rows = torch.arange(drafted.shape[0])
    ok = u * p[rows, drafted] < q[rows, drafted]
    bad = (~ok).nonzero()
    if bad.numel() == 0:
        return torch.tensor(drafted.shape[0]), p[-1].clone()
    n = int(bad[0, 0])
    r = (p[n] - q[n]).clamp(min=0)
    return torch.tensor(n), r / r.sum()


def _verify_residual_q_minus_p(p, q, drafted, u):
    """Residual max(q - p, 0): the wrong way round."""
    from labsupport.diffusion.speculative import verify_draft
    n, probs = verify_draft(p, q, drafted, u)
    if int(n) < drafted.shape[0]:
        r = (q[int(n)] - p[int(n)]).clamp(min=0)
        probs = r / r.sum()
    return n, probs


#: Wrong answers that only make sense for one checker: name -> [(kind, function)].
SPECIFIC: dict[str, list[tuple[str, Callable[..., Any]]]] = {
    "check_flash_forward": [("dense (torch.logsumexp)", _dense_flash_forward)],
    "check_flash_backward": [("dense autograd", _dense_flash_backward),
                             ("no -inf guard on lse", _unguarded_flash_backward)],
    "check_block_sparse_loop": [("dense, NaN cleaned", _dense_block_sparse)],
    "check_tova_evict": [("per head", _tova_per_head)],
    "check_streaming_step": [("text positions", _streaming_slot_positions),
                             ("sinks evicted", _streaming_evicts_sinks)],
    "check_block_select": [("max-pooled", _block_select_max_pooled),
                           ("own block not forced", _block_select_without_own_block)],
    "check_gate_top_k": [("one renormalised rule for every paper", _one_gate_for_all),
                         ("never renormalise, never sigmoid", _never_renormalise)],
    "check_sequence_balance_loss": [("counted over the batch", _batch_wise_sequence_loss),
                                    ("raw sigmoid scores", _raw_score_sequence_loss)],
    "check_bias_balance": [("overloaded expert moved up", _bias_up_when_busy),
                           ("step proportional to the overload", _bias_by_overload),
                           ("selection never sees the bias", _bias_weighted_selection_once)],
    "check_capacity_keep": [("token order instead of choice order", _token_order_capacity)],
    "check_fft_conv": [("direct convolution (conv1d)", _direct_conv),
                       ("direct convolution, decoy FFT", _direct_conv_with_a_decoy_fft),
                       ("circular (no padding)", _circular_fft_conv)],
    "check_chunked_scan": [("sequential loop", _scan_loop), ("cumprod closed form", _scan_closed_form),
                           ("h0 ignored", _scan_chunked_without_h0)],
    "check_ssd_chunked": [("whole L x L matrix", _ssd_quadratic_answer),
                          ("decays as differences of cumsums", _ssd_chunked_by_differences),
                          ("no state between chunks", _ssd_state_not_carried)],
    "check_pattern_builder": [("first letter only", _builder_first_letter_only),
                              ("short pattern not repeated", _builder_no_repeat),
                              ("position in the pattern as layer index", _builder_pattern_position),
                              ("pattern reversed", _builder_reversed)],
    "check_hybrid_bytes_per_token": [("window charged in full", _bytes_with("full_window")),
                                     ("window charged the context", _bytes_with("context")),
                                     ("total, not per token", _bytes_with("right", per_token=False)),
                                     ("no bytes per element", _bytes_with("right", with_bytes=False))],
    "check_pareto_front": [("duplicates dropped", _pareto_drops_duplicates),
                           ("strict on both axes", _pareto_strict_on_both)],
    "check_register_gqa": [("query heads counted", _register_with(lambda c, d, g: 2 * 4 * (d // 4) * c)),
                           ("no factor 2", _register_with(lambda c, d, g: g * (d // 4) * c)),
                           ("constant state", _register_with(lambda c, d, g: 2 * g * (d // 4))),
                           ("returns nothing", lambda g: _register_with(lambda c, d, h: 2 * h * (d // 4) * c)(g)
                            and None)],
    "check_patches_of": [("reshape into strips", _strip_patches), ("pixels (p, p, C)", _channels_last_patches)],
    "check_image_of": [("reshape from strips", _strip_image)],
    "check_snake_scan": [("even rows reversed", _even_rows_reversed), ("height and width swapped", _snake_swapped)],
    "check_invert": [("the permutation itself", _invert_returns_perm)],
    "check_merge_step": [("unweighted mean", _merge_unweighted), ("dot product, not cosine", _merge_dot_product)],
    "check_fastv_keep_set": [("attention given (rows)", _keep_by_rows), ("last query only", _keep_last_query),
                             ("ordered by rank", _keep_by_rank)],
    "check_route_tokens": [("no router weight", _mod(gate="none")), ("weight on x + update", _mod(gate="whole")),
                           ("softmax over the chosen", _mod(gate="softmax")), ("skipped zeroed", _mod(skipped="0")),
                           ("k rounded down", _mod(k_of=lambda c, n: max(1, int(c * n)))),
                           ("k at least 0", _mod(k_of=lambda c, n: round(c * n))),
                           ("score order", _mod(ordered=False)), ("update on every token", _mod(on_all=True)),
                           ("router detached", _mod(detach=True)),
                           ("lowest scores", lambda x, s, c, u: _mod()(x, -s, c, u))],
    "check_gap_log_posterior": [("p(c | left) only", _gap_left_only), ("next character only", _gap_next_only)],
    "check_threshold_commit": [("strict > without progress", _threshold_strict)],
    "check_speculative_verify": [("accept when p >= q", _verify_accept_if_p_ge_q),
                                 ("rejected token redrawn from p", _verify_residual_from_p),
                                 ("ratio q/p", _verify_ratio_flipped),
                                 ("residual q - p", _verify_residual_q_minus_p)],
    "check_bottleneck_terms": [("compute + memory time", _terms_with(combine="sum")),
                               ("FLOPs only", _terms_with(combine="flops")),
                               ("decode at the final context", _terms_with(context="final")),
                               ("one sequence's cache", _terms_with(batch_in_memory=False))],
    "check_cheapest_design": [("best recall", _pick_with(by="recall")),
                              ("memory ignored", _pick_with(use_memory=False)),
                              ("recall bar ignored", _pick_with(use_recall=False)),
                              ("strict bar", _pick_with(strict=True)),
                              ("ties to the first row", _pick_with(tie="first"))],
}


# ----------------------------------------------------------------------------- chapters 02 and 03: work and library


def _mla_broadcast_up_projection(q_c, q_r, cache, w_uk, w_uv, scale):
    """The naive MLA step written as broadcast-multiply-and-sum: no matrix product, every key and value built."""
    d_c = w_uk.shape[1]
    c, k_r = cache[..., :d_c], cache[..., d_c:]
    keys = (c[..., :, :, None] * w_uk[None, :, None]).sum(-2)            # (B, H, T, d_h)
    values = (c[..., :, :, None] * w_uv[None, :, None]).sum(-2)
    scores = ((q_c * keys).sum(-1) + (q_r * k_r).sum(-1)) * scale
    return (scores.softmax(-1)[..., None] * values).sum(-2, keepdim=True)


def _mla_up_projection_per_head(q_c, q_r, cache, w_uk, w_uv, scale):
    """The naive MLA step one head at a time: no tensor of T × H × d_h, but every head's keys and values."""
    d_c = w_uk.shape[1]
    c, k_r = cache[:, 0, :, :d_c], cache[:, 0, :, d_c:]
    heads = []
    for h in range(w_uk.shape[0]):
        scores = (q_c[:, h] @ (c @ w_uk[h]).transpose(-1, -2) + q_r[:, h] @ k_r.transpose(-1, -2)) * scale
        heads.append(scores.softmax(-1) @ (c @ w_uv[h]))
    return torch.stack(heads, dim=1)


def _mla_values_up_projected(q_c, q_r, cache, w_uk, w_uv, scale):
    """Keys absorbed, values still up-projected for every cached token."""
    d_c = w_uk.shape[1]
    q = torch.cat([q_c @ w_uk.transpose(-1, -2), q_r], dim=-1)
    return (scale * q @ cache.transpose(-1, -2)).softmax(-1) @ (cache[..., :d_c] @ w_uv)


def _mla_by_the_library(q_c, q_r, cache, w_uk, w_uv, scale):
    from labsupport.grouped import latent_attention_core

    return latent_attention_core(torch.cat([q_c @ w_uk.transpose(-1, -2), q_r], -1), cache, w_uk.shape[1],
                                 scale) @ w_uv


def _grouped_decode_copying_the_cache(q, k, v):
    """Chapter 02's exercise 1 with the cache repeated for every query head (the copy GQA avoids)."""
    reps = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(reps, dim=1), v.repeat_interleave(reps, dim=1)
    return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(dim=-1) @ v


def _quantise_by_the_library(x, bits, dim):
    from labsupport.grouped import quantize_dequantize

    return quantize_dequantize(x, bits, dim)


def _decay_chunk_token_loop(state, q, k, v, log_decay):
    """Exercise 4 of chapter 03 by stepping through the chunk's tokens (the recurrent form)."""
    outs = []
    for i in range(k.shape[2]):
        state = log_decay[..., i, None, None].exp() * state + k[:, :, i, :, None] * v[:, :, i, None, :]
        outs.append((q[:, :, i, :, None] * state).sum(-2))
    return torch.stack(outs, dim=2), state


def _gated_delta_token_loop(state, q, k, v, beta, log_decay):
    """Exercise 5 of chapter 03 by stepping through the chunk's tokens (the recurrent form)."""
    outs = []
    for i in range(k.shape[2]):
        k_i, b_i = k[:, :, i], beta[:, :, i, None]
        state = log_decay[..., i, None, None].exp() * state
        recalled = (k_i[..., :, None] * state).sum(-2)
        state = state + k_i[..., :, None] * (b_i * (v[:, :, i] - recalled))[..., None, :]
        outs.append((q[:, :, i, :, None] * state).sum(-2))
    return torch.stack(outs, dim=2), state


def _mean_pool_strided_groups(kv_weight, head_dim, n_kv_heads):
    """Groups of heads taken with a stride (h % G') instead of consecutive heads."""
    rows, d_model = kv_weight.shape
    old = rows // (2 * head_dim)
    grouped = kv_weight.reshape(2, old // n_kv_heads, n_kv_heads, head_dim, d_model)
    return grouped.mean(dim=1).reshape(2 * n_kv_heads * head_dim, d_model)


SPECIFIC.update({
    "check_absorbed_mla_decode_step": [("up-projection by broadcast multiply-and-sum", _mla_broadcast_up_projection),
                                       ("up-projection one head at a time", _mla_up_projection_per_head),
                                       ("values up-projected", _mla_values_up_projected),
                                       ("the library's latent_attention_core", _mla_by_the_library)],
    "check_quantize_dequantize": [("the library's quantize_dequantize", _quantise_by_the_library)],
    "check_grouped_decode_step": [("the cache repeated per query head", _grouped_decode_copying_the_cache)],
    "check_chunkwise_decay_step": [("loop over the chunk's tokens", _decay_chunk_token_loop)],
    "check_gated_delta_chunk_step": [("loop over the chunk's tokens", _gated_delta_token_loop)],
    "check_mean_pool_kv": [("strided groups of heads", _mean_pool_strided_groups)],
})


# ----------------------------------------------------------------------------- the count


def count(kinds_filter: set[str] | None = None, checkers: list[tuple[str, str]] | None = None,
          ) -> tuple[int, int, list[str]]:
    """Feed every wrong answer to every checker; return (passed, total, lines naming those that passed)."""
    passed, total, lines = 0, 0, []
    for module_name, name in (CHECKERS if checkers is None else checkers):
        checker, spied = load_checker(module_name, name)
        trials: list[tuple[str, Callable[..., Any]]] = []
        for kind in applicable_kinds(spied):
            if (name, kind) in EXEMPT:
                continue
            variants = [{}]
            if kind in ("nan", "posinf", "neginf", "offset"):
                variants = [{"where": 0.0}, {"where": 0.99}]
            if kind == "mutate":
                n_tensors = max(sum(isinstance(a, torch.Tensor) for a in c.args) for c in spied.cases)
                variants = [{"which": i} for i in range(min(3, n_tensors))]
            for extra in variants:
                trials.append((f"{kind}{extra or ''}", make_wrong(spied.reference, kind, **extra)))
        trials += SPECIFIC.get(name, [])
        for label, fn in trials:
            if kinds_filter and label.split("{")[0] not in kinds_filter:
                continue
            total += 1
            if run_checker(checker, fn):
                passed += 1
                lines.append(f"PASSED (should fail): {name} <- {label}")
    return passed, total, lines


# Chapters 00 and 01 (issue 24): the library's one-call answers, and query chunking in place of tiles.
for _name, _wrong in {
    "check_attention_decode_step": [("library call: F.scaled_dot_product_attention", _sdpa_decode_step)],
    "check_largest_batch": [("library call: shape.max_batch", _library_max_batch)],
    "check_decode_intensity": [("library call: shape.decode_step", _library_decode_intensity)],
    "check_online_softmax_update": [("library call: reference.online_softmax_update", _library_online_update)],
    "check_flash_forward": [("query-chunked: whole key axis per query block", _query_chunked_flash_forward),
                            ("library call: ref.flash_attention_forward", _library_flash_forward)],
    "check_flash_backward": [("query-chunked: whole key axis per query block", _query_chunked_flash_backward),
                             ("library call: ref.flash_attention_backward", _library_flash_backward)],
}.items():
    SPECIFIC.setdefault(_name, []).extend(_wrong)


if _triton_runs_here():  # chapter 01's Triton exercise: wrong kernels written as a learner would
    _kernels = _triton_kernels()
    SPECIFIC["check_triton_attention_kernel"] = [
        ("dense: every key in one load", _kernels.dense_shortcut),
        ("dense, with a loop that does nothing", _kernels.dense_with_a_dummy_loop),
        ("running sums not rescaled", _kernels.no_rescale),
        ("last key block not masked", _kernels.unmasked_tail),
    ]


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    packages: dict[str, list[tuple[str, str]]] = {}
    for checker in CHECKERS:  # one group per family package, in the order the list first names them
        packages.setdefault(checker[0].split(".")[1], []).append(checker)
    for package, group in packages.items():
        passed, total, lines = count(checkers=group)
        for line in lines:
            print(line)
        print(f"{package}: {passed} of {total} wrong answers passed ({len(group)} checkers)")
    print(f"({time.perf_counter() - start:.1f} s)")
    import labsupport
    print(f"labsupport from {os.path.dirname(labsupport.__file__)}", file=sys.stderr)


if __name__ == "__main__":
    main()
