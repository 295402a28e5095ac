"""Chapter 03: linear attention and the memory-update view.

Every mechanism in this chapter keeps a fixed-size matrix memory ``S`` of
shape ``(D_k, D_v)`` per head and updates it once per token. They differ only
in how they *forget* (what multiplies the old state) and how they *write*
(what is added)::

    mechanism        forget                          write
    linear attention S                               + k vᵀ
    RetNet           γ_h · S        (fixed per head) + k vᵀ
    GLA              diag(α_t) · S  (per token, dim) + k vᵀ
    DeltaNet         (I − β_t k kᵀ) · S              + β_t k vᵀ
    gated DeltaNet   α_t (I − β_t k kᵀ) · S          + β_t k vᵀ
    TTT-linear       one gradient step on ½‖Sᵀk − v‖² with step size η (= DeltaNet, β = η)

and every one reads with ``o_t = S_tᵀ q_t``.

Conventions
-----------
* Tensors are ``(B, H, L, D)``. Keys and queries share ``D_k``; values have ``D_v``.
* Feature maps (``elu(x) + 1``, L2 normalisation) are applied by the caller,
  so these functions take the features ``φ(q), φ(k)`` directly.
* Decay is passed as its logarithm, ``log_decay`` ≤ 0: ``None`` (no decay),
  ``(B, H, L)`` for a scalar per head and token (RetNet, gated DeltaNet), or
  ``(B, H, L, D_k)`` for one gate per key dimension (GLA). Logs keep long
  products of gates stable: ``Π α = exp(Σ log α)``.
* ``normalize=True`` divides by ``φ(q_t)ᵀ z_t`` with ``z_t`` the (decayed) sum
  of keys, as in Katharopoulos et al. The normaliser is computed as one more
  value column of ones, so with ``return_state=True`` a normalised state has
  ``D_v + 1`` columns, the last being ``z``.
* The same computation comes in three forms: ``*_parallel`` (an ``L × L``
  matrix, like softmax attention), ``*_recurrent`` (a loop over tokens with a
  fixed-size state) and ``*_chunkwise`` (parallel inside chunks of ``C``
  tokens, recurrent across chunks). The tests prove them equal in float64.

Contents
--------
References: :func:`elu_feature_map`, :func:`retnet_log_decay`,
:func:`linear_attention_parallel`, :func:`linear_attention_recurrent`,
:func:`linear_attention_chunkwise`, :func:`linear_attention_chunkwise_fast`,
:func:`delta_rule_parallel`,
:func:`delta_rule_recurrent`, :func:`delta_rule_chunkwise`, :func:`ut_transform`,
:func:`ttt_linear`, :func:`ttt_linear_minibatch`, :func:`ttt_inner_loss`, :func:`memory_recurrence` (the
unified update). Step functions (also the exercises): :func:`recurrent_step`,
:func:`chunkwise_step`, :func:`chunkwise_decay_step`, :func:`delta_rule_step`. Cost helpers:
:func:`chunkwise_flops`, :func:`recurrent_state_bytes`. Widget data:
:func:`memory_decay_data`, :func:`memory_decay_figure`. Checkers:
:func:`check_recurrent_step`, :func:`check_chunkwise_step`,
:func:`check_chunkwise_decay_step`, :func:`check_delta_rule_step`. Sequence mixers for ``TinyLM`` live in
:mod:`labsupport.linear_attention_mixers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labsupport.harness.checking import Case, CheckResult, check_function

__all__ = [
    "MECHANISMS",
    "elu_feature_map",
    "retnet_log_decay",
    "linear_attention_parallel",
    "linear_attention_recurrent",
    "linear_attention_chunkwise",
    "linear_attention_chunkwise_fast",
    "delta_rule_parallel",
    "delta_rule_recurrent",
    "delta_rule_chunkwise",
    "ut_transform",
    "ttt_inner_loss",
    "ttt_linear",
    "ttt_linear_minibatch",
    "memory_recurrence",
    "recurrent_step",
    "chunkwise_step",
    "chunkwise_decay_step",
    "delta_rule_step",
    "chunkwise_flops",
    "recurrent_state_bytes",
    "MemoryDecayData",
    "memory_decay_data",
    "memory_decay_figure",
    "check_recurrent_step",
    "check_chunkwise_step",
    "check_chunkwise_decay_step",
    "check_delta_rule_step",
]

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: The mechanisms of the chapter: how each forgets and how each writes.
MECHANISMS: dict[str, dict[str, str]] = {
    "linear": {"forget": "S (nothing is forgotten)", "write": "+ k vᵀ"},
    "retnet": {"forget": "γ_h S (fixed decay per head)", "write": "+ k vᵀ"},
    "gla": {"forget": "diag(α_t) S (data-dependent gate per key dimension)", "write": "+ k vᵀ"},
    "deltanet": {"forget": "(I − β_t k kᵀ) S (erase what k currently points to)", "write": "+ β_t k vᵀ"},
    "gated_deltanet": {"forget": "α_t (I − β_t k kᵀ) S (decay, then erase)", "write": "+ β_t k vᵀ"},
    "ttt": {"forget": "S − η k kᵀ S (gradient step on ½‖Sᵀk − v‖²)", "write": "+ η k vᵀ"},
}


# --------------------------------------------------------------------------- validation


def _check_tensor(name: str, x: object, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _check_qkv(q: object, k: object, v: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = _check_tensor("q", q, 4)
    k = _check_tensor("k", k, 4)
    v = _check_tensor("v", v, 4)
    if q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape (B, H, L, D_k), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must be (B, H, L, D_v) with the B, H, L of k {tuple(k.shape[:3])}, got {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] == 0:
        raise ValueError("the sequence is empty (L = 0)")
    return q, k, v


def _check_log_decay(log_decay: object, k: torch.Tensor, *, vector_ok: bool = True) -> torch.Tensor | None:
    if log_decay is None:
        return None
    log_decay = _check_tensor("log_decay", log_decay)
    b, h, length, dk = k.shape
    shapes = [(b, h, length)] + ([(b, h, length, dk)] if vector_ok else [])
    if tuple(log_decay.shape) not in shapes:
        allowed = " or ".join(str(s) for s in shapes)
        raise ValueError(f"log_decay must have shape {allowed} (B, H, L[, D_k]), got {tuple(log_decay.shape)}")
    if bool((log_decay > 0).any()):
        raise ValueError("log_decay must be <= 0 (a decay factor α = exp(log_decay) in (0, 1])")
    return log_decay.to(k.dtype)


def _check_beta(beta: object, k: torch.Tensor, name: str = "beta") -> torch.Tensor:
    if isinstance(beta, (int, float)) and not isinstance(beta, bool):
        return torch.full(k.shape[:3], float(beta), dtype=k.dtype, device=k.device)
    beta = _check_tensor(name, beta)
    if tuple(beta.shape) != tuple(k.shape[:3]):
        raise ValueError(f"{name} must be a float or have shape (B, H, L) = {tuple(k.shape[:3])}, got {tuple(beta.shape)}")
    return beta.to(k.dtype)


def _check_chunk(chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _check_state(state: object, b: int, h: int, dk: int, dv: int, like: torch.Tensor) -> torch.Tensor:
    if state is None:
        return like.new_zeros(b, h, dk, dv)
    state = _check_tensor("initial_state", state, 4)
    if tuple(state.shape) != (b, h, dk, dv):
        raise ValueError(f"initial_state must have shape (B, H, D_k, D_v) = {(b, h, dk, dv)}, got {tuple(state.shape)}")
    return state.to(like.dtype)


def _augment(v: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Append a column of ones to ``v``: the normaliser is then one more output column."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if normalize else v


def _finish(out: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    if not normalize:
        return out
    return out[..., :-1] / (out[..., -1:] + eps)


# --------------------------------------------------------------------------- feature maps and decays


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``φ(x) = elu(x) + 1``: positive features, so the normaliser ``φ(q)ᵀ Σ φ(k)`` is positive."""
    _check_tensor("x", x)
    return F.elu(x) + 1.0


def retnet_log_decay(n_heads: int, length: int, *, batch: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """RetNet's fixed per-head decay ``γ_h = 1 − 2^(−5−h)`` as ``log γ_h``, broadcast to ``(B, H, L)``."""
    for name, value in (("n_heads", n_heads), ("length", length), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    gamma = 1.0 - 2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64))
    return gamma.log().to(dtype)[None, :, None].expand(batch, n_heads, length).contiguous()


# --------------------------------------------------------------------------- linear attention with decay


def _decay_matrix(log_decay: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The causal score matrix ``A_ij = Σ_d q_id k_jd Π_{r=j+1..i} α_rd`` (0 for j > i), ``(B, H, L, L)``."""
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    if log_decay is None:
        return (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)
    if log_decay.dim() == 3:
        g = log_decay.cumsum(-1)  # G_i = Σ_{r≤i} log α_r
        diff = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf"))
        return (q @ k.transpose(-1, -2)) * diff.exp()
    g = log_decay.cumsum(-2)  # (B, H, L, D_k)
    diff = (g[:, :, :, None, :] - g[:, :, None, :, :]).masked_fill(~causal[..., None], float("-inf"))
    return torch.einsum("bhid,bhjd,bhijd->bhij", q, k, diff.exp())


def linear_attention_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    normalize: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Causal linear attention, parallel form: ``O = (Q Kᵀ ⊙ D) V`` with ``D`` the decay mask.

    ``D_ij = Π_{r=j+1..i} α_r`` for ``j ≤ i`` (all ones without decay) and 0 above
    the diagonal. With a per-dimension gate (GLA) the decay sits inside the dot
    product. Costs ``O(L² D)`` time and an ``L × L`` matrix, like softmax attention.

    Args:
        q, k: features ``(B, H, L, D_k)``; v: ``(B, H, L, D_v)``.
        log_decay: ``None``, ``(B, H, L)`` or ``(B, H, L, D_k)``, all ``<= 0``.
        normalize: divide each output row by ``Σ_j A_ij`` (Katharopoulos et al.).
        eps: added to the normaliser.

    Returns:
        ``(B, H, L, D_v)``.
    """
    q, k, v = _check_qkv(q, k, v)
    log_decay = _check_log_decay(log_decay, k)
    scores = _decay_matrix(log_decay, q, k)
    return _finish(scores @ _augment(v, normalize), normalize, eps)


def linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    normalize: bool = False,
    eps: float = 1e-6,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention, recurrent form: one token at a time with a ``(D_k, D_v)`` state.

    ``S_t = α_t ⊙ S_{t-1} + k_t v_tᵀ`` and ``o_t = S_tᵀ q_t``. Costs ``O(L D_k D_v)``
    time and a state whose size does not grow with ``L``.

    Args: as :func:`linear_attention_parallel`, plus
        initial_state: ``(B, H, D_k, D_v)`` (``D_v + 1`` when normalising), default zeros.
        return_state: also return the final state.
    """
    q, k, v = _check_qkv(q, k, v)
    log_decay = _check_log_decay(log_decay, k)
    va = _augment(v, normalize)
    b, h, length, dk = k.shape
    state = _check_state(initial_state, b, h, dk, va.shape[-1], k)
    outs = []
    for t in range(length):
        step_decay = None if log_decay is None else log_decay[:, :, t]
        out, state = _recurrent_step(state, q[:, :, t], k[:, :, t], va[:, :, t], step_decay)
        outs.append(out)
    out = _finish(torch.stack(outs, dim=2), normalize, eps)
    return (out, state) if return_state else out


def _pad_to_chunks(x: torch.Tensor, chunk: int, dim: int = 2) -> torch.Tensor:
    pad = (-x.shape[dim]) % chunk
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def linear_attention_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    normalize: bool = False,
    eps: float = 1e-6,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention, chunkwise form: parallel inside chunks, recurrent across them.

    For chunk ``[i]`` with state ``S`` from the chunks before it (no decay)::

        O_[i] = Q_[i] S + (Q_[i] K_[i]ᵀ ⊙ causal) V_[i]        # inter-chunk + intra-chunk
        S    ← S + K_[i]ᵀ V_[i]

    With decay, ``b`` = the cumulative log-decay inside the chunk: queries are
    scaled by ``exp(b_i)`` for the inter-chunk term, the intra-chunk scores by
    ``exp(b_i − b_j)``, and keys by ``exp(b_C − b_j)`` when written into the
    state, which itself decays by ``exp(b_C)`` per chunk. Costs
    ``O(L C D + L D_k D_v)``; the ``L / C`` sequential steps each do matrix
    products, which is why this form is fast on real hardware.

    Without decay the states before every chunk come from one cumulative sum
    (no Python loop); with decay a short loop over the ``L / C`` chunks.

    Args: as :func:`linear_attention_recurrent`, plus
        chunk_size: tokens per chunk ``C``; ``L`` need not be a multiple of it.
    """
    q, k, v = _check_qkv(q, k, v)
    log_decay = _check_log_decay(log_decay, k)
    chunk = _check_chunk(chunk_size)
    va = _augment(v, normalize)
    b, h, length, dk = k.shape
    dv = va.shape[-1]
    state0 = _check_state(initial_state, b, h, dk, dv, k)
    n = -(-length // chunk)
    qc = _pad_to_chunks(q, chunk).view(b, h, n, chunk, dk)
    kc = _pad_to_chunks(k, chunk).view(b, h, n, chunk, dk)
    vc = _pad_to_chunks(va, chunk).view(b, h, n, chunk, dv)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()

    if log_decay is None:
        scores = (qc @ kc.transpose(-1, -2)).masked_fill_(~causal, 0.0)
        writes = kc.transpose(-1, -2) @ vc  # (B, H, N, D_k, D_v): what each chunk adds
        before = writes.cumsum(dim=2) - writes + state0[:, :, None]  # state entering each chunk
        out = qc @ before + scores @ vc
        final = before[:, :, -1] + writes[:, :, -1]
    else:
        vector = log_decay.dim() == 4
        ld = _pad_to_chunks(log_decay, chunk)
        ld = ld.view(b, h, n, chunk, dk) if vector else ld.view(b, h, n, chunk)
        g = ld.cumsum(dim=3)  # b_i: cumulative log-decay from the chunk start to i (inclusive)
        if vector:
            diff = (g[..., :, None, :] - g[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
            scores = torch.einsum("bhnid,bhnjd,bhnijd->bhnij", qc, kc, diff.exp())
            q_in = qc * g.exp()
            k_out = kc * (g[..., -1:, :] - g).exp()
            chunk_decay = g[..., -1, :].exp()[..., None]  # (B, H, N, D_k, 1)
        else:
            diff = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf"))
            scores = (qc @ kc.transpose(-1, -2)) * diff.exp()
            q_in = qc * g.exp()[..., None]
            k_out = kc * (g[..., -1:] - g).exp()[..., None]
            chunk_decay = g[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1)
        writes = k_out.transpose(-1, -2) @ vc
        state = state0
        befores = []
        for i in range(n):
            befores.append(state)
            state = chunk_decay[:, :, i] * state + writes[:, :, i]
        before = torch.stack(befores, dim=2)
        out = q_in @ before + scores @ vc
        final = state
    out = _finish(out.reshape(b, h, n * chunk, dv)[:, :, :length], normalize, eps)
    return (out, final) if return_state else out


def _exclusive_prefix_sum(w: torch.Tensor) -> torch.Tensor:
    """``out[:, i] = Σ_{j<i} w[:, j]`` over dim 1 of ``(X, N, Y)``, in about 2·√N in-place adds.

    Blocked in two levels (a running sum inside groups of ``g ≈ √N`` chunks,
    then the group totals carried across groups); on CPU this is about three
    times faster than ``torch.cumsum`` along a middle dimension.
    """
    _, n, _ = w.shape
    g = max(1, math.isqrt(n))
    while n % g:
        g -= 1
    groups = n // g
    out = torch.empty_like(w)
    w4 = w.view(w.shape[0], groups, g, w.shape[2])
    o4 = out.view_as(w4)
    o4[:, :, 0].zero_()
    for j in range(1, g):
        torch.add(o4[:, :, j - 1], w4[:, :, j - 1], out=o4[:, :, j])
    totals = o4[:, :, -1] + w4[:, :, -1]  # (X, groups, Y)
    for j in range(1, groups):
        totals[:, j] += totals[:, j - 1]
    o4[:, 1:] += totals[:, :-1, None]
    return out


def linear_attention_chunkwise_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                    chunk_size: int = 64) -> torch.Tensor:
    """:func:`linear_attention_chunkwise` without decay or normaliser, written for speed.

    The same algorithm, with the work arranged for a CPU: every chunk of every
    head in one batched matmul, the causal mask applied in place (``tril_``),
    the chunk states from a blocked prefix sum, and ``Q S`` added into the
    intra-chunk output by ``baddbmm_`` instead of a separate sum. Used by
    ``benchmarks/linear_attention_cpu.py``; the tests prove it equals the
    reference forms.
    """
    q, k, v = _check_qkv(q, k, v)
    chunk = _check_chunk(chunk_size)
    b, h, length, dk = k.shape
    dv = v.shape[-1]
    n = -(-length // chunk)
    if n * chunk != length:
        q, k, v = (_pad_to_chunks(t, chunk) for t in (q, k, v))
    qc = q.reshape(b * h * n, chunk, dk)
    kc = k.reshape(b * h * n, chunk, dk)
    vc = v.reshape(b * h * n, chunk, dv)
    scores = torch.matmul(qc, kc.mT).tril_()
    writes = torch.matmul(kc.mT, vc).view(b * h, n, dk * dv)
    before = _exclusive_prefix_sum(writes).view(b * h * n, dk, dv)
    out = torch.matmul(scores, vc).baddbmm_(qc, before)
    return out.view(b, h, n * chunk, dv)[:, :, :length]


# --------------------------------------------------------------------------- delta rule


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | float,
    log_decay: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(Gated) DeltaNet, recurrent form.

    ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` and ``o_t = S_tᵀ q_t``:
    read what the state currently returns for ``k_t``, then move it a fraction
    ``β_t`` of the way towards ``v_t``. ``log_decay=None`` gives DeltaNet
    (``α = 1``); a ``(B, H, L)`` log-decay gives gated DeltaNet. Keys are
    usually L2-normalised so that ``β ∈ (0, 1]`` keeps the update stable.

    Args:
        q, k: ``(B, H, L, D_k)``; v: ``(B, H, L, D_v)``.
        beta: the writing strength, a float or ``(B, H, L)``.
        log_decay: ``None`` or ``(B, H, L)``, ``<= 0``.
        initial_state, return_state: as in :func:`linear_attention_recurrent`.
    """
    q, k, v = _check_qkv(q, k, v)
    beta = _check_beta(beta, k)
    log_decay = _check_log_decay(log_decay, k, vector_ok=False)
    b, h, length, dk = k.shape
    state = _check_state(initial_state, b, h, dk, v.shape[-1], k)
    outs = []
    for t in range(length):
        if log_decay is not None:
            state = log_decay[:, :, t].exp()[..., None, None] * state
        state = _delta_rule_step(state, k[:, :, t], v[:, :, t], beta[:, :, t])
        outs.append((q[:, :, t, :, None] * state).sum(dim=-2))
    out = torch.stack(outs, dim=2)
    return (out, state) if return_state else out


def delta_rule_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | float,
    log_decay: torch.Tensor | None = None,
) -> torch.Tensor:
    """(Gated) DeltaNet as one ``L × L`` computation: the UT transform over the whole sequence.

    The delta rule writes *pseudo-values* ``u_t`` with plain (decayed) linear
    attention, ``S_t = α_t S_{t-1} + k_t u_tᵀ``, where ``u_t`` solves a
    lower-triangular system (see :func:`ut_transform`). This is
    :func:`delta_rule_chunkwise` with a single chunk: ``O(L² D + L³)`` work, the
    form a parallel-over-length derivation gives.
    """
    q, k, v = _check_qkv(q, k, v)
    return delta_rule_chunkwise(q, k, v, beta, log_decay, chunk_size=q.shape[2])  # type: ignore[return-value]


def ut_transform(
    k: torch.Tensor, beta: torch.Tensor, log_decay_cumsum: torch.Tensor | None = None
) -> torch.Tensor:
    """``T = (I + StrictLower(diag(β) (K Kᵀ ⊙ Γ)))⁻¹ diag(β)`` for chunks of keys ``(..., C, D_k)``.

    ``Γ_ij = exp(b_i − b_j)`` from the cumulative log-decay ``b`` inside the chunk
    (all ones without decay). ``W = T (exp(b) ⊙ K)`` and ``U = T V`` are then the
    WY representation of the chunk's product of Householder-like factors
    ``Π (I − β_t k_t k_tᵀ)``: the chunk's pseudo-values are ``U − W S``. The
    inverse is a triangular solve, never an explicit inverse.

    Args:
        k: ``(..., C, D_k)``; beta: ``(..., C)``; log_decay_cumsum: ``None`` or ``(..., C)``.

    Returns:
        ``T`` of shape ``(..., C, C)``, lower triangular.
    """
    k = _check_tensor("k", k)
    beta = _check_tensor("beta", beta)
    if k.dim() < 2 or beta.shape != k.shape[:-1]:
        raise ValueError(f"expected k (..., C, D_k) and beta (..., C); got {tuple(k.shape)} and {tuple(beta.shape)}")
    c = k.shape[-2]
    gram = k @ k.transpose(-1, -2)
    if log_decay_cumsum is not None:
        if log_decay_cumsum.shape != beta.shape:
            raise ValueError(f"log_decay_cumsum must have shape {tuple(beta.shape)}, got {tuple(log_decay_cumsum.shape)}")
        strict = torch.ones(c, c, dtype=torch.bool, device=k.device).tril(-1)
        diff = (log_decay_cumsum[..., :, None] - log_decay_cumsum[..., None, :]).masked_fill(~strict, float("-inf"))
        gram = gram * diff.exp()
    a = (beta[..., :, None] * gram).tril(-1)
    eye = torch.eye(c, dtype=k.dtype, device=k.device)
    rhs = torch.diag_embed(beta)
    return torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)


def delta_rule_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | float,
    log_decay: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(Gated) DeltaNet, chunkwise form through the WY/UT transform.

    Per chunk, with ``T`` from :func:`ut_transform` (computed for all chunks at
    once, since it does not depend on the state), ``W = T (γ ⊙ K)``, ``U = T V``
    and ``γ_i = exp(b_i)`` the decay from the chunk start::

        U' = U − W S                                   # the chunk's pseudo-values
        O  = (γ ⊙ Q) S + (Q Kᵀ ⊙ Γ ⊙ causal) U'
        S  ← γ_C S + (K ⊙ γ_C / γ)ᵀ U'

    Args: as :func:`delta_rule_recurrent`, plus ``chunk_size``.
    """
    q, k, v = _check_qkv(q, k, v)
    beta = _check_beta(beta, k)
    log_decay = _check_log_decay(log_decay, k, vector_ok=False)
    chunk = _check_chunk(chunk_size)
    b, h, length, dk = k.shape
    dv = v.shape[-1]
    state = _check_state(initial_state, b, h, dk, dv, k)
    n = -(-length // chunk)
    qc = _pad_to_chunks(q, chunk).view(b, h, n, chunk, dk)
    kc = _pad_to_chunks(k, chunk).view(b, h, n, chunk, dk)
    vc = _pad_to_chunks(v, chunk).view(b, h, n, chunk, dv)
    bc = _pad_to_chunks(beta, chunk).view(b, h, n, chunk)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    if log_decay is None:
        g = None
        gamma = torch.ones_like(bc)
        decay_mask = torch.ones(chunk, chunk, dtype=q.dtype, device=q.device).tril()
    else:
        g = _pad_to_chunks(log_decay, chunk).view(b, h, n, chunk).cumsum(-1)
        gamma = g.exp()
        decay_mask = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    t = ut_transform(kc, bc, g)
    w = t @ (kc * gamma[..., None])
    u = t @ vc
    scores = (qc @ kc.transpose(-1, -2)) * decay_mask
    q_in = qc * gamma[..., None]
    k_out = kc * (gamma[..., -1:] / gamma)[..., None]
    outs = []
    for i in range(n):
        pseudo = u[:, :, i] - w[:, :, i] @ state
        outs.append(q_in[:, :, i] @ state + scores[:, :, i] @ pseudo)
        state = gamma[:, :, i, -1, None, None] * state + k_out[:, :, i].transpose(-1, -2) @ pseudo
    out = torch.stack(outs, dim=2).reshape(b, h, n * chunk, dv)[:, :, :length]
    return (out, state) if return_state else out


# --------------------------------------------------------------------------- test-time training


def ttt_inner_loss(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """TTT-linear's self-supervised loss ``½ ‖Sᵀ k − v‖²``, summed over batch and heads.

    ``state`` ``(B, H, D_k, D_v)`` is the weight of the inner linear model;
    ``k`` ``(B, H, D_k)`` is its input and ``v`` ``(B, H, D_v)`` the target. Its
    gradient with respect to ``state`` is ``k (Sᵀk − v)ᵀ``.
    """
    state = _check_tensor("state", state, 4)
    k = _check_tensor("k", k, 3)
    v = _check_tensor("v", v, 3)
    prediction = (k[..., :, None] * state).sum(dim=-2)
    return 0.5 * (prediction - v).pow(2).sum()


def ttt_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor | float,
    *,
    mini_batch: int = 1,
    use_autograd: bool = False,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """TTT-linear: the state is a linear model trained online, one gradient step per mini-batch.

    The inner model predicts ``v`` from ``k`` as ``Sᵀ k``; its loss on token ``t``
    is ``ℓ_t(S) = ½ ‖Sᵀ k_t − v_t‖²``. Inside a mini-batch of ``b`` tokens every
    gradient is taken at the state ``S_0`` the mini-batch started from, and token
    ``t`` reads with ``S_t = S_0 − Σ_{s ≤ t in the batch} η_s ∇ℓ_s(S_0)``. With
    ``mini_batch=1`` this is exactly the delta rule with ``β = η``.

    This is the plain version (linear inner model, no inner layer norm, no
    residual), enough to show the link; the paper adds those.

    Args:
        q, k: ``(B, H, L, D_k)``; v: ``(B, H, L, D_v)``.
        lr: inner learning rate ``η``, a float or ``(B, H, L)`` (one per token).
        mini_batch: tokens per inner gradient step.
        use_autograd: compute each gradient with ``torch.autograd.grad`` of
            :func:`ttt_inner_loss` instead of the closed form (slow; a proof that
            the closed form is the gradient).
        initial_state, return_state: as in :func:`linear_attention_recurrent`.
    """
    q, k, v = _check_qkv(q, k, v)
    eta = _check_beta(lr, k, "lr")
    if isinstance(mini_batch, bool) or not isinstance(mini_batch, int) or mini_batch < 1:
        raise ValueError(f"mini_batch must be a positive int, got {mini_batch!r}")
    b, h, length, dk = k.shape
    state = _check_state(initial_state, b, h, dk, v.shape[-1], k)
    outs = []
    for start in range(0, length, mini_batch):
        stop = min(length, start + mini_batch)
        grads = []
        for t in range(start, stop):
            if use_autograd:
                with torch.enable_grad():
                    s0 = state.detach().requires_grad_(True)
                    (grad,) = torch.autograd.grad(ttt_inner_loss(s0, k[:, :, t], v[:, :, t]), s0)
            else:
                residual = (k[:, :, t, :, None] * state).sum(dim=-2) - v[:, :, t]  # Sᵀk − v
                grad = k[:, :, t, :, None] * residual[..., None, :]
            grads.append(eta[:, :, t, None, None] * grad)
        steps = torch.stack(grads, dim=2).cumsum(dim=2)  # (B, H, b, D_k, D_v)
        inner = state[:, :, None] - steps
        outs.append((q[:, :, start:stop, :, None] * inner).sum(dim=-2))
        state = inner[:, :, -1]
    out = torch.cat(outs, dim=2)
    return (out, state) if return_state else out


def ttt_linear_minibatch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor | float,
    *,
    mini_batch: int = 16,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`ttt_linear` computed a mini-batch at a time with matrix products (TTT's "dual form").

    All gradients of a mini-batch are taken at its starting state ``S_0``, so
    with ``R = K S_0 − V`` (the inner model's errors) and ``η`` the step sizes::

        O   = Q S_0 − (Q Kᵀ ⊙ causal) diag(η) R
        S_0 ← S_0 − Kᵀ diag(η) R

    The same numbers as the token loop, with no per-token Python step. When
    ``L`` is not a multiple of ``mini_batch`` the final state is the one after
    the last, partial, mini-batch.
    """
    q, k, v = _check_qkv(q, k, v)
    eta = _check_beta(lr, k, "lr")
    if isinstance(mini_batch, bool) or not isinstance(mini_batch, int) or mini_batch < 1:
        raise ValueError(f"mini_batch must be a positive int, got {mini_batch!r}")
    b, h, length, dk = k.shape
    state = _check_state(initial_state, b, h, dk, v.shape[-1], k)
    outs = []
    for start in range(0, length, mini_batch):
        stop = min(length, start + mini_batch)
        qb, kb, vb, eb = q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], eta[:, :, start:stop]
        scaled_errors = eb[..., None] * (kb @ state - vb)  # diag(η) (K S_0 − V)
        outs.append(qb @ state - (qb @ kb.transpose(-1, -2)).tril() @ scaled_errors)
        state = state - kb.transpose(-1, -2) @ scaled_errors
    out = torch.cat(outs, dim=2)
    return (out, state) if return_state else out


# --------------------------------------------------------------------------- the unified update


def memory_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    beta: torch.Tensor | float = 1.0,
    rule: str = "add",
) -> torch.Tensor:
    """One loop for every mechanism of the chapter: forget, then write, then read.

    ``S ← diag(α_t) S`` (forget), then either ``S ← S + β_t k_t v_tᵀ``
    (``rule="add"``: linear attention, RetNet, GLA) or
    ``S ← S + β_t k_t (v_t − Sᵀ k_t)ᵀ`` (``rule="delta"``: DeltaNet, gated
    DeltaNet, TTT-linear), then ``o_t = S_tᵀ q_t``.
    """
    q, k, v = _check_qkv(q, k, v)
    if rule not in ("add", "delta"):
        raise ValueError(f"rule must be 'add' or 'delta', got {rule!r}")
    log_decay = _check_log_decay(log_decay, k)
    beta = _check_beta(beta, k)
    b, h, length, dk = k.shape
    state = k.new_zeros(b, h, dk, v.shape[-1])
    outs = []
    for t in range(length):
        if log_decay is not None:
            alpha = log_decay[:, :, t].exp()
            state = (alpha[..., None, None] if alpha.dim() == 2 else alpha[..., None]) * state
        kt, vt, bt = k[:, :, t], v[:, :, t], beta[:, :, t, None]
        target = vt - (kt[..., :, None] * state).sum(dim=-2) if rule == "delta" else vt
        state = state + kt[..., :, None] * (bt * target)[..., None, :]
        outs.append((q[:, :, t, :, None] * state).sum(dim=-2))
    return torch.stack(outs, dim=2)


# --------------------------------------------------------------------------- step functions (exercises)


def _check_step(state: object, k: object, v: object, q: object = None) -> None:
    state = _check_tensor("state", state)
    k = _check_tensor("k", k)
    v = _check_tensor("v", v)
    if state.dim() < 2 or k.shape != (*state.shape[:-2], state.shape[-2]) or v.shape != (*state.shape[:-2], state.shape[-1]):
        raise ValueError("expected state (B, H, D_k, D_v), k (B, H, D_k) and v (B, H, D_v); got "
                         f"{tuple(state.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q is not None and (_check_tensor("q", q).shape != k.shape):
        raise ValueError(f"q must have the shape of k {tuple(k.shape)}, got {tuple(q.shape)}")


def recurrent_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of (decayed) linear attention: ``S' = α ⊙ S + k vᵀ``, ``o = S'ᵀ q``.

    Args:
        state: ``(B, H, D_k, D_v)``.
        q, k: ``(B, H, D_k)``; v: ``(B, H, D_v)``.
        log_decay: ``None``, ``(B, H)`` (one decay per head) or ``(B, H, D_k)`` (a gate per key dimension).

    Returns:
        ``(o, new_state)`` with ``o`` of shape ``(B, H, D_v)``.
    """
    _check_step(state, k, v, q=q)
    if log_decay is not None:
        log_decay = _check_tensor("log_decay", log_decay)
        if log_decay.shape not in (state.shape[:-2], k.shape):
            raise ValueError(f"log_decay must have shape {tuple(state.shape[:-2])} (one decay per head) or "
                             f"{tuple(k.shape)} (one per key dimension), got {tuple(log_decay.shape)}")
    return _recurrent_step(state, q, k, v, log_decay)


def _recurrent_step(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    log_decay: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`recurrent_step` without input checks, for the loops that call it once per token."""
    if log_decay is not None:
        alpha = log_decay.exp()
        state = (alpha[..., None, None] if alpha.dim() == state.dim() - 2 else alpha[..., None]) * state
    new_state = state + k[..., :, None] * v[..., None, :]
    out = (q[..., :, None] * new_state).sum(dim=-2)
    return out, new_state


def chunkwise_step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of linear attention (no decay, no normaliser).

    ``O = Q S + (Q Kᵀ ⊙ causal) V`` and ``S' = S + Kᵀ V``.

    Args:
        state: ``(B, H, D_k, D_v)``; q, k: ``(B, H, C, D_k)``; v: ``(B, H, C, D_v)``.

    Returns:
        ``(O, new_state)`` with ``O`` of shape ``(B, H, C, D_v)``.
    """
    for name, x in (("state", state), ("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 4)
    if q.shape != k.shape or v.shape[:3] != k.shape[:3] or state.shape != (*k.shape[:2], k.shape[-1], v.shape[-1]):
        raise ValueError("expected state (B, H, D_k, D_v), q and k (B, H, C, D_k), v (B, H, C, D_v); got "
                         f"{tuple(state.shape)}, {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scores = (q @ k.transpose(-1, -2)).tril()
    out = q @ state + scores @ v
    return out, state + k.transpose(-1, -2) @ v


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
    for name, x in (("state", state), ("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 4)
    _check_tensor("log_decay", log_decay, 3)
    if q.shape != k.shape or v.shape[:3] != k.shape[:3] or state.shape != (*k.shape[:2], k.shape[-1], v.shape[-1]):
        raise ValueError("expected state (B, H, D_k, D_v), q and k (B, H, C, D_k), v (B, H, C, D_v); got "
                         f"{tuple(state.shape)}, {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if log_decay.shape != k.shape[:3]:
        raise ValueError(f"log_decay must have shape (B, H, C) = {tuple(k.shape[:3])}, got {tuple(log_decay.shape)}")
    c = k.shape[2]
    b = log_decay.cumsum(-1)  # (B, H, C)
    causal = torch.ones(c, c, dtype=torch.bool, device=k.device).tril()
    gamma = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    out = (q * b.exp()[..., None]) @ state + ((q @ k.transpose(-1, -2)) * gamma) @ v
    new_state = b[..., -1:, None].exp() * state + (k * (b[..., -1:] - b).exp()[..., None]).transpose(-1, -2) @ v
    return out, new_state


def delta_rule_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """One delta-rule write: ``S' = S + β k (v − Sᵀ k)ᵀ`` = ``(I − β k kᵀ) S + β k vᵀ``.

    Args:
        state: ``(B, H, D_k, D_v)``; k: ``(B, H, D_k)``; v: ``(B, H, D_v)``; beta: ``(B, H)``.

    Returns:
        the new state, ``(B, H, D_k, D_v)``.
    """
    _check_step(state, k, v)
    beta = _check_tensor("beta", beta)
    if beta.shape != state.shape[:-2]:
        raise ValueError(f"beta must have shape {tuple(state.shape[:-2])} (one per head), got {tuple(beta.shape)}")
    return _delta_rule_step(state, k, v, beta)


def _delta_rule_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """:func:`delta_rule_step` without input checks, for the per-token loops."""
    recalled = (k[..., :, None] * state).sum(dim=-2)  # Sᵀ k: what the memory returns for k now
    return state + k[..., :, None] * (beta[..., None] * (v - recalled))[..., None, :]


# --------------------------------------------------------------------------- cost helpers


def chunkwise_flops(batch: int, heads: int, length: int, d_k: int, d_v: int, chunk_size: int) -> dict[str, int]:
    """Matmul FLOPs of :func:`linear_attention_chunkwise` without decay (2 per multiply-add).

    Per chunk of ``C`` tokens: ``Q Kᵀ`` (``2 C² D_k``, computed in full even
    though the causal mask zeroes half), ``scores · V`` (``2 C² D_v``),
    ``Kᵀ V`` (``2 C D_k D_v``) and ``Q S`` (``2 C D_k D_v``). Returns the
    ``executed`` count (what the code multiplies, the last chunk padded), and
    ``useful``: the same with only the causal half (plus diagonal) of the
    intra-chunk products and the unpadded length. Element-wise work (masking,
    the cumulative sum of states) is not counted.
    """
    for name, value in (("batch", batch), ("heads", heads), ("length", length), ("d_k", d_k),
                        ("d_v", d_v), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    c = chunk_size
    padded = -(-length // c) * c
    executed = batch * heads * (padded * 2 * c * (d_k + d_v) + padded * 4 * d_k * d_v)
    useful = batch * heads * (length * (c + 1) * (d_k + d_v) + length * 4 * d_k * d_v)
    return {"executed": executed, "useful": useful}


def recurrent_state_bytes(layers: int, heads: int, d_k: int, d_v: int, *,
                          bytes_per_element: int = 2, batch: int = 1) -> int:
    """Bytes of the recurrent state of a model: ``layers × heads × D_k × D_v`` elements per sequence.

    Unlike a KV cache it does not depend on the context length.
    """
    for name, value in (("layers", layers), ("heads", heads), ("d_k", d_k), ("d_v", d_v),
                        ("bytes_per_element", bytes_per_element), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return layers * heads * d_k * d_v * bytes_per_element * batch


# --------------------------------------------------------------------------- widget data


@dataclass
class MemoryDecayData:
    """What the "memory decay" widget draws.

    Attributes:
        mechanism: one of ``linear``, ``retnet``, ``gla``, ``deltanet``, ``gated_deltanet``.
        survival: ``(L, L)``; entry ``[t, s]`` (``s ≤ t``) is how much of token
            ``s``'s key direction survives in the state after token ``t``:
            ``‖M_t ⋯ M_{s+1} k_s‖`` for unit ``k_s``, where ``M_r`` is the forget
            map of step ``r``. NaN above the diagonal (not yet written).
        recall_error: ``(L,)``; after token ``t``, the mean over stored tokens
            ``s ≤ t`` of ``‖S_tᵀ k_s − v_s‖ / ‖v_s‖``: how badly the memory
            returns what was written (0 = perfect, 1 = nothing left).
        recall_error_recent: ``(L,)``; the same, over the most recent ``d_key``
            tokens only (the ones a state of rank ``d_key`` could hold exactly).
        d_key: key dimension (the rank of the state).
    """

    mechanism: str
    survival: torch.Tensor
    recall_error: torch.Tensor
    recall_error_recent: torch.Tensor
    d_key: int
    decay: float
    beta: float


_WIDGET_MECHANISMS = ("linear", "retnet", "gla", "deltanet", "gated_deltanet")


def memory_decay_data(
    mechanism: str,
    *,
    decay: float = 0.95,
    beta: float = 0.5,
    length: int = 64,
    d_key: int = 16,
    seed: int = 0,
) -> MemoryDecayData:
    """Write ``length`` random unit keys with random values into one head's memory, and measure it.

    ``decay`` is the fixed decay ``γ`` (``retnet``), the mean gate (``gla``:
    each token and dimension draws ``α = decay ** u`` with ``u ~ U(0, 2)``) or
    the decay ``α`` of ``gated_deltanet``; ``beta`` is the writing strength of
    the delta rules. ``linear`` and ``deltanet`` ignore ``decay``; the additive
    rules ignore ``beta``. Deterministic for a given ``seed``.
    """
    if mechanism not in _WIDGET_MECHANISMS:
        raise ValueError(f"mechanism must be one of {_WIDGET_MECHANISMS}, got {mechanism!r}")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0.0 < decay <= 1.0):
        raise ValueError(f"decay must be a number in (0, 1], got {decay!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 < beta <= 1.0):
        raise ValueError(f"beta must be a number in (0, 1], got {beta!r}")
    for name, value in (("length", length), ("d_key", d_key)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    keys = F.normalize(torch.randn(length, d_key, generator=gen, dtype=dt), dim=-1)
    values = torch.randn(length, d_key, generator=gen, dtype=dt)
    if mechanism == "gla":
        gates = decay ** (2.0 * torch.rand(length, d_key, generator=gen, dtype=dt))
    else:
        gates = torch.full((length, d_key), float(decay) if mechanism in ("retnet", "gated_deltanet") else 1.0, dtype=dt)
    eye = torch.eye(d_key, dtype=dt)
    delta = mechanism in ("deltanet", "gated_deltanet")
    b = float(beta) if delta else 1.0

    survival = torch.full((length, length), float("nan"), dtype=dt)
    error = torch.zeros(length, dtype=dt)
    recent = torch.zeros(length, dtype=dt)
    state = torch.zeros(d_key, d_key, dtype=dt)
    carried = torch.zeros(0, d_key, dtype=dt)  # row s: M_t ⋯ M_{s+1} k_s, for every written s
    for t in range(length):
        k, v = keys[t], values[t]
        forget = torch.diag(gates[t])
        if delta:
            forget = (eye - b * torch.outer(k, k)) @ forget
        state = forget @ state + b * torch.outer(k, v)
        carried = torch.cat([carried @ forget.T, k[None]], dim=0)
        survival[t, : t + 1] = carried.norm(dim=-1)
        recalled = keys[: t + 1] @ state  # row s: S_tᵀ k_s
        rel = (recalled - values[: t + 1]).norm(dim=-1) / values[: t + 1].norm(dim=-1)
        error[t] = rel.mean()
        recent[t] = rel[max(0, t + 1 - d_key):].mean()
    return MemoryDecayData(mechanism, survival, error, recent, d_key, float(decay), float(beta))


def memory_decay_figure(data: MemoryDecayData) -> "go.Figure":  # noqa: F821 - plotly imported lazily
    """A heatmap of :attr:`MemoryDecayData.survival` next to the recall error as the state fills."""
    if not isinstance(data, MemoryDecayData):
        raise TypeError(f"memory_decay_figure expects a MemoryDecayData, got {type(data).__name__}")
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    length = data.survival.shape[0]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.24,
                        subplot_titles=("what survives of token s after token t",
                                        "recall error as the state fills"))
    # NaN (not yet written) becomes None: plotly leaves those cells blank, and widgets can send it as JSON
    z = [[None if math.isnan(x) else x for x in row] for row in data.survival.tolist()]
    fig.add_trace(go.Heatmap(z=z, x=list(range(length)), y=list(range(length)),
                             colorscale="Viridis", zmin=0, zmax=1, colorbar=dict(x=0.39, xanchor="left", thickness=12, title="|kept|")),
                  row=1, col=1)
    steps = list(range(1, length + 1))
    fig.add_trace(go.Scatter(x=steps, y=data.recall_error.numpy(), name="all stored tokens", mode="lines"),
                  row=1, col=2)
    fig.add_trace(go.Scatter(x=steps, y=data.recall_error_recent.numpy(),
                             name=f"last {data.d_key} tokens", mode="lines"), row=1, col=2)
    fig.add_vline(x=data.d_key, line_dash="dot", annotation_text="tokens = d_key", row=1, col=2)
    fig.update_xaxes(title_text="written at token s", row=1, col=1)
    fig.update_yaxes(title_text="state after token t", autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="tokens written", row=1, col=2)
    fig.update_yaxes(title_text="‖Sᵀk − v‖ / ‖v‖", rangemode="tozero", row=1, col=2)
    fig.update_layout(height=420, legend=dict(orientation="h", y=-0.25, x=0.55),
                      title=f"{data.mechanism}: decay={data.decay:g}, β={data.beta:g}, d_key={data.d_key}")
    return fig


# --------------------------------------------------------------------------- checkers


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _log_gate(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return F.logsigmoid(torch.randn(*shape, generator=gen, dtype=torch.float64) + 2.0).to(dtype)


def _recurrent_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(303)
    b, h, dk, dv = 2, 3, 4, 5
    cases = [
        Case("no decay, zero state (first token)",
             (torch.zeros(b, h, dk, dv, dtype=torch.float64), _randn(gen, b, h, dk), _randn(gen, b, h, dk),
              _randn(gen, b, h, dv), None)),
        Case("no decay, a filled state",
             (_randn(gen, b, h, dk, dv), _randn(gen, b, h, dk), _randn(gen, b, h, dk), _randn(gen, b, h, dv), None)),
        Case("a decay per head, log_decay (B, H)",
             (_randn(gen, b, h, dk, dv), _randn(gen, b, h, dk), _randn(gen, b, h, dk), _randn(gen, b, h, dv),
              _log_gate(gen, b, h))),
        Case("a gate per key dimension, log_decay (B, H, D_k)",
             (_randn(gen, b, h, dk, dv), _randn(gen, b, h, dk), _randn(gen, b, h, dk), _randn(gen, b, h, dv),
              _log_gate(gen, b, h, dk))),
        Case("float32, non-contiguous state (a transposed view)",
             (_randn(gen, b, h, dv, dk, dtype=torch.float32).transpose(-1, -2), _randn(gen, b, h, dk, dtype=torch.float32),
              _randn(gen, b, h, dk, dtype=torch.float32), _randn(gen, b, h, dv, dtype=torch.float32),
              _log_gate(gen, b, h, dtype=torch.float32))),
    ]
    return cases


def check_recurrent_step(fn: Callable[..., object]) -> CheckResult:
    """Check ``fn(state, q, k, v, log_decay) -> (o, new_state)`` against :func:`recurrent_step`."""
    return check_function(
        fn, recurrent_step, _recurrent_cases(), exercise="recurrent_step", atol=1e-6, rtol=1e-5,
        hint="decay first (α = exp(log_decay), shaped to multiply the rows of S), then add the outer "
        "product k vᵀ, then read o = S'ᵀ q with the *new* state; log_decay may be None.",
    )


def _chunk_state_q_k(gen: torch.Generator, b: int, h: int, c: int, dk: int, dv: int, dtype: torch.dtype, *,
                     zero_state: bool, non_contiguous: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk checker case's incoming state and its q, k (as transposed views when ``non_contiguous``)."""
    state = torch.zeros(b, h, dk, dv, dtype=dtype) if zero_state else _randn(gen, b, h, dk, dv, dtype=dtype)
    if non_contiguous:
        q = _randn(gen, b, c, h, dk, dtype=dtype).transpose(1, 2)
        k = _randn(gen, b, h, dk, c, dtype=dtype).transpose(-1, -2)
    else:
        q, k = _randn(gen, b, h, c, dk, dtype=dtype), _randn(gen, b, h, c, dk, dtype=dtype)
    return state, q, k


def _chunk_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(404)
    cases = []
    for name, (b, h, c, dk, dv), dtype, zero in [
        ("first chunk, zero state, C=8", (1, 2, 8, 4, 3), torch.float64, True),
        ("a later chunk, C=6", (2, 2, 6, 5, 4), torch.float64, False),
        ("a single-token chunk, C=1", (1, 1, 1, 4, 4), torch.float64, False),
        ("float32, non-contiguous q and k, C=7", (1, 3, 7, 4, 6), torch.float32, False),
    ]:
        state, q, k = _chunk_state_q_k(gen, b, h, c, dk, dv, dtype, zero_state=zero,
                                       non_contiguous="non-contiguous" in name)
        cases.append(Case(name, (state, q, k, _randn(gen, b, h, c, dv, dtype=dtype))))
    return cases


def check_chunkwise_step(fn: Callable[..., object]) -> CheckResult:
    """Check ``fn(state, q, k, v) -> (O, new_state)`` against :func:`chunkwise_step`."""
    return check_function(
        fn, chunkwise_step, _chunk_cases(), exercise="chunkwise_step", atol=1e-6, rtol=1e-5,
        hint="O = Q S (everything before the chunk) + (Q Kᵀ with the causal mask, diagonal included) V; "
        "then S' = S + Kᵀ V. Use the *old* state for O.",
    )


def _decay_chunk_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(606)
    cases = []
    for name, (b, h, c, dk, dv), dtype, zero, gate in [
        ("first chunk, zero state, no decay (log α = 0), C=5", (1, 2, 5, 4, 3), torch.float64, True, "none"),
        ("a later chunk, random gates, C=6", (2, 2, 6, 5, 4), torch.float64, False, "random"),
        ("a single-token chunk, C=1", (1, 1, 1, 4, 4), torch.float64, False, "random"),
        ("strong decay (α ≈ 0.3), C=8", (1, 2, 8, 3, 5), torch.float64, False, "strong"),
        ("float32, non-contiguous q and k, C=7", (1, 3, 7, 4, 6), torch.float32, False, "random"),
    ]:
        state, q, k = _chunk_state_q_k(gen, b, h, c, dk, dv, dtype, zero_state=zero,
                                       non_contiguous="non-contiguous" in name)
        if gate == "none":
            log_decay = torch.zeros(b, h, c, dtype=dtype)
        elif gate == "strong":
            log_decay = torch.full((b, h, c), math.log(0.3), dtype=dtype)
        else:
            log_decay = _log_gate(gen, b, h, c, dtype=dtype)
        cases.append(Case(name, (state, q, k, _randn(gen, b, h, c, dv, dtype=dtype), log_decay)))
    return cases


def check_chunkwise_decay_step(fn: Callable[..., object]) -> CheckResult:
    """Check ``fn(state, q, k, v, log_decay) -> (O, new_state)`` against :func:`chunkwise_decay_step`."""
    return check_function(
        fn, chunkwise_decay_step, _decay_chunk_cases(), exercise="chunkwise_decay_step", atol=1e-6, rtol=1e-5,
        hint="b = log_decay.cumsum(-1) (token i's own gate included). O = (exp(b)·Q) S + (Q Kᵀ ⊙ Γ) V with "
        "Γ_ij = exp(b_i − b_j) for j ≤ i and 0 above the diagonal (mask the exponent with -inf before exp); "
        "S' = exp(b_C) S + (exp(b_C − b)·K)ᵀ V, b_C the last entry of b. Use the *old* state for O.",
    )


def _delta_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(505)
    b, h, dk, dv = 2, 2, 6, 3
    unit = lambda *s: F.normalize(_randn(gen, *s), dim=-1)  # noqa: E731
    cases = [
        Case("zero state, β = 1: stores v exactly", (torch.zeros(b, h, dk, dv, dtype=torch.float64), unit(b, h, dk),
                                                  _randn(gen, b, h, dv), torch.ones(b, h, dtype=torch.float64))),
        Case("a filled state, random β", (_randn(gen, b, h, dk, dv), unit(b, h, dk), _randn(gen, b, h, dv),
                                          torch.rand(b, h, generator=gen, dtype=torch.float64))),
        Case("keys not normalised", (_randn(gen, b, h, dk, dv), _randn(gen, b, h, dk), _randn(gen, b, h, dv),
                                     torch.rand(b, h, generator=gen, dtype=torch.float64))),
        Case("float32, non-contiguous state", (_randn(gen, b, h, dv, dk, dtype=torch.float32).transpose(-1, -2),
                                               unit(b, h, dk).float(), _randn(gen, b, h, dv, dtype=torch.float32),
                                               torch.rand(b, h, generator=gen))),
    ]
    return cases


def check_delta_rule_step(fn: Callable[..., object]) -> CheckResult:
    """Check ``fn(state, k, v, beta) -> new_state`` against :func:`delta_rule_step`."""
    return check_function(
        fn, delta_rule_step, _delta_cases(), exercise="delta_rule_step", atol=1e-6, rtol=1e-5,
        hint="read what the memory returns for k (Sᵀ k, a D_v vector), then add β k (v − Sᵀk)ᵀ; "
        "β has shape (B, H), so give it a trailing axis before multiplying.",
    )
