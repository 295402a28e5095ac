"""How busy is this machine? Load, spare CPUs, and the conditions to print beside a measured number.

Chapters run on laptops, Binder, Colab and shared lab servers. A timing taken
while other programs compete for the cores can be several times (with several
torch threads, tens of times) slower than the same timing on a quiet machine,
and a scaling exponent fitted from such timings can be anything. This module
says when that is happening, so that a chapter can print a plain warning
instead of a wrong lesson:

* :func:`load_average` — runnable programs over the last minute (``os.getloadavg``).
* :func:`cpu_budget` — how many CPUs this process may keep busy (affinity mask, cgroup quota).
* :func:`spare_cpus` — how many of the CPUs this process may use nobody else is using.
* :func:`busy_warning` — a one-line warning when the load exceeds the CPUs, else ``None``.
* :func:`measurement_conditions` — "1 torch thread, 2 CPUs, load 0.4 (quiet)", to print beside a number.
* :func:`print_measured` — print a measured number for the prose, with those conditions.

What the load means: Linux counts every runnable thread on the machine (in a
container without its own ``/proc/loadavg``, on the whole host), so the load is
compared with every CPU the machine has (``os.cpu_count()``); on a plain laptop
or lab server that is the same number as
:func:`cpu_budget`. A load above it means some
thread is always waiting for a core: timings are slower and noisier than the
work itself. The notebook's own running thread counts in the load too.

This module imports nothing else from the harness; :mod:`labsupport.harness.settings` imports it (and
re-exports :func:`cpu_budget`), never the other way round.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

__all__ = [
    "busy_warning",
    "cpu_budget",
    "load_average",
    "machine_cpus",
    "measurement_conditions",
    "print_measured",
    "spare_cpus",
]


def load_average() -> float | None:
    """The one-minute load average (runnable threads, machine-wide), or ``None`` where the OS has none (Windows)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def machine_cpus() -> int:
    """Every CPU the load average is spread over: ``os.cpu_count()`` (at least 1)."""
    return max(1, os.cpu_count() or 1)


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1: -1 when unlimited
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def cpu_budget(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """How many CPUs this process can keep busy: its affinity mask, capped by a cgroup CPU quota.

    At least 1. A quota of 1.5 CPUs counts as 1: a second thread would be throttled.
    """
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        available = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        available = min(available, math.floor(limit))
    return max(1, available)


def spare_cpus(load: float | None = None) -> int:
    """CPUs this process may use that nobody else is using now: ``cpu_budget`` capped by ``machine_cpus - load``.

    Rounded to the nearest whole CPU, at least 1 (a process can always run on
    one). Without a load average (Windows) every CPU of the budget counts as spare.
    """
    budget = cpu_budget()
    load = load_average() if load is None else load
    if load is None:
        return budget
    if isinstance(load, bool) or not isinstance(load, (int, float)) or math.isnan(load) or load < 0:
        raise ValueError(f"load must be a non-negative number, got {load!r}")
    return max(1, min(budget, round(machine_cpus() - load)))


def busy_warning(load: float | None = None, *, short: bool = False) -> str | None:
    """A plain one-line warning when the load average is above the machine's CPUs, else ``None``.

    ``load`` defaults to :func:`load_average`. The warning says what it does to
    the numbers that follow (slower, noisier timings; unreliable exponents);
    ``short=True`` gives a few words only, for a cell that warns several times.
    """
    load = load_average() if load is None else load
    if load is None:
        return None
    cpus = machine_cpus()
    if load <= cpus:
        return None
    if short:
        return f"⚠️ busy machine (load {load:.1f} on {cpus} CPU(s)): timings slower and noisier than the work itself"
    return (
        f"⚠️ this machine is busy: load average {load:.1f} on {cpus} CPU(s), so some thread is always waiting "
        "for a core. Timings below are slower and noisier than the work itself, and fitted exponents may be off; "
        "rerun when the machine is quieter before trusting them."
    )


def measurement_conditions(load: float | None = None) -> str:
    """The conditions a measured number was taken under, e.g. ``"1 torch thread, 2 CPUs, load 0.4 (quiet)"``."""
    load = load_average() if load is None else load
    threads = torch.get_num_threads()
    cpus = machine_cpus()
    text = f"{threads} torch thread{'s' if threads != 1 else ''}, {cpus} CPU{'s' if cpus != 1 else ''}"
    if load is None:
        return text + ", load unknown"
    return f"{text}, load {load:.1f} ({_load_state(load, cpus)})"


def _load_state(load: float, cpus: int) -> str:
    """"quiet", "partly busy" or "busy" for a load on ``cpus`` CPUs, not counting the measuring thread itself.

    The notebook that measures is one runnable thread of the load (a load of 1.0 on
    an idle machine is that thread alone), so up to one unit of load is its own:
    quiet while the others add less than half a CPU, busy once some thread must
    wait for a core (load above the CPUs, as :func:`busy_warning` says), partly
    busy in between.
    """
    others = max(0.0, load - 1.0)
    if load > cpus:
        return "busy"
    return "quiet" if others < 0.5 else "partly busy"


def print_measured(label: str, value: float, unit: str = "", *, digits: int = 3) -> str:
    """Print ``label: value unit  [conditions]`` for a number the prose relies on, and return the line.

    Use it for every number a sentence of the chapter leans on, so that the
    reader sees their own value and the conditions it was measured under::

        print_measured("copy bandwidth", bandwidth_gbs, "GB/s")
        # copy bandwidth: 11.8 GB/s   [1 torch thread, 2 CPUs, load 0.6 (partly busy)]
    """
    if not isinstance(label, str) or not label:
        raise TypeError(f"label must be a non-empty str, got {label!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"value must be a number, got {type(value).__name__} ({value!r})")
    if not isinstance(unit, str):
        raise TypeError(f"unit must be a str, got {type(unit).__name__}")
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be a positive int, got {digits!r}")
    if isinstance(value, int) or abs(value) >= 10**digits:
        number = f"{value:,.0f}"
    else:
        number = f"{value:.{digits}g}"
    line = f"{label}: {number}{' ' + unit if unit else ''}   [{measurement_conditions()}]"
    print(line)
    return line
