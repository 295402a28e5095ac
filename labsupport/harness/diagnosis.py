"""What a checker says about a wrong answer beyond "it differs": rules that tell which mistake was made.

:func:`labsupport.harness.checking.check_function` takes ``diagnose=``: a callable (or a list of them)
``diagnose(case, expected, got) -> str | None`` run when an answer's output differs from the reference's. The
first string returned is printed under the mismatch as ``found   <string>``; ``None`` means "this rule cannot
tell". A diagnosis names what *this* answer did ("your weights sum to 0.54 per row, not 1"), never the recipe.

This module holds the building blocks:

* :func:`known_mistakes` — a rule from wrong answers written out as functions: "your B̄ matches Euler's ΔB";
* :func:`output_rule` — a rule on one element of a tuple answer, written as a function of that element;
* :func:`generic_diagnosis` — what the engine says by itself: a constant factor off, sizes in another order;
* :func:`dtype_advice` — the sentence under a dtype mismatch, chosen by what the output holds (a mask,
  indices, real numbers) and whether the inputs already had the expected dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["Diagnose", "dtype_advice", "generic_diagnosis", "known_mistakes", "output_rule", "run_diagnoses"]

#: ``diagnose(case, expected, got) -> str | None``: ``case`` is the :class:`~labsupport.harness.checking.Case`,
#: ``expected`` the reference's output and ``got`` the learner's (both detached).
Diagnose = Callable[[Any, Any, Any], "str | None"]


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def _close(a: Any, b: Any, atol: float, rtol: float) -> bool:
    """Whether two outputs (tensors, numbers, tuples of them) agree within ``atol + rtol·|a|``, NaN equal to NaN."""
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_close(x, y, atol, rtol) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not (a.is_floating_point() or a.is_complex()):
            return bool(torch.equal(a, b))
        return bool(torch.allclose(b.detach().double(), a.detach().double(), atol=atol, rtol=rtol, equal_nan=True))
    if isinstance(a, (int, float)) and not isinstance(b, (tuple, list, torch.Tensor)) and b is not None:
        try:
            return abs(float(b) - float(a)) <= atol + rtol * abs(float(a))
        except (TypeError, ValueError):
            return False
    return bool(a == b)


def known_mistakes(mistakes: Mapping[str, Callable[..., Any]], *, output: int | None = None,
                   atol: float = 1e-6, rtol: float = 1e-5) -> Diagnose:
    """A rule that recognises wrong answers written out as functions.

    Args:
        mistakes: ``{diagnosis: wrong_fn}``; ``wrong_fn`` takes the exercise's arguments. When the learner's
            output matches ``wrong_fn``'s on the failing case, the rule returns ``diagnosis`` — write it as what
            the learner did, e.g. ``"your B̄ matches Euler's ΔB, a first-order approximation"``.
        output: compare only this element of a tuple answer (``None``: the whole output).
        atol, rtol: how close counts as a match.
    """
    if not isinstance(mistakes, Mapping) or not all(isinstance(k, str) and callable(f) for k, f in mistakes.items()):
        raise TypeError("known_mistakes needs a mapping {diagnosis string: wrong-answer function}")

    def part(value: Any) -> Any:
        return value[output] if output is not None and isinstance(value, (tuple, list)) and len(value) > output else value

    def rule(case: Any, expected: Any, got: Any) -> str | None:
        mine, right = part(got), part(expected)
        if _close(right, mine, atol, rtol):
            return None  # this part of the answer is right: the mistake is elsewhere
        for text, wrong in mistakes.items():
            try:
                with torch.no_grad():
                    theirs = wrong(*_copy(tuple(case.args)), **_copy(dict(case.kwargs)))
            except Exception:  # a wrong answer that cannot run on this case tells nothing
                continue
            if output is not None and isinstance(theirs, (tuple, list)):
                theirs = theirs[output] if len(theirs) > output else None
            if theirs is not None and _close(theirs, mine, atol, rtol) and not _close(theirs, right, atol, rtol):
                return text  # (a wrong answer that is right on this case tells nothing)
        return None

    return rule


def output_rule(index: int, rule: Callable[[Any, Any, Any], str | None]) -> Diagnose:
    """Apply ``rule(case, expected[index], got[index])`` to one element of a tuple answer."""

    def diagnose(case: Any, expected: Any, got: Any) -> str | None:
        if not isinstance(got, (tuple, list)) or len(got) <= index:
            return None
        return rule(case, expected[index], got[index])

    return diagnose


def run_diagnoses(rules: Diagnose | Sequence[Diagnose] | None, case: Any, expected: Any, got: Any) -> str | None:
    """The first diagnosis a rule returns (a rule that raises is skipped: it must never hide the mismatch)."""
    if rules is None:
        return None
    for rule in ([rules] if callable(rules) else list(rules)):
        try:
            text = rule(case, expected, got)
        except Exception:
            continue
        if isinstance(text, str) and text.strip():
            return text.strip()
    return None


def _ratio(expected: Any, got: Any) -> float | None:
    """The constant ``c`` with ``got = c · expected`` when there is one (finite, non-zero, not 1)."""
    if isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor):
        if expected.shape != got.shape or not expected.is_floating_point() or not got.is_floating_point():
            return None
        e, g = expected.detach().double().flatten(), got.detach().double().flatten()
        finite = torch.isfinite(e) & torch.isfinite(g)
        if not bool(((e == g) | (torch.isnan(e) & torch.isnan(g)) | finite).all()):
            return None  # a non-finite entry where the other has another value: not a scaling
        e, g = e[finite], g[finite]
        if e.numel() == 0:
            return None
        big = e.abs() > 1e-6 * float(e.abs().max())
        if int(big.sum()) < 1 or bool((g[~big].abs() > 1e-9 * max(float(g.abs().max()), 1e-300)).any()):
            return None
        ratios = g[big] / e[big]
        c = float(ratios.median())
        if c == 0 or not bool(((ratios - c).abs() <= 1e-6 * abs(c)).all()):
            return None
    elif isinstance(expected, (int, float)) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if expected == 0 or got == 0:
            return None
        c = float(got) / float(expected)
    else:
        return None
    return None if abs(c - 1) < 1e-9 else c


def _simple(c: float) -> bool:
    """A factor a learner could have slipped in: p/q with small p and q, or a power of ten."""
    if any(abs(abs(c) - 10.0**e) < 1e-9 * 10.0**e for e in range(-12, 13)):
        return True
    return any(abs(c * q - round(c * q)) < 1e-9 * q and 1 <= abs(round(c * q)) <= 64 for q in range(1, 9))


def _nice(c: float) -> str:
    for text, value in (("1/2", 0.5), ("2", 2.0), ("1/4", 0.25), ("4", 4.0), ("−1", -1.0)):
        if abs(c - value) < 1e-9:
            return text
    return f"{c:.4g}"


def generic_diagnosis(expected: Any, got: Any, names: Sequence[str] = ()) -> str | None:
    """What can be told without knowing the exercise: a constant factor, or an element that belongs elsewhere."""
    if isinstance(expected, (tuple, list)) and isinstance(got, (tuple, list)) and len(expected) == len(got):
        def label(i: int) -> str:
            return f"output[{i}]" + (f" ({names[i]})" if i < len(names) else "")
        for i, g in enumerate(got):
            if _close(expected[i], g, 1e-6, 1e-5):
                continue
            for j, e in enumerate(expected):
                if j != i and _close(e, g, 1e-6, 1e-5):
                    return (f"your {label(i)} is what {label(j)} should be: are your outputs in the wrong order? "
                            "Return them in the order the exercise states.")
            found = generic_diagnosis(expected[i], g)
            return f"in {label(i)}, {found}" if found else None
        return None
    c = _ratio(expected, got)
    few = not isinstance(got, torch.Tensor) or int(torch.isfinite(got.detach()).sum()) < 4 if c is not None else True
    if c is not None and (not few or _simple(c)):  # with one or two numbers, any ratio is "constant"
        return (f"your answer is exactly {_nice(c)} × the expected one{' everywhere' if isinstance(got, torch.Tensor) else ''}"
                ": the right shape of computation, with a factor missing or extra.")
    return None


def dtype_advice(expected: torch.dtype, got: torch.dtype, input_dtypes: frozenset[torch.dtype] = frozenset()) -> str:
    """One sentence under ``expected dtype X, got Y``, chosen by what the output holds."""
    exp, mine = str(expected).replace("torch.", ""), str(got).replace("torch.", "")
    if expected == torch.bool:
        return ("This output is a yes/no mask: a comparison (a < b, x == y) already gives a bool tensor; "
                f"drop the conversion that made it {mine}.")
    if not (expected.is_floating_point or expected.is_complex):
        if got == torch.bool:
            return f"This output holds integers ({exp}), not a mask: did a comparison end up where a count or index belongs?"
        if got.is_floating_point:
            return (f"This output holds indices or counts ({exp}): a true division (/ instead of //), arithmetic "
                    "with a float tensor, or a torch.zeros/torch.full without dtype= gives floats.")
        return f"Return {exp}, the integer type torch's index operations use (e.g. .long() for int64)."
    if got == torch.bool or not (got.is_floating_point or got.is_complex):
        return (f"This output holds real numbers ({exp}): an integer or bool tensor here usually means indices, "
                "counts or a mask returned where values belong.")
    if expected in input_dtypes:
        return (f"The inputs are {exp}: keep their dtype (check for a stray .float() or .double(), or a new tensor "
                "made without dtype=).")
    return f"This output should be {exp} (convert at the end with .to(torch.{exp}))."
