"""Work guards: what a learner's function *does* while a checker runs it, beyond the numbers it returns.

A right answer can be computed the way a chapter teaches against: a whole score matrix instead of tiles, a loop
over the tokens instead of a chunkwise product, a cache up-projected at every step instead of absorbed. The
numbers match, so only the work gives it away. Each guard here watches the torch operations run inside it (a
``TorchDispatchMode``: it sees every ATen operation, in the learner's code and in the torch functions it calls)
and keeps one measure:

====================================  =======================================================================
guard                                 measures
====================================  =======================================================================
:class:`LargestTensorRecorder`        the largest tensor created (views and in-place results not counted)
:class:`OperationCounter`             how many operations ran, and which (``counts`` by name)
:class:`WorkCounter`                  the multiply-add FLOPs of matrix products (``torch.utils.flop_counter``'s
                                      formulas) and the elements every other operation writes, so a
                                      broadcast multiply-and-sum is counted as the work it is
====================================  =======================================================================

They share one base, :class:`WorkGuard`, and nest (``with OperationCounter() as ops, WorkCounter() as work:``).
One more guard watches Python calls rather than torch operations: :class:`CallRecorder` notes which of some
library functions ran, and :func:`refuse_calls` wraps a learner's function so that calling the library's own
version of the exercise raises :class:`LibraryCallRefused`, which the checker reports.
:func:`run_guarded` runs a function on fresh copies of its arguments, without autograd, inside any number of
guards, and says whether it finished. :func:`labsupport.harness.checking.check_function` uses
:class:`LargestTensorRecorder` for a case's ``max_elements``; a chapter's checker uses the others after the
values match (chapter 02's absorbed MLA step, chapter 03's chunk exercises, chapter 04's FFT convolution).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["CallRecorder", "LargestTensorRecorder", "LibraryCallRefused", "OperationCounter", "WorkCounter",
           "WorkGuard", "refuse_calls", "run_guarded"]


def _storages(tree: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


def _new_tensors(args: Any, kwargs: Any, out: Any) -> list[torch.Tensor]:
    """The tensors an operation allocated: its outputs that are neither a view of an input nor an input itself."""
    outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if not outputs:
        return []
    inputs = _storages((args, kwargs))
    return [t for t in outputs if t.untyped_storage().data_ptr() not in inputs]


class WorkGuard(TorchDispatchMode):
    """The base of the work guards: runs every operation inside it, then hands it to :meth:`record`.

    A subclass keeps one measure in :meth:`record`; use any guard as a context manager.
    """

    def record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Note one operation ``func(*args, **kwargs) -> out`` (nothing here: a subclass measures)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out


class LargestTensorRecorder(WorkGuard):
    """Records the largest tensor created by the torch operations run inside it.

    Views (a transpose, a slice, an ``expand``) share their input's memory and are
    not counted; everything an operation allocates is, including what autograd's
    backward creates. Use it as a context manager::

        with LargestTensorRecorder() as rec:
            out = my_attention(q, k, v)
        rec.largest_shape  # e.g. (1, 1, 512, 512): the whole score matrix
    """

    def __init__(self) -> None:
        super().__init__()
        self.largest_elements = 0
        self.largest_shape: tuple[int, ...] = ()

    def record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        for t in _new_tensors(args, kwargs, out):
            if t.numel() > self.largest_elements:
                self.largest_elements = t.numel()
                self.largest_shape = tuple(t.shape)


class OperationCounter(WorkGuard):
    """Counts the torch (ATen) operations run inside it, and which ones.

    ``count`` is the total; ``counts`` maps each operation's name (``"mm"``, ``"_fft_r2c"``, ...) to how often
    it ran, and ``names`` is the set of those names. A loop over ``n`` tokens runs its body's operations ``n``
    times, so comparing the counts of two lengths tells a loop from a batched form::

        with OperationCounter() as ops:
            chunk_step(*args)
        ops.count, ops.counts["linalg_solve_triangular"]
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.counts: Counter[str] = Counter()

    @property
    def names(self) -> set[str]:
        """The names of the operations that ran."""
        return set(self.counts)

    def record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        self.count += 1
        self.counts[func.overloadpacket.__name__] += 1


class WorkCounter(WorkGuard):
    """Counts arithmetic: multiply-add FLOPs of matrix products, and the elements every other operation writes.

    ``matmul_flops`` uses ``torch.utils.flop_counter``'s formulas (2 FLOPs per multiply-add of ``mm``, ``bmm``,
    ``addmm``, convolutions, attention kernels). ``elements_written`` adds up the elements of every new tensor
    that any *other* operation allocates (an element-wise product, a sum, a copy, a softmax): the work an answer
    does when it writes a matrix product as a broadcast multiply followed by a sum, which the FLOP formulas do
    not see. ``work`` is the two together, a rough count of arithmetic in either style.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self._formulas = flop_registry
        self.matmul_flops = 0
        self.elements_written = 0

    @property
    def work(self) -> int:
        """``matmul_flops + elements_written``."""
        return self.matmul_flops + self.elements_written

    def record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        formula = self._formulas.get(func.overloadpacket)
        if formula is not None:
            self.matmul_flops += int(formula(*args, **kwargs, out_val=out))
            return
        self.elements_written += sum(t.numel() for t in _new_tensors(args, kwargs, out))


def _fresh(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def run_guarded(fn: Callable[..., object], args: tuple, *guards: WorkGuard) -> bool:
    """Run ``fn(*args)`` on copies of the tensor arguments, without autograd, inside ``guards``; True if it finished.

    The guards keep what they measured either way; an answer that raises has already been reported by the
    value check that comes first, so the caller usually skips the work check when this returns False.
    """
    for guard in guards:
        if not isinstance(guard, WorkGuard):
            raise TypeError(f"guards must be WorkGuard instances, got {type(guard).__name__}")
    copies = tuple(_fresh(a) for a in args)
    try:
        with torch.no_grad():
            _enter_all(list(guards), lambda: fn(*copies))
    except Exception:
        return False
    return True


def _enter_all(guards: list[WorkGuard], body: Callable[[], object]) -> object:
    if not guards:
        return body()
    with guards[0]:
        return _enter_all(guards[1:], body)


class CallRecorder:
    """Records which of the given Python functions run inside it (on this thread), however they were reached.

    It matches the functions' code objects, so a call through another name (``from m import f as g``), a
    wrapper or a lambda is seen as well. Built on ``sys.setprofile``; the previous profile function is restored
    on exit. ``called`` lists the functions that ran, in the order of their first call::

        with CallRecorder([ga.quantize_dequantize]) as calls:
            learner_fn(x, 2, -1)
        calls.called  # [ga.quantize_dequantize] when the answer called it
    """

    def __init__(self, functions: Iterable[Callable[..., object]]) -> None:
        self._by_code: dict[Any, Callable[..., object]] = {}
        for function in functions:
            code = getattr(inspect.unwrap(function), "__code__", None)
            if code is None:
                raise TypeError(f"functions must be Python functions, got {function!r}")
            self._by_code[code] = function
        self.called: list[Callable[..., object]] = []
        self._previous: Any = None

    def _profile(self, frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            function = self._by_code.get(frame.f_code)
            if function is not None and function not in self.called:
                self.called.append(function)

    def __enter__(self) -> CallRecorder:
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(self._previous)


class LibraryCallRefused(Exception):
    """Raised by a function wrapped with :func:`refuse_calls` when it called a refused library function."""


def refuse_calls(fn: Callable[..., Any], refused: Mapping[Callable[..., object], str]) -> Callable[..., Any]:
    """``fn``, watched: when a call of it runs one of ``refused``'s functions, :class:`LibraryCallRefused` is raised.

    ``refused`` maps each library function to the reason given to the learner ("ga.quantize_dequantize is the
    library's version of this exercise"). The wrapper keeps ``fn``'s name, so the checker's messages still name
    the learner's function.
    """
    if not callable(fn):
        return fn  # the checker reports a non-function itself
    recorder_functions = list(refused)

    @functools.wraps(fn)
    def watched(*args: Any, **kwargs: Any) -> Any:
        with CallRecorder(recorder_functions) as calls:
            out = fn(*args, **kwargs)
        if calls.called:
            raise LibraryCallRefused(refused[calls.called[0]])
        return out

    return watched
