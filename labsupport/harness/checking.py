"""The exercise-checker engine shared by every chapter.

A chapter's checker is a thin wrapper around :func:`check_function`: it builds a
few seeded random :class:`Case` objects, names the reference solution, and
picks tolerances. ``check_function`` then

* runs the learner's function and the reference on fresh copies of each case
  (copies that keep the strides of the case's tensors, so a non-contiguous
  input reaches the learner non-contiguous);
* fails a function that changes its inputs in place, naming the input;
* compares the results (tensors, numbers — Python or numpy —, or tuples/lists
  of those) for type, shape, dtype, values within ``atol + rtol * |expected|``,
  and non-finite entries by kind and position: NaN, +inf and −inf must stand
  exactly where the answer has them (a NaN where −inf belongs is wrong);
* stops an answer that runs past a time budget (``time_budget_s`` per case)
  and says so;
* with :attr:`Case.max_elements`, records the largest tensor the learner's
  function creates (:class:`LargestTensorRecorder`) and fails an answer that
  materialises more, e.g. "a 512×512 score matrix" in a tiling exercise;
* for cases with ``grad_argnums``, also compares gradients with respect to
  those arguments, pulled back from the same random cotangent;
* prints a single line on success, a short explanation on failure (which case,
  the input shapes and dtypes — small integer inputs by value —, what was
  expected and what came, where the first mismatch is and the relative error,
  then what this answer got wrong where a ``diagnose=`` rule or the engine's own
  rules can tell, the hint, and how to ask for the recipe), or "not done yet" when the learner's
  function raises ``NotImplementedError`` (naming the unfinished helper when
  the learner's function is finished but calls one that is not).

It never raises and never shows an internal traceback: a learner should see
what is wrong with *their* answer, nothing else.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from labsupport.harness.diagnosis import Diagnose, dtype_advice, generic_diagnosis, run_diagnoses
from labsupport.harness.limits import (
    LargestTensorRecorder,
    OutOfTime,
    TimeBudget,
    raised_by_the_course,
    unfinished as _unfinished,
    where_in_learner_code,
)

__all__ = [
    "Case",
    "CheckResult",
    "DEFAULT_TIME_BUDGET_S",
    "InputChanged",
    "LargestTensorRecorder",
    "STRICT_ENV_VAR",
    "check_function",
    "describe_value",
]

#: When this environment variable is "1" (the test suite sets it), a failed check raises
#: ``AssertionError`` after printing, so executing a chapter with a broken reference fails.
STRICT_ENV_VAR = "LABSUPPORT_STRICT_CHECKS"

#: When this environment variable names a file, every check also appends its result to it as one JSON line
#: (``exercise``, ``checker``, ``status``, ``cases_passed``, ``cases_total``): the grader's machine-readable channel
#: (``python -m labsupport.grade`` sets it in each submission's sandbox; docs/teaching/grading.md).
RECORD_ENV_VAR = "LABSUPPORT_CHECK_LOG"

Status = Literal["passed", "failed", "not done"]

_NUMBER_TYPES = (int, float, bool)

#: Seconds one case may take in the learner's function before the check stops it (checker cases are small:
#: the references take milliseconds, so only an answer with a runaway loop gets near this).
DEFAULT_TIME_BUDGET_S = 10.0


@dataclass(frozen=True)
class Case:
    """One input on which the learner's function is compared to the reference.

    Attributes:
        name: a short human description, shown when the case fails ("causal, L=7").
        args: positional arguments.
        kwargs: keyword arguments.
        grad_argnums: positions in ``args`` of floating-point tensors whose
            gradients must also match the reference's.
        max_elements: when set, the largest tensor the learner's function may
            create (in elements); an answer that materialises a bigger one fails
            with its shape named. A tiling exercise sets it below ``Lq · Lk``.
        max_elements_note: what such a tensor usually is, for the message
            ("a tiled answer holds one block_q × block_k tile of scores at a time").
        notes: a few words printed after an argument's description, keyed by the argument's name (or its
            position): ``{"logits": "V = 4 + [MASK]"}`` prints ``logits: float64 tensor of shape (2, 6, 5)
            (V = 4 + [MASK])``.
    """

    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    grad_argnums: tuple[int, ...] = ()
    max_elements: int | None = None
    max_elements_note: str = ""
    notes: Mapping[str | int, str] = field(default_factory=dict)


class InputChanged(Exception):
    """Raise this (from a chapter's wrapper) when the learner's function changed an input: the check then says it
    found the change, not that the learner's function raised. The engine checks every input by itself (unless
    ``inputs_may_change=True``), so a wrapper is only needed for a change the engine cannot see."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclass
class CheckResult:
    """What a checker found. Truthy exactly when the exercise passed."""

    exercise: str
    status: Status
    message: str
    cases_passed: int = 0
    cases_total: int = 0
    diagnosis: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"CheckResult(exercise={self.exercise!r}, status={self.status!r})"

    def _ipython_display_(self) -> None:
        # The message was already printed by the checker; showing the object
        # again as a cell's last expression would only repeat it.
        return None


class _Mismatch(Exception):
    """Raised internally when a learner's value differs from the expected one."""


def describe_value(value: Any) -> str:
    """A short description of a value: ``float32 tensor of shape (2, 3)``, ``None``, ``int 3``."""
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        layout = "" if value.is_contiguous() else ", non-contiguous"
        return f"{_dtype_name(value.dtype)} tensor of shape {tuple(value.shape)}{layout}"
    if isinstance(value, bool):
        return f"bool {value}"
    if isinstance(value, _NUMBER_TYPES):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe_value(v) for v in value[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"{type(value).__name__} of {len(value)} [{inner}{more}]"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _clone_tensor(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with the same shape *and strides* (``clone`` makes a strided slice contiguous)."""
    t = t.detach()
    try:
        copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        copy.copy_(t)
        return copy
    except RuntimeError:  # overlapping strides (an expanded tensor): a plain copy
        return t.clone()


def _clone(value: Any) -> Any:
    """A deep copy of tensors (keeping their strides), tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return _clone_tensor(value)
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal entries, NaN equal to NaN (what "left unchanged" means for an input)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    equal = a == b
    if a.is_floating_point() or a.is_complex():
        equal = equal | (torch.isnan(a) & torch.isnan(b))
    return bool(equal.all())


def _first_mutation(before: Any, after: Any, label: str) -> str | None:
    """The name of the first input whose tensor was changed in place, or None."""
    if isinstance(before, torch.Tensor):
        if isinstance(after, torch.Tensor) and not _same_bits(before, after.detach()):
            return label
        return None
    if isinstance(before, (tuple, list)):
        for i, (b, a) in enumerate(zip(before, after)):
            found = _first_mutation(b, a, f"{label}[{i}]")
            if found:
                return found
    if isinstance(before, dict):
        for key in before:
            found = _first_mutation(before[key], after.get(key), f"{label}[{key!r}]")
            if found:
                return found
    return None


def _argument_names(fn: Callable[..., Any], count: int) -> list[str]:
    try:
        params = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"arg{i}" for i in range(count)]


#: Integer and bool tensors of at most this many elements are printed by value, so a case can be traced by hand.
SMALL_INPUT_ELEMENTS = 16


def _describe_input(value: Any, note: str | None) -> str:
    text = describe_value(value)
    if (isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex())
            and 0 < value.numel() <= SMALL_INPUT_ELEMENTS):
        text += f" = {value.tolist()}"
    return f"{text} ({note})" if note else text


def _describe_inputs(case: Case, names: list[str]) -> str:
    notes = dict(case.notes)
    parts = [f"{name}: {_describe_input(value, notes.get(name, notes.get(i)))}"
             for i, (name, value) in enumerate(zip(names, case.args))]
    parts += [f"{key}={_describe_input(value, notes.get(key))}" for key, value in case.kwargs.items()]
    return "; ".join(parts) if parts else "(no arguments)"


def _input_dtypes(case: Case) -> frozenset[torch.dtype]:
    return frozenset(t.dtype for t in _flatten_tensors([*case.args, *case.kwargs.values()]))


def _signature(value: Any) -> tuple[Any, ...]:
    if isinstance(value, torch.Tensor):
        return ("tensor", _dtype_name(value.dtype), tuple(value.shape))
    return (type(value).__name__,)


def _swapped(expected: Sequence[Any], got: Sequence[Any], names: Sequence[str]) -> str | None:
    """A message when the answer's elements are the expected kinds (dtype, shape) in another order."""
    want, have = [_signature(e) for e in expected], [_signature(g) for g in got]
    if want == have or sorted(map(repr, want)) != sorted(map(repr, have)):
        return None
    label = [f"output[{i}]" + (f" ({names[i]})" if i < len(names) else "") for i in range(len(expected))]
    wanted = "; ".join(f"{label[i]} {'an' if describe_value(e)[:1] in 'aeiou' else 'a'} {describe_value(e)}"
                       for i, e in enumerate(expected))
    order = ", ".join(names) if len(names) == len(expected) else "the order the exercise states"
    yours = ", ".join(describe_value(g) for g in got)
    return (f"your outputs look swapped: expected {wanted}; yours are {yours}. "
            f"Return them in the order {order}.")


def _compare(
    expected: Any, got: Any, where: str, atol: float, rtol: float, element_names: Sequence[str] = (),
    input_dtypes: frozenset[torch.dtype] = frozenset(),
) -> None:
    """Raise :class:`_Mismatch` with a learner-facing explanation if ``got`` differs.

    ``element_names`` label the elements of a tuple/list answer: ``output[1] (lse)``; ``input_dtypes`` (the
    case's) choose the advice under a dtype mismatch.
    """
    if isinstance(expected, torch.Tensor):
        _compare_tensor(expected, got, where, atol, rtol, input_dtypes)
    elif isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            raise _Mismatch(
                f"{where}: expected a {type(expected).__name__} of {len(expected)} values, "
                f"got {describe_value(got)}.{_none_hint(got)}"
            )
        if len(got) != len(expected):
            raise _Mismatch(
                f"{where}: expected {len(expected)} values, got {len(got)} "
                f"({describe_value(got)})."
            )
        swapped = _swapped(expected, got, element_names)
        if swapped:
            raise _Mismatch(f"{where}: {swapped}")
        for i, (e, g) in enumerate(zip(expected, got)):
            label = f"{where}[{i}]" + (f" ({element_names[i]})" if i < len(element_names) else "")
            _compare(e, g, label, atol, rtol, input_dtypes=input_dtypes)
    elif isinstance(expected, _NUMBER_TYPES):
        _compare_number(float(expected), got, where, atol, rtol)
    elif expected is None:
        if got is not None:
            raise _Mismatch(f"{where}: expected None, got {describe_value(got)}.")
    else:
        if got != expected:
            raise _Mismatch(f"{where}: expected {expected!r}, got {got!r}.")


def _none_hint(got: Any) -> str:
    return " Did you forget a `return` statement?" if got is None else ""


def _as_number(got: Any) -> float | None:
    """``got`` as a float when it is a number: Python, numpy (``np.int64``, ``np.float32``), or a 1-element tensor/array."""
    if isinstance(got, torch.Tensor):
        return float(got.detach().double().item()) if got.numel() == 1 else None
    if isinstance(got, numbers.Real):  # int, float, bool, and numpy's scalar types
        return float(got)
    if type(got).__module__ == "numpy" and getattr(got, "size", None) == 1:  # a numpy array of one number
        try:
            return float(got)
        except (TypeError, ValueError):
            return None
    return None


def _kind(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return "finite"


def _compare_number(expected: float, got: Any, where: str, atol: float, rtol: float) -> None:
    got_value = _as_number(got)
    if got_value is None:
        raise _Mismatch(
            f"{where}: expected a number, got {describe_value(got)}.{_none_hint(got)}"
        )
    if _kind(expected) != "finite" or _kind(got_value) != "finite":
        if _kind(expected) != _kind(got_value):
            raise _Mismatch(f"{where}: expected {expected:.6g}, got {got_value:.6g}.")
        return
    if abs(got_value - expected) > atol + rtol * abs(expected):
        raise _Mismatch(f"{where}: expected {expected:.6g}, got {got_value:.6g}.")


def _compare_tensor(
    expected: torch.Tensor, got: Any, where: str, atol: float, rtol: float,
    input_dtypes: frozenset[torch.dtype] = frozenset(),
) -> None:
    if not isinstance(got, torch.Tensor):
        raise _Mismatch(
            f"{where}: expected {describe_value(expected)}, got {describe_value(got)}."
            f"{_none_hint(got)}"
        )
    if tuple(got.shape) != tuple(expected.shape):
        reordered = (sorted(got.shape) == sorted(expected.shape) and got.dim() > 1
                     and " The same sizes in another order: a transpose, or the axes in the wrong order?")
        raise _Mismatch(
            f"{where}: expected shape {tuple(expected.shape)}, got shape {tuple(got.shape)}.{reordered or ''}"
        )
    if got.dtype != expected.dtype:
        raise _Mismatch(
            f"{where}: expected dtype {_dtype_name(expected.dtype)}, got {_dtype_name(got.dtype)}. "
            + dtype_advice(expected.dtype, got.dtype, input_dtypes)
        )
    exp = expected.detach().to("cpu")
    got_ = got.detach().to("cpu")
    if exp.dtype == torch.bool or not (exp.is_floating_point() or exp.is_complex()):
        wrong = got_ != exp
        if bool(wrong.any()):
            index = tuple(int(i) for i in wrong.nonzero()[0])
            raise _Mismatch(
                f"{where}: {int(wrong.sum())} of {exp.numel()} entries differ; first at index "
                f"{index}: expected {exp[index].item()}, got {got_[index].item()}."
            )
        return
    exp64 = exp.to(torch.complex128 if exp.is_complex() else torch.float64)
    got64 = got_.to(exp64.dtype)
    bad_got = ~torch.isfinite(got64)
    bad_exp = ~torch.isfinite(exp64)
    unexpected = bad_got & ~bad_exp
    if bool(unexpected.any()):
        index = tuple(int(i) for i in unexpected.nonzero()[0])
        value = got64[index]
        if bool(torch.isnan(value)):
            kind = "NaN"
        else:
            kind = "inf" if value.is_complex() else ("+inf" if float(value) > 0 else "-inf")
        raise _Mismatch(
            f"{where}: {int(unexpected.sum())} entries are NaN/inf where the answer is finite; "
            f"first at index {index} ({kind}). Look for exp() of large numbers, 0/0, or "
            "a fully masked row."
        )
    if not exp64.is_complex():
        # Non-finite entries must match by kind: NaN, +inf and -inf are three different answers.
        def code(x: torch.Tensor) -> torch.Tensor:
            return torch.where(torch.isnan(x), 1, torch.where(x == math.inf, 2, torch.where(x == -math.inf, 3, 0)))

        exp_code, got_code = code(exp64), code(got64)
        wrong_kind = (exp_code != got_code) & bad_exp
        if bool(wrong_kind.any()):
            index = tuple(int(i) for i in wrong_kind.nonzero()[0])
            names = {0: "a finite value", 1: "NaN", 2: "+inf", 3: "-inf"}
            got_text = names[int(got_code[index])]
            if got_text == "a finite value":
                got_text = f"{got64[index].item():.6g}"
            raise _Mismatch(
                f"{where}: {int(wrong_kind.sum())} of {exp.numel()} entries should be "
                f"{names[int(exp_code[index])]} and are not; first at index {index}: expected "
                f"{names[int(exp_code[index])]}, got {got_text}. A row that sees no key has output 0 and "
                "logsumexp -inf (never NaN)."
            )
    diff = (got64 - exp64).abs()
    diff = torch.where(bad_exp & bad_got, torch.zeros_like(diff), diff)
    tolerance = atol + rtol * exp64.abs()
    wrong = (diff > tolerance) | (bad_exp & ~bad_got)
    if bool(wrong.any()):
        index = tuple(int(i) for i in wrong.nonzero()[0])
        finite = ~(bad_exp | bad_got)
        denom = float(exp64[finite].abs().pow(2).sum().sqrt()) if bool(finite.any()) else 0.0
        numer = float(diff[finite].pow(2).sum().sqrt()) if bool(finite.any()) else float("nan")
        rel = numer / denom if denom > 0 else float("inf")
        raise _Mismatch(
            f"{where}: {int(wrong.sum())} of {exp.numel()} entries are off; first at index "
            f"{index}: expected {exp64[index].item():.6g}, got {got64[index].item():.6g}. "
            f"Largest absolute error {float(diff[finite].max()) if bool(finite.any()) else float('nan'):.3g}, "
            f"relative error (norm of difference / norm of answer) {rel:.3g}; "
            f"tolerance atol={atol:g}, rtol={rtol:g}."
        )


def _flatten_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten_tensors(v)]
    return []


def _gradients(
    fn: Callable[..., Any], case: Case, cotangent_seed: int, args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> tuple[Any, list[torch.Tensor | None]]:
    args = list(_clone(case.args)) if args is None else args
    for i in case.grad_argnums:
        args[i] = args[i].detach().clone().requires_grad_(True)
    kwargs = _clone(dict(case.kwargs)) if kwargs is None else kwargs
    out = fn(*args, **kwargs)
    tensors = [t for t in _flatten_tensors(out) if t.is_floating_point() and t.requires_grad]
    if not tensors:
        return out, [None for _ in case.grad_argnums]
    gen = torch.Generator().manual_seed(cotangent_seed)
    total = sum(
        (t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum()
        for t in tensors
    )
    inputs = [args[i] for i in case.grad_argnums]
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    return out, list(grads)


def check_function(
    learner_fn: Any,
    reference_fn: Callable[..., Any],
    cases: Sequence[Case],
    *,
    exercise: str,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    hint: str | None = None,
    output_names: Sequence[str] | None = None,
    quiet: bool = False,
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S,
    inputs_may_change: bool = False,
    diagnose: Diagnose | Sequence[Diagnose] | None = None,
    recipe: str | None = None,
    reveal: bool = False,
    checker: str | None = None,
) -> CheckResult:
    """Compare a learner's function to a reference solution on ``cases``.

    Args:
        learner_fn: the function the learner wrote.
        reference_fn: the reference solution, with the same signature.
        cases: the inputs to try; their order is the order of reporting.
        exercise: the exercise's name, shown in every message.
        atol, rtol: values match when ``|got - expected| <= atol + rtol * |expected|``.
        hint: one sentence printed under a failure, pointing at the usual mistake.
        output_names: names of the elements when the answer is a tuple, so that a
            mismatch reads ``output[1] (lse)`` rather than ``output[1]``.
        quiet: return the result without printing it.
        time_budget_s: seconds the learner's function may take on one case
            (``None``: no limit), or 100 times the reference's time if that is more.
            An overrun is stopped (on Unix, in the main thread) and fails the check
            with the budget and the reference's time.
        inputs_may_change: accept a function that writes into its inputs (each case
            hands the learner its own copies). By default that fails the check: a
            caller's tensors must come back as they were.
        diagnose: a rule ``diagnose(case, expected, got) -> str | None`` (or a list of
            them, tried in order) run when an output differs; the first string is printed
            as ``found   ...``: what *this* answer got wrong ("your weights sum to 0.54 per
            row, not 1"). Without one, or when none applies, the engine tries its own
            (a constant factor, outputs in the wrong order). See
            :mod:`labsupport.harness.diagnosis` (``known_mistakes``, ``output_rule``).
        recipe: the full solution recipe. Never printed unless ``reveal`` is true; a
            failure says how to ask for it (``check_x(your_fn, reveal=True)``).
        reveal: print ``recipe`` under a failure or a "not done yet" (the learner asked).
        checker: the checker's name for that sentence; by default the calling
            function's name when it starts with ``check_``.

    Returns:
        A :class:`CheckResult`; it is truthy exactly when every case passed.
    """
    if not isinstance(exercise, str) or not exercise:
        raise TypeError("check_function needs exercise= a non-empty string naming the exercise")
    if not callable(reference_fn):
        raise TypeError(f"reference_fn must be callable, got {describe_value(reference_fn)}")
    if output_names is None:
        output_names = ()
    elif isinstance(output_names, str) or not all(isinstance(n, str) for n in output_names):
        raise TypeError(f"output_names must be a sequence of strings, got {output_names!r}")
    output_names = tuple(output_names)
    cases = list(cases)
    if not cases or not all(isinstance(c, Case) for c in cases):
        raise TypeError("cases must be a non-empty sequence of labsupport.harness.checking.Case")
    if time_budget_s is not None and (isinstance(time_budget_s, bool) or not isinstance(time_budget_s, numbers.Real)
                                      or not time_budget_s > 0):
        raise TypeError(f"time_budget_s must be a positive number of seconds or None, got {time_budget_s!r}")

    if diagnose is not None and not callable(diagnose) and not (
            isinstance(diagnose, Sequence) and all(callable(d) for d in diagnose)):
        raise TypeError(f"diagnose must be a callable or a sequence of callables, got {diagnose!r}")
    if recipe is not None and not isinstance(recipe, str):
        raise TypeError(f"recipe must be a string or None, got {describe_value(recipe)}")
    if checker is None:
        caller = inspect.currentframe()
        caller = caller.f_back if caller is not None else None
        checker = caller.f_code.co_name if caller is not None and caller.f_code.co_name.startswith("check_") else None
    learner_name = getattr(learner_fn, "__name__", "")
    learner_name = learner_name if learner_name.isidentifier() and learner_name != "<lambda>" else "your_function"

    def advice(found: str | None = None, with_hint: bool = True) -> str:
        """The lines under a failure: the diagnosis, the hint, and the recipe (or how to ask for it)."""
        lines = f"\n   found   {found}" if found else ""
        if hint and with_hint:
            lines += f"\n   hint    {hint}"
        if recipe and reveal:
            lines += f"\n   recipe  {recipe}"
        elif recipe and checker:
            lines += (f"\n   recipe  try the tiered hints first; `{checker}({learner_name}, reveal=True)` "
                      "prints the full recipe.")
        return lines

    def finish(status: Status, message: str, passed: int, found: str | None = None) -> CheckResult:
        if status == "not done" and recipe and reveal:
            message += f"\n   recipe  {recipe}"
        result = CheckResult(exercise, status, message, passed, len(cases), found or "")
        _record(result, checker)
        if not quiet:
            print(message)
        if status == "failed" and os.environ.get(STRICT_ENV_VAR, "") == "1":
            # The test suite runs the chapters with their reference solutions in place:
            # there, a failing check is a bug in the course, and must fail the run.
            raise AssertionError(message)
        return result

    if not callable(learner_fn):
        return finish(
            "failed",
            f"❌ {exercise}: expected a function, got {describe_value(learner_fn)}. "
            "Pass the function itself, without calling it (no parentheses).",
            0,
        )

    for number, case in enumerate(cases, start=1):
        names = _argument_names(reference_fn, len(case.args))
        header = f"❌ {exercise}: case {number} of {len(cases)} ({case.name}) failed."
        inputs = f"   inputs  {_describe_inputs(case, names)}"
        seed = 1234 + number
        try:
            started = time.perf_counter()
            if case.grad_argnums:
                expected, expected_grads = _gradients(reference_fn, case, seed)
            else:
                with torch.no_grad():
                    expected = reference_fn(*_clone(case.args), **_clone(dict(case.kwargs)))
                expected_grads = []
            reference_s = time.perf_counter() - started
        except Exception as error:  # a bug in the checker, not the learner's fault
            return finish(
                "failed",
                f"⚠️ {exercise}: the checker itself failed on case {number} "
                f"({type(error).__name__}: {error}). This is a bug in the course; please report it.",
                number - 1,
            )

        given_args, given_kwargs = list(_clone(case.args)), _clone(dict(case.kwargs))
        recorder = LargestTensorRecorder() if case.max_elements is not None else None
        # The budget is never tighter than 100 times the reference's own time, so a machine
        # that is slow for everyone (a busy CI runner, Binder) does not fail a correct answer.
        budget = TimeBudget(None if time_budget_s is None else max(float(time_budget_s), 100 * reference_s))
        try:
            with budget:
                with recorder if recorder is not None else _no_context():
                    if case.grad_argnums:
                        got, got_grads = _gradients(learner_fn, case, seed, given_args, given_kwargs)
                    else:
                        with torch.no_grad():
                            got = learner_fn(*given_args, **given_kwargs)
                        got_grads = []
        except OutOfTime:
            return finish("failed", f"{header}\n{inputs}\n   {_too_slow(budget.seconds, reference_s)}", number - 1)
        except NotImplementedError as error:
            unfinished, helper = _unfinished(error, learner_fn)
            if unfinished and helper:
                return finish(
                    "not done",
                    f"⏳ {exercise}: not done yet: your function calls `{helper}`, which still raises "
                    f"NotImplementedError. Finish `{helper}` (and run its cell), then run this check again.",
                    number - 1,
                )
            if unfinished:
                return finish(
                    "not done",
                    f"⏳ {exercise}: not done yet. Replace `raise NotImplementedError` with your "
                    "code, run that cell, then run this check again.",
                    number - 1,
                )
            return finish("failed", f"{header}\n{inputs}\n   your function raised {_summarise(error)}"
                          f"{where_in_learner_code(error)}." + advice(), number - 1)
        except InputChanged as error:
            return finish("failed", f"{header}\n{inputs}\n   {_mutation_message(error.name, names)}", number - 1)
        except Exception as error:
            changed = None if inputs_may_change or not raised_by_the_course(error) else (
                _first_mutation(list(case.args), given_args, "args")
                or _first_mutation(dict(case.kwargs), given_kwargs, "kwargs"))
            if changed is not None:  # a chapter's wrapper refused the change: the check found it, nothing else
                return finish("failed", f"{header}\n{inputs}\n   {_mutation_message(changed, names)}", number - 1)
            return finish(
                "failed",
                f"{header}\n{inputs}\n   your function raised {_summarise(error)}"
                f"{where_in_learner_code(error)}." + advice(),
                number - 1,
            )
        if budget.exceeded:
            return finish("failed", f"{header}\n{inputs}\n   {_too_slow(budget.seconds, reference_s)}", number - 1)

        changed = None if inputs_may_change else (
            _first_mutation(list(case.args), given_args, "args")
            or _first_mutation(dict(case.kwargs), given_kwargs, "kwargs"))
        if changed is not None:
            return finish("failed", f"{header}\n{inputs}\n   {_mutation_message(changed, names)}", number - 1)

        if recorder is not None and recorder.largest_elements > case.max_elements:  # type: ignore[operator]
            return finish(
                "failed",
                f"{header}\n{inputs}\n   {_too_big_message(recorder, case)}" + advice(),
                number - 1,
            )

        try:
            _compare(_detach(expected), _detach(got), "output", atol, rtol, output_names, _input_dtypes(case))
            for argnum, e_grad, g_grad in zip(case.grad_argnums, expected_grads, got_grads):
                where = f"gradient w.r.t. {names[argnum]}"
                if e_grad is not None and g_grad is None:
                    raise _Mismatch(
                        f"{where}: no gradient reached this input. Avoid .detach(), .item(), "
                        "in-place writes into inputs, or leaving autograd (numpy) in your code."
                    )
                if e_grad is not None:
                    _compare(e_grad, g_grad, where, atol, rtol)
        except _Mismatch as mismatch:
            expected_, got_ = _detach(expected), _detach(got)
            found = None if "look swapped" in str(mismatch) else (
                run_diagnoses(diagnose, case, expected_, got_) or run_diagnoses(
                    lambda c, e, g: generic_diagnosis(e, g, output_names), case, expected_, got_))
            return finish("failed", f"{header}\n{inputs}\n   {mismatch}" + advice(found), number - 1, found)
        except Exception as error:  # e.g. comparing exotic objects
            return finish(
                "failed",
                f"{header}\n{inputs}\n   could not compare your output "
                f"({describe_value(got)}) with the answer ({describe_value(expected)}): "
                f"{type(error).__name__}.",
                number - 1,
            )

    noun = "case" if len(cases) == 1 else "cases"
    return finish("passed", f"✅ {exercise}: passed {len(cases)} {noun}.", len(cases))


def _record(result: CheckResult, checker: str | None) -> None:
    """Append ``result`` to the file named by :data:`RECORD_ENV_VAR`, if any (never raises)."""
    path = os.environ.get(RECORD_ENV_VAR, "")
    if not path:
        return
    record = {"exercise": result.exercise, "checker": checker, "status": result.status,
              "cases_passed": result.cases_passed, "cases_total": result.cases_total}
    try:
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
    except OSError:
        pass


class _no_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _summarise(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _too_slow(seconds: float | None, reference_s: float) -> str:
    return (
        f"your function took longer than {seconds:g} s on this case (the reference takes {reference_s:.3g} s), "
        "so the check stopped it. Look for a Python loop over single entries where one tensor operation "
        "would do, or a loop that never ends."
    )


def _mutation_message(changed: str, names: list[str]) -> str:
    name = changed
    if changed.startswith("args["):
        index = int(changed[5:changed.index("]")])
        name = (names[index] if index < len(names) else f"argument {index}") + changed[changed.index("]") + 1:]
    elif changed.startswith("kwargs["):
        name = changed[len("kwargs["):].split("]")[0].strip("'\"")
    return (
        f"the check found that your function changed its input `{name}` in place (nothing was raised; "
        f"the check compared `{name}` before and after the call). Leave the inputs as they came and return new "
        f"tensors: write `{name} = {name} * a + b`, not `{name} *= a`, `{name}[...] = ...` or `{name}.add_(...)`."
    )


def _too_big_message(recorder: LargestTensorRecorder, case: Case) -> str:
    shape = recorder.largest_shape
    matrix = f" (a {shape[-2]}×{shape[-1]} matrix per head)" if len(shape) >= 2 else ""
    note = f" {case.max_elements_note}" if case.max_elements_note else ""
    return (
        f"your function materialised a tensor of shape {shape}{matrix}, {recorder.largest_elements:,} elements; "
        f"on this case an answer needs no tensor above {case.max_elements:,} elements.{note}"
    )


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    return value
