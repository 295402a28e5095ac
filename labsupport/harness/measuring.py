"""Measuring cost: wall time, peak memory, scaling sweeps, power-law fits.

The chapters measure how a mechanism's cost grows with size and read off the
exponent ("softmax attention is quadratic in length"). The pieces:

* :func:`time_callable` — the one timer of the course: the fastest (or median) of several calls.
* :func:`peak_memory_bytes` — peak bytes of torch CPU allocations while a callable
  runs, above the level at its start (see its docstring for the method and limits).
* :func:`sweep` — run a family of callables over sizes, giving a :class:`ScalingResult`.
* :func:`fit_power_law` — exponent and prefactor of ``value ≈ prefactor · size**exponent``.
* :func:`exponent_warning` — a plain warning when a fitted exponent cannot be right.

Every sweep runs on one torch thread by default and warns when the machine is
busy (:mod:`labsupport.harness.contention`): the numbers a chapter prints must
hold on the reader's machine, quiet or shared.

Plots of these live in :mod:`labsupport.harness.plotting`; byte and FLOP formulas
in :mod:`labsupport.harness.costs`.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.std import tqdm as text_progress

from labsupport.harness.contention import busy_warning
from labsupport.harness.settings import torch_threads
from labsupport.harness.validation import (
    require_callable,
    require_choice,
    require_int,
    require_positive_floats,
)

__all__ = [
    "ScalingResult",
    "exponent_warning",
    "fit_power_law",
    "peak_memory_bytes",
    "sweep",
    "time_callable",
]


# --------------------------------------------------------------------------- timing and memory


def time_callable(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5,
                  statistic: Literal["min", "median"] = "min") -> float:
    """Wall-clock seconds of ``fn()``: the fastest (default) or the median of ``repeats`` timed calls.

    ``warmup`` untimed calls come first. The minimum is the default because on
    a shared machine (Binder, a lab server) other programs only ever add time:
    the fastest call is the best estimate of what the work itself costs, and it
    varies far less from run to run than the mean or even the median. Timing
    uses ``time.perf_counter``. On a GPU, ``fn`` itself must synchronise
    (``torch.cuda.synchronize()``) for the time to mean anything.
    """
    require_callable("fn", fn)
    warmup = require_int("warmup", warmup, minimum=0)
    repeats = require_int("repeats", repeats, minimum=1)
    require_choice("statistic", statistic, ("min", "median"))
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) if statistic == "min" else statistics.median(times)


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of torch CPU tensor memory allocated while ``fn()`` runs, above the start level.

    Method: ``fn`` runs once under ``torch.profiler.profile(profile_memory=True)``,
    which records every allocation (+bytes) and free (-bytes) made through
    torch's CPU allocator. Taking those events in time order, the running sum is
    the memory held by tensors created since the start; its maximum (or 0) is
    returned. Freeing a tensor that existed before the call lowers the running
    sum, so the result is "peak extra memory", never less than 0.

    Limits:

    * only torch CPU allocations count — numpy arrays, Python objects and
      allocator caching outside torch are invisible; CUDA memory is not counted
      (use ``torch.cuda.max_memory_allocated`` there);
    * it measures what tensors *request*, not the process's resident set
      (the OS may map pages lazily, the C allocator may keep freed memory);
    * profiling adds overhead, so do not time the same call;
    * allocations made at the same nanosecond keep the profiler's order.

    The profiler's own log lines are silenced by setting ``KINETO_LOG_LEVEL=6``
    (unless already set) before the first profile in the process.
    """
    require_callable("fn", fn)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        event
        for event in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda event: event.start_ns())  # stable: ties keep recorded order
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return int(peak)


# --------------------------------------------------------------------------- sweeps and fits


@dataclass
class ScalingResult:
    """One measured curve: cost at each size.

    Attributes:
        label: legend name, e.g. ``"softmax attention"``.
        sizes: the sizes swept (e.g. sequence lengths).
        seconds: wall time at each size (the fastest of the timed calls).
        peak_bytes: peak extra torch CPU memory at each size, or ``None`` when not measured.
    """

    label: str
    sizes: list[int]
    seconds: list[float]
    peak_bytes: list[int] | None = None


def sweep(
    make_fn: Callable[[int], Callable[[], object]],
    sizes: Sequence[int],
    *,
    label: str,
    memory: bool = False,
    warmup: int = 1,
    repeats: int = 3,
    threads: int | None = 1,
) -> ScalingResult:
    """Time (and optionally measure memory of) ``make_fn(size)()`` for each size, on one torch thread.

    ``make_fn(size)`` builds the inputs once and returns a zero-argument callable
    that does the work to measure, so set-up cost stays out of the timing::

        def make(n):
            x = torch.randn(n, n)
            return lambda: x.softmax(-1)
        result = sweep(make, [256, 512, 1024], label="softmax")

    Each time is the fastest of ``repeats`` calls (:func:`time_callable`). The
    sweep runs on ``threads`` torch threads (default one: comparable across
    machines and unhurt by busy neighbours; ``None`` keeps the current count)
    and prints a plain warning first when the machine is busy
    (:func:`labsupport.harness.contention.busy_warning`). A one-line text
    progress bar (on standard output) shows the sizes and ends at 100% with the
    elapsed time, so that an exported notebook shows a finished bar, not a
    widget frozen at 0%.
    """
    require_callable("make_fn", make_fn)
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"sizes must be a sequence of positive ints, got {type(sizes).__name__}")
    if len(sizes) == 0:
        raise ValueError("sizes must not be empty")
    checked_sizes = [require_int(f"sizes[{i}]", s, minimum=1) for i, s in enumerate(sizes)]
    if not isinstance(label, str) or not label:
        raise TypeError(f"label must be a non-empty str, got {label!r}")
    if not isinstance(memory, bool):
        raise TypeError(f"memory must be a bool, got {type(memory).__name__}")
    warmup = require_int("warmup", warmup, minimum=0)
    repeats = require_int("repeats", repeats, minimum=1)
    if threads is not None:
        threads = require_int("threads", threads, minimum=1)

    warning = busy_warning(short=True)
    if warning:
        print(f"{label}: {warning}")
    seconds: list[float] = []
    peaks: list[int] = []
    with torch_threads(threads if threads is not None else torch.get_num_threads()):
        bar = text_progress(checked_sizes, desc=label, file=sys.stdout, leave=True, mininterval=0.5,
                            bar_format="{desc}: {percentage:3.0f}% |{bar:20}| {n_fmt}/{total_fmt} sizes, {elapsed}")
        for size in bar:
            fn = make_fn(size)
            require_callable(f"make_fn({size})", fn)
            seconds.append(time_callable(fn, warmup=warmup, repeats=repeats))
            if memory:
                peaks.append(peak_memory_bytes(fn))
    return ScalingResult(label, checked_sizes, seconds, peaks if memory else None)


def fit_power_law(
    sizes: Sequence[float], values: Sequence[float], *, tail: int | None = None
) -> tuple[float, float]:
    """Fit ``value ≈ prefactor · size**exponent`` by least squares on ``log(value)`` vs ``log(size)``.

    Args:
        sizes: positive sizes (at least two distinct ones among those fitted).
        values: positive measurements, one per size.
        tail: fit only the ``tail`` largest sizes. Small sizes are often dominated
            by fixed overhead (Python, kernel launch), which flattens the slope.

    Returns:
        ``(exponent, prefactor)``.
    """
    xs = require_positive_floats("sizes", sizes)
    ys = require_positive_floats("values", values)
    if len(xs) != len(ys):
        raise ValueError(f"sizes and values must have the same length, got {len(xs)} and {len(ys)}")
    pairs = sorted(zip(xs, ys))
    if tail is not None:
        tail = require_int("tail", tail, minimum=2)
        if tail > len(pairs):
            raise ValueError(f"tail={tail} is more than the {len(pairs)} points given")
        pairs = pairs[-tail:]
    if len(pairs) < 2:
        raise ValueError(f"a power-law fit needs at least 2 points, got {len(pairs)}")
    log_x = [math.log(x) for x, _ in pairs]
    log_y = [math.log(y) for _, y in pairs]
    mean_x, mean_y = statistics.fmean(log_x), statistics.fmean(log_y)
    sxx = sum((lx - mean_x) ** 2 for lx in log_x)
    if sxx == 0:
        raise ValueError("a power-law fit needs at least 2 distinct sizes")
    sxy = sum((lx - mean_x) * (ly - mean_y) for lx, ly in zip(log_x, log_y))
    exponent = sxy / sxx
    prefactor = math.exp(mean_y - exponent * mean_x)
    return exponent, prefactor


# Time (or bytes) of real work never falls as the work grows, and nothing the course measures grows faster than
# cubically; outside this range a fitted exponent is noise (a busy machine, sizes dominated by fixed overhead).
_PLAUSIBLE_EXPONENTS = (0.0, 3.5)


def exponent_warning(label: str, exponent: float, *, expected: float | None = None,
                     tolerance: float = 0.5) -> str | None:
    """A plain warning when a fitted exponent is implausible, else ``None``.

    Implausible means outside [0, 3.5] (cost that falls as the work grows, or
    grows faster than cubically), or, when ``expected`` is given (e.g. 2 for
    softmax attention's prefill), more than ``tolerance`` away from it. The
    warning names the usual causes: a busy machine, sizes so small that fixed
    overhead dominates, or sizes that straddle a CPU cache (a real effect, not noise).
    """
    if not isinstance(label, str):
        raise TypeError(f"label must be a str, got {type(label).__name__}")
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or math.isnan(exponent):
        raise ValueError(f"exponent must be a number, got {exponent!r}")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, (int, float))):
        raise TypeError(f"expected must be a number or None, got {expected!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    low, high = _PLAUSIBLE_EXPONENTS
    if expected is not None and abs(exponent - expected) > tolerance:
        problem = f"the fitted exponent {exponent:.2f} is far from the expected {expected:g}"
    elif not low <= exponent <= high:
        problem = f"the fitted exponent {exponent:.2f} is implausible (outside {low:g} to {high:g})"
    else:
        return None
    return (
        f"⚠️ {label}: {problem}. Usual causes: a busy machine (other programs took the cores during some calls), "
        "sizes so small that fixed overhead hides the growth, or data that outgrow a CPU cache within the fitted "
        "sizes (memory-bound work then slows per element, and the slope rises above the work's own exponent "
        "wherever you run it); rerun the cell, and if the slope stays, compare the sizes with your caches."
    )
