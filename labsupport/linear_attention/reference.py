"""The readable reference math of chapter 03: every form of every mechanism, in float64-exact agreement.

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
* Low precision: fp16 and bf16 inputs are computed in float32 (states,
  normalisers, decays and the UT transform's triangular solve) and the
  outputs and final state come back in the input dtype, as production kernels
  do (:func:`labsupport.harness.numerics.accumulation_dtype`). Gates,
  writing strengths and initial states must have the dtype of ``q``.
* Ratios of decays are always formed as ``exp`` of a difference of
  cumulative log-decays, never as a quotient of two exponentials, which
  underflow to 0/0 under strong gates.
* The same computation comes in three forms: ``*_parallel`` (an ``L × L``
  matrix, like softmax attention), ``*_recurrent`` (a loop over tokens with a
  fixed-size state) and ``*_chunkwise`` (parallel inside chunks of ``C``
  tokens, recurrent across chunks). The tests prove them equal in float64.

Contents
--------
:func:`elu_feature_map`, :func:`retnet_log_decay`; linear attention with decay:
:func:`linear_attention_parallel`, :func:`linear_attention_recurrent`,
:func:`linear_attention_chunkwise`; the delta rule: :func:`delta_rule_recurrent`,
:func:`delta_rule_parallel`, :func:`ut_transform`, :func:`delta_rule_chunkwise`;
test-time training: :func:`ttt_inner_loss`, :func:`ttt_linear`, :func:`ttt_linear_minibatch`;
and :func:`memory_recurrence`, the one loop behind all of them.

The one-token kernels :func:`recurrent_update` and :func:`delta_rule_update`
are what the loops (and the mixers' decoding) call once per token; they do not
check their inputs. The checked versions, ``recurrent_step`` and
``delta_rule_step``, are the chapter's exercises (:mod:`.exercises`).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from labsupport.harness.numerics import accumulation_dtype
from labsupport.harness.validation import (
    require_choice,
    require_float,
    require_float_tensor,
    require_positive_int,
    require_qkv,
)

__all__ = [
    "delta_rule_chunkwise",
    "delta_rule_parallel",
    "delta_rule_recurrent",
    "delta_rule_update",
    "elu_feature_map",
    "linear_attention_chunkwise",
    "linear_attention_parallel",
    "linear_attention_recurrent",
    "memory_recurrence",
    "recurrent_update",
    "retnet_log_decay",
    "ttt_inner_loss",
    "ttt_linear",
    "ttt_linear_minibatch",
    "ut_transform",
]


# --------------------------------------------------------------------------- input guards


def _require_qkv(q: object, k: object, v: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features ``q, k (B, H, L, D_k)`` of one shape and values ``v (B, H, L, D_v)``."""
    q, k, v = require_qkv(q, k, v, ndim=4, same_value_dim=False)
    if q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape (B, H, L, D_k), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    return q, k, v


def _require_same_dtype(name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
    if tensor.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of q, k, v ({str(like.dtype).removeprefix('torch.')}), got "
                        f"{str(tensor.dtype).removeprefix('torch.')}; convert it with .to(q.dtype)")


def _require_log_decay(log_decay: object, k: torch.Tensor, *, vector_ok: bool = True) -> torch.Tensor | None:
    """``None``, or a log-decay ``<= 0`` of shape ``(B, H, L)`` (or ``(B, H, L, D_k)`` when ``vector_ok``)."""
    if log_decay is None:
        return None
    log_decay = require_float_tensor("log_decay", log_decay)
    b, h, length, dk = k.shape
    shapes = [(b, h, length)] + ([(b, h, length, dk)] if vector_ok else [])
    if tuple(log_decay.shape) not in shapes:
        allowed = " or ".join(str(s) for s in shapes)
        raise ValueError(f"log_decay must have shape {allowed} (B, H, L[, D_k]), got {tuple(log_decay.shape)}")
    _require_same_dtype("log_decay", log_decay, k)
    if bool((~(log_decay <= 0)).any()):  # NaN fails `<= 0` too: one reduction, one host sync
        raise ValueError("log_decay must be <= 0 (a decay factor α = exp(log_decay) in (0, 1])")
    return log_decay


def _require_beta(beta: object, k: torch.Tensor, name: str = "beta") -> torch.Tensor:
    """A writing strength: a number (the same for every token) or a ``(B, H, L)`` tensor, as ``(B, H, L)``."""
    if isinstance(beta, numbers.Real) and not isinstance(beta, bool):
        return torch.full(k.shape[:3], require_float(name, beta), dtype=k.dtype, device=k.device)
    beta = require_float_tensor(name, beta)
    if tuple(beta.shape) != tuple(k.shape[:3]):
        raise ValueError(f"{name} must be a float or have shape (B, H, L) = {tuple(k.shape[:3])}, got {tuple(beta.shape)}")
    _require_same_dtype(name, beta, k)
    return beta


def _require_state(state: object, b: int, h: int, dk: int, dv: int, like: torch.Tensor,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """An initial state ``(B, H, D_k, D_v)`` of ``dtype`` (the inputs' dtype), as ``like.dtype``; zeros when ``None``."""
    if state is None:
        return like.new_zeros(b, h, dk, dv)
    state = require_float_tensor("initial_state", state, ndim=4)
    if tuple(state.shape) != (b, h, dk, dv):
        raise ValueError(f"initial_state must have shape (B, H, D_k, D_v) = {(b, h, dk, dv)}, got {tuple(state.shape)}")
    if state.dtype != (dtype or like.dtype):
        raise TypeError(f"initial_state must have the dtype of q, k, v ({str(dtype or like.dtype).removeprefix('torch.')}),"
                        f" got {str(state.dtype).removeprefix('torch.')}")
    return state.to(like.dtype)


def _upcast(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors in the accumulation dtype of the first (fp16/bf16 → float32); ``None`` stays ``None``."""
    cdt = accumulation_dtype(tensors[0].dtype)  # type: ignore[union-attr]
    return [None if t is None else t.to(cdt) for t in tensors]


def _augment(v: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Append a column of ones to ``v``: the normaliser is then one more output column."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if normalize else v


def _finish(out: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    if not normalize:
        return out
    return out[..., :-1] / (out[..., -1:] + eps)


def _pad_to_chunks(x: torch.Tensor, chunk: int, dim: int = 2) -> torch.Tensor:
    """``x`` padded with zeros along ``dim`` to a multiple of ``chunk``."""
    pad = (-x.shape[dim]) % chunk
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


# --------------------------------------------------------------------------- one-token kernels


def recurrent_update(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     log_decay: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of (decayed) linear attention, unchecked: ``S' = α ⊙ S + k vᵀ``, ``o = S'ᵀ q``.

    Shapes as ``recurrent_step`` (:mod:`.exercises`), which checks them and calls this.
    """
    if log_decay is not None:
        alpha = log_decay.exp()
        state = (alpha[..., None, None] if alpha.dim() == state.dim() - 2 else alpha[..., None]) * state
    new_state = state + k[..., :, None] * v[..., None, :]
    out = (q[..., :, None] * new_state).sum(dim=-2)
    return out, new_state


def delta_rule_update(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """One delta-rule write, unchecked: ``S' = S + β k (v − Sᵀ k)ᵀ``.

    Shapes as ``delta_rule_step`` (:mod:`.exercises`), which checks them and calls this.
    """
    recalled = (k[..., :, None] * state).sum(dim=-2)  # Sᵀ k: what the memory returns for k now
    return state + k[..., :, None] * (beta[..., None] * (v - recalled))[..., None, :]


# --------------------------------------------------------------------------- feature maps and decays


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``φ(x) = elu(x) + 1``: positive features, so the normaliser ``φ(q)ᵀ Σ φ(k)`` is positive."""
    require_float_tensor("x", x)
    return F.elu(x) + 1.0


def retnet_log_decay(n_heads: int, length: int, *, batch: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """RetNet's fixed per-head decay ``γ_h = 1 − 2^(−5−h)`` as ``log γ_h``, broadcast to ``(B, H, L)``."""
    n_heads = require_positive_int("n_heads", n_heads)
    length = require_positive_int("length", length)
    batch = require_positive_int("batch", batch)
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
    q, k, v = _require_qkv(q, k, v)
    log_decay = _require_log_decay(log_decay, k)
    dtype = q.dtype
    q, k, v, log_decay = _upcast(q, k, v, log_decay)
    scores = _decay_matrix(log_decay, q, k)
    return _finish(scores @ _augment(v, normalize), normalize, eps).to(dtype)


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
    q, k, v = _require_qkv(q, k, v)
    log_decay = _require_log_decay(log_decay, k)
    dtype = q.dtype
    q, k, v, log_decay = _upcast(q, k, v, log_decay)
    va = _augment(v, normalize)
    b, h, length, dk = k.shape
    state = _require_state(initial_state, b, h, dk, va.shape[-1], k, dtype)
    outs = []
    for t in range(length):
        step_decay = None if log_decay is None else log_decay[:, :, t]
        out, state = recurrent_update(state, q[:, :, t], k[:, :, t], va[:, :, t], step_decay)
        outs.append(out)
    out = _finish(torch.stack(outs, dim=2), normalize, eps).to(dtype)
    return (out, state.to(dtype)) if return_state else out


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
    q, k, v = _require_qkv(q, k, v)
    log_decay = _require_log_decay(log_decay, k)
    chunk = require_positive_int("chunk_size", chunk_size)
    dtype = q.dtype
    q, k, v, log_decay = _upcast(q, k, v, log_decay)
    va = _augment(v, normalize)
    b, h, length, dk = k.shape
    dv = va.shape[-1]
    state0 = _require_state(initial_state, b, h, dk, dv, k, dtype)
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
    out = _finish(out.reshape(b, h, n * chunk, dv)[:, :, :length], normalize, eps).to(dtype)
    return (out, final.to(dtype)) if return_state else out


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
    q, k, v = _require_qkv(q, k, v)
    beta = _require_beta(beta, k)
    log_decay = _require_log_decay(log_decay, k, vector_ok=False)
    dtype = q.dtype
    q, k, v, beta, log_decay = _upcast(q, k, v, beta, log_decay)
    b, h, length, dk = k.shape
    state = _require_state(initial_state, b, h, dk, v.shape[-1], k, dtype)
    outs = []
    for t in range(length):
        if log_decay is not None:
            state = log_decay[:, :, t].exp()[..., None, None] * state
        state = delta_rule_update(state, k[:, :, t], v[:, :, t], beta[:, :, t])
        outs.append((q[:, :, t, :, None] * state).sum(dim=-2))
    out = torch.stack(outs, dim=2).to(dtype)
    return (out, state.to(dtype)) if return_state else out


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
    q, k, v = _require_qkv(q, k, v)
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
    k = require_float_tensor("k", k)
    beta = require_float_tensor("beta", beta)
    if k.dim() < 2 or beta.shape != k.shape[:-1]:
        raise ValueError(f"expected k (..., C, D_k) and beta (..., C); got {tuple(k.shape)} and {tuple(beta.shape)}")
    if log_decay_cumsum is not None:
        log_decay_cumsum = require_float_tensor("log_decay_cumsum", log_decay_cumsum)
        if log_decay_cumsum.shape != beta.shape:
            raise ValueError(f"log_decay_cumsum must have shape {tuple(beta.shape)}, got {tuple(log_decay_cumsum.shape)}")
    dtype = k.dtype
    k, beta, log_decay_cumsum = _upcast(k, beta, log_decay_cumsum)  # the solve needs float32 or float64
    c = k.shape[-2]
    gram = k @ k.transpose(-1, -2)
    if log_decay_cumsum is not None:
        strict = torch.ones(c, c, dtype=torch.bool, device=k.device).tril(-1)
        diff = (log_decay_cumsum[..., :, None] - log_decay_cumsum[..., None, :]).masked_fill(~strict, float("-inf"))
        gram = gram * diff.exp()
    a = (beta[..., :, None] * gram).tril(-1)
    eye = torch.eye(c, dtype=k.dtype, device=k.device)
    rhs = torch.diag_embed(beta)
    return torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True).to(dtype)


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
    q, k, v = _require_qkv(q, k, v)
    beta = _require_beta(beta, k)
    log_decay = _require_log_decay(log_decay, k, vector_ok=False)
    chunk = require_positive_int("chunk_size", chunk_size)
    dtype = q.dtype
    q, k, v, beta, log_decay = _upcast(q, k, v, beta, log_decay)
    b, h, length, dk = k.shape
    dv = v.shape[-1]
    state = _require_state(initial_state, b, h, dk, dv, k, dtype)
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
    if g is None:
        k_out = kc
    else:  # exp(b_C - b_i), never exp(b_C) / exp(b_i): both underflow to 0 under strong gates (0/0 = NaN)
        k_out = kc * (g[..., -1:] - g).exp()[..., None]
    outs = []
    for i in range(n):
        pseudo = u[:, :, i] - w[:, :, i] @ state
        outs.append(q_in[:, :, i] @ state + scores[:, :, i] @ pseudo)
        state = gamma[:, :, i, -1, None, None] * state + k_out[:, :, i].transpose(-1, -2) @ pseudo
    out = torch.stack(outs, dim=2).reshape(b, h, n * chunk, dv)[:, :, :length].to(dtype)
    return (out, state.to(dtype)) if return_state else out


# --------------------------------------------------------------------------- test-time training


def ttt_inner_loss(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """TTT-linear's self-supervised loss ``½ ‖Sᵀ k − v‖²``, summed over batch and heads.

    ``state`` ``(B, H, D_k, D_v)`` is the weight of the inner linear model;
    ``k`` ``(B, H, D_k)`` is its input and ``v`` ``(B, H, D_v)`` the target. Its
    gradient with respect to ``state`` is ``k (Sᵀk − v)ᵀ``.
    """
    state = require_float_tensor("state", state, ndim=4)
    k = require_float_tensor("k", k, ndim=3)
    v = require_float_tensor("v", v, ndim=3)
    b, h, dk, dv = state.shape
    if tuple(k.shape) != (b, h, dk) or tuple(v.shape) != (b, h, dv):
        raise ValueError(f"expected state (B, H, D_k, D_v), k (B, H, D_k) = {(b, h, dk)} and v (B, H, D_v) = "
                         f"{(b, h, dv)}; got state {tuple(state.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (state.dtype == k.dtype == v.dtype):
        raise TypeError(f"state, k and v must share one dtype, got {state.dtype}, {k.dtype}, {v.dtype}")
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
    q, k, v = _require_qkv(q, k, v)
    eta = _require_beta(lr, k, "lr")
    mini_batch = require_positive_int("mini_batch", mini_batch)
    dtype = q.dtype
    q, k, v, eta = _upcast(q, k, v, eta)
    b, h, length, dk = k.shape
    state = _require_state(initial_state, b, h, dk, v.shape[-1], k, dtype)
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
    out = torch.cat(outs, dim=2).to(dtype)
    return (out, state.to(dtype)) if return_state else out


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
    q, k, v = _require_qkv(q, k, v)
    eta = _require_beta(lr, k, "lr")
    mini_batch = require_positive_int("mini_batch", mini_batch)
    dtype = q.dtype
    q, k, v, eta = _upcast(q, k, v, eta)
    b, h, length, dk = k.shape
    state = _require_state(initial_state, b, h, dk, v.shape[-1], k, dtype)
    outs = []
    for start in range(0, length, mini_batch):
        stop = min(length, start + mini_batch)
        qb, kb, vb, eb = q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], eta[:, :, start:stop]
        scaled_errors = eb[..., None] * (kb @ state - vb)  # diag(η) (K S_0 − V)
        outs.append(qb @ state - (qb @ kb.transpose(-1, -2)).tril() @ scaled_errors)
        state = state - kb.transpose(-1, -2) @ scaled_errors
    out = torch.cat(outs, dim=2).to(dtype)
    return (out, state.to(dtype)) if return_state else out


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
    q, k, v = _require_qkv(q, k, v)
    require_choice("rule", rule, ("add", "delta"))
    log_decay = _require_log_decay(log_decay, k)
    beta = _require_beta(beta, k)
    dtype = q.dtype
    q, k, v, log_decay, beta = _upcast(q, k, v, log_decay, beta)
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
    return torch.stack(outs, dim=2).to(dtype)
