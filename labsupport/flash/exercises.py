"""Chapter 01's exercise checkers and the seeded cases they run.

* :func:`check_online_softmax_update` — exercise 1, one online-softmax step with values.
* :func:`check_flash_forward` — exercise 2, the tiled forward pass ``(out, lse)``.
* :func:`check_flash_backward` — exercise 3, the backward pass by recomputation.

Each compares the learner's function with the reference of
:mod:`labsupport.flash.reference` / :mod:`labsupport.flash.tiled` through
:func:`labsupport.harness.checking.check_function`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from labsupport.flash import reference as _reference  # a module, so the exercise's own name stays out of this one
from labsupport.flash import tiled as _tiled
from labsupport.flash.tiled import flash_attention_forward
from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.diagnosis import known_mistakes
from labsupport.harness.guards import refuse_calls
from labsupport.harness.numerics import seeded_randn

__all__ = ["check_flash_backward", "check_flash_forward", "check_online_softmax_update"]


# The library's own versions of the exercises: each checker refuses them (labsupport.harness.guards.refuse_calls).
_LIBRARY = "is the library's version of this exercise, which the chapter uses once you have written yours"
_REFUSED_UPDATE = {_reference.online_softmax_update: f"labsupport.flash.reference.online_softmax_update {_LIBRARY}"}
_REFUSED_FORWARD = {_tiled.flash_attention_forward: f"ref.flash_attention_forward {_LIBRARY}",
                    _tiled.flash_attention: f"ref.flash_attention {_LIBRARY} (with autograd)"}
_REFUSED_BACKWARD = {_tiled.flash_attention_backward: f"ref.flash_attention_backward {_LIBRARY}",
                     _tiled.flash_attention: f"ref.flash_attention {_LIBRARY} (with autograd)"}


def _update_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(101)
    cases = []
    # first block: m = -inf, l = 0, acc = 0
    r, c, dv = 4, 5, 3
    cases.append(Case(
        "first block (m = -inf, l = 0, acc = 0)",
        (torch.full((r,), float("-inf"), dtype=torch.float64), torch.zeros(r, dtype=torch.float64),
         torch.zeros(r, dv, dtype=torch.float64), seeded_randn(gen, r, c) * 3, seeded_randn(gen, c, dv)),
    ))
    # a later block where the maximum grows for some rows and not others
    m = seeded_randn(gen, r) * 2
    scores = seeded_randn(gen, r, c) * 3
    cases.append(Case(
        "later block, the maximum changes in some rows",
        (m, torch.rand(r, generator=gen, dtype=torch.float64) * 5 + 1, seeded_randn(gen, r, dv), scores,
         seeded_randn(gen, c, dv)),
    ))
    # batched (B, H, R) with large scores (overflow without subtracting the max)
    b, h = 2, 3
    cases.append(Case(
        "batched (B=2, H=3), scores around 500",
        (seeded_randn(gen, b, h, r) + 500, torch.rand(b, h, r, generator=gen, dtype=torch.float64) + 1,
         seeded_randn(gen, b, h, r, dv), seeded_randn(gen, b, h, r, c) + 500, seeded_randn(gen, b, h, c, dv)),
    ))
    # masked entries (-inf), including a row that is entirely masked so far
    scores = seeded_randn(gen, r, c)
    scores[0, :] = float("-inf")
    scores[1, 2:] = float("-inf")
    m0 = torch.tensor([float("-inf"), 0.5, 1.0, -1.0], dtype=torch.float64)
    l0 = torch.tensor([0.0, 2.0, 1.5, 3.0], dtype=torch.float64)
    acc0 = seeded_randn(gen, r, dv)
    acc0[0] = 0.0
    cases.append(Case("masked scores, one row fully masked so far", (m0, l0, acc0, scores, seeded_randn(gen, c, dv))))
    # non-contiguous inputs (views of transposed storage), float32
    v_t = seeded_randn(gen, dv, c, dtype=torch.float32).T  # (c, dv) non-contiguous
    s_t = seeded_randn(gen, c, r, dtype=torch.float32).T
    cases.append(Case(
        "float32, non-contiguous scores and v",
        (seeded_randn(gen, r, dtype=torch.float32), torch.rand(r, generator=gen) + 1,
         seeded_randn(gen, r, dv, dtype=torch.float32), s_t, v_t),
    ))
    return cases


def _update_variant(m, l, acc, scores, v, *, rescale_l: bool = True, rescale_acc: bool = True,
                    use_old_max: bool = False):
    """The online-softmax step with one of its usual slips (for the diagnoses)."""
    m_new = torch.maximum(m, scores.amax(dim=-1))
    m_ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    m_old = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    alpha = torch.exp(m - m_ref)
    p = torch.exp(scores - (m_old if use_old_max else m_ref)[..., None])
    l_new = (alpha * l if rescale_l else l) + p.sum(dim=-1)
    acc_new = (alpha[..., None] * acc if rescale_acc else acc) + p @ v
    return m_new, l_new, acc_new


_UPDATE_MISTAKES = [
    known_mistakes({"your acc_new adds this block to acc without repairing acc for the new maximum":
                    lambda *a: _update_variant(*a, rescale_acc=False)}, output=2),
    known_mistakes({"your l_new adds this block to l without repairing l for the new maximum":
                    lambda *a: _update_variant(*a, rescale_l=False)}, output=1),
    known_mistakes({"your block's exponentials are taken against the old maximum, not the new one":
                    lambda *a: _update_variant(*a, use_old_max=True)}, output=1),
]


def check_online_softmax_update(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check ``fn(m, l, acc, scores, v) -> (m_new, l_new, acc_new)`` against the reference update."""
    return check_function(
        refuse_calls(fn, _REFUSED_UPDATE),
        _reference._online_update,
        _update_cases(),
        exercise="online_softmax_update",
        atol=1e-6,
        rtol=1e-5,
        diagnose=_UPDATE_MISTAKES,
        reveal=reveal,
        hint="everything built against the old maximum is off by the same factor once the maximum moves; a row "
        "that is all -inf so far must stay at l = 0, acc = 0 (section 2's reference point). Tiered hints are "
        "above the exercise.",
        recipe="m_new = max(m, rowmax(scores)); r = m_new, or 0 where m_new = -inf; α = exp(m − r); "
        "p = exp(scores − r); l_new = α l + rowsum(p); acc_new = α acc + p v.",
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
        ("causal, Lq=20 > Lk=12, one 64-wide block: the 8 rows that see no key share a block with rows that do",
         (1, 2, 20, 12, 4), True, 64, 64, torch.float64),
        ("cross attention, Lq=9, Lk=30", (1, 2, 9, 30, 8), False, 4, 16, torch.float64),
        ("float32, non-contiguous q (a transposed view)", (1, 2, 24, 24, 8), True, 16, 8, torch.float32),
    ]
    cases = []
    for name, (b, h, lq, lk, d), causal, bq, bk, dtype in specs:
        if "non-contiguous" in name:
            q = seeded_randn(gen, b, lq, h, d, dtype=dtype).transpose(1, 2)
        else:
            q = seeded_randn(gen, b, h, lq, d, dtype=dtype)
        k = seeded_randn(gen, b, h, lk, d, dtype=dtype)
        v = seeded_randn(gen, b, h, lk, d, dtype=dtype)
        kwargs = {"causal": causal, "block_q": bq, "block_k": bk}
        if with_dout:
            out, lse = flash_attention_forward(q, k, v, causal=causal, block_q=bq, block_k=bk)
            dout = seeded_randn(gen, b, h, lq, d, dtype=dtype)
            cases.append(Case(name, (q, k, v, out, lse, dout), kwargs))
        else:
            cases.append(Case(name, (q, k, v), kwargs))
    cases.append(_tiling_guard_case(gen, with_dout))
    return cases


#: The guard case's size: a dense answer holds GUARD_L² scores, a tiled one a 64 × 64 tile at a time.
GUARD_L, GUARD_D, GUARD_BLOCK = 256, 16, 64
#: The largest tensor a tiled answer needs on the guard case: a block_q × block_k tile of scores and its
#: exponentials, with room for one more of the same size (2 · 64 · 64 = 8,192 elements). Query chunking (a whole
#: 64 × 256 row of key blocks per query block, no online softmax) needs 16,384 and is refused, as is anything of
#: the full 256 × 256, whether scores or a full-size boolean causal mask.
GUARD_MAX_ELEMENTS = 2 * GUARD_BLOCK * GUARD_BLOCK


def _tiling_guard_case(gen: torch.Generator, with_dout: bool) -> Case:
    """Causal L=256 in 64-wide blocks, with a cap on the largest tensor: dense and query-chunked answers are refused."""
    q, k, v = (seeded_randn(gen, 1, 1, GUARD_L, GUARD_D, dtype=torch.float32) for _ in range(3))
    kwargs = {"causal": True, "block_q": GUARD_BLOCK, "block_k": GUARD_BLOCK}
    args: tuple = (q, k, v)
    if with_dout:
        out, lse = flash_attention_forward(q, k, v, **kwargs)
        args = (q, k, v, out, lse, seeded_randn(gen, 1, 1, GUARD_L, GUARD_D, dtype=torch.float32))
    return Case(
        f"tiling guard: causal, L={GUARD_L}, {GUARD_BLOCK}-wide blocks, float32", args, kwargs,
        max_elements=GUARD_MAX_ELEMENTS,
        max_elements_note=(
            f"A tiled answer's largest tensors are one block_q × block_k tile ({GUARD_BLOCK} × {GUARD_BLOCK}: its "
            f"scores, their exponentials, its mask) and the {GUARD_L} × {GUARD_D} output. A {GUARD_BLOCK} × "
            f"{GUARD_L} tensor is a whole row of key blocks for one query block (query chunking: each tile must be "
            f"folded in with the online-softmax update instead); a {GUARD_L} × {GUARD_L} one is the whole score "
            "matrix, or a causal mask built for all positions (build each diagonal tile's mask from its own row "
            "and column indices)."),
    )


def _forward_reference(q, k, v, causal=False, block_q=64, block_k=64):
    return _tiled._tiled_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)


def _dense_forward(q, k, v, causal=False, block_q=64, block_k=64, *, top_left: bool = False):
    """Dense attention and its logsumexp, with the causal mask aligned bottom-right (or top-left)."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if causal:
        lq, lk = scores.shape[-2], scores.shape[-1]
        hidden = torch.ones(lq, lk, dtype=torch.bool).triu(1 + (0 if top_left else lk - lq))
        scores = scores.masked_fill(hidden, float("-inf"))
    lse = scores.logsumexp(dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    return probs @ v, lse


_FORWARD_MISTAKES = [
    known_mistakes({"your causal mask is aligned top-left: with Lq ≠ Lk, the last query must see the last key "
                    "(bottom-right, as the exercise states)":
                    lambda *a, **kw: _dense_forward(*a, **kw, top_left=True)}, output=0, atol=1e-5, rtol=1e-4),
    known_mistakes({"your lse is the logsumexp of the unscaled scores":
                    lambda q, k, v, **kw: _dense_forward(q * q.shape[-1] ** 0.5, k, v, **kw)}, output=1,
                   atol=1e-5, rtol=1e-4),
]


def check_flash_forward(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check ``fn(q, k, v, causal=..., block_q=..., block_k=...) -> (out, lse)``.

    ``out`` must equal dense attention and ``lse`` the row logsumexp of the scaled
    scores (``-inf`` for a row that sees no key; its output row is zeros).
    """
    return check_function(
        refuse_calls(fn, _REFUSED_FORWARD),
        _forward_reference,
        _attention_cases(with_dout=False),
        exercise="flash_forward",
        atol=1e-5,
        rtol=1e-4,
        diagnose=_FORWARD_MISTAKES,
        reveal=reveal,
        hint="read the failing case's name: a block size that does not divide L, Lq ≠ Lk under causal, and a "
        "row that sees no key each test one part of the loop. Tiered hints are above the exercise.",
        recipe="for each query block: m = -inf, l = 0, acc = 0; for each key block (skipping tiles wholly above "
        "the bottom-right-aligned diagonal): scores = q kᵀ / sqrt(D), -inf where key j > query i + (Lk − Lq), "
        "(m, l, acc) = online_softmax_update(m, l, acc, scores, v); then out = acc / l (0 where l = 0) and "
        "lse = m + log l (-inf where l = 0).",
        output_names=("out", "lse"),
    )


def _backward_reference(q, k, v, out, lse, dout, causal=False, block_q=64, block_k=64):
    return _tiled._tiled_backward(q, k, v, out, lse, dout, causal=causal, block_q=block_q, block_k=block_k)


def check_flash_backward(fn: Callable[..., object], reveal: bool = False) -> CheckResult:
    """Check ``fn(q, k, v, out, lse, dout, causal=..., block_q=..., block_k=...) -> (dq, dk, dv)``."""
    return check_function(
        refuse_calls(fn, _REFUSED_BACKWARD),
        _backward_reference,
        _attention_cases(with_dout=True),
        exercise="flash_backward",
        atol=1e-5,
        rtol=1e-4,
        reveal=reveal,
        hint="rebuild each tile's probabilities from the saved lse (0 where masked, and for a row with "
        "lse = -inf) and walk the same tiles as the forward pass; a gradient off by a constant factor points "
        "at the scale. Section 7's equations give each gradient; tiered hints are above the exercise.",
        recipe="per tile: P = exp(q kᵀ/sqrt(D) − lse) (0 where masked or lse = -inf); dV += Pᵀ dO; "
        "dP = dO vᵀ; dS = P ⊙ (dP − rowsum(dO ⊙ O)); dQ += dS k / sqrt(D); dK += dSᵀ q / sqrt(D).",
        output_names=("dq", "dk", "dv"),
    )
