"""Chapter 03's Triton kernels for the chunkwise (gated) delta rule; the launches and checks are in
:mod:`labsupport.linear_attention.triton_delta`, whose docstring explains the algorithm.

Three preparation kernels (whole rows, ``_delta_prep_kernel`` with the inverse by doubling on the whole chunk and
``_delta_prep_blocked_kernel`` by blocks; ``_delta_prep_pieces_kernel``, by blocks and in pieces of columns, the
default), the state pass (``_delta_state_kernel``) and the separate output kernel (``_delta_output_kernel``).
This module imports without Triton and then defines nothing.
"""

from __future__ import annotations

try:  # Triton is optional
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

if triton is not None:

    @triton.jit
    def _chunk_scores(q, k, diff, causal, PREC: tl.constexpr):
        """``(Q Kᵀ ⊙ Γ)`` with 0 above the diagonal; ``exp`` is taken only of differences ``<= 0``."""
        scores = tl.dot(q, tl.trans(k), input_precision=PREC)
        return tl.where(causal, scores * tl.exp(tl.where(causal, diff, 0.0)), 0.0)

    @triton.jit
    def _unit_lower_inverse(a, S: tl.constexpr, LOG_S: tl.constexpr, PREC: tl.constexpr):
        """``(I + a)⁻¹`` for a strictly lower-triangular ``S × S`` tile ``a``, by doubling (see the module)."""
        offs = tl.arange(0, S)
        rows = offs[:, None]
        cols = offs[None, :]
        # the first step (blocks of 1) needs no product: X_2 = I − A ⊙ M_1
        first = (rows > cols) & ((rows // 2) == (cols // 2))
        x = tl.where(rows == cols, 1.0, 0.0) - tl.where(first, a, 0.0)
        for level in tl.static_range(1, LOG_S):
            s = 1 << level
            corner = ((rows // (2 * s)) == (cols // (2 * s))) & ((rows // s) % 2 == 1) & ((cols // s) % 2 == 0)
            step = tl.dot(tl.where(corner, a, 0.0), x, input_precision=PREC)
            x = x - tl.dot(x, step, input_precision=PREC)
        return x

    @triton.jit
    def _delta_prep_kernel(
        Q, K, V, BETA, LD, W, U, SC, G,
        length, n_chunks,
        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
        C: tl.constexpr, LOG_C: tl.constexpr, HAS_DECAY: tl.constexpr, STORE_SCORES: tl.constexpr,
        PREC: tl.constexpr, PREC_INV: tl.constexpr,
    ):
        pid_n = tl.program_id(0)  # chunk
        pid_bh = tl.program_id(1)  # batch * heads + head
        offs_c = tl.arange(0, C)
        offs_k = tl.arange(0, BK)
        offs_v = tl.arange(0, BDV)
        tok = pid_n * C + offs_c
        valid = tok < length
        kmask = valid[:, None] & (offs_k[None, :] < DK)
        vmask = valid[:, None] & (offs_v[None, :] < DV)
        beta = tl.load(BETA + pid_bh * length + tok, mask=valid, other=0.0).to(tl.float32)
        if HAS_DECAY:
            ld = tl.load(LD + pid_bh * length + tok, mask=valid, other=0.0).to(tl.float32)
            g = tl.cumsum(ld, 0)  # b_i: log-decay from the chunk start to token i, inclusive
        else:
            g = tl.zeros((C,), dtype=tl.float32)
        k = tl.load(K + (pid_bh * length + tok)[:, None] * DK + offs_k[None, :], mask=kmask, other=0.0)
        k = k.to(tl.float32)
        rows = offs_c[:, None]
        cols = offs_c[None, :]
        diff = g[:, None] - g[None, :]
        if STORE_SCORES:  # intra-chunk scores (Q Kᵀ ⊙ Γ), causal with the diagonal, for the fused output
            q = tl.load(Q + (pid_bh * length + tok)[:, None] * DK + offs_k[None, :], mask=kmask, other=0.0)
            scores = _chunk_scores(q.to(tl.float32), k, diff, rows >= cols, PREC)
            tl.store(SC + ((pid_bh * n_chunks + pid_n) * C + rows) * C + cols, scores.to(SC.dtype.element_ty))
        # A = StrictLower(diag(β) (K Kᵀ ⊙ Γ))
        strict = rows > cols
        gram = tl.dot(k, tl.trans(k), input_precision=PREC)
        a = tl.where(strict, beta[:, None] * gram * tl.exp(tl.where(strict, diff, 0.0)), 0.0)
        x = _unit_lower_inverse(a, C, LOG_C, PREC_INV)  # X = (I + A)⁻¹
        t = x * beta[None, :]  # T = X diag(β)
        w = tl.dot(t, k * tl.exp(g)[:, None], input_precision=PREC)
        out_rows = (pid_bh * n_chunks * C + tok)[:, None]  # W, U, G are padded to whole chunks
        tl.store(W + out_rows * DK + offs_k[None, :], w.to(W.dtype.element_ty), mask=offs_k[None, :] < DK)
        v = tl.load(V + (pid_bh * length + tok)[:, None] * DV + offs_v[None, :], mask=vmask, other=0.0)
        u = tl.dot(t, v.to(tl.float32), input_precision=PREC)
        tl.store(U + out_rows * DV + offs_v[None, :], u.to(U.dtype.element_ty), mask=offs_v[None, :] < DV)
        tl.store(G + pid_bh * n_chunks * C + tok, g)

    @triton.jit
    def _rows(PTR, pid_bh, length, tok, offs, D: tl.constexpr):
        """Rows ``tok`` of one head of a ``(B·H, L, D)`` tensor as float32, zero past ``L`` and ``D``."""
        mask = (tok < length)[:, None] & (offs[None, :] < D)
        return tl.load(PTR + (pid_bh * length + tok)[:, None] * D + offs[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _entries(PTR, pid_bh, length, tok):
        """Entries ``tok`` of one head of a ``(B·H, L)`` tensor as float32, zero past ``L``."""
        return tl.load(PTR + pid_bh * length + tok, mask=tok < length, other=0.0).to(tl.float32)

    @triton.jit
    def _gram_block(kr, kc, br, gr, gc, PREC: tl.constexpr):
        """``diag(β_r) (K_r K_cᵀ ⊙ Γ)`` for a block of rows entirely after the block of columns (so ``g_r ≤ g_c``)."""
        return br[:, None] * tl.dot(kr, tl.trans(kc), input_precision=PREC) * tl.exp(gr[:, None] - gc[None, :])

    @triton.jit
    def _gram_diagonal(k, b, g, below, PREC: tl.constexpr):
        """The same on a diagonal block, kept where ``below`` (strictly lower, or lower with the diagonal)."""
        diff = tl.where(below, g[:, None] - g[None, :], 0.0)
        return tl.where(below, b[:, None] * tl.dot(k, tl.trans(k), input_precision=PREC) * tl.exp(diff), 0.0)

    @triton.jit
    def _scores_diagonal(q, k, g, causal, PREC: tl.constexpr):
        """``(Q Kᵀ ⊙ Γ)`` on a diagonal block, zero above the diagonal."""
        return _chunk_scores(q, k, g[:, None] - g[None, :], causal, PREC)

    @triton.jit
    def _store_block(PTR, first_row, offs_r, offs_c, D: tl.constexpr, value):
        """``value`` into rows ``first_row + offs_r`` (a ``(·, D)`` row-major tensor), columns below ``D``."""
        tl.store(PTR + (first_row + offs_r)[:, None] * D + offs_c[None, :], value.to(PTR.dtype.element_ty),
                 mask=offs_c[None, :] < D)

    @triton.jit
    def _block_gates(BETA, LD, pid_bh, length, t0, t1, t2, t3, S: tl.constexpr, HAS_DECAY: tl.constexpr):
        """``β`` and the cumulative log-decay ``b`` (from the chunk start, carried across the blocks) of the four
        blocks of ``S`` tokens ``t0 … t3``; ``b = 0`` without decay."""
        b0 = _entries(BETA, pid_bh, length, t0)
        b1 = _entries(BETA, pid_bh, length, t1)
        b2 = _entries(BETA, pid_bh, length, t2)
        b3 = _entries(BETA, pid_bh, length, t3)
        if HAS_DECAY:
            l0 = _entries(LD, pid_bh, length, t0)
            l1 = _entries(LD, pid_bh, length, t1)
            l2 = _entries(LD, pid_bh, length, t2)
            l3 = _entries(LD, pid_bh, length, t3)
            g0 = tl.cumsum(l0, 0)
            g1 = tl.cumsum(l1, 0) + tl.sum(l0, 0)
            g2 = tl.cumsum(l2, 0) + (tl.sum(l0, 0) + tl.sum(l1, 0))
            g3 = tl.cumsum(l3, 0) + (tl.sum(l0, 0) + tl.sum(l1, 0) + tl.sum(l2, 0))
        else:
            g0 = tl.zeros((S,), dtype=tl.float32)
            g1 = g0
            g2 = g0
            g3 = g0
        return b0, b1, b2, b3, g0, g1, g2, g3

    @triton.jit
    def _blocks_below(x00, x11, x22, x33, a10, a20, a21, a30, a31, a32, PREC_INV: tl.constexpr):
        """The blocks of ``(I + A)⁻¹`` below its inverted diagonal blocks, by block forward substitution:
        ``X_ij = −X_ii Σ_{j ≤ m < i} A_im X_mj``. Returns ``X_10, X_20, X_21, X_30, X_31, X_32``."""
        x10 = -tl.dot(x11, tl.dot(a10, x00, input_precision=PREC_INV), input_precision=PREC_INV)
        x21 = -tl.dot(x22, tl.dot(a21, x11, input_precision=PREC_INV), input_precision=PREC_INV)
        x32 = -tl.dot(x33, tl.dot(a32, x22, input_precision=PREC_INV), input_precision=PREC_INV)
        x20 = tl.dot(a20, x00, input_precision=PREC_INV)
        x20 = -tl.dot(x22, tl.dot(a21, x10, acc=x20, input_precision=PREC_INV), input_precision=PREC_INV)
        x31 = tl.dot(a31, x11, input_precision=PREC_INV)
        x31 = -tl.dot(x33, tl.dot(a32, x21, acc=x31, input_precision=PREC_INV), input_precision=PREC_INV)
        x30 = tl.dot(a30, x00, input_precision=PREC_INV)
        x30 = tl.dot(a31, x10, acc=x30, input_precision=PREC_INV)
        x30 = -tl.dot(x33, tl.dot(a32, x20, acc=x30, input_precision=PREC_INV), input_precision=PREC_INV)
        return x10, x20, x21, x30, x31, x32

    @triton.jit
    def _store_gates(PTR, offs, S: tl.constexpr, g0, g1, g2, g3):
        """The four blocks' cumulative log-decays into one chunk's ``C = 4 S`` entries at ``PTR``."""
        tl.store(PTR + offs, g0)
        tl.store(PTR + S + offs, g1)
        tl.store(PTR + 2 * S + offs, g2)
        tl.store(PTR + 3 * S + offs, g3)

    @triton.jit
    def _delta_prep_blocked_kernel(
        Q, K, V, BETA, LD, W, U, SC, G,
        length, n_chunks,
        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
        C: tl.constexpr, S: tl.constexpr, LOG_S: tl.constexpr, HAS_DECAY: tl.constexpr,
        STORE_SCORES: tl.constexpr, PREC: tl.constexpr, PREC_INV: tl.constexpr,
    ):
        """The preparation kernel with ``(I + A)⁻¹`` by blocks: the chunk is 4 blocks of ``S = C / 4`` tokens.

        The diagonal blocks are inverted by doubling; the blocks below them by block forward substitution,
        ``X_ij = −X_ii Σ_{j ≤ m < i} A_im X_mj``. Every product is an ``S × S`` (or ``S × D``) one, about a
        third of the arithmetic of doubling on the whole ``C × C`` matrix.
        """
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        offs = tl.arange(0, S)
        offs_k = tl.arange(0, BK)
        offs_v = tl.arange(0, BDV)
        t0 = pid_n * C + offs
        t1 = t0 + S
        t2 = t0 + 2 * S
        t3 = t0 + 3 * S
        b0, b1, b2, b3, g0, g1, g2, g3 = _block_gates(BETA, LD, pid_bh, length, t0, t1, t2, t3, S, HAS_DECAY)
        k0 = _rows(K, pid_bh, length, t0, offs_k, DK)
        k1 = _rows(K, pid_bh, length, t1, offs_k, DK)
        k2 = _rows(K, pid_bh, length, t2, offs_k, DK)
        k3 = _rows(K, pid_bh, length, t3, offs_k, DK)
        strict = offs[:, None] > offs[None, :]
        causal = offs[:, None] >= offs[None, :]
        if STORE_SCORES:  # (Q Kᵀ ⊙ Γ) by blocks, zero above the diagonal
            sc_row = (pid_bh * n_chunks + pid_n) * C
            q0 = _rows(Q, pid_bh, length, t0, offs_k, DK)
            q1 = _rows(Q, pid_bh, length, t1, offs_k, DK)
            q2 = _rows(Q, pid_bh, length, t2, offs_k, DK)
            q3 = _rows(Q, pid_bh, length, t3, offs_k, DK)
            ones = tl.full((S,), 1.0, tl.float32)
            zero = tl.zeros((S, S), dtype=tl.float32)
            _store_block(SC, sc_row, offs, offs, C, _scores_diagonal(q0, k0, g0, causal, PREC))
            _store_block(SC, sc_row, offs, offs + S, C, zero)
            _store_block(SC, sc_row, offs, offs + 2 * S, C, zero)
            _store_block(SC, sc_row, offs, offs + 3 * S, C, zero)
            _store_block(SC, sc_row + S, offs, offs, C, _gram_block(q1, k0, ones, g1, g0, PREC))
            _store_block(SC, sc_row + S, offs, offs + S, C, _scores_diagonal(q1, k1, g1, causal, PREC))
            _store_block(SC, sc_row + S, offs, offs + 2 * S, C, zero)
            _store_block(SC, sc_row + S, offs, offs + 3 * S, C, zero)
            _store_block(SC, sc_row + 2 * S, offs, offs, C, _gram_block(q2, k0, ones, g2, g0, PREC))
            _store_block(SC, sc_row + 2 * S, offs, offs + S, C, _gram_block(q2, k1, ones, g2, g1, PREC))
            _store_block(SC, sc_row + 2 * S, offs, offs + 2 * S, C, _scores_diagonal(q2, k2, g2, causal, PREC))
            _store_block(SC, sc_row + 2 * S, offs, offs + 3 * S, C, zero)
            _store_block(SC, sc_row + 3 * S, offs, offs, C, _gram_block(q3, k0, ones, g3, g0, PREC))
            _store_block(SC, sc_row + 3 * S, offs, offs + S, C, _gram_block(q3, k1, ones, g3, g1, PREC))
            _store_block(SC, sc_row + 3 * S, offs, offs + 2 * S, C, _gram_block(q3, k2, ones, g3, g2, PREC))
            _store_block(SC, sc_row + 3 * S, offs, offs + 3 * S, C, _scores_diagonal(q3, k3, g3, causal, PREC))
        # the diagonal blocks of (I + A)⁻¹
        x00 = _unit_lower_inverse(_gram_diagonal(k0, b0, g0, strict, PREC), S, LOG_S, PREC_INV)
        x11 = _unit_lower_inverse(_gram_diagonal(k1, b1, g1, strict, PREC), S, LOG_S, PREC_INV)
        x22 = _unit_lower_inverse(_gram_diagonal(k2, b2, g2, strict, PREC), S, LOG_S, PREC_INV)
        x33 = _unit_lower_inverse(_gram_diagonal(k3, b3, g3, strict, PREC), S, LOG_S, PREC_INV)
        # the blocks below them, by block forward substitution
        a10 = _gram_block(k1, k0, b1, g1, g0, PREC)
        a20 = _gram_block(k2, k0, b2, g2, g0, PREC)
        a21 = _gram_block(k2, k1, b2, g2, g1, PREC)
        a30 = _gram_block(k3, k0, b3, g3, g0, PREC)
        a31 = _gram_block(k3, k1, b3, g3, g1, PREC)
        a32 = _gram_block(k3, k2, b3, g3, g2, PREC)
        x10, x20, x21, x30, x31, x32 = _blocks_below(x00, x11, x22, x33, a10, a20, a21, a30, a31, a32, PREC_INV)
        # T = X diag(β); W = T (exp(b) ⊙ K), U = T V, block row by block row
        kg0 = k0 * tl.exp(g0)[:, None]
        kg1 = k1 * tl.exp(g1)[:, None]
        kg2 = k2 * tl.exp(g2)[:, None]
        kg3 = k3 * tl.exp(g3)[:, None]
        v0 = _rows(V, pid_bh, length, t0, offs_v, DV)
        v1 = _rows(V, pid_bh, length, t1, offs_v, DV)
        v2 = _rows(V, pid_bh, length, t2, offs_v, DV)
        v3 = _rows(V, pid_bh, length, t3, offs_v, DV)
        row = pid_bh * n_chunks * C + pid_n * C  # W, U, G are padded to whole chunks
        tb0 = x00 * b0[None, :]
        _store_block(W, row, offs, offs_k, DK, tl.dot(tb0, kg0, input_precision=PREC))
        _store_block(U, row, offs, offs_v, DV, tl.dot(tb0, v0, input_precision=PREC))
        tb0 = x10 * b0[None, :]
        tb1 = x11 * b1[None, :]
        w = tl.dot(tb1, kg1, acc=tl.dot(tb0, kg0, input_precision=PREC), input_precision=PREC)
        u = tl.dot(tb1, v1, acc=tl.dot(tb0, v0, input_precision=PREC), input_precision=PREC)
        _store_block(W, row + S, offs, offs_k, DK, w)
        _store_block(U, row + S, offs, offs_v, DV, u)
        tb0 = x20 * b0[None, :]
        tb1 = x21 * b1[None, :]
        tb2 = x22 * b2[None, :]
        w = tl.dot(tb1, kg1, acc=tl.dot(tb0, kg0, input_precision=PREC), input_precision=PREC)
        w = tl.dot(tb2, kg2, acc=w, input_precision=PREC)
        u = tl.dot(tb1, v1, acc=tl.dot(tb0, v0, input_precision=PREC), input_precision=PREC)
        u = tl.dot(tb2, v2, acc=u, input_precision=PREC)
        _store_block(W, row + 2 * S, offs, offs_k, DK, w)
        _store_block(U, row + 2 * S, offs, offs_v, DV, u)
        tb0 = x30 * b0[None, :]
        tb1 = x31 * b1[None, :]
        tb2 = x32 * b2[None, :]
        tb3 = x33 * b3[None, :]
        w = tl.dot(tb1, kg1, acc=tl.dot(tb0, kg0, input_precision=PREC), input_precision=PREC)
        w = tl.dot(tb3, kg3, acc=tl.dot(tb2, kg2, acc=w, input_precision=PREC), input_precision=PREC)
        u = tl.dot(tb1, v1, acc=tl.dot(tb0, v0, input_precision=PREC), input_precision=PREC)
        u = tl.dot(tb3, v3, acc=tl.dot(tb2, v2, acc=u, input_precision=PREC), input_precision=PREC)
        _store_block(W, row + 3 * S, offs, offs_k, DK, w)
        _store_block(U, row + 3 * S, offs, offs_v, DV, u)
        _store_gates(G + pid_bh * n_chunks * C + pid_n * C, offs, S, g0, g1, g2, g3)

    @triton.jit
    def _piece(PTR, pid_bh, length, tok, cols, D: tl.constexpr, F32: tl.constexpr):
        """Rows ``tok``, columns ``cols`` of one head of a ``(B·H, L, D)`` tensor, zero past ``L`` and ``D``.

        In the tensor's dtype (bf16 operands go to the tensor cores as they are: their products are exact in
        float32, as tf32 products of the same numbers are), or as float32 where ``F32`` (the CPU interpreter,
        whose products of bf16 tiles are wrong in Triton 3.9).
        """
        mask = (tok < length)[:, None] & (cols[None, :] < D)
        x = tl.load(PTR + (pid_bh * length + tok)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        if F32:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _dt(a, b, acc, PREC: tl.constexpr):
        """``acc + a bᵀ``."""
        return tl.dot(a, tl.trans(b), acc=acc, input_precision=PREC)

    @triton.jit
    def _decayed(raw, br, gr, gc, mask):
        """``diag(β_r) (raw ⊙ Γ)`` where ``mask``, else 0; ``exp`` only of differences taken where ``mask``."""
        return tl.where(mask, br[:, None] * raw * tl.exp(tl.where(mask, gr[:, None] - gc[None, :], 0.0)), 0.0)

    @triton.jit
    def _mm(a, b, acc, PREC: tl.constexpr):
        """``acc + a b``."""
        return tl.dot(a, b, acc=acc, input_precision=PREC)

    @triton.jit
    def _delta_prep_pieces_kernel(
        Q, K, V, BETA, LD, W, U, SC, G,
        length, n_chunks,
        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
        C: tl.constexpr, S: tl.constexpr, LOG_S: tl.constexpr, HAS_DECAY: tl.constexpr,
        STORE_SCORES: tl.constexpr, PREC: tl.constexpr, PREC_INV: tl.constexpr, BD: tl.constexpr,
        F32: tl.constexpr,
    ):
        """The blocked preparation, reading ``Q, K, V`` in pieces of ``BD`` columns (``prep_columns``).

        The same arithmetic as :func:`_delta_prep_blocked_kernel`, arranged so that few registers are live: a
        product of two ``S``-row blocks (``K_i K_jᵀ``, ``Q_i K_jᵀ``) is accumulated over pieces of ``BD`` columns
        instead of taking whole ``D``-wide rows at once, and ``W`` and ``U`` are written a piece of columns at a
        time. A ``S × D`` block as the left operand of a product is copied into every warp's registers (the warps
        split the product's columns), so four of them at ``D = 128`` cannot be held by 128 threads without spilling
        to local memory; pieces of 16 columns can. The scores are accumulated and stored before the Gram blocks,
        so the two sets of ten accumulators are never live together. ``K`` is read three times (scores, Gram
        blocks, ``W``): the re-reads come from the L1/L2 caches.
        """
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        offs = tl.arange(0, S)
        offs_d = tl.arange(0, BD)
        t0 = pid_n * C + offs
        t1 = t0 + S
        t2 = t0 + 2 * S
        t3 = t0 + 3 * S
        b0, b1, b2, b3, g0, g1, g2, g3 = _block_gates(BETA, LD, pid_bh, length, t0, t1, t2, t3, S, HAS_DECAY)
        z = tl.zeros((S, S), dtype=tl.float32)
        strict = offs[:, None] > offs[None, :]
        causal = offs[:, None] >= offs[None, :]
        full = offs[:, None] >= 0
        if STORE_SCORES:  # q_i k_jᵀ (i ≥ j) over pieces of BD columns, stored before the Gram pass
            s00 = z; s10 = z; s11 = z; s20 = z; s21 = z; s22 = z; s30 = z; s31 = z; s32 = z; s33 = z
            for d in range(0, BK, BD):
                cols = d + offs_d
                k0 = _piece(K, pid_bh, length, t0, cols, DK, F32)
                k1 = _piece(K, pid_bh, length, t1, cols, DK, F32)
                k2 = _piece(K, pid_bh, length, t2, cols, DK, F32)
                k3 = _piece(K, pid_bh, length, t3, cols, DK, F32)
                q = _piece(Q, pid_bh, length, t0, cols, DK, F32)
                s00 = _dt(q, k0, s00, PREC)
                q = _piece(Q, pid_bh, length, t1, cols, DK, F32)
                s10 = _dt(q, k0, s10, PREC)
                s11 = _dt(q, k1, s11, PREC)
                q = _piece(Q, pid_bh, length, t2, cols, DK, F32)
                s20 = _dt(q, k0, s20, PREC)
                s21 = _dt(q, k1, s21, PREC)
                s22 = _dt(q, k2, s22, PREC)
                q = _piece(Q, pid_bh, length, t3, cols, DK, F32)
                s30 = _dt(q, k0, s30, PREC)
                s31 = _dt(q, k1, s31, PREC)
                s32 = _dt(q, k2, s32, PREC)
                s33 = _dt(q, k3, s33, PREC)
            ones = tl.full((S,), 1.0, tl.float32)
            sc_row = (pid_bh * n_chunks + pid_n) * C
            _store_block(SC, sc_row, offs, offs, C, _decayed(s00, ones, g0, g0, causal))
            _store_block(SC, sc_row, offs, offs + S, C, z)
            _store_block(SC, sc_row, offs, offs + 2 * S, C, z)
            _store_block(SC, sc_row, offs, offs + 3 * S, C, z)
            _store_block(SC, sc_row + S, offs, offs, C, _decayed(s10, ones, g1, g0, full))
            _store_block(SC, sc_row + S, offs, offs + S, C, _decayed(s11, ones, g1, g1, causal))
            _store_block(SC, sc_row + S, offs, offs + 2 * S, C, z)
            _store_block(SC, sc_row + S, offs, offs + 3 * S, C, z)
            _store_block(SC, sc_row + 2 * S, offs, offs, C, _decayed(s20, ones, g2, g0, full))
            _store_block(SC, sc_row + 2 * S, offs, offs + S, C, _decayed(s21, ones, g2, g1, full))
            _store_block(SC, sc_row + 2 * S, offs, offs + 2 * S, C, _decayed(s22, ones, g2, g2, causal))
            _store_block(SC, sc_row + 2 * S, offs, offs + 3 * S, C, z)
            _store_block(SC, sc_row + 3 * S, offs, offs, C, _decayed(s30, ones, g3, g0, full))
            _store_block(SC, sc_row + 3 * S, offs, offs + S, C, _decayed(s31, ones, g3, g1, full))
            _store_block(SC, sc_row + 3 * S, offs, offs + 2 * S, C, _decayed(s32, ones, g3, g2, full))
            _store_block(SC, sc_row + 3 * S, offs, offs + 3 * S, C, _decayed(s33, ones, g3, g3, causal))
        # raw Gram blocks k_i k_jᵀ (i ≥ j), over pieces of BD columns
        a00 = z; a10 = z; a11 = z; a20 = z; a21 = z; a22 = z; a30 = z; a31 = z; a32 = z; a33 = z
        for d in range(0, BK, BD):
            cols = d + offs_d
            k0 = _piece(K, pid_bh, length, t0, cols, DK, F32)
            k1 = _piece(K, pid_bh, length, t1, cols, DK, F32)
            k2 = _piece(K, pid_bh, length, t2, cols, DK, F32)
            k3 = _piece(K, pid_bh, length, t3, cols, DK, F32)
            a00 = _dt(k0, k0, a00, PREC)
            a10 = _dt(k1, k0, a10, PREC)
            a11 = _dt(k1, k1, a11, PREC)
            a20 = _dt(k2, k0, a20, PREC)
            a21 = _dt(k2, k1, a21, PREC)
            a22 = _dt(k2, k2, a22, PREC)
            a30 = _dt(k3, k0, a30, PREC)
            a31 = _dt(k3, k1, a31, PREC)
            a32 = _dt(k3, k2, a32, PREC)
            a33 = _dt(k3, k3, a33, PREC)
        x00 = _unit_lower_inverse(_decayed(a00, b0, g0, g0, strict), S, LOG_S, PREC_INV)
        x11 = _unit_lower_inverse(_decayed(a11, b1, g1, g1, strict), S, LOG_S, PREC_INV)
        x22 = _unit_lower_inverse(_decayed(a22, b2, g2, g2, strict), S, LOG_S, PREC_INV)
        x33 = _unit_lower_inverse(_decayed(a33, b3, g3, g3, strict), S, LOG_S, PREC_INV)
        a10 = _decayed(a10, b1, g1, g0, full)
        a20 = _decayed(a20, b2, g2, g0, full)
        a21 = _decayed(a21, b2, g2, g1, full)
        a30 = _decayed(a30, b3, g3, g0, full)
        a31 = _decayed(a31, b3, g3, g1, full)
        a32 = _decayed(a32, b3, g3, g2, full)
        x10, x20, x21, x30, x31, x32 = _blocks_below(x00, x11, x22, x33, a10, a20, a21, a30, a31, a32, PREC_INV)
        # T = X diag(β)
        x00 = x00 * b0[None, :]
        x10 = x10 * b0[None, :]
        x11 = x11 * b1[None, :]
        x20 = x20 * b0[None, :]
        x21 = x21 * b1[None, :]
        x22 = x22 * b2[None, :]
        x30 = x30 * b0[None, :]
        x31 = x31 * b1[None, :]
        x32 = x32 * b2[None, :]
        x33 = x33 * b3[None, :]
        row = pid_bh * n_chunks * C + pid_n * C
        e0 = tl.exp(g0)[:, None]
        e1 = tl.exp(g1)[:, None]
        e2 = tl.exp(g2)[:, None]
        e3 = tl.exp(g3)[:, None]
        for d in range(0, BK, BD):  # W = T (exp(b) ⊙ K), a piece of columns at a time
            cols = d + offs_d
            k0 = _piece(K, pid_bh, length, t0, cols, DK, F32).to(tl.float32) * e0
            k1 = _piece(K, pid_bh, length, t1, cols, DK, F32).to(tl.float32) * e1
            k2 = _piece(K, pid_bh, length, t2, cols, DK, F32).to(tl.float32) * e2
            k3 = _piece(K, pid_bh, length, t3, cols, DK, F32).to(tl.float32) * e3
            _store_block(W, row, offs, cols, DK, tl.dot(x00, k0, input_precision=PREC))
            _store_block(W, row + S, offs, cols, DK, _mm(x11, k1, tl.dot(x10, k0, input_precision=PREC), PREC))
            _store_block(W, row + 2 * S, offs, cols, DK, _mm(x22, k2, _mm(x21, k1, tl.dot(x20, k0, input_precision=PREC), PREC), PREC))
            _store_block(W, row + 3 * S, offs, cols, DK, _mm(x33, k3, _mm(x32, k2, _mm(x31, k1, tl.dot(x30, k0, input_precision=PREC), PREC), PREC), PREC))
        for d in range(0, BDV, BD):  # U = T V
            cols = d + offs_d
            v0 = _piece(V, pid_bh, length, t0, cols, DV, F32).to(tl.float32)
            v1 = _piece(V, pid_bh, length, t1, cols, DV, F32).to(tl.float32)
            v2 = _piece(V, pid_bh, length, t2, cols, DV, F32).to(tl.float32)
            v3 = _piece(V, pid_bh, length, t3, cols, DV, F32).to(tl.float32)
            _store_block(U, row, offs, cols, DV, tl.dot(x00, v0, input_precision=PREC))
            _store_block(U, row + S, offs, cols, DV, _mm(x11, v1, tl.dot(x10, v0, input_precision=PREC), PREC))
            _store_block(U, row + 2 * S, offs, cols, DV, _mm(x22, v2, _mm(x21, v1, tl.dot(x20, v0, input_precision=PREC), PREC), PREC))
            _store_block(U, row + 3 * S, offs, cols, DV, _mm(x33, v3, _mm(x32, v2, _mm(x31, v1, tl.dot(x30, v0, input_precision=PREC), PREC), PREC), PREC))
        _store_gates(G + pid_bh * n_chunks * C + pid_n * C, offs, S, g0, g1, g2, g3)

    @triton.jit
    def _delta_state_kernel(
        Q, K, W, U, SC, G, O, HS, VN, S0, SN,
        length, n_chunks,
        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
        HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr, FUSED_OUTPUT: tl.constexpr, PREC: tl.constexpr,
    ):
        pid_v = tl.program_id(0)  # block of value columns
        pid_bh = tl.program_id(1)
        offs_c = tl.arange(0, C)
        offs_k = tl.arange(0, BK)
        offs_v = pid_v * BV + tl.arange(0, BV)
        kcol = offs_k < DK
        vcol = offs_v < DV
        local = offs_k[:, None] * DV + offs_v[None, :]  # (row, column) inside one D_k × D_v state
        state_ptrs = pid_bh * DK * DV + local
        state_mask = kcol[:, None] & vcol[None, :]
        if HAS_INITIAL:
            state = tl.load(S0 + state_ptrs, mask=state_mask, other=0.0).to(tl.float32)
        else:
            state = tl.zeros((BK, BV), dtype=tl.float32)
        for n in range(0, n_chunks):
            tok = n * C + offs_c
            valid = tok < length
            padded = pid_bh * n_chunks * C + tok  # row in W, U, G
            rows_in = (pid_bh * length + tok)[:, None]
            # every load of the chunk first: none depends on the state, so they overlap the products below
            g = tl.load(G + padded)
            g_last = tl.load(G + pid_bh * n_chunks * C + n * C + C - 1)
            w = tl.load(W + padded[:, None] * DK + offs_k[None, :], mask=kcol[None, :], other=0.0).to(tl.float32)
            u = tl.load(U + padded[:, None] * DV + offs_v[None, :], mask=vcol[None, :], other=0.0).to(tl.float32)
            k = tl.load(K + rows_in * DK + offs_k[None, :], mask=valid[:, None] & kcol[None, :], other=0.0)
            if FUSED_OUTPUT:
                q = tl.load(Q + rows_in * DK + offs_k[None, :], mask=valid[:, None] & kcol[None, :], other=0.0)
                scores = tl.load(SC + ((pid_bh * n_chunks + n) * C + offs_c[:, None]) * C + offs_c[None, :])
            pseudo = u - tl.dot(w, state, input_precision=PREC)  # V' = U − W S
            if FUSED_OUTPUT:  # O = (exp(b) ⊙ Q) S + scores V', written here
                q = q.to(tl.float32) * tl.exp(g)[:, None]
                out = tl.dot(q, state, input_precision=PREC)
                out = tl.dot(scores.to(tl.float32), pseudo, acc=out, input_precision=PREC)
                tl.store(O + rows_in * DV + offs_v[None, :], out.to(O.dtype.element_ty),
                         mask=valid[:, None] & vcol[None, :])
            else:  # the state entering the chunk and V', for the output kernel
                tl.store(HS + (pid_bh * n_chunks + n) * DK * DV + local, state.to(HS.dtype.element_ty),
                         mask=state_mask)
                tl.store(VN + padded[:, None] * DV + offs_v[None, :], pseudo.to(VN.dtype.element_ty),
                         mask=vcol[None, :])
            k = k.to(tl.float32) * tl.exp(g_last - g)[:, None]
            state = state * tl.exp(g_last) + tl.dot(tl.trans(k), pseudo, input_precision=PREC)
        if STORE_FINAL:
            tl.store(SN + state_ptrs, state, mask=state_mask)

    @triton.jit
    def _delta_output_kernel(
        Q, K, G, HS, VN, O,
        length, n_chunks,
        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
        PREC: tl.constexpr,
    ):
        pid_n = tl.program_id(0)  # chunk
        pid_bh = tl.program_id(1)
        pid_v = tl.program_id(2)  # block of value columns
        offs_c = tl.arange(0, C)
        offs_k = tl.arange(0, BK)
        offs_v = pid_v * BV + tl.arange(0, BV)
        kcol = offs_k < DK
        vcol = offs_v < DV
        tok = pid_n * C + offs_c
        valid = tok < length
        padded = pid_bh * n_chunks * C + tok
        g = tl.load(G + padded)
        rows_in = (pid_bh * length + tok)[:, None]
        q = tl.load(Q + rows_in * DK + offs_k[None, :], mask=valid[:, None] & kcol[None, :], other=0.0)
        k = tl.load(K + rows_in * DK + offs_k[None, :], mask=valid[:, None] & kcol[None, :], other=0.0)
        q = q.to(tl.float32)
        scores = _chunk_scores(q, k.to(tl.float32), g[:, None] - g[None, :], offs_c[:, None] >= offs_c[None, :],
                               PREC)
        state = tl.load(HS + ((pid_bh * n_chunks + pid_n) * DK + offs_k[:, None]) * DV + offs_v[None, :],
                        mask=kcol[:, None] & vcol[None, :], other=0.0)
        pseudo = tl.load(VN + padded[:, None] * DV + offs_v[None, :], mask=vcol[None, :], other=0.0)
        out = tl.dot(q * tl.exp(g)[:, None], state.to(tl.float32), input_precision=PREC)
        out = tl.dot(scores, pseudo.to(tl.float32), acc=out, input_precision=PREC)
        tl.store(O + rows_in * DV + offs_v[None, :], out.to(O.dtype.element_ty), mask=valid[:, None] & vcol[None, :])
