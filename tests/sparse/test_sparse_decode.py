"""Chapter 05: decode-time selection and eviction — Quest's bound, NSA, bounded policy caches, the mixer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labsupport import sparse
from labsupport.harness.numerics import rel_err
from labsupport.lm.model import TinyLM


# --------------------------------------------------------------------------- Quest


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), length=st.integers(1, 40), page=st.integers(1, 9), scale=st.floats(0.1, 100.0))
def test_quest_bound_bounds_every_score_in_its_page(seed, length, page, scale):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, length, 6, generator=g, dtype=torch.float64) * scale
    q = torch.randn(2, 6, generator=g, dtype=torch.float64) * scale
    kmin, kmax = sparse.page_bounds(keys, page)
    bound = sparse.page_upper_bound(q, kmin, kmax)  # (2, P)
    scores = (keys @ q[..., None])[..., 0]  # (2, T)
    page_of = torch.arange(length) // page
    assert (scores <= bound[:, page_of] + 1e-9 * scale * scale).all()
    # tight for a page of one key
    if page == 1:
        assert torch.allclose(bound, scores)


def test_quest_token_mask_keeps_the_best_pages_and_the_newest():
    keys = torch.zeros(1, 12, 2, dtype=torch.float64)
    keys[0, 4:8, 0] = 5.0  # page 1 (of 3, pages of 4) holds the keys that match q
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    read = sparse.quest_token_mask(q, keys, page=4, n_pages=2)
    assert read[0].tolist() == [False] * 4 + [True] * 8  # page 1 by score, page 2 because it is the newest
    assert sparse.quest_token_mask(q, keys, page=4, n_pages=5).all()


# --------------------------------------------------------------------------- NSA


def test_nsa_token_counts_reproduce_the_paper_figure():
    """NSA (arXiv:2502.11089) quotes 2,048 / 2,560 / 3,584 / 5,632 tokens per step at 8K–64K (= s/16 + 1,536)."""
    for context, paper in ((8192, 2048), (16384, 2560), (32768, 3584), (65536, 5632)):
        counts = sparse.nsa_token_counts(context)
        assert counts["selected"] == 16 * 64 and counts["window"] == 512
        # ⌊(s − 32)/16⌋ + 1 compression blocks = s/16 − 1: one fewer than the paper's rounded s/16
        assert counts["compressed"] == context // 16 - 1
        assert counts["total"] == paper - 1
    assert sparse.nsa_token_counts(100)["total"] == 5 + 100 + 100


def test_nsa_branches():
    g = torch.Generator().manual_seed(0)
    t, d = 300, 8
    q = torch.randn(2, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, t, d, generator=g, dtype=torch.float64) for _ in range(2))
    dense, _ = sparse.masked_attention(q[:, None], k, v, torch.ones(1, t, dtype=torch.bool))
    every_block = sparse.nsa_decode(q, k, v, torch.tensor([[0.0, 1.0, 0.0]] * 2, dtype=torch.float64),
                                    compress_block=32, compress_stride=16, select_block=32, n_selected=100, window=16)
    assert rel_err(every_block.out, dense[:, 0]) < 1e-12  # selecting every block = dense attention
    window = sparse.nsa_decode(q, k, v, torch.tensor([[0.0, 0.0, 1.0]] * 2, dtype=torch.float64), window=20)
    ref, _ = sparse.masked_attention(q[:, None], k[:, -20:], v[:, -20:], torch.ones(1, 20, dtype=torch.bool))
    assert rel_err(window.out, ref[:, 0]) < 1e-12
    mixed = sparse.nsa_decode(q, k, v, torch.full((2, 3), 0.5, dtype=torch.float64), select_block=32, n_selected=3)
    assert mixed.selected_blocks.sum(dim=-1).tolist() == [3, 3]
    assert mixed.selected_blocks[:, 0].all() and mixed.selected_blocks[:, -2:].all()  # first and local blocks
    with pytest.raises(ValueError, match="gates"):
        sparse.nsa_decode(q, k, v, torch.ones(2, 2, dtype=torch.float64))


# --------------------------------------------------------------------------- eviction choices


def test_h2o_and_tova_victims():
    positions = torch.tensor([[0, 1, 2, 3, 4, -1]])
    accumulated = torch.tensor([[0.9, 0.1, 0.5, 0.0, 0.0, 0.0]])
    # incoming token 5, recent 3 protects positions 3, 4 (and the incoming one): lowest of 0, 1, 2 is slot 1
    assert sparse.h2o_victim(accumulated, positions, 5, 3).tolist() == [1]
    # everything recent: the oldest goes
    assert sparse.h2o_victim(accumulated, positions, 5, 10).tolist() == [0]
    attention = torch.tensor([[[0.3, 0.2, 0.4, 0.05, 0.05, 0.0]]])
    assert sparse.tova_victim(attention, positions[None], 4).tolist() == [[3]]  # slot 4 is the newest: protected


def test_tova_averages_over_heads_as_its_paper_does():
    positions = torch.tensor([[0, 1, 2, 3]]).expand(1, 2, 4)
    # head 0 attends least to slot 0, head 1 least to slot 2; averaged, slot 1 is the least attended
    attention = torch.tensor([[[0.00, 0.10, 0.50, 0.40], [0.50, 0.10, 0.00, 0.40]]])
    assert sparse.tova_victim(attention, positions, 3).tolist() == [[1, 1]]
    assert sparse.tova_victim(attention, positions, 3, per_head=True).tolist() == [[0, 2]]
    cache = sparse.PolicyKVCache(sparse.CachePolicy("tova", budget=4), batch=1, heads=3, head_dim=4)
    torch.manual_seed(0)
    for _ in range(12):
        cache.attend(*(torch.randn(1, 3, 1, 4) for _ in range(3)))
    assert torch.equal(cache.positions, cache.positions[:, :1].expand_as(cache.positions))  # one choice per layer


# --------------------------------------------------------------------------- the mixer and its caches


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyLM(20, d_model=32, n_layers=2, max_len=64, sequence_mixer=sparse.sparse_mixer(4), positional="none",
                  short_conv=3).double().eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 20, (3, 40), generator=torch.Generator().manual_seed(1))


def _forward_under(model, tokens, mask):
    sparse.set_static_mask(model, mask)
    try:
        with torch.no_grad():
            return model(tokens)
    finally:
        sparse.set_static_mask(model, None)


def test_full_cache_decode_equals_forward(model, tokens):
    logits, reads = sparse.decode_logits(model, tokens, sparse.CachePolicy("full"))
    with torch.no_grad():
        assert rel_err(logits, model(tokens)) < 1e-12
    assert reads == list(range(1, 41))


def test_window_cache_equals_the_sliding_window_mask(model, tokens):
    """Positions assigned inside the cache keep every relative distance of a window, so RoPE scores match."""
    logits, reads = sparse.decode_logits(model, tokens, sparse.CachePolicy("window", budget=8))
    assert rel_err(logits, _forward_under(model, tokens, sparse.sliding_window_mask(40, window=8))) < 1e-12
    assert max(reads) == 8


def test_sink_cache_equals_the_sink_mask_with_original_positions(model, tokens):
    policy = sparse.CachePolicy("sinks", budget=8, sinks=2, positions="original")
    logits, _ = sparse.decode_logits(model, tokens, policy)
    assert rel_err(logits, _forward_under(model, tokens, sparse.sink_window_mask(40, sinks=2, window=6))) < 1e-12


def test_streaming_cache_assigns_positions_inside_the_cache():
    cache = sparse.PolicyKVCache(sparse.CachePolicy("sinks", budget=6, sinks=2), 1, 1, 4)
    seen = []

    def record(x, positions):
        seen.append(positions.clone())
        return x
    for _ in range(20):
        cache.attend(*(torch.randn(1, 1, 1, 4) for _ in range(3)), rotate=record)
    assert cache.length == 6
    kept = sorted(cache.positions[0, 0].tolist())
    assert kept == [0, 1, 16, 17, 18, 19]  # two sinks and the four latest
    key_positions = seen[-2][0, 0]  # the keys' positions at the last step: ranks 0..5, never 19
    assert sorted(key_positions.tolist()) == list(range(6)) and seen[-1].flatten().tolist() == [5]


@pytest.mark.parametrize("policy", [sparse.CachePolicy("window", budget=6), sparse.CachePolicy("sinks", budget=6),
                                    sparse.CachePolicy("h2o", budget=6), sparse.CachePolicy("h2o", budget=6, recent=1),
                                    sparse.CachePolicy("tova", budget=6)])
def test_eviction_caches_stay_bounded(model, tokens, policy):
    logits, reads = sparse.decode_logits(model, tokens, policy)
    assert torch.isfinite(logits).all() and max(reads) == 6
    layer = model.blocks[0].mixer
    _, state = layer.decode_step(torch.zeros(3, 1, 32, dtype=torch.float64), None)
    for _ in range(30):
        _, state = layer.decode_step(torch.randn(3, 1, 32, dtype=torch.float64), state)
    assert state.length == 6 and layer.cache_bytes(state) == 3 * 4 * 6 * 2 * 8 * 8


def test_quest_reads_at_most_its_budget_and_equals_full_when_the_budget_covers_all(model, tokens):
    logits, reads = sparse.decode_logits(model, tokens, sparse.CachePolicy("quest", budget=16, page=4))
    assert max(reads) == 16 and torch.isfinite(logits).all()
    full, _ = sparse.decode_logits(model, tokens, sparse.CachePolicy("quest", budget=64, page=4))
    with torch.no_grad():
        assert rel_err(full, model(tokens)) < 1e-12


def test_h2o_keeps_a_heavy_hitter():
    """A key that every query matches strongly survives H2O but falls out of a plain window."""
    policy = sparse.CachePolicy("h2o", budget=4, recent=2)
    cache = sparse.PolicyKVCache(policy, 1, 1, 2)
    heavy = torch.tensor([10.0, 0.0]).view(1, 1, 1, 2)
    cache.attend(heavy, heavy, heavy)
    for _ in range(15):
        filler = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
        cache.attend(heavy, filler, filler)
    assert 0 in cache.positions[0, 0].tolist()


def test_policy_guards():
    with pytest.raises(ValueError, match="name"):
        sparse.CachePolicy("lru", budget=4)
    with pytest.raises(ValueError, match="budget"):
        sparse.CachePolicy("window", budget=1)
    with pytest.raises(ValueError, match="sinks"):
        sparse.CachePolicy("sinks", budget=4, sinks=4)
    with pytest.raises(ValueError, match="page"):
        sparse.CachePolicy("quest", budget=8, page=16)
    with pytest.raises(ValueError, match="SparseAttention"):
        sparse.set_policy(torch.nn.Linear(2, 2), sparse.CachePolicy())
    with pytest.raises(ValueError, match="even"):
        sparse.SparseAttention(12, 4)


def test_per_head_static_masks(model, tokens):
    """One mask per head: a head restricted to its own position reads only its own value."""
    length = tokens.shape[1]
    window = sparse.sliding_window_mask(length, window=4)
    full = torch.ones(length, length, dtype=torch.bool)
    same_everywhere = _forward_under(model, tokens, torch.stack([window] * 4))
    assert rel_err(same_everywhere, _forward_under(model, tokens, window)) < 1e-12
    mixed = _forward_under(model, tokens, torch.stack([window, full, full, full]))
    with torch.no_grad():
        plain = model(tokens)
    assert rel_err(mixed, plain) > 1e-6 and rel_err(mixed, same_everywhere) > 1e-6
    with pytest.raises(ValueError, match="static_mask"):
        _forward_under(model, tokens, torch.ones(3, length, length, dtype=torch.bool)[:, :5])


def test_rope_table_matches_the_formula():
    layer = sparse.SparseAttention(16, 2).double()
    x = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    positions = torch.tensor([0, 3, 9, 1000, 2, 2, 5])
    assert rel_err(layer._rotate(x, positions), sparse.rotate_half_rope(x, positions)) < 1e-12
    # relative: rotating q and k by the same shift leaves q·k unchanged
    q, k = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    s1 = (sparse.rotate_half_rope(q, torch.tensor([5, 5])) * sparse.rotate_half_rope(k, torch.tensor([2, 2]))).sum(-1)
    s2 = (sparse.rotate_half_rope(q, torch.tensor([105, 105])) * sparse.rotate_half_rope(k, torch.tensor([102, 102]))).sum(-1)
    assert torch.allclose(s1, s2)


def test_lightning_indexer_learns_to_imitate_attention():
    from labsupport.lm.tasks import make_mqar
    from labsupport.sparse.checkpoints import mqar_model

    torch.manual_seed(0)
    recall_model = mqar_model(32, d_model=16, n_heads=2).eval()
    indexer, losses = sparse.train_indexer(recall_model, 1, lambda g: make_mqar(8, 32, 2, 32, generator=g), steps=25)
    assert losses[-1] < losses[0]
    x = torch.randn(2, 32, 16)
    scores = indexer.scores(x)
    assert scores.shape == (2, 32, 32) and torch.isneginf(scores.triu(1)[..., 0, 1:]).all()
    chosen = sparse.topk_mask(scores, 4)
    assert (chosen.sum(dim=-1) <= 4 + 1).all() and chosen.diagonal(dim1=-2, dim2=-1).all()
    assert not (chosen & ~torch.ones(32, 32, dtype=torch.bool).tril()).any()
    uniform = torch.full((1, 3, 3), 1.0).tril() / torch.arange(1, 4)[:, None]
    assert float(sparse.indexer_kl(torch.zeros(1, 3, 3).masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf")), uniform)) < 1e-6


def test_indexer_selection_with_every_key_is_the_dense_model(model, tokens):
    indexers = {0: sparse.LightningIndexer(32).double(), 1: sparse.LightningIndexer(32).double()}
    with torch.no_grad():
        dense = model(tokens)
        with sparse.indexer_selection(model, indexers, tokens.shape[1]):
            every = model(tokens)
        with sparse.indexer_selection(model, indexers, 2):
            few = model(tokens)
    assert rel_err(every, dense) < 1e-6 and rel_err(few, dense) > 1e-4
    assert all(m.static_mask is None for m in model.modules() if isinstance(m, sparse.SparseAttention))
