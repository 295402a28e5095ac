"""Chapter 05: every static pattern, as a mask and as a block layout; block-sparse loops = dense attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labsupport import sparse
from labsupport.flash import flash_attention_forward
from labsupport.harness.numerics import rel_err

L = 96


def patterns() -> dict[str, torch.Tensor]:
    return {
        "sliding window": sparse.sliding_window_mask(L, window=37),
        "sliding window, not causal": sparse.sliding_window_mask(L, window=20, causal=False),
        "sinks + window": sparse.sink_window_mask(L, sinks=4, window=20),
        "dilated": sparse.dilated_mask(L, window=8, dilation=5),
        "global + window": sparse.global_token_mask(L, global_tokens=3) | sparse.sliding_window_mask(L, window=10),
        "random blocks (causal)": sparse.random_block_mask(L, block=16, per_row=2, seed=3) | sparse.causal_mask(L) & sparse.sliding_window_mask(L, window=1),
        "bigbird": sparse.bigbird_mask(L, block=16),
        "bigbird causal": sparse.bigbird_mask(L, block=16, causal=True),
        "Lq > Lk: rows that see nothing": sparse.sliding_window_mask(90, 40, window=10),
        "a key block nobody reads": sparse.sliding_window_mask(L, window=5) & (torch.arange(L) // 16 != 3)[None, :],
    }


def qkv(lq, lk, dtype=torch.float64, seed=0, dv=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, lq, 16, generator=g, dtype=dtype), torch.randn(2, 3, lk, 16, generator=g, dtype=dtype),
            torch.randn(2, 3, lk, dv, generator=g, dtype=dtype))


def test_masks_by_definition():
    w = sparse.sliding_window_mask(10, window=3)
    assert w[5].nonzero().flatten().tolist() == [3, 4, 5]
    s = sparse.sink_window_mask(10, sinks=2, window=3)
    assert s[9].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    assert s[1].nonzero().flatten().tolist() == [0, 1]
    d = sparse.dilated_mask(20, window=3, dilation=4)
    assert d[19].nonzero().flatten().tolist() == [11, 15, 19]
    g = sparse.global_token_mask(6, global_tokens=2, causal=False)
    assert g[0].all() and g[:, 1].all() and not g[4, 3]
    assert torch.equal(sparse.causal_mask(4, 6), torch.ones(4, 6, dtype=torch.bool).tril(2))
    bb = sparse.bigbird_mask(128, block=16, window_blocks=3, random_blocks=2, global_blocks=1)
    per_block = sparse.block_layout(bb, 16, 16).kinds != sparse.EMPTY
    # every query block reads its 3 window blocks, the global block and 2 random ones (some may coincide)
    assert per_block[0].all()  # the global block reads everything
    assert (per_block[1:].sum(dim=1) <= 3 + 1 + 2).all() and per_block[:, 0].all()
    assert torch.equal(sparse.random_block_mask(64, block=8, per_row=2, seed=1),
                       sparse.random_block_mask(64, block=8, per_row=2, seed=1))


def test_mask_guards():
    with pytest.raises(ValueError, match="window"):
        sparse.sliding_window_mask(8, window=0)
    with pytest.raises(TypeError, match="lq must be an int"):
        sparse.sliding_window_mask(8.0, window=2)
    with pytest.raises(TypeError, match="bool"):
        sparse.block_layout(torch.ones(4, 4), 2, 2)


def test_block_layout_kinds():
    layout = sparse.block_layout(sparse.sliding_window_mask(64, window=16), 16, 16)
    assert layout.kinds.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    full = sparse.block_layout(torch.ones(40, 40, dtype=torch.bool), 16, 16)
    assert (full.kinds == sparse.FULL).all()  # ragged edge tiles are full when every real entry is visible
    assert full.tile_density == 1.0 and "tile density" in repr(full)


@pytest.mark.parametrize("name", list(patterns()))
def test_block_sparse_loops_equal_dense(name):
    mask = patterns()[name]
    q, k, v = qkv(*mask.shape)
    ref, ref_lse = sparse.masked_attention(q, k, v, mask)
    for fn in (sparse.block_sparse_forward, sparse.block_sparse_attention):
        for bq, bk in ((32, 16), (64, 64)):
            out, lse = fn(q, k, v, mask, block_q=bq, block_k=bk)
            assert rel_err(out, ref) < 1e-12, (fn.__name__, bq, bk)
            assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
            finite = torch.isfinite(ref_lse)
            assert float((lse - ref_lse)[finite].abs().max()) < 1e-12
            empty_rows = ~mask.any(dim=1)
            assert torch.equal(out[..., empty_rows, :], torch.zeros_like(out[..., empty_rows, :]))


def test_block_sparse_never_reads_an_empty_tile():
    mask = patterns()["a key block nobody reads"]
    q, k, v = qkv(L, L)
    v[..., 48:64, :] = float("nan")  # key block 3 (of 16): no query reads it
    k[..., 48:64, :] = float("nan")
    for fn in (sparse.block_sparse_forward, sparse.block_sparse_attention):
        out, _ = fn(q, k, v, mask, block_q=16, block_k=16)
        assert torch.isfinite(out).all(), fn.__name__
    dense, _ = sparse.masked_attention(q, k, v, mask)
    assert torch.isnan(dense).any()  # the dense reference does touch it


def test_against_chapter_01_and_sdpa():
    q, k, v = qkv(L, L, dv=16)
    causal = sparse.causal_mask(L)
    out, lse = sparse.block_sparse_forward(q, k, v, causal, block_q=32, block_k=32)
    flash_out, flash_lse = flash_attention_forward(q, k, v, causal=True, block_q=32, block_k=32)
    assert rel_err(out, flash_out) < 1e-12 and rel_err(lse, flash_lse) < 1e-12
    mask = sparse.sink_window_mask(L, sinks=4, window=30)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert rel_err(sparse.block_sparse_attention(q, k, v, mask)[0], sdpa) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision(dtype, tol):
    mask = sparse.sink_window_mask(96, sinks=2, window=24)
    q, k, v = (t.to(dtype) * 3 for t in qkv(96, 96))
    ref, _ = sparse.masked_attention(q.double(), k.double(), v.double(), mask)
    for fn in (sparse.block_sparse_forward, sparse.block_sparse_attention):
        out, lse = fn(q, k, v, mask, block_q=32, block_k=32)
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert rel_err(out, ref) < tol


def test_long_sequence_float32():
    """L = 65,536 with a window of 64: 1,024 query blocks, each reading 2 key blocks; checked on the last rows."""
    length, window = 65_536, 64
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, length, 16, generator=g) * 4 for _ in range(3))
    mask = sparse.WindowPattern(window)  # a dense mask would be 4 GiB
    layout = mask.layout(length, length, 64, 64)
    assert layout.tiles_visited == 2 * 1024 - 1
    out, lse = sparse.block_sparse_attention(q, k, v, mask, layout=layout)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    tail = slice(length - 200, length)
    ref, _ = sparse.masked_attention(q[..., tail, :].double(), k[..., length - 263:, :].double(),
                                     v[..., length - 263:, :].double(), sparse.sliding_window_mask(200, 263, window=window))
    assert rel_err(out[..., tail, :], ref) < 1e-5


@pytest.mark.parametrize("window,sinks", [(1, 0), (10, 0), (37, 4), (16, 16), (200, 3)])
@pytest.mark.parametrize("lq,lk,bq,bk", [(150, 150, 32, 16), (90, 40, 16, 16), (40, 130, 16, 32)])
def test_window_pattern_matches_its_mask(window, sinks, lq, lk, bq, bk):
    pattern = sparse.WindowPattern(window, sinks)
    mask = pattern.mask(lq, lk)
    assert torch.equal(mask, sparse.sink_window_mask(lq, lk, sinks=sinks, window=window))
    rows, cols = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    assert torch.equal(pattern.mask_mod(rows, cols, lq, lk), mask)
    assert torch.equal(pattern.layout(lq, lk, bq, bk).kinds, sparse.block_layout(mask, bq, bk).kinds)
    q, k, v = qkv(lq, lk)
    ref, _ = sparse.masked_attention(q, k, v, mask)
    for fn in (sparse.block_sparse_forward, sparse.block_sparse_attention):
        assert rel_err(fn(q, k, v, pattern, block_q=bq, block_k=bk)[0], ref) < 1e-12


def test_guards():
    q, k, v = qkv(8, 8)
    with pytest.raises(ValueError, match=r"mask must end in \(Lq, Lk\)"):
        sparse.block_sparse_forward(q, k, v, torch.ones(8, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        sparse.masked_attention(q, k, v, torch.ones(8, 8))
    with pytest.raises(ValueError, match="one"):
        sparse.block_sparse_attention(q, k, v, torch.ones(3, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="tiles"):
        sparse.block_sparse_forward(q, k, v, torch.ones(8, 8, dtype=torch.bool), block_q=4,
                                    layout=sparse.block_layout(torch.ones(8, 8, dtype=torch.bool), 2, 2))
