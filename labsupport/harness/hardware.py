"""Two measurements of the reader's own machine: matmul throughput and memory bandwidth; and its caches.

Their ratio, FLOPs per byte, is the machine's *balance point*: a computation
that performs fewer FLOPs per byte it moves than this is limited by memory
bandwidth, not by arithmetic (the roofline model). Chapter 00 uses it to show
that decoding one token at a time sits far below the balance point.

:func:`cache_sizes` and :func:`last_level_cache_bytes` read the CPU's cache sizes
(Linux): a memory-bound timing changes regime when its data outgrow the
last-level cache, so a chapter prints where its sizes sit against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from labsupport.harness.measuring import time_callable
from labsupport.harness.settings import torch_threads
from labsupport.harness.validation import require_float, require_int

__all__ = ["MachineProfile", "cache_sizes", "copy_bandwidth_gbs", "last_level_cache_bytes", "matmul_gflops",
           "profile_machine"]

_CPU0_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def matmul_gflops(n: int = 1024, *, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Measured GFLOP/s of an ``n × n`` by ``n × n`` matrix product (``2 n³`` FLOPs)."""
    n = require_int("n", n, minimum=16)  # smaller products measure Python overhead, not arithmetic
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    seconds = time_callable(lambda: a @ b, repeats=repeats)
    return 2 * n**3 / seconds / 1e9


def copy_bandwidth_gbs(megabytes: int = 256, *, repeats: int = 5) -> float:
    """Measured memory bandwidth in GB/s of copying a large buffer (bytes read + bytes written).

    The buffer should be far larger than the CPU caches (the default 256 MB is).
    """
    megabytes = require_int("megabytes", megabytes, minimum=8)  # smaller buffers fit in the CPU caches
    src = torch.ones(megabytes * 1_000_000 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = time_callable(lambda: dst.copy_(src), repeats=repeats)
    return 2 * src.numel() * 4 / seconds / 1e9


@dataclass(frozen=True)
class MachineProfile:
    """Measured peak rates of this machine."""

    gflops: float
    bandwidth_gbs: float

    @property
    def balance_flops_per_byte(self) -> float:
        """Arithmetic intensity at which compute and memory take equal time."""
        return self.gflops / self.bandwidth_gbs

    def attainable_gflops(self, intensity: float) -> float:
        """The roofline: ``min(peak FLOP/s, intensity × bandwidth)``."""
        intensity = require_float("intensity", intensity, positive=True)
        return min(self.gflops, intensity * self.bandwidth_gbs)


def profile_machine(*, matmul_n: int = 1024, copy_megabytes: int = 256, threads: int | None = None,
                    record_as: str | None = "00") -> MachineProfile:
    """Measure fp32 matmul GFLOP/s and copy bandwidth (about a second on a laptop).

    ``threads``: the torch threads to measure on (``None``: the current count).
    A roofline only describes timings taken on the same number of threads, at
    the same time: measure the peaks in the cell that times the work, with the
    sweep's ``threads`` (one by default).

    ``record_as``: the chapter under which the peaks are recorded in the reader's local results file
    (:mod:`labsupport.harness.results`; keys ``matmul_gflops_{n}thread`` and ``copy_bandwidth_gbs_{n}thread``),
    for chapter 10 to rank designs on this machine; ``None`` records nothing. Only the default sizes are
    recorded (smaller buffers measure the caches, not the memory).
    """
    if threads is None:
        profile = MachineProfile(matmul_gflops(matmul_n), copy_bandwidth_gbs(copy_megabytes))
        threads = torch.get_num_threads()
    else:
        threads = require_int("threads", threads, minimum=1)
        with torch_threads(threads):
            profile = MachineProfile(matmul_gflops(matmul_n), copy_bandwidth_gbs(copy_megabytes))
    if record_as is not None and matmul_n >= 1024 and copy_megabytes >= 256:
        from labsupport.harness.results import record

        record(record_as, f"matmul_gflops_{threads}thread", profile.gflops, "GFLOP/s")
        record(record_as, f"copy_bandwidth_gbs_{threads}thread", profile.bandwidth_gbs, "GB/s")
    return profile


def _parse_cache_size(text: str) -> int | None:
    """``"32768K"``, ``"1M"``, ``"512"`` (bytes) → bytes; ``None`` when unreadable."""
    text = text.strip().upper()
    factor = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * factor if digits.isdigit() else None


def cache_sizes(root: Path | str = _CPU0_CACHES) -> dict[int, int]:
    """Bytes of each data (or unified) cache level that one core can use: ``{1: L1d, 2: L2, 3: L3}``.

    Read from Linux's ``/sys/devices/system/cpu/cpu0/cache`` (one instance of
    each level, as the first core sees it: a shared L3 counts once, not once per
    core as ``lscpu``'s totals do). Empty where the system does not say (macOS,
    Windows, some containers).
    """
    sizes: dict[int, int] = {}
    root = Path(root)
    try:
        entries = sorted(root.glob("index*"))
    except OSError:
        return sizes
    for entry in entries:
        try:
            kind = (entry / "type").read_text().strip()
            level = int((entry / "level").read_text().strip())
            size = _parse_cache_size((entry / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and size:
            sizes[level] = max(size, sizes.get(level, 0))
    return sizes


def last_level_cache_bytes(root: Path | str = _CPU0_CACHES) -> int | None:
    """Bytes of the largest cache level one core can use (usually the L3), or ``None`` where unknown."""
    sizes = cache_sizes(root)
    return sizes[max(sizes)] if sizes else None
