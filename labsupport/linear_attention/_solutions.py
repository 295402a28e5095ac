"""Chapter 03's reference solutions of its core exercises: private, so a notebook's ``la.<name>`` never shows one.

* :func:`chunkwise_decay_step` — one chunk with a scalar decay per head and token (exercise 4);
* :func:`gated_delta_chunk_step` — one chunk of gated DeltaNet through the UT transform (exercise 5).

The checkers (:mod:`labsupport.linear_attention.exercises`, :mod:`labsupport.linear_attention.exercises_core`)
compare a learner's function with these; the tests use them as the right answer.
"""

from __future__ import annotations

import math

import torch

from labsupport.harness.validation import require_float_tensor

__all__ = ["chunkwise_decay_step", "gated_delta_chunk_step", "require_chunk_inputs"]


def require_chunk_inputs(state: object, q: object, k: object, v: object) -> None:
    """One chunk's ``state (B, H, D_k, D_v)``, ``q, k (B, H, C, D_k)`` and ``v (B, H, C, D_v)``."""
    for name, x in (("state", state), ("q", q), ("k", k), ("v", v)):
        require_float_tensor(name, x, ndim=4)
    if q.shape != k.shape or v.shape[:3] != k.shape[:3] or state.shape != (*k.shape[:2], k.shape[-1], v.shape[-1]):
        raise ValueError("expected state (B, H, D_k, D_v), q and k (B, H, C, D_k), v (B, H, C, D_v); got "
                         f"{tuple(state.shape)}, {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def chunkwise_decay_step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of linear attention with a scalar decay per head and token (RetNet, a scalar gate).

    With ``b_i = Σ_{r ≤ i} log α_r`` the cumulative log-decay from the chunk start
    (token ``i`` included) and ``b_C`` its last entry::

        O  = (exp(b) ⊙ Q) S + (Q Kᵀ ⊙ Γ) V        Γ_ij = exp(b_i − b_j) for j ≤ i, else 0
        S' = exp(b_C) S + (exp(b_C − b) ⊙ K)ᵀ V

    This is one chunk of :func:`linear_attention_chunkwise`.

    Args:
        state: ``(B, H, D_k, D_v)``; q, k: ``(B, H, C, D_k)``; v: ``(B, H, C, D_v)``;
        log_decay: ``(B, H, C)``, ``<= 0``.

    Returns:
        ``(O, new_state)`` with ``O`` of shape ``(B, H, C, D_v)``.
    """
    require_chunk_inputs(state, q, k, v)
    require_float_tensor("log_decay", log_decay, ndim=3)
    if log_decay.shape != k.shape[:3]:
        raise ValueError(f"log_decay must have shape (B, H, C) = {tuple(k.shape[:3])}, got {tuple(log_decay.shape)}")
    c = k.shape[2]
    b = log_decay.cumsum(-1)  # (B, H, C)
    causal = torch.ones(c, c, dtype=torch.bool, device=k.device).tril()
    gamma = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    out = (q * b.exp()[..., None]) @ state + ((q @ k.transpose(-1, -2)) * gamma) @ v
    new_state = b[..., -1:, None].exp() * state + (k * (b[..., -1:] - b).exp()[..., None]).transpose(-1, -2) @ v
    return out, new_state


def _require_delta_chunk(state: object, q: object, k: object, v: object, beta: object, log_decay: object) -> None:
    for name, x in (("state", state), ("q", q), ("k", k), ("v", v)):
        require_float_tensor(name, x, ndim=4)
    for name, x in (("beta", beta), ("log_decay", log_decay)):
        require_float_tensor(name, x, ndim=3)
    if (q.shape != k.shape or v.shape[:3] != k.shape[:3] or state.shape != (*k.shape[:2], k.shape[-1], v.shape[-1])
            or beta.shape != k.shape[:3] or log_decay.shape != k.shape[:3]):
        raise ValueError("expected state (B, H, D_k, D_v), q and k (B, H, C, D_k), v (B, H, C, D_v), beta and "
                         f"log_decay (B, H, C); got {tuple(state.shape)}, {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(beta.shape)}, {tuple(log_decay.shape)}")


def gated_delta_chunk_step(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           beta: torch.Tensor, log_decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of gated DeltaNet, chunkwise (UT transform), from the state before the chunk.

    Token ``i`` of the chunk does ``S_i = α_i (I − β_i k_i k_iᵀ) S_{i−1} + β_i k_i v_iᵀ`` and reads
    ``o_i = S_iᵀ q_i``. With ``b = cumsum(log α)`` inside the chunk (token ``i``'s own gate included)
    and ``Γ_ij = exp(b_i − b_j)``:

    * ``T = (I + StrictLower(diag(β) (K Kᵀ ⊙ Γ)))⁻¹ diag(β)`` (a triangular solve);
    * the corrected values ``U = T V − T (exp(b) ⊙ K) S``;
    * ``O = (exp(b) ⊙ Q) S + (Q Kᵀ ⊙ Γ ⊙ causal) U`` and ``S' = exp(b_C) S + (exp(b_C − b) ⊙ K)ᵀ U``.

    Args:
        state: ``(B, H, D_k, D_v)``; q, k: ``(B, H, C, D_k)``; v: ``(B, H, C, D_v)``;
        beta: ``(B, H, C)`` write strengths; log_decay: ``(B, H, C)``, ``≤ 0``.

    Returns:
        ``(O (B, H, C, D_v), new_state (B, H, D_k, D_v))``.
    """
    _require_delta_chunk(state, q, k, v, beta, log_decay)
    c = k.shape[2]
    b = log_decay.cumsum(-1)                                              # (B, H, C)
    causal = torch.ones(c, c, dtype=torch.bool, device=k.device).tril()
    diff = b[..., :, None] - b[..., None, :]                             # b_i − b_j
    gamma = diff.masked_fill(~causal, -math.inf).exp()                    # Γ ⊙ causal (diagonal included)
    a = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * gamma).tril(-1)
    eye = torch.eye(c, dtype=k.dtype, device=k.device)
    t = torch.linalg.solve_triangular(eye + a, torch.diag_embed(beta), upper=False, unitriangular=True)
    w = t @ (k * b.exp()[..., None])                                      # (B, H, C, D_k)
    u = t @ v - w @ state                                                 # the chunk's corrected values
    out = (q * b.exp()[..., None]) @ state + ((q @ k.transpose(-1, -2)) * gamma) @ u
    k_written = k * (b[..., -1:] - b).exp()[..., None]
    new_state = b[..., -1:, None].exp() * state + k_written.transpose(-1, -2) @ u
    return out, new_state
