"""Chapter 01: online softmax, tiled (FlashAttention-2 style) attention, IO counting.

Everything here is plain, readable PyTorch; the Triton version of the forward
pass lives in :mod:`labsupport.flash_triton`.

Conventions
-----------
* Tensors are ``(B, H, L, D)``: batch, heads, length, head dimension.
* ``scale`` defaults to ``1 / sqrt(D)``.
* ``causal=True`` aligns the mask to the *bottom right*, as FlashAttention-2
  does: query ``i`` of ``Lq`` may look at key ``j`` of ``Lk`` when
  ``j <= i + (Lk - Lq)``. With ``Lq == Lk`` this is the usual lower-triangular
  mask (and what ``scaled_dot_product_attention(is_causal=True)`` does). With
  ``Lq > Lk`` the first ``Lq - Lk`` queries see no key at all: such a *fully
  masked row* gives an output of zeros and a logsumexp of ``-inf``, never NaN.
* Low-precision inputs (fp16, bf16) are computed in float32 and the output is
  cast back to the input dtype; the logsumexp is always float32 (or float64
  for float64 inputs).

Contents
--------
References: :func:`naive_attention`, :func:`stable_softmax`,
:func:`online_softmax_row`, :func:`online_softmax_update`,
:func:`flash_attention_forward`, :func:`flash_attention_backward`,
:func:`flash_attention` (an autograd function), :func:`tile_trace` (for the
widget). IO model: :class:`TwoLevelMemory`, :func:`standard_attention_io`,
:func:`flash_attention_io`. Checkers: :func:`check_online_softmax_update`,
:func:`check_flash_forward`, :func:`check_flash_backward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from labsupport.harness.checking import Case, CheckResult, check_function

__all__ = [
    "naive_attention",
    "stable_softmax",
    "online_softmax_row",
    "online_softmax_update",
    "flash_attention_forward",
    "flash_attention_backward",
    "FlashAttentionFunction",
    "flash_attention",
    "causal_mask",
    "TileStep",
    "tile_trace",
    "TwoLevelMemory",
    "IOReport",
    "standard_attention_io",
    "flash_attention_io",
    "flash_block_sizes",
    "check_online_softmax_update",
    "check_flash_forward",
    "check_flash_backward",
]

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- validation


def _check_tensor(name: str, x: object, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_TYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _check_qkv(q: object, k: object, v: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = _check_tensor("q", q)
    k = _check_tensor("k", k)
    v = _check_tensor("v", v)
    if q.dim() < 2:
        raise ValueError(f"q must be (..., L, D) with at least 2 dimensions, got {tuple(q.shape)}")
    if k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(
            f"q, k, v must have the same number of dimensions, got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(
            f"q, k, v must share their leading (batch, heads) dimensions, got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head dimension, got {q.shape[-1]} and {k.shape[-1]}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same length, got {k.shape[-2]} and {v.shape[-2]}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError("q and k must hold at least one position each (length 0 given)")
    return q, k, v


def _check_block(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _scale_for(q: torch.Tensor, scale: float | None) -> float:
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_mask(lq: int, lk: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``(lq, lk)`` mask, ``True`` where query ``i`` may see key ``j``.

    Bottom-right aligned: ``j <= i + (lk - lq)``.
    """
    if lq < 1 or lk < 1:
        raise ValueError(f"lengths must be positive, got lq={lq}, lk={lk}")
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


# --------------------------------------------------------------------------- dense references


def stable_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax that subtracts the maximum first, so ``exp`` never overflows.

    A slice that is entirely ``-inf`` gives zeros (not NaN).
    """
    _check_tensor("x", x)
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    e = torch.exp(x - m)
    total = e.sum(dim=dim, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention that materialises the full ``(Lq, Lk)`` score matrix.

    ``softmax(q kᵀ · scale) v``, computed in float32 (float64 for float64
    inputs) and returned in the input dtype. Differentiable; fully masked rows
    give zeros.
    """
    q, k, v = _check_qkv(q, k, v)
    s = _scale_for(q, scale)
    cdt = _compute_dtype(q.dtype)
    scores = (q.to(cdt) @ k.to(cdt).transpose(-1, -2)) * s  # (..., Lq, Lk)
    if causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    p = stable_softmax(scores, dim=-1)
    return (p @ v.to(cdt)).to(q.dtype)


def online_softmax_row(x: torch.Tensor, block: int) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Softmax of a 1-D tensor read ``block`` entries at a time (running max and sum).

    Returns the softmax and the list of ``(running max, running sum)`` after each block,
    so a notebook can show how the two statistics evolve.
    """
    _check_tensor("x", x, ndim=1)
    _check_block("block", block)
    m = torch.tensor(float("-inf"), dtype=x.dtype)
    l = torch.tensor(0.0, dtype=x.dtype)
    history: list[tuple[float, float]] = []
    for start in range(0, x.numel(), block):
        chunk = x[start : start + block]
        m_new = torch.maximum(m, chunk.max())
        # rescale the old sum to the new maximum, then add this block's terms
        l = l * torch.exp(m - m_new) + torch.exp(chunk - m_new).sum()
        m = m_new
        history.append((float(m), float(l)))
    return torch.exp(x - m) / l, history


def online_softmax_update(
    m: torch.Tensor,
    l: torch.Tensor,
    acc: torch.Tensor,
    scores: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the online softmax over a block of keys.

    Args:
        m: running row maximum, ``(..., R)`` (``-inf`` before the first block).
        l: running row sum of ``exp(score - m)``, ``(..., R)``.
        acc: unnormalised output ``Σ exp(score - m) v``, ``(..., R, Dv)``.
        scores: this block's (scaled, masked) scores, ``(..., R, C)``; ``-inf`` = masked.
        v: this block's values, ``(..., C, Dv)``.

    Returns:
        ``(m_new, l_new, acc_new)``. Rows whose scores are all ``-inf`` so far stay
        at ``m = -inf, l = 0, acc = 0`` (no NaN).
    """
    m_new = torch.maximum(m, scores.amax(dim=-1))
    # A row that has seen only -inf keeps m_new = -inf; use 0 as its reference
    # point so that exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
    m_ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m - m_ref)  # how much the old statistics shrink
    p = torch.exp(scores - m_ref[..., None])
    l_new = alpha * l + p.sum(dim=-1)
    acc_new = alpha[..., None] * acc + p @ v
    return m_new, l_new, acc_new


# --------------------------------------------------------------------------- tiled forward and backward


def _block_ranges(lq: int, lk: int, block_q: int, block_k: int, causal: bool) -> Iterator[tuple[int, int, list[tuple[int, int, bool]]]]:
    """Yield ``(q0, q1, [(k0, k1, needs_mask), ...])`` for the tiles that hold any visible key.

    With ``causal``, key blocks entirely above the (bottom-right) diagonal are skipped,
    and only blocks that cross the diagonal need a mask.
    """
    offset = lk - lq
    for q0 in range(0, lq, block_q):
        q1 = min(q0 + block_q, lq)
        tiles = []
        for k0 in range(0, lk, block_k):
            k1 = min(k0 + block_k, lk)
            if causal:
                if k0 > (q1 - 1) + offset:  # every key of the block is in the future of every query
                    break
                needs_mask = (k1 - 1) > q0 + offset
            else:
                needs_mask = False
            tiles.append((k0, k1, needs_mask))
        yield q0, q1, tiles


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled attention forward, FlashAttention-2 style; never forms the full score matrix.

    For each block of ``block_q`` queries, walk over blocks of ``block_k`` keys,
    keeping a running maximum ``m``, running sum ``l`` and an unnormalised output
    ``acc``; divide by ``l`` once at the end.

    Returns:
        ``(out, lse)``: ``out`` like ``q`` (with v's head dimension), and the row
        logsumexp ``lse = m + log l`` of shape ``(..., Lq)`` that the backward pass needs.
    """
    q, k, v = _check_qkv(q, k, v)
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    s = _scale_for(q, scale)
    cdt = _compute_dtype(q.dtype)
    lq = q.shape[-2]
    batch = q.shape[:-2]
    out = torch.zeros(*batch, lq, v.shape[-1], dtype=cdt, device=q.device)
    lse = torch.full((*batch, lq), float("-inf"), dtype=cdt, device=q.device)
    for q0, q1, tiles in _block_ranges(lq, k.shape[-2], block_q, block_k, causal):
        qi = q[..., q0:q1, :].to(cdt)
        m = torch.full((*batch, q1 - q0), float("-inf"), dtype=cdt, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(*batch, q1 - q0, v.shape[-1], dtype=cdt, device=q.device)
        for k0, k1, needs_mask in tiles:
            scores = (qi @ k[..., k0:k1, :].to(cdt).transpose(-1, -2)) * s
            if needs_mask:
                rows = torch.arange(q0, q1, device=q.device)[:, None]
                cols = torch.arange(k0, k1, device=q.device)[None, :]
                scores = scores.masked_fill(cols > rows + (k.shape[-2] - lq), float("-inf"))
            m, l, acc = online_softmax_update(m, l, acc, scores, v[..., k0:k1, :].to(cdt))
        seen = l > 0
        out[..., q0:q1, :] = acc / torch.where(seen, l, torch.ones_like(l))[..., None]
        lse[..., q0:q1] = torch.where(seen, m + torch.log(torch.where(seen, l, torch.ones_like(l))), m)
    return out.to(q.dtype), lse


def flash_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass by recomputation: rebuild each probability tile from ``lse``.

    With ``D = rowsum(dO ⊙ O)``, for every tile ``P = exp(S - lse)``,
    ``dV += Pᵀ dO``, ``dP = dO Vᵀ``, ``dS = P ⊙ (dP - D)``,
    ``dQ += dS K · scale``, ``dK += dSᵀ Q · scale``.

    Returns ``(dq, dk, dv)`` in the dtypes of ``q, k, v``.
    """
    q, k, v = _check_qkv(q, k, v)
    _check_tensor("out", out)
    _check_tensor("lse", lse)
    _check_tensor("dout", dout)
    if out.shape != (*q.shape[:-1], v.shape[-1]) or dout.shape != out.shape:
        raise ValueError(
            f"out and dout must have shape {(*q.shape[:-1], v.shape[-1])}, got "
            f"{tuple(out.shape)} and {tuple(dout.shape)}"
        )
    if lse.shape != q.shape[:-1]:
        raise ValueError(f"lse must have shape {tuple(q.shape[:-1])}, got {tuple(lse.shape)}")
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    s = _scale_for(q, scale)
    cdt = _compute_dtype(q.dtype)
    lq, lk = q.shape[-2], k.shape[-2]
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    do = dout.to(cdt)
    d_rows = (do * out.to(cdt)).sum(dim=-1)  # D = rowsum(dO ⊙ O), (..., Lq)
    # Fully masked rows have lse = -inf; +inf makes exp(S - lse) = 0 there.
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).to(cdt)
    dq = torch.zeros_like(qc)
    dk = torch.zeros_like(kc)
    dv = torch.zeros_like(vc)
    for q0, q1, tiles in _block_ranges(lq, lk, block_q, block_k, causal):
        qi, doi = qc[..., q0:q1, :], do[..., q0:q1, :]
        li, di = lse_safe[..., q0:q1, None], d_rows[..., q0:q1, None]
        for k0, k1, needs_mask in tiles:
            kj, vj = kc[..., k0:k1, :], vc[..., k0:k1, :]
            scores = (qi @ kj.transpose(-1, -2)) * s
            if needs_mask:
                rows = torch.arange(q0, q1, device=q.device)[:, None]
                cols = torch.arange(k0, k1, device=q.device)[None, :]
                scores = scores.masked_fill(cols > rows + (lk - lq), float("-inf"))
            p = torch.exp(scores - li)  # the probabilities, recomputed
            dv[..., k0:k1, :] += p.transpose(-1, -2) @ doi
            dp = doi @ vj.transpose(-1, -2)
            ds = p * (dp - di)
            dq[..., q0:q1, :] += (ds @ kj) * s
            dk[..., k0:k1, :] += (ds.transpose(-1, -2) @ qi) * s
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: tiled forward, saves only ``q, k, v, out, lse``; tiled backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_q, block_k):  # type: ignore[override]
        out, lse = flash_attention_forward(
            q, k, v, causal=causal, scale=scale, block_q=block_q, block_k=block_k
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (causal, scale, block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, block_q, block_k = ctx.settings
        dq, dk, dv = flash_attention_backward(
            q, k, v, out, lse, dout,
            causal=causal, scale=scale, block_q=block_q, block_k=block_k,
        )
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """Differentiable tiled attention (:class:`FlashAttentionFunction`); returns the output only."""
    _check_qkv(q, k, v)
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), scale, block_q, block_k)


# --------------------------------------------------------------------------- a trace for the widget


@dataclass
class TileStep:
    """The state of one query block after one key block has been folded in (one head)."""

    q_range: tuple[int, int]
    k_range: tuple[int, int]
    masked: bool
    m: torch.Tensor  # (rows,) running max
    l: torch.Tensor  # (rows,) running sum
    partial_out: torch.Tensor  # (rows, Dv) = acc / l so far
    exact_out: torch.Tensor  # (rows, Dv) the final answer for these rows
    error: float  # max |partial_out - exact_out|
    skipped: list[tuple[int, int]] = field(default_factory=list)  # key blocks never loaded


def tile_trace(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    block_q: int = 16,
    block_k: int = 16,
    scale: float | None = None,
) -> list[TileStep]:
    """Run the tiled forward on one head ``(L, D)`` and record every step.

    Used by the chapter's widget: which tiles are resident, ``m`` and ``l`` as they
    evolve, and the partial output approaching the exact one.
    """
    q, k, v = _check_qkv(q, k, v)
    if q.dim() != 2:
        raise ValueError(f"tile_trace takes one head: q, k, v of shape (L, D), got {tuple(q.shape)}")
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    s = _scale_for(q, scale)
    q64, k64, v64 = q.double(), k.double(), v.double()
    exact = naive_attention(q64, k64, v64, causal=causal, scale=s)
    lq, lk = q.shape[0], k.shape[0]
    steps: list[TileStep] = []
    for q0, q1, tiles in _block_ranges(lq, lk, block_q, block_k, causal):
        m = torch.full((q1 - q0,), float("-inf"), dtype=torch.float64)
        l = torch.zeros(q1 - q0, dtype=torch.float64)
        acc = torch.zeros(q1 - q0, v.shape[-1], dtype=torch.float64)
        loaded = {k0 for k0, _, _ in tiles}
        skipped = [(k0, min(k0 + block_k, lk)) for k0 in range(0, lk, block_k) if k0 not in loaded]
        for k0, k1, needs_mask in tiles:
            scores = (q64[q0:q1] @ k64[k0:k1].T) * s
            if needs_mask:
                rows = torch.arange(q0, q1)[:, None]
                cols = torch.arange(k0, k1)[None, :]
                scores = scores.masked_fill(cols > rows + (lk - lq), float("-inf"))
            m, l, acc = online_softmax_update(m, l, acc, scores, v64[k0:k1])
            partial = acc / torch.where(l > 0, l, torch.ones_like(l))[:, None]
            steps.append(
                TileStep(
                    q_range=(q0, q1),
                    k_range=(k0, k1),
                    masked=needs_mask,
                    m=m.clone(),
                    l=l.clone(),
                    partial_out=partial,
                    exact_out=exact[q0:q1],
                    error=float((partial - exact[q0:q1]).abs().max()),
                    skipped=skipped,
                )
            )
    return steps


# --------------------------------------------------------------------------- IO accounting


class TwoLevelMemory:
    """A toy two-level memory: a large slow memory (HBM) and a fast memory (SRAM) of ``capacity`` elements.

    Algorithms call :meth:`load` to bring ``n`` elements into fast memory under a
    name, :meth:`store` to write ``n`` elements back, and :meth:`free` to drop a
    resident buffer. Every element moved counts ``bytes_per_element`` bytes. The
    fast memory refuses to hold more than its capacity, so an algorithm that
    "cheats" raises instead of producing a flattering count.
    """

    def __init__(self, capacity: int, *, bytes_per_element: int = 2) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int (elements), got {capacity!r}")
        if bytes_per_element not in (1, 2, 4, 8):
            raise ValueError(f"bytes_per_element must be 1, 2, 4 or 8, got {bytes_per_element!r}")
        self.capacity = capacity
        self.bytes_per_element = bytes_per_element
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
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int (elements), got {n!r}")
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
        return self.read_bytes + self.write_bytes


def _check_io_args(n: int, d: int, capacity: int) -> None:
    for name, value in (("n", n), ("d", d), ("capacity", capacity)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


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
    _check_io_args(n, d, capacity)
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
    _check_io_args(n, d, capacity)
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
    _check_io_args(n, d, capacity)
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


# --------------------------------------------------------------------------- checkers


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _update_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(101)
    cases = []
    # first block: m = -inf, l = 0, acc = 0
    r, c, dv = 4, 5, 3
    cases.append(Case(
        "first block (m = -inf, l = 0, acc = 0)",
        (torch.full((r,), float("-inf"), dtype=torch.float64), torch.zeros(r, dtype=torch.float64),
         torch.zeros(r, dv, dtype=torch.float64), _randn(gen, r, c) * 3, _randn(gen, c, dv)),
    ))
    # a later block where the maximum grows for some rows and not others
    m = _randn(gen, r) * 2
    scores = _randn(gen, r, c) * 3
    cases.append(Case(
        "later block, the maximum changes in some rows",
        (m, torch.rand(r, generator=gen, dtype=torch.float64) * 5 + 1, _randn(gen, r, dv), scores, _randn(gen, c, dv)),
    ))
    # batched (B, H, R) with large scores (overflow without subtracting the max)
    b, h = 2, 3
    cases.append(Case(
        "batched (B=2, H=3), scores around 500",
        (_randn(gen, b, h, r) + 500, torch.rand(b, h, r, generator=gen, dtype=torch.float64) + 1,
         _randn(gen, b, h, r, dv), _randn(gen, b, h, r, c) + 500, _randn(gen, b, h, c, dv)),
    ))
    # masked entries (-inf), including a row that is entirely masked so far
    scores = _randn(gen, r, c)
    scores[0, :] = float("-inf")
    scores[1, 2:] = float("-inf")
    m0 = torch.tensor([float("-inf"), 0.5, 1.0, -1.0], dtype=torch.float64)
    l0 = torch.tensor([0.0, 2.0, 1.5, 3.0], dtype=torch.float64)
    acc0 = _randn(gen, r, dv)
    acc0[0] = 0.0
    cases.append(Case("masked scores, one row fully masked so far", (m0, l0, acc0, scores, _randn(gen, c, dv))))
    # non-contiguous inputs (views of transposed storage), float32
    v_t = _randn(gen, dv, c, dtype=torch.float32).T  # (c, dv) non-contiguous
    s_t = _randn(gen, c, r, dtype=torch.float32).T
    cases.append(Case(
        "float32, non-contiguous scores and v",
        (_randn(gen, r, dtype=torch.float32), torch.rand(r, generator=gen) + 1,
         _randn(gen, r, dv, dtype=torch.float32), s_t, v_t),
    ))
    return cases


def check_online_softmax_update(fn: Callable[..., object]) -> CheckResult:
    """Check ``fn(m, l, acc, scores, v) -> (m_new, l_new, acc_new)`` against :func:`online_softmax_update`."""
    return check_function(
        fn,
        online_softmax_update,
        _update_cases(),
        exercise="online_softmax_update",
        atol=1e-6,
        rtol=1e-5,
        hint="m_new = max(m, rowmax(scores)); rescale the old l and acc by exp(m - m_new) "
        "before adding this block; a row that is all -inf so far must stay at l = 0, acc = 0.",
        output_names=("m_new", "l_new", "acc_new"),
    )


def _attention_cases(with_dout: bool) -> list[Case]:
    gen = torch.Generator().manual_seed(202)
    specs = [
        # name, (B, H, Lq, Lk, D), causal, block_q, block_k, dtype
        ("not causal, L=37 (not a multiple of the blocks)", (1, 2, 37, 37, 8), False, 16, 8, torch.float64),
        ("causal, L=40", (2, 1, 40, 40, 8), True, 16, 16, torch.float64),
        ("causal with uneven blocks, L=33", (1, 2, 33, 33, 4), True, 8, 16, torch.float64),
        ("causal, Lq=20 > Lk=12: the first 8 rows see no key", (1, 1, 20, 12, 4), True, 8, 8, torch.float64),
        ("cross attention, Lq=9, Lk=30", (1, 2, 9, 30, 8), False, 4, 16, torch.float64),
        ("float32, non-contiguous q (a transposed view)", (1, 2, 24, 24, 8), True, 16, 8, torch.float32),
    ]
    cases = []
    for name, (b, h, lq, lk, d), causal, bq, bk, dtype in specs:
        if "non-contiguous" in name:
            q = _randn(gen, b, lq, h, d, dtype=dtype).transpose(1, 2)
        else:
            q = _randn(gen, b, h, lq, d, dtype=dtype)
        k = _randn(gen, b, h, lk, d, dtype=dtype)
        v = _randn(gen, b, h, lk, d, dtype=dtype)
        kwargs = {"causal": causal, "block_q": bq, "block_k": bk}
        if with_dout:
            out, lse = flash_attention_forward(q, k, v, causal=causal, block_q=bq, block_k=bk)
            dout = _randn(gen, b, h, lq, d, dtype=dtype)
            cases.append(Case(name, (q, k, v, out, lse, dout), kwargs))
        else:
            cases.append(Case(name, (q, k, v), kwargs))
    return cases


def _forward_reference(q, k, v, causal=False, block_q=64, block_k=64):
    return flash_attention_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)


def check_flash_forward(fn: Callable[..., object]) -> CheckResult:
    """Check ``fn(q, k, v, causal=..., block_q=..., block_k=...) -> (out, lse)``.

    ``out`` must equal dense attention and ``lse`` the row logsumexp of the scaled
    scores (``-inf`` for a row that sees no key; its output row is zeros).
    """
    return check_function(
        fn,
        _forward_reference,
        _attention_cases(with_dout=False),
        exercise="flash_forward",
        atol=1e-5,
        rtol=1e-4,
        hint="loop over query blocks, then key blocks; with causal=True mask key j > i + (Lk - Lq) "
        "and skip blocks that are entirely masked; divide by l once at the end and return "
        "(out, m + log l).",
        output_names=("out", "lse"),
    )


def _backward_reference(q, k, v, out, lse, dout, causal=False, block_q=64, block_k=64):
    return flash_attention_backward(q, k, v, out, lse, dout, causal=causal, block_q=block_q, block_k=block_k)


def check_flash_backward(fn: Callable[..., object]) -> CheckResult:
    """Check ``fn(q, k, v, out, lse, dout, causal=..., block_q=..., block_k=...) -> (dq, dk, dv)``."""
    return check_function(
        fn,
        _backward_reference,
        _attention_cases(with_dout=True),
        exercise="flash_backward",
        atol=1e-5,
        rtol=1e-4,
        hint="recompute P = exp(scale·QKᵀ - lse) per tile (0 where masked); D = rowsum(dO ⊙ O); "
        "dS = P ⊙ (dO Vᵀ - D); dQ += dS K·scale, dK += dSᵀ Q·scale, dV += Pᵀ dO.",
        output_names=("dq", "dk", "dv"),
    )
