"""2-D scan orders for recurrent mixers, and a small selective recurrence to run along them.

A recurrent mixer reads a *sequence*; an image is a grid. A **scan order** is a permutation ``perm`` of the
``N = H·W`` patches (row-major indices): step ``k`` of the scan reads patch ``perm[k]``. Reordering is a gather
``x[:, perm]``; putting the outputs back where the patches are is the gather with the inverse permutation
``y[:, inverse(perm)]`` (``inverse[perm[k]] = k``). A *multi-direction* order (Vim's bidirectional scan, VMamba's
four-way cross-scan) runs one mixer per direction and sums their outputs once each is back in patch order.

================================  =====================================================================
``SCAN_ORDERS``                   ``row``, ``column``, ``snake``, ``bidirectional`` (Vim, arXiv:2401.09417),
                                  ``cross`` (VMamba's SS2D cross-scan, arXiv:2401.10166)
``scan_permutations``             the permutation(s) of one order, as int64 tensors
``inverse_permutation``           ``inv`` with ``inv[perm] = arange(N)``
``seen_mask``                     which patches a causal scan has read when it reaches each patch
``neighbour_distance``            how many scan steps separate 2-D neighbours (per axis)
``diagonal_recurrence``           ``h_t = a_t ⊙ h_{t-1} + (1 − a_t) ⊙ u_t``, chunked (the fast path)
``GatedRecurrence``               a selective diagonal recurrence as an ``lm`` sequence mixer (causal)
``ScanMixer`` / ``scan_mixer``    any causal mixer factory run along a scan order, merged back
================================  =====================================================================

``scan_mixer(order, grid_height, grid_width, inner=...)`` takes ``inner``, any ``lm`` mixer factory
``(d_model, layer_index) -> nn.Module``: swapping the recurrence for another family's mixer is one argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.validation import require_choice, require_positive_int, require_tensor
from labsupport.lm.contracts import MixerFactory

__all__ = [
    "SCAN_ORDERS",
    "GatedRecurrence",
    "ScanMixer",
    "diagonal_recurrence",
    "gated_recurrence_mixer",
    "inverse_permutation",
    "neighbour_distance",
    "scan_mixer",
    "scan_permutations",
    "seen_mask",
]

SCAN_ORDERS = ("row", "column", "snake", "bidirectional", "cross")


def _row(h: int, w: int) -> torch.Tensor:
    return torch.arange(h * w)


def _column(h: int, w: int) -> torch.Tensor:
    return torch.arange(h * w).view(h, w).t().reshape(-1)


def _snake(h: int, w: int) -> torch.Tensor:
    grid = torch.arange(h * w).view(h, w).clone()
    grid[1::2] = grid[1::2].flip(-1)  # odd rows right to left
    return grid.reshape(-1)


def scan_permutations(order: str, grid_height: int, grid_width: int) -> list[torch.Tensor]:
    """The permutation(s) of ``order`` on an ``H × W`` grid of patches: one per direction, each ``(N,)`` int64.

    ``row``: left to right, top to bottom. ``column``: top to bottom, left to right. ``snake``: rows in turn,
    alternating direction (consecutive steps are always 2-D neighbours). ``bidirectional``: ``row`` and its
    reverse (Vim). ``cross``: ``row``, ``column`` and both reversed (VMamba's four directions).
    """
    require_choice("order", order, SCAN_ORDERS)
    h, w = require_positive_int("grid_height", grid_height), require_positive_int("grid_width", grid_width)
    if order == "row":
        return [_row(h, w)]
    if order == "column":
        return [_column(h, w)]
    if order == "snake":
        return [_snake(h, w)]
    if order == "bidirectional":
        return [_row(h, w), _row(h, w).flip(0)]
    return [_row(h, w), _column(h, w), _row(h, w).flip(0), _column(h, w).flip(0)]


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[k]] = k``: the gather that puts scanned outputs back in patch order.

    Raises ``ValueError`` when ``perm`` is not a permutation of ``0..N-1``.
    """
    perm = require_tensor("perm", perm, ndim=1)
    if perm.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"perm must be an integer tensor, got {perm.dtype}")
    n = perm.numel()
    if not torch.equal(torch.sort(perm).values, torch.arange(n, dtype=perm.dtype)):
        raise ValueError(f"perm is not a permutation of 0..{n - 1}")
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n, dtype=perm.dtype)
    return inv


def seen_mask(order: str, grid_height: int, grid_width: int) -> torch.Tensor:
    """``(N, N)`` bool: ``mask[i, j]`` is True when patch ``i``'s output can depend on patch ``j``.

    One causal pass: the token at patch ``i`` has read the patches scanned up to and including itself. A
    multi-direction order sums its directions, so a patch sees the union of what each direction showed it.
    """
    perms = scan_permutations(order, grid_height, grid_width)
    n = perms[0].numel()
    mask = torch.zeros(n, n, dtype=torch.bool)
    for perm in perms:
        step = inverse_permutation(perm)               # step[i]: when patch i is read
        mask |= step[None, :] <= step[:, None]         # j read no later than i
    return mask


def neighbour_distance(order: str, grid_height: int, grid_width: int) -> dict[str, float]:
    """Mean number of scan steps between horizontally and between vertically adjacent patches.

    For a multi-direction order, each pair counts the shortest distance over the directions.
    """
    h, w = require_positive_int("grid_height", grid_height), require_positive_int("grid_width", grid_width)
    steps = [inverse_permutation(p).view(h, w) for p in scan_permutations(order, h, w)]
    horizontal = torch.stack([(s[:, 1:] - s[:, :-1]).abs() for s in steps]).min(0).values if w > 1 else None
    vertical = torch.stack([(s[1:] - s[:-1]).abs() for s in steps]).min(0).values if h > 1 else None
    return {"horizontal": float(horizontal.float().mean()) if horizontal is not None else float("nan"),
            "vertical": float(vertical.float().mean()) if vertical is not None else float("nan")}


def diagonal_recurrence(log_a: torch.Tensor, u: torch.Tensor, *, chunk: int = 16) -> torch.Tensor:
    """All states of ``h_t = a_t ⊙ h_{t-1} + u_t`` (``h_{-1} = 0``), from ``log a`` and ``u``, both ``(B, L, D)``.

    Chunked: inside a chunk of ``C`` steps the states are a masked ``(C, C)`` weighted sum with weights
    ``exp(Σ_{s<r≤t} log a_r) ≤ 1`` (no overflow); one state is carried from chunk to chunk.
    """
    log_a, u = require_tensor("log_a", log_a, ndim=3), require_tensor("u", u, ndim=3)
    if log_a.shape != u.shape:
        raise ValueError(f"log_a and u must have one shape, got {tuple(log_a.shape)} and {tuple(u.shape)}")
    chunk = require_positive_int("chunk", chunk)
    b, length, d = u.shape
    pad = (-length) % chunk
    if pad:
        log_a = F.pad(log_a, (0, 0, 0, pad))
        u = F.pad(u, (0, 0, 0, pad))
    n = (length + pad) // chunk
    la = log_a.view(b, n, chunk, d)
    uu = u.view(b, n, chunk, d)
    cum = la.cumsum(dim=2)                                              # (B, n, C, D)
    diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]                # (B, n, t, s, D): Σ_{s<r≤t} log a_r
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=u.device).tril()
    weights = torch.where(causal[None, None, :, :, None], diff, diff.new_full((), float("-inf"))).exp()
    intra = (weights * uu[:, :, None, :, :]).sum(dim=3)                # (B, n, C, D)
    decay = cum.exp()                                                   # from the chunk's start to step t
    states = []
    carry = u.new_zeros(b, d)
    for j in range(n):
        block = intra[:, j] + decay[:, j] * carry[:, None, :]
        states.append(block)
        carry = block[:, -1]
    return torch.cat(states, dim=1)[:, :length]


class GatedRecurrence(nn.Module):
    """A selective diagonal recurrence (causal): a small stand-in for chapter 04's SSMs.

    ``a_t = σ(W_a x_t + b)`` (per channel, input-dependent: *selective*),
    ``h_t = a_t ⊙ h_{t-1} + (1 − a_t) ⊙ (W_u x_t)``, ``y_t = W_o (h_t ⊙ silu(W_g x_t))``.
    The state is ``d_model`` numbers per sequence, whatever the length.
    """

    causal = True

    def __init__(self, d_model: int, *, chunk: int = 16) -> None:
        super().__init__()
        self.d_model = require_positive_int("d_model", d_model)
        self.chunk = require_positive_int("chunk", chunk)
        self.in_proj = nn.Linear(d_model, 3 * d_model)    # gate logits, input, output gate
        self.out = nn.Linear(d_model, d_model)
        self.init_weights()

    def init_weights(self) -> None:
        """Start with memories of about 10 steps (``a ≈ 0.9``), as selective SSMs start with slow decays."""
        with torch.no_grad():
            self.in_proj.bias[: self.d_model].fill_(2.2)

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"GatedRecurrence expects (batch, length, d_model={self.d_model}), got {shape}")
        gate, value, out_gate = self.in_proj(x).chunk(3, dim=-1)
        log_a = F.logsigmoid(gate)
        return log_a, (1 - log_a.exp()) * value, out_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``, causal: one step at a time.

        On a CPU at this chapter's sizes (tens of patches, width 32) the step loop, two element-wise
        operations per step, trains faster than the chunked form (:meth:`forward_chunked`); both are
        the same function, and the tests hold them equal.
        """
        log_a, u, out_gate = self._parts(x)
        a = log_a.exp()
        h = u.new_zeros(u.shape[0], u.shape[2])
        states = []
        for t in range(u.shape[1]):
            h = a[:, t] * h + u[:, t]
            states.append(h)
        return self.out(torch.stack(states, dim=1) * F.silu(out_gate))

    def forward_chunked(self, x: torch.Tensor) -> torch.Tensor:
        """The same output through :func:`diagonal_recurrence` (chunks of ``self.chunk`` steps)."""
        log_a, u, out_gate = self._parts(x)
        h = diagonal_recurrence(log_a, u, chunk=self.chunk)
        return self.out(h * F.silu(out_gate))

    def state_bytes(self, batch: int = 1) -> int:
        """Bytes of the recurrent state of one sequence batch (the size of ``h``), in the parameters' dtype."""
        return require_positive_int("batch", batch) * self.d_model * self.out.weight.element_size()


def gated_recurrence_mixer(*, chunk: int = 16) -> MixerFactory:
    """An ``lm`` mixer factory that builds :class:`GatedRecurrence` in every layer."""
    chunk = require_positive_int("chunk", chunk)

    def build(d_model: int, layer_index: int) -> nn.Module:
        return GatedRecurrence(d_model, chunk=chunk)
    return build


class ScanMixer(nn.Module):
    """Run one causal mixer per scan direction over a grid of patches and sum the outputs in patch order.

    Input and output are ``(B, N, d_model)`` in row-major patch order. Direction ``k`` gathers
    ``x[:, perm_k]``, runs its own mixer, and gathers back with ``inverse(perm_k)``.
    """

    causal = False  # over the image as a whole: what a patch sees depends on the order (see seen_mask)

    def __init__(self, d_model: int, layer_index: int, order: str, grid_height: int, grid_width: int,
                 inner: MixerFactory) -> None:
        super().__init__()
        self.order = require_choice("order", order, SCAN_ORDERS)
        perms = scan_permutations(order, grid_height, grid_width)
        self.register_buffer("perms", torch.stack(perms), persistent=False)
        self.register_buffer("inverses", torch.stack([inverse_permutation(p) for p in perms]), persistent=False)
        self.directions = nn.ModuleList(inner(d_model, layer_index) for _ in perms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, d_model) -> (B, N, d_model)``."""
        if x.dim() != 3 or x.shape[1] != self.perms.shape[1]:
            raise ValueError(f"ScanMixer expects (batch, {self.perms.shape[1]} patches, d_model), got {tuple(x.shape)}")
        if all(type(m) is GatedRecurrence for m in self.directions):
            return self._forward_batched(x)
        out = torch.zeros_like(x)
        for perm, inv, mixer in zip(self.perms, self.inverses, self.directions):
            out = out + mixer(x[:, perm])[:, inv]
        return out

    def _forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """The same sum, with the directions' step loops run as one (each keeps its own weights)."""
        parts = [m._parts(x[:, perm]) for perm, m in zip(self.perms, self.directions)]
        a = torch.cat([p[0] for p in parts]).exp()            # (K·B, N, D)
        u = torch.cat([p[1] for p in parts])
        h = u.new_zeros(u.shape[0], u.shape[2])
        states = []
        for t in range(u.shape[1]):
            h = a[:, t] * h + u[:, t]
            states.append(h)
        hs = torch.stack(states, dim=1).chunk(len(parts))
        out = torch.zeros_like(x)
        for h_k, (_, _, gate), inv, m in zip(hs, parts, self.inverses, self.directions):
            out = out + m.out(h_k * F.silu(gate))[:, inv]
        return out

    def state_bytes(self, batch: int = 1) -> int:
        """Recurrent state of all directions (each direction's mixer must report ``state_bytes``)."""
        return sum(int(m.state_bytes(batch)) for m in self.directions)


def scan_mixer(order: str, grid_height: int, grid_width: int,
               inner: MixerFactory | None = None) -> Callable[[int, int], nn.Module]:
    """An ``lm`` mixer factory: :class:`ScanMixer` along ``order`` with ``inner`` (default: the gated recurrence)."""
    require_choice("order", order, SCAN_ORDERS)
    h, w = require_positive_int("grid_height", grid_height), require_positive_int("grid_width", grid_width)
    inner = inner if inner is not None else gated_recurrence_mixer()

    def build(d_model: int, layer_index: int) -> nn.Module:
        return ScanMixer(d_model, layer_index, order, h, w, inner)
    return build
