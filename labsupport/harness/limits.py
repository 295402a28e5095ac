"""Limits on a learner's function while a checker runs it: time (:class:`TimeBudget`) and memory
(:class:`LargestTensorRecorder`, the largest tensor it creates).

Used by :func:`labsupport.harness.checking.check_function`; kept apart so the engine stays one readable file.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LargestTensorRecorder", "OutOfTime", "TimeBudget"]


class LargestTensorRecorder(TorchDispatchMode):
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

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs or {}))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest_elements:
                if t.untyped_storage().data_ptr() in inputs:
                    continue  # a view of an input, or an in-place result: nothing new was allocated
                self.largest_elements = t.numel()
                self.largest_shape = tuple(t.shape)
        return out


class OutOfTime(BaseException):
    """Raised (from a timer signal) when the learner's function overruns its time budget."""


class TimeBudget:
    """Interrupts the code inside after ``seconds`` where a timer signal can (Unix, main thread).

    Elsewhere (Windows, a worker thread) nothing interrupts; :attr:`elapsed` is still measured so
    the check can fail an overrun afterwards.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.elapsed = 0.0
        self._armed = False

    def _expire(self, signum: int, frame: Any) -> None:
        raise OutOfTime()

    def __enter__(self) -> TimeBudget:
        self._start = time.perf_counter()
        if (self.seconds is not None and hasattr(signal, "setitimer")
                and threading.current_thread() is threading.main_thread()):
            self._previous = signal.signal(signal.SIGALRM, self._expire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
            self._armed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
        self.elapsed = time.perf_counter() - self._start

    @property
    def exceeded(self) -> bool:
        return self.seconds is not None and self.elapsed > self.seconds
