"""A fused selective scan: from ``(Δ, A, B, C, x)`` in blocks of tokens, never the ``(batch, L, D, N)`` tensors.

:func:`~labsupport.ssm.reference.selective_scan` first *expands* the layer's inputs into the scan's
elements ``a = exp(Δ A)`` and ``b = Δ B x``, each ``(batch, L, D, N)`` — ``N`` (16 in Mamba) times
the size of the activations — then scans them and writes every state ``h_t``, another tensor of that
size, before reducing ``y_t = C_t · h_t``. Mamba's CUDA kernel (Gu & Dao, arXiv:2312.00752, §3.3.2)
never writes those tensors to GPU main memory: it loads ``Δ, A, B, C, x`` into on-chip SRAM, computes
``exp(ΔA)`` and ``ΔBx`` there, runs a parallel scan inside each block of tokens with the state carried
between blocks, writes only ``y``, and recomputes the expanded tensors in the backward pass instead
of storing them.

:func:`fused_selective_scan` is that *schedule* in PyTorch: the sequence is cut into blocks of
``block`` tokens; for each block the expanded ``(batch, block, D, N)`` elements are built, scanned
from the carried state (with :func:`~labsupport.ssm.scans.chunked_scan`), read out and dropped. Peak
memory is set by the block, not by ``L``, and when a block's working set fits in the CPU's cache the
expanded tensors never travel to main memory. It is still eager PyTorch — every operation writes its
result to memory before the next reads it — so it is a model of the kernel's data flow, not the
kernel. :func:`selective_scan_traffic` counts the bytes each schedule moves.
"""

from __future__ import annotations

import torch

from labsupport.harness.validation import require_int, require_positive_int
from labsupport.ssm.reference import _check_selective
from labsupport.ssm.scans import chunked_scan

__all__ = ["fused_selective_scan", "selective_scan_traffic"]


def fused_selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         D: torch.Tensor | None = None, h0: torch.Tensor | None = None, *,
                         block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective SSM, block by block: the same contract and numbers as ``selective_scan``.

    ``u, delta (batch, L, D)``, ``A (D, N)``, ``B, C (batch, L, N)``, ``D (D,)`` or ``None``,
    ``h0 (batch, D, N)`` or ``None`` → ``(y (batch, L, D), last state (batch, D, N))``. The largest
    tensor it creates is ``(batch, block, D, N)``. Differentiable (each block's scan has a backward).
    """
    _check_selective(u, delta, A, B, C)
    block = require_positive_int("block", block)
    length = u.shape[1]
    state = h0
    ys = []
    for start in range(0, length, block):
        stop = min(start + block, length)
        d_blk = delta[:, start:stop]
        a = torch.exp(d_blk[..., None] * A)                                      # (batch, T, D, N)
        b = (d_blk * u[:, start:stop])[..., None] * B[:, start:stop, None, :]    # (batch, T, D, N)
        h = chunked_scan(a, b, state)
        ys.append(torch.einsum("btdn,btn->btd", h, C[:, start:stop]))
        state = h[:, -1]
    y = torch.cat(ys, dim=1)
    if D is not None:
        y = y + D * u
    return y, state


def selective_scan_traffic(batch: int, length: int, channels: int, d_state: int, *, bytes_per_number: int = 4,
                           block: int | None = None) -> dict[str, int]:
    """Bytes moved to and from main memory by one selective-scan forward, counted tensor by tensor.

    * ``"expanded (selective_scan)"``: the library's unfused path with the chunked scan. Of
      ``(batch, L, D, N)`` size it writes ``ΔA``, ``a = exp(ΔA)``, ``b``, ``h`` and ``h ⊙ C`` (5
      tensors) and reads ``ΔA`` once, ``a`` and ``b`` twice each (the chunked scan's two sweeps),
      ``h`` and ``h ⊙ C`` once (7 reads): 12 full-size passes, plus the inputs and ``y``.
    * ``"fused, block in cache"``: the same passes on ``(batch, block, D, N)`` pieces that stay in
      cache, so main memory sees only the inputs ``x, Δ (batch, L, D)``, ``B, C (batch, L, N)``,
      ``A (D, N)`` and the output ``y (batch, L, D)`` — what Mamba's kernel moves.
    * ``"working set per block"``: the expanded bytes alive at once inside a block (``a, b, h`` and one
      temporary), which must fit in cache for the previous line to hold (``block`` needed).
    """
    batch, length = require_positive_int("batch", batch), require_positive_int("length", length)
    channels, d_state = require_positive_int("channels", channels), require_positive_int("d_state", d_state)
    bytes_per_number = require_positive_int("bytes_per_number", bytes_per_number)
    inputs_outputs = (3 * batch * length * channels + 2 * batch * length * d_state
                      + channels * d_state) * bytes_per_number
    expanded = batch * length * channels * d_state * bytes_per_number
    counts = {"expanded (selective_scan)": 12 * expanded + inputs_outputs, "fused, block in cache": inputs_outputs}
    if block is not None:
        block = require_int("block", block, minimum=1)
        counts["working set per block"] = 4 * batch * min(block, length) * channels * d_state * bytes_per_number
    return counts
