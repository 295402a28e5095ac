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

#: (module, checker name) of every checker in chapters 00-03 (the issue's scope), then 04 and 06.
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
    ("labsupport.moe.exercises", "check_top_k_router"),
    ("labsupport.moe.exercises", "check_load_balancing_loss"),
    ("labsupport.moe.exercises", "check_capacity_keep"),
    ("labsupport.moe.exercises", "check_update_balance_bias"),
    ("labsupport.diffusion.exercises", "check_diffusion_loss"),
    ("labsupport.diffusion.exercises", "check_low_confidence_commit"),
    ("labsupport.diffusion.exercises", "check_threshold_commit"),
    ("labsupport.diffusion.exercises", "check_gap_log_posterior"),
    ("labsupport.diffusion.exercises", "check_mask_tokens"),
    ("labsupport.diffusion.exercises", "check_transfer_schedule"),
]

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
    return checker, seen[-1]


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


def _slow(reference: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return reference(*args, **kwargs)
    return slow


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


def _threshold_strict(canvas, probs, mask_id, threshold):
    """A strict > and no guaranteed progress."""
    confidence, predicted = probs.max(-1)
    return torch.where((canvas == mask_id) & (confidence > threshold), predicted, canvas)


#: Wrong answers that only make sense for one checker: name -> [(kind, function)].
SPECIFIC: dict[str, list[tuple[str, Callable[..., Any]]]] = {
    "check_flash_forward": [("dense (torch.logsumexp)", _dense_flash_forward)],
    "check_flash_backward": [("dense autograd", _dense_flash_backward),
                             ("no -inf guard on lse", _unguarded_flash_backward)],
    "check_gap_log_posterior": [("p(c | left) only", _gap_left_only), ("next character only", _gap_next_only)],
    "check_threshold_commit": [("strict > without progress", _threshold_strict)],
}


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


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    early = [c for c in CHECKERS if not c[0].startswith(("labsupport.ssm", "labsupport.moe",
                                                         "labsupport.diffusion"))]
    later = [c for c in CHECKERS if c not in early]
    for label, group in (("chapters 00-03", early), ("chapters 04, 06 and 08", later)):
        passed, total, lines = count(checkers=group)
        for line in lines:
            print(line)
        print(f"{label}: {passed} of {total} wrong answers passed ({len(group)} checkers)")
    print(f"({time.perf_counter() - start:.1f} s)")
    import labsupport
    print(f"labsupport from {os.path.dirname(labsupport.__file__)}", file=sys.stderr)


if __name__ == "__main__":
    main()
