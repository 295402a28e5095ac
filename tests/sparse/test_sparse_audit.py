"""Chapter 05: the outside audit's numerics findings (issue 19), one test each; every one failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch

from labsupport import sparse
from labsupport.harness.costs import policy_tokens_per_step
from labsupport.harness.numerics import rel_err


def _qkv(lq, lk, d=8, seed=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, d, generator=g, dtype=dtype) for n in (lq, lk, lk))
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def test_block_sparse_attention_refuses_a_layout_of_other_tiles():
    mask = sparse.sliding_window_mask(12, window=3)
    q, k, v = _qkv(12, 12)
    wrong = sparse.block_layout(mask, 4, 4)  # the call below asks for 8 × 8 tiles
    with pytest.raises(ValueError, match="tiles"):
        sparse.block_sparse_attention(q, k, v, mask, block_q=8, block_k=8, layout=wrong)
    with pytest.raises(ValueError, match="tiles"):
        sparse.block_sparse_forward(q, k, v, mask, block_q=8, block_k=8, layout=wrong)


def test_block_sparse_attention_backpropagates_like_dense_attention():
    mask = sparse.sink_window_mask(20, sinks=2, window=5)
    q, k, v = _qkv(20, 20, grad=True)
    out, _ = sparse.block_sparse_attention(q, k, v, mask, block_q=8, block_k=4)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    dense, _ = sparse.masked_attention(q, k, v, mask)
    expected = torch.autograd.grad(dense.square().sum(), (q, k, v))
    for got, want in zip(grads, expected):
        assert rel_err(got, want) < 1e-10
    assert torch.autograd.gradcheck(
        lambda a, b, c: sparse.block_sparse_attention(a, b, c, mask, block_q=8, block_k=4)[0], (q, k, v))


def test_policy_cache_refuses_two_tokens_at_once():
    cache = sparse.PolicyKVCache(sparse.CachePolicy("window", budget=4), batch=1, heads=2, head_dim=8)
    q, k, v = _qkv(2, 2)
    with pytest.raises(ValueError, match="one token"):
        cache.attend(q, k, v)
    with pytest.raises(ValueError, match="one token"):
        cache.attend(q[..., :1, :], k, v)
    assert cache.steps == 0 and cache.length == 0  # nothing was stored


def test_topk_mask_is_causal_even_for_finite_scores():
    scores = torch.randn(2, 10, 10)  # finite everywhere, the future included
    chosen = sparse.topk_mask(scores, 4)
    assert not (chosen & ~torch.ones(10, 10, dtype=torch.bool).tril()).any()
    assert (chosen.sum(-1) == torch.arange(1, 11).clamp(max=4)).all()


def test_topk_mask_refuses_non_square_scores():
    with pytest.raises(ValueError, match="square"):
        sparse.topk_mask(torch.randn(1, 4, 6), 2)


def test_indexer_kl_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        sparse.indexer_kl(torch.randn(1, 5, 5), torch.rand(1, 4, 4))


def test_quest_token_mask_refuses_a_valid_mask_of_the_wrong_length():
    keys = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="valid"):
        sparse.quest_token_mask(torch.randn(2, 4), keys, 4, 1, valid=torch.ones(2, 9, dtype=torch.bool))


def test_tova_victim_validates_its_inputs():
    with pytest.raises(ValueError, match="positions"):
        sparse.tova_victim(torch.rand(1, 2, 5), torch.zeros(1, 2, 4, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="positions"):
        sparse.tova_victim(torch.rand(1, 2, 5), [0, 1, 2, 3, 4], 3)


def test_checkpoint_whose_settings_disagree_with_its_tensors_gives_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from labsupport.sparse.checkpoints import char_model, load_checkpoint_file

    model = char_model(10, d_model=32, n_layers=1, n_heads=2)
    settings = {"d_model": 48, "n_layers": 1, "n_heads": 2, "vocab_size": 10}  # width disagrees
    path = tmp_path / "m.safetensors"
    save_file({k: t.contiguous() for k, t in model.state_dict().items()}, str(path),
              metadata={"settings": json.dumps(settings)})
    with pytest.raises(ValueError, match="d_model|shape"):
        load_checkpoint_file(path, "char")
    settings["d_model"] = 32
    save_file({k: t.contiguous() for k, t in model.state_dict().items()}, str(path),
              metadata={"settings": json.dumps(settings)})
    assert load_checkpoint_file(path, "char").settings["d_model"] == 32


def test_bigbird_random_blocks_avoid_window_and_global_blocks():
    block, n = 4, 16
    for seed in range(20):
        mask = sparse.bigbird_mask(n * block, block=block, window_blocks=3, random_blocks=2, global_blocks=1,
                                   seed=seed, causal=True)
        tiles = mask.view(n, block, n, block).any(dim=(1, 3))
        for row in range(n):
            # window (3 blocks, causal: own + 2 before) + global block 0 + 2 random ones drawn from the rest
            structural = {c for c in range(max(0, row - 2), row + 1)} | {0}
            available = [c for c in range(row) if c not in structural]
            expected = len(structural | set()) + min(2, len(available))
            if row == 0:
                expected = 1
            assert int(tiles[row].sum()) == expected, (seed, row)


def test_quest_cost_counts_the_newest_page_as_filled_so_far():
    # 100 tokens in pages of 16: 6 full pages and a newest page holding 4 tokens; 3 pages read
    assert policy_tokens_per_step("quest", 100, 48, page=16)["tokens"] == 2 * 16 + 4
    assert policy_tokens_per_step("quest", 96, 48, page=16)["tokens"] == 48
    assert policy_tokens_per_step("quest", 20, 64, page=16)["tokens"] == 20


def test_quest_cost_agrees_with_what_the_cache_reads():
    torch.manual_seed(0)
    policy = sparse.CachePolicy("quest", budget=24, page=8)
    cache = sparse.PolicyKVCache(policy, batch=1, heads=1, head_dim=4)
    for _ in range(45):
        x = torch.randn(1, 1, 1, 4)
        cache.attend(x, torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
    for t, read in enumerate(cache.tokens_read, start=1):
        assert read == policy_tokens_per_step("quest", t, 24, page=8)["tokens"], t


def test_causal_share_is_slightly_above_half():
    # the prose's number: a causal mask keeps (L + 1) / (2L) of all pairs, and more of the tiles
    mask = sparse.causal_mask(128)
    assert sparse.mask_density(mask) == pytest.approx(129 / 256)
    assert sparse.block_layout(mask, 16, 16).tile_density == pytest.approx(36 / 64)


# --------------------------------------------------------------------------- what the reader builds (issue 19)


def test_block_select_mask_reads_own_block_and_the_best_mean_blocks():
    keys = torch.zeros(1, 20, 2, dtype=torch.float64)
    keys[0, 4:8, 0] = 1.0  # block 1 has the largest mean along the query
    keys[0, 9, 0] = 5.0  # one large key in block 2, whose mean (1.25) is still above block 1's (1.0)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    chosen = sparse.block_select_mask(q, keys, 4, 3)
    blocks = chosen[0].view(5, 4).all(-1).tolist()
    assert blocks == [False, True, True, False, True]  # own (newest) block + the two best means
    assert sparse.block_select_mask(q, keys, 4, 9).all()
    with pytest.raises(ValueError, match="agree"):
        sparse.block_select_mask(torch.randn(3), keys, 4, 2)


def test_snapkv_keeps_the_window_and_what_it_voted_for_then_appends():
    torch.manual_seed(0)
    prompt, budget, observe = 24, 10, 4
    policy = sparse.CachePolicy("snapkv", budget=budget, prompt=prompt, observe=observe, kernel=1)
    cache = sparse.PolicyKVCache(policy, batch=1, heads=2, head_dim=4)
    keys = torch.randn(1, 2, 30, 4)
    keys[..., 5, :] = 8.0  # token 5 has a key every query will prefer
    for t in range(30):
        q = torch.ones(1, 2, 1, 4)
        cache.attend(q, keys[..., t:t + 1, :], torch.randn(1, 2, 1, 4))
        if t == prompt:
            held = sorted(int(p) for p in cache.positions[0, 0] if p >= 0)
            assert len(held) == budget + 1  # compressed to the budget, then the first generated token
            assert 5 in held and held[-observe - 1:] == list(range(prompt - observe, prompt + 1))
    assert cache.length == budget + 30 - prompt
    with pytest.raises(ValueError, match="budget"):
        sparse.CachePolicy("snapkv", budget=4, prompt=10, observe=4)


def test_vertical_slash_mask_is_causal_keeps_the_diagonal_and_finds_a_column():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 40, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 40, 8, generator=g, dtype=torch.float64)
    k[..., 7, :] = q[..., -16:, :].mean(-2) * 20  # every late query looks at key 7
    mask = sparse.vertical_slash_mask(q, k, vertical=2, slash=3, last_q=16)
    assert mask.shape == (2, 3, 40, 40) and not mask.triu(1).any()
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    assert mask[..., 7:, 7].all()  # the vertical line reaches every query that may see key 7
    full = sparse.vertical_slash_mask(q, k, vertical=40, slash=40)
    assert torch.equal(full, torch.ones(40, 40, dtype=torch.bool).tril().expand(2, 3, 40, 40))


def test_dense_layers_keep_the_full_cache_in_the_first_layers():
    from labsupport.sparse.checkpoints import mqar_model

    torch.manual_seed(0)
    model = mqar_model(32, d_model=16, n_heads=2).eval()
    policy = sparse.CachePolicy("window", budget=4)
    sparse.set_policy(model, policy, dense_layers=1)
    layers = [b.mixer for b in model.blocks]
    assert layers[0].policy.name == "full" and layers[1].policy is policy
    tokens = torch.randint(0, 32, (1, 12))
    _, reads = sparse.decode_logits(model, tokens, policy, dense_layers=1)
    assert max(reads) == 4  # the reads reported are the last (windowed) layer's
