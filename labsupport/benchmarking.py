"""Measuring cost: wall time, peak memory, scaling sweeps, power-law fits, KV-cache bytes.

The chapters measure how a mechanism's cost grows with size and read off the
exponent ("softmax attention is quadratic in length"). The pieces:

* :func:`time_callable` — median wall time of a callable (``time.perf_counter``).
* :func:`peak_memory_bytes` — peak bytes of torch CPU allocations while a callable
  runs, above the level at its start (see its docstring for the method and limits).
* :func:`sweep` — run a family of callables over sizes, giving a :class:`ScalingResult`.
* :func:`fit_power_law` — exponent and prefactor of ``value ≈ prefactor · size**exponent``.
* :func:`plot_scaling` — log-log plotly figure with the fitted slope in each legend entry.
* :func:`kv_cache_bytes` and :func:`format_bytes` — memory arithmetic for the KV cache.
"""

from __future__ import annotations

import math
import numbers
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

__all__ = [
    "ScalingResult",
    "fit_power_law",
    "format_bytes",
    "kv_cache_bytes",
    "peak_memory_bytes",
    "plot_scaling",
    "sweep",
    "time_callable",
]


# --------------------------------------------------------------------------- validation


def _require_callable(name: str, value: object) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")


def _require_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _positive_floats(name: str, values: object) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of positive numbers, got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty")
    out: list[float] = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}[{i}] must be a number, got {type(v).__name__} ({v!r})")
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}[{i}] must be a finite positive number, got {v}")
        out.append(float(v))
    return out


# --------------------------------------------------------------------------- timing and memory


def time_callable(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs.

    The median (not the mean) resists the occasional slow run caused by the
    rest of the machine. Timing uses ``time.perf_counter``. On a GPU, ``fn``
    itself must synchronise (``torch.cuda.synchronize()``) for the time to mean
    anything.
    """
    _require_callable("fn", fn)
    warmup = _require_int("warmup", warmup, minimum=0)
    repeats = _require_int("repeats", repeats, minimum=1)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    _require_callable("fn", fn)
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
        seconds: median wall time at each size.
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
) -> ScalingResult:
    """Time (and optionally measure memory of) ``make_fn(size)()`` for each size.

    ``make_fn(size)`` builds the inputs once and returns a zero-argument callable
    that does the work to measure, so set-up cost stays out of the timing::

        def make(n):
            x = torch.randn(n, n)
            return lambda: x.softmax(-1)
        result = sweep(make, [256, 512, 1024], label="softmax")

    A ``tqdm.auto`` progress bar shows the sizes and disappears when done.
    """
    _require_callable("make_fn", make_fn)
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"sizes must be a sequence of positive ints, got {type(sizes).__name__}")
    if len(sizes) == 0:
        raise ValueError("sizes must not be empty")
    checked_sizes = [_require_int(f"sizes[{i}]", s, minimum=1) for i, s in enumerate(sizes)]
    if not isinstance(label, str) or not label:
        raise TypeError(f"label must be a non-empty str, got {label!r}")
    if not isinstance(memory, bool):
        raise TypeError(f"memory must be a bool, got {type(memory).__name__}")
    warmup = _require_int("warmup", warmup, minimum=0)
    repeats = _require_int("repeats", repeats, minimum=1)

    seconds: list[float] = []
    peaks: list[int] = []
    for size in tqdm(checked_sizes, desc=label, leave=False):
        fn = make_fn(size)
        _require_callable(f"make_fn({size})", fn)
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
    xs = _positive_floats("sizes", sizes)
    ys = _positive_floats("values", values)
    if len(xs) != len(ys):
        raise ValueError(f"sizes and values must have the same length, got {len(xs)} and {len(ys)}")
    pairs = sorted(zip(xs, ys))
    if tail is not None:
        tail = _require_int("tail", tail, minimum=2)
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


_Y_AXIS_TITLES = {"seconds": "time per call (s)", "peak_bytes": "peak extra memory (bytes)"}


def plot_scaling(
    results: Sequence[ScalingResult],
    *,
    title: str,
    y: Literal["seconds", "peak_bytes"] = "seconds",
    fit_tail: int | None = None,
    x_title: str = "size",
) -> go.Figure:
    """Log-log plot of cost against size, one line per result, fitted slope in each legend entry.

    Args:
        results: the curves, e.g. from :func:`sweep`.
        title: figure title.
        y: ``"seconds"`` or ``"peak_bytes"`` (needs results measured with ``memory=True``).
        fit_tail: passed to :func:`fit_power_law` as ``tail`` (capped at each curve's length).
        x_title: the x-axis title, e.g. ``"sequence length L (tokens)"``.

    A slope of 1 means linear growth, 2 quadratic. Curves whose values include
    zeros (e.g. no extra memory) are drawn without a fitted slope.
    """
    if isinstance(results, ScalingResult):
        results = [results]
    if isinstance(results, (str, bytes)) or not isinstance(results, Sequence):
        raise TypeError(f"results must be a list of ScalingResult, got {type(results).__name__}")
    if len(results) == 0:
        raise ValueError("results must not be empty")
    for i, result in enumerate(results):
        if not isinstance(result, ScalingResult):
            raise TypeError(f"results[{i}] must be a ScalingResult, got {type(result).__name__}")
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    if y not in _Y_AXIS_TITLES:
        raise ValueError(f"y must be one of {sorted(_Y_AXIS_TITLES)}, got {y!r}")
    if fit_tail is not None:
        _require_int("fit_tail", fit_tail, minimum=2)

    figure = go.Figure()
    for result in results:
        values = result.seconds if y == "seconds" else result.peak_bytes
        if values is None:
            raise ValueError(
                f"result {result.label!r} has no peak_bytes; run sweep(..., memory=True) to plot memory"
            )
        if len(values) != len(result.sizes):
            raise ValueError(
                f"result {result.label!r} has {len(result.sizes)} sizes but {len(values)} values"
            )
        name = result.label
        if len(result.sizes) >= 2 and all(v > 0 for v in values):
            tail = None if fit_tail is None else min(fit_tail, len(result.sizes))
            exponent, _ = fit_power_law(result.sizes, values, tail=tail)
            name = f"{result.label} (slope {exponent:.2f})"
        figure.add_trace(go.Scatter(x=list(result.sizes), y=list(values), mode="lines+markers", name=name))
    figure.update_layout(
        title=title,
        xaxis={"title": {"text": x_title}, "type": "log"},
        yaxis={"title": {"text": _Y_AXIS_TITLES[y]}, "type": "log"},
        legend_title_text="fitted log-log slope" if fit_tail is None else f"slope of the {fit_tail} largest sizes",
        template="plotly_white",
    )
    return figure


# --------------------------------------------------------------------------- KV-cache arithmetic


def kv_cache_bytes(
    *,
    layers: int,
    kv_heads: int,
    head_dim: int,
    context: int,
    bytes_per_element: int = 2,
    batch: int = 1,
) -> int:
    """Bytes of the key/value cache: ``2 · layers · kv_heads · head_dim · context · bytes · batch``.

    The leading 2 counts keys and values. ``bytes_per_element`` is 2 for fp16/bf16,
    1 for int8, 4 for fp32. Example: LLaMA-2-7B (32 layers, 32 KV heads of
    dimension 128, fp16) at 256K tokens holds 2**37 bytes, which
    ``format_bytes`` shows as ``"128 GiB"`` — the "128GB" of the Jamba paper.
    """
    layers = _require_int("layers", layers, minimum=1)
    kv_heads = _require_int("kv_heads", kv_heads, minimum=1)
    head_dim = _require_int("head_dim", head_dim, minimum=1)
    context = _require_int("context", context, minimum=0)
    bytes_per_element = _require_int("bytes_per_element", bytes_per_element, minimum=1)
    batch = _require_int("batch", batch, minimum=1)
    return 2 * layers * kv_heads * head_dim * context * bytes_per_element * batch


_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def format_bytes(n: int | float, *, binary: bool = True, digits: int = 3) -> str:
    """Human-readable byte count.

    Args:
        n: a non-negative number of bytes.
        binary: ``True`` (default) uses powers of 1024 with IEC names (KiB, MiB,
            GiB); ``False`` uses powers of 1000 with SI names (kB, MB, GB).
            Papers usually write "GB" for what are binary gigabytes: the Jamba
            paper's "128GB" KV cache for LLaMA-2-7B at 256K tokens is 2**37 bytes
            = ``"128 GiB"`` here, which would read ``"137 GB"`` in decimal units.
        digits: significant digits shown (trailing zeros dropped).

    Examples: ``format_bytes(2**37) == "128 GiB"``, ``format_bytes(2**37, binary=False) == "137 GB"``,
    ``format_bytes(1536) == "1.5 KiB"``, ``format_bytes(10) == "10 B"``.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"n must be a number of bytes, got {type(n).__name__} ({n!r})")
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"n must be a finite non-negative number of bytes, got {n}")
    if not isinstance(binary, bool):
        raise TypeError(f"binary must be a bool, got {type(binary).__name__}")
    digits = _require_int("digits", digits, minimum=1)
    base = 1024.0 if binary else 1000.0
    units = _BINARY_UNITS if binary else _DECIMAL_UNITS
    value = float(n)
    unit_index = 0
    # Promote to the next unit when the *shown* number reaches the base, so that
    # 1023.9 KiB reads "1 MiB" and never "1024 KiB".
    while unit_index < len(units) - 1 and float(_significant(value, digits)) >= base:
        value /= base
        unit_index += 1
    if unit_index == 0:
        return f"{int(round(value))} B"
    return f"{_significant(value, digits)} {units[unit_index]}"


def _significant(value: float, digits: int) -> str:
    """``value`` with ``digits`` significant digits, never in exponent form, trailing zeros dropped."""
    if value >= 10 ** (digits - 1):
        return f"{value:.0f}"
    decimals = digits - 1 - math.floor(math.log10(value)) if value > 0 else 0
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
