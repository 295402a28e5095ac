"""The exercise-checker engine shared by every chapter.

A chapter's checker is a thin wrapper around :func:`check_function`: it builds a
few seeded random :class:`Case` objects, names the reference solution, and
picks tolerances. ``check_function`` then

* runs the learner's function and the reference on fresh copies of each case;
* compares the results (tensors, numbers, or tuples/lists of those) for type,
  shape, dtype, NaN/inf, and values within ``atol + rtol * |expected|``;
* for cases with ``grad_argnums``, also compares gradients with respect to
  those arguments, pulled back from the same random cotangent;
* prints a single line on success, a short explanation on failure (which case,
  the input shapes and dtypes, what was expected and what came, where the first
  mismatch is and the relative error), or "not done yet" when the learner's
  function raises ``NotImplementedError``.

It never raises and never shows an internal traceback: a learner should see
what is wrong with *their* answer, nothing else.
"""

from __future__ import annotations

import inspect
import math
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["Case", "CheckResult", "check_function", "describe_value", "STRICT_ENV_VAR"]

#: When this environment variable is "1" (the test suite sets it), a failed check raises
#: ``AssertionError`` after printing, so executing a chapter with a broken reference fails.
STRICT_ENV_VAR = "LABSUPPORT_STRICT_CHECKS"

Status = Literal["passed", "failed", "not done"]

_NUMBER_TYPES = (int, float, bool)


@dataclass(frozen=True)
class Case:
    """One input on which the learner's function is compared to the reference.

    Attributes:
        name: a short human description, shown when the case fails ("causal, L=7").
        args: positional arguments.
        kwargs: keyword arguments.
        grad_argnums: positions in ``args`` of floating-point tensors whose
            gradients must also match the reference's.
    """

    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    grad_argnums: tuple[int, ...] = ()


@dataclass
class CheckResult:
    """What a checker found. Truthy exactly when the exercise passed."""

    exercise: str
    status: Status
    message: str
    cases_passed: int = 0
    cases_total: int = 0

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


def _clone(value: Any) -> Any:
    """A deep copy of tensors (keeping their strides), tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


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


def _describe_inputs(case: Case, names: list[str]) -> str:
    parts = [f"{name}: {describe_value(value)}" for name, value in zip(names, case.args)]
    parts += [f"{key}={describe_value(value)}" for key, value in case.kwargs.items()]
    return "; ".join(parts) if parts else "(no arguments)"


def _compare(
    expected: Any, got: Any, where: str, atol: float, rtol: float, element_names: Sequence[str] = ()
) -> None:
    """Raise :class:`_Mismatch` with a learner-facing explanation if ``got`` differs.

    ``element_names`` label the elements of a tuple/list answer: ``output[1] (lse)``.
    """
    if isinstance(expected, torch.Tensor):
        _compare_tensor(expected, got, where, atol, rtol)
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
        for i, (e, g) in enumerate(zip(expected, got)):
            label = f"{where}[{i}]" + (f" ({element_names[i]})" if i < len(element_names) else "")
            _compare(e, g, label, atol, rtol)
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


def _compare_number(expected: float, got: Any, where: str, atol: float, rtol: float) -> None:
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got_value = float(got.detach().double().item())
    elif isinstance(got, _NUMBER_TYPES):
        got_value = float(got)
    else:
        raise _Mismatch(
            f"{where}: expected a number, got {describe_value(got)}.{_none_hint(got)}"
        )
    if math.isnan(got_value) and not math.isnan(expected):
        raise _Mismatch(f"{where}: expected {expected:.6g}, got NaN.")
    if abs(got_value - expected) > atol + rtol * abs(expected):
        raise _Mismatch(f"{where}: expected {expected:.6g}, got {got_value:.6g}.")


def _compare_tensor(
    expected: torch.Tensor, got: Any, where: str, atol: float, rtol: float
) -> None:
    if not isinstance(got, torch.Tensor):
        raise _Mismatch(
            f"{where}: expected {describe_value(expected)}, got {describe_value(got)}."
            f"{_none_hint(got)}"
        )
    if tuple(got.shape) != tuple(expected.shape):
        raise _Mismatch(
            f"{where}: expected shape {tuple(expected.shape)}, got shape {tuple(got.shape)}."
        )
    if got.dtype != expected.dtype:
        raise _Mismatch(
            f"{where}: expected dtype {_dtype_name(expected.dtype)}, got {_dtype_name(got.dtype)}."
            " Keep the dtype of the inputs (check for a stray .float() or .double())."
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
        kind = "NaN" if bool(torch.isnan(got64[index])) else "inf"
        raise _Mismatch(
            f"{where}: {int(unexpected.sum())} entries are NaN/inf where the answer is finite; "
            f"first at index {index} ({kind}). Look for exp() of large numbers, 0/0, or "
            "a fully masked row."
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


def _where_in_learner_code(error: BaseException) -> str:
    """The learner's own line that raised, without the rest of the traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the whole labsupport package
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    mine = [
        f
        for f in frames
        if not os.path.abspath(f.filename).startswith((here, torch_dir))
    ]
    if not mine:
        return ""
    frame = mine[-1]
    line = (frame.line or "").strip()
    return f" (raised at `{line}`, in {frame.name})" if line else f" (raised in {frame.name})"


def _gradients(
    fn: Callable[..., Any], case: Case, cotangent_seed: int
) -> tuple[Any, list[torch.Tensor | None]]:
    args = list(_clone(case.args))
    for i in case.grad_argnums:
        args[i] = args[i].detach().clone().requires_grad_(True)
    kwargs = _clone(dict(case.kwargs))
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

    def finish(status: Status, message: str, passed: int) -> CheckResult:
        result = CheckResult(exercise, status, message, passed, len(cases))
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
            if case.grad_argnums:
                expected, expected_grads = _gradients(reference_fn, case, seed)
            else:
                with torch.no_grad():
                    expected = reference_fn(*_clone(case.args), **_clone(dict(case.kwargs)))
                expected_grads = []
        except Exception as error:  # a bug in the checker, not the learner's fault
            return finish(
                "failed",
                f"⚠️ {exercise}: the checker itself failed on case {number} "
                f"({type(error).__name__}: {error}). This is a bug in the course; please report it.",
                number - 1,
            )

        try:
            if case.grad_argnums:
                got, got_grads = _gradients(learner_fn, case, seed)
            else:
                with torch.no_grad():
                    got = learner_fn(*_clone(case.args), **_clone(dict(case.kwargs)))
                got_grads = []
        except NotImplementedError:
            return finish(
                "not done",
                f"⏳ {exercise}: not done yet. Replace `raise NotImplementedError` with your "
                "code, run that cell, then run this check again.",
                number - 1,
            )
        except Exception as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            detail = f"{type(error).__name__}: {message}" if message else type(error).__name__
            return finish(
                "failed",
                f"{header}\n{inputs}\n   your function raised {detail}"
                f"{_where_in_learner_code(error)}."
                + (f"\n   hint    {hint}" if hint else ""),
                number - 1,
            )

        try:
            _compare(_detach(expected), _detach(got), "output", atol, rtol, output_names)
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
            return finish(
                "failed",
                f"{header}\n{inputs}\n   {mismatch}" + (f"\n   hint    {hint}" if hint else ""),
                number - 1,
            )
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


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    return value
