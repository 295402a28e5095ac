"""Counting bytes: a toy two-level memory (slow HBM, fast SRAM) and the traffic of two attention algorithms.

* :class:`TwoLevelMemory` — loads, stores and frees named buffers, refuses to overflow, counts every byte.
* :func:`standard_attention_io` — three passes through slow memory (``S``, ``P``, ``O``): Θ(N d + N²).
* :func:`flash_attention_io` — the tiled forward pass: Θ(N² d² / M), with block sizes from
  :func:`flash_block_sizes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from labsupport.flash.tiled import _block_ranges
from labsupport.harness.validation import require_choice, require_int, require_positive_int

__all__ = [
    "IOReport",
    "TwoLevelMemory",
    "flash_attention_io",
    "flash_block_sizes",
    "standard_attention_io",
]


class TwoLevelMemory:
    """A toy two-level memory: a large slow memory (HBM) and a fast memory (SRAM) of ``capacity`` elements.

    Algorithms call :meth:`load` to bring ``n`` elements into fast memory under a
    name, :meth:`store` to write ``n`` elements back, and :meth:`free` to drop a
    resident buffer. Every element moved counts ``bytes_per_element`` bytes. The
    fast memory refuses to hold more than its capacity, so an algorithm that
    "cheats" raises instead of producing a flattering count.
    """

    def __init__(self, capacity: int, *, bytes_per_element: int = 2) -> None:
        self.capacity = require_positive_int("capacity (elements)", capacity)
        self.bytes_per_element = require_choice(
            "bytes_per_element", require_int("bytes_per_element", bytes_per_element), (1, 2, 4, 8)
        )
        self.read_bytes = 0
        self.write_bytes = 0
        self.resident: dict[str, int] = {}
        self.peak_resident = 0

    @property
    def in_use(self) -> int:
        """Elements currently held in fast memory."""
        return sum(self.resident.values())

    def allocate(self, name: str, n: int) -> None:
        """Reserve ``n`` elements of fast memory (scratch: no slow-memory traffic)."""
        if not isinstance(name, str):
            raise TypeError(f"buffer name must be a str, got {type(name).__name__}")
        n = require_int("n (elements)", n, minimum=0)
        used = self.in_use - self.resident.get(name, 0) + n
        if used > self.capacity:
            raise MemoryError(
                f"fast memory overflow: {used} elements would be resident ({name!r} needs {n}), "
                f"capacity {self.capacity}"
            )
        self.resident[name] = n
        self.peak_resident = max(self.peak_resident, used)

    def load(self, name: str, n: int) -> None:
        """Read ``n`` elements from slow memory into a fast buffer called ``name``."""
        self.allocate(name, n)
        self.read_bytes += n * self.bytes_per_element

    def store(self, name: str, n: int | None = None) -> None:
        """Write ``n`` elements (default: the whole buffer ``name``) back to slow memory."""
        if name not in self.resident:
            raise KeyError(f"nothing called {name!r} is resident in fast memory")
        self.write_bytes += (self.resident[name] if n is None else n) * self.bytes_per_element

    def free(self, *names: str) -> None:
        """Drop buffers from fast memory (no traffic)."""
        for name in names:
            self.resident.pop(name, None)


@dataclass(frozen=True)
class IOReport:
    """Bytes moved between slow and fast memory by one algorithm."""

    algorithm: str
    n: int
    d: int
    capacity: int
    read_bytes: int
    write_bytes: int
    peak_resident: int
    block_rows: int
    block_cols: int

    @property
    def total_bytes(self) -> int:
        """Bytes read plus bytes written."""
        return self.read_bytes + self.write_bytes


def _require_io_args(n: int, d: int, capacity: int) -> tuple[int, int, int]:
    """The sequence length, head dimension and fast-memory capacity, each a positive int."""
    return require_positive_int("n", n), require_positive_int("d", d), require_positive_int("capacity", capacity)


def standard_attention_io(
    n: int, d: int, capacity: int, *, bytes_per_element: int = 2, causal: bool = False
) -> IOReport:
    """Count the slow-memory traffic of standard attention in three passes.

    1. ``S = Q Kᵀ``, written to slow memory (``N²``);
    2. ``P = softmax(S)``, reading ``S`` and writing ``P`` (``2 N²``);
    3. ``O = P V``, reading ``P`` (``N²``) and writing ``O``.

    The matrix products are tiled to fit the fast memory; the softmax pass reads each
    row twice when a row does not fit. ``causal`` does not help here: the masked
    matrix is still written and read in full. Total: Θ(N d + N²).
    """
    n, d, capacity = _require_io_args(n, d, capacity)
    mem = TwoLevelMemory(capacity, bytes_per_element=bytes_per_element)
    # square tiles of the N x N matrices, t rows of Q (or P) and t rows of K (or V)
    t = max(1, min(n, int((math.sqrt(d * d + capacity) - d))))
    while 2 * t * d + t * t > capacity and t > 1:
        t -= 1
    if 2 * t * d + t * t > capacity:
        raise ValueError(
            f"capacity {capacity} is too small: it must hold at least 2*d+1 = {2 * d + 1} elements"
        )
    # pass 1: S = Q K^T
    for r0 in range(0, n, t):
        rows = min(t, n - r0)
        mem.load("Q_i", rows * d)
        for c0 in range(0, n, t):
            cols = min(t, n - c0)
            mem.load("K_j", cols * d)
            mem.allocate("S_ij", rows * cols)
            mem.store("S_ij")
            mem.free("K_j", "S_ij")
        mem.free("Q_i")
    # pass 2: softmax row by row (in chunks of at most `capacity` elements)
    chunk = min(n, capacity)
    passes = 1 if n <= capacity else 2  # max and sum first, then normalise
    for _ in range(n):
        for _ in range(passes):
            for c0 in range(0, n, chunk):
                mem.load("S_row", min(chunk, n - c0))
                mem.free("S_row")
        for c0 in range(0, n, chunk):
            if passes == 1:
                mem.allocate("P_row", min(chunk, n - c0))
            else:
                mem.load("P_row", min(chunk, n - c0))
            mem.store("P_row")
            mem.free("P_row")
    # pass 3: O = P V, accumulating a tile of O in fast memory
    t3 = max(1, min(n, capacity // (3 * d + 1)))  # rows of P, of V, and of O (d wide)
    while t3 * t3 + 2 * t3 * d > capacity and t3 > 1:
        t3 -= 1
    for r0 in range(0, n, t3):
        rows = min(t3, n - r0)
        mem.allocate("O_i", rows * d)
        for c0 in range(0, n, t3):
            cols = min(t3, n - c0)
            mem.load("P_ij", rows * cols)
            mem.load("V_j", cols * d)
            mem.free("P_ij", "V_j")
        mem.store("O_i")
        mem.free("O_i")
    return IOReport("standard", n, d, capacity, mem.read_bytes, mem.write_bytes,
                    mem.peak_resident, t, t)


def flash_block_sizes(n: int, d: int, capacity: int) -> tuple[int, int]:
    """Block sizes ``(rows, cols)`` for the tiled algorithm so that one step fits the fast memory.

    Fast memory holds a query block and its accumulator (``2·Br·d``), a key and a
    value block (``2·Bc·d``), the score tile (``Br·Bc``) and the statistics ``m, l``
    (``2·Br``). The key block stays small (at most ``d`` columns) and the query
    block takes what is left, because the keys are streamed once per query block.
    """
    n, d, capacity = _require_io_args(n, d, capacity)
    bc = max(1, min(d, n, capacity // (6 * d)))
    br = (capacity - 2 * bc * d) // (2 * d + bc + 2)
    if br < 1:
        raise ValueError(
            f"capacity {capacity} is too small for d={d}: it must hold at least "
            f"4*d+3 = {4 * d + 3} elements"
        )
    return min(br, n), bc


def flash_attention_io(
    n: int, d: int, capacity: int, *, bytes_per_element: int = 2, causal: bool = False
) -> IOReport:
    """Count the slow-memory traffic of the tiled (FlashAttention-2 order) forward pass.

    Each query block is read once and its output written once; every key and value
    block is streamed once per query block. With ``Br ≈ M / (3d)`` rows per query
    block that is about ``2 N d · N / Br`` = Θ(N² d² / M) bytes. With ``causal``, key
    blocks entirely in the future are never loaded.
    """
    n, d, capacity = _require_io_args(n, d, capacity)
    br, bc = flash_block_sizes(n, d, capacity)
    mem = TwoLevelMemory(capacity, bytes_per_element=bytes_per_element)
    for q0, q1, tiles in _block_ranges(n, n, br, bc, causal):
        rows = q1 - q0
        mem.load("Q_i", rows * d)
        mem.allocate("O_i", rows * d)
        mem.allocate("m_l", 2 * rows)
        for k0, k1, _ in tiles:
            mem.load("K_j", (k1 - k0) * d)
            mem.load("V_j", (k1 - k0) * d)
            mem.allocate("S_ij", rows * (k1 - k0))
            mem.free("K_j", "V_j", "S_ij")
        mem.store("O_i")
        mem.store("m_l", rows)  # the logsumexp, one number per row
        mem.free("Q_i", "O_i", "m_l")
    return IOReport("tiled", n, d, capacity, mem.read_bytes, mem.write_bytes,
                    mem.peak_resident, br, bc)
