"""Limits on a learner's function while a checker runs it: time (:class:`TimeBudget`) and memory
(:class:`LargestTensorRecorder`, the largest tensor it creates, one of the work guards of
:mod:`labsupport.harness.guards`); and whose code raised (the learner's own line,
an unfinished helper, or the course's own wrapper).

Used by :func:`labsupport.harness.checking.check_function`; kept apart so the engine stays one readable file.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from typing import Any

import torch

from labsupport.harness.guards import LargestTensorRecorder  # its home is the guards module; kept importable here

__all__ = ["LargestTensorRecorder", "OutOfTime", "TimeBudget", "raised_by_the_course", "unfinished",
           "where_in_learner_code"]

_LABSUPPORT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the whole labsupport package
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


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


def where_in_learner_code(error: BaseException) -> str:
    """The learner's own line that raised, without the rest of the traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    here = _LABSUPPORT  # the whole labsupport package
    torch_dir = _TORCH
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


def raised_by_the_course(error: BaseException) -> bool:
    """Whether the innermost frame that raised is the course's own code (a chapter's wrapper), not the learner's."""
    frames = traceback.extract_tb(error.__traceback__)
    here = _LABSUPPORT
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(here)


def unfinished(error: NotImplementedError, learner_fn: Any) -> tuple[bool, str | None]:
    """Whether ``error`` means "not done yet", and the unfinished helper's name when it is not ``learner_fn``.

    A ``NotImplementedError`` raised inside torch (an operation missing for a dtype) is a real
    error, not an unfinished exercise.
    """
    frames = traceback.extract_tb(error.__traceback__)
    here = _LABSUPPORT
    torch_dir = _TORCH
    if not frames:
        return True, None
    innermost = frames[-1]
    if os.path.abspath(innermost.filename).startswith(torch_dir):
        return False, None
    if os.path.abspath(innermost.filename).startswith(here):
        return True, None
    own = getattr(learner_fn, "__code__", None)
    own_name = getattr(learner_fn, "__name__", None)
    if own is not None and innermost.filename == own.co_filename and innermost.name == own.co_name:
        return True, None
    if innermost.name == own_name or innermost.name == "<lambda>":
        return True, None
    return True, innermost.name
