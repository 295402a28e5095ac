"""ToMe: the matching follows its definition, merges keep size-weighted sums, proportional attention, FastV."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labsupport.lm.layers import SoftmaxAttention
from labsupport.multimodal import merging, vit


def _loop_matches(metric, r):
    unit = F.normalize(metric, dim=-1)
    a, b = list(range(0, len(metric), 2)), list(range(1, len(metric), 2))
    edges = []
    for i in a:
        sims = [float(unit[i] @ unit[j]) for j in b]
        best = max(range(len(b)), key=lambda k: sims[k])
        edges.append((sims[best], i, b[best]))
    edges.sort(key=lambda e: -e[0])
    return [e[1] for e in edges[:r]], [e[2] for e in edges[:r]]


def test_matches_equal_a_loop_over_the_definition():
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 11, 4, generator=gen, dtype=torch.float64)
    src, dst = merging.bipartite_matches(metric, 4)
    for b in range(3):
        s, d = _loop_matches(metric[b], 4)
        assert src[b].tolist() == s and dst[b].tolist() == d


def test_merge_preserves_size_weighted_sums_and_total_size():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 5, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 4, (2, 10), generator=gen).double()
    out, new_size = merging.tome_merge(x, size, torch.randn(2, 10, 3, generator=gen, dtype=torch.float64), 3)
    assert out.shape == (2, 7, 5) and new_size.shape == (2, 7)
    assert torch.allclose((out * new_size[..., None]).sum(1), (x * size[..., None]).sum(1))
    assert torch.equal(new_size.sum(1), size.sum(1))


def test_merge_keeps_survivors_in_order_and_averages_by_size():
    x = torch.tensor([[[0.0], [10.0], [4.0], [20.0]]])
    size = torch.tensor([[3.0, 1.0, 1.0, 1.0]])
    out, new_size = merging.merge_tokens(x, size, torch.tensor([[0]]), torch.tensor([[1]]))
    assert out[0, :, 0].tolist() == [2.5, 4.0, 20.0] and new_size[0].tolist() == [4.0, 1.0, 1.0]


def test_merge_sources_follow_patches_to_their_token():
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
    src, dst = merging.bipartite_matches(metric, 2)
    source = merging.merge_sources(torch.arange(4)[None], src, dst, 4)
    assert source.tolist() == [[0, 0, 1, 1]]


def test_r_too_large_is_refused():
    with pytest.raises(ValueError, match="at most"):
        merging.bipartite_matches(torch.randn(1, 5, 2), 3)


def test_sized_attention_is_the_lm_layer_at_unit_sizes_and_proportional_otherwise():
    torch.manual_seed(0)
    attn = vit.SizedAttention(8, 2, causal=False).double()
    plain = SoftmaxAttention(8, 2, causal=False).double()
    plain.load_state_dict(attn.state_dict())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y, keys, _ = attn(x, torch.ones(2, 5, dtype=torch.float64))
    assert torch.allclose(y, plain(x), atol=1e-12) and keys.shape == (2, 5, 4)
    # a token of size 2 attends like two copies of itself
    dup = torch.cat([x, x[:, -1:]], dim=1)
    y_dup, _, _ = attn(dup)
    y_sized, _, _ = attn(x, torch.tensor([[1.0, 1, 1, 1, 2]] * 2, dtype=torch.float64))
    assert torch.allclose(y_dup[:, :5], y_sized, atol=1e-12)
    y_w, _, probs = attn(x, need_weights=True)
    assert torch.allclose(y_w, plain(x), atol=1e-12) and torch.allclose(probs.sum(-1), torch.ones(2, 2, 5,
                                                                                                   dtype=torch.float64))


def test_tome_vit_pool_is_unchanged_by_merging_a_constant_image_and_counts_tokens():
    torch.manual_seed(0)
    model = vit.ToMeViT(image_size=8, patch=1, channels=1, d_model=16, n_layers=3, n_heads=2, n_classes=10).eval()
    images = torch.rand(2, 1, 8, 8)
    trace = vit.MergeTrace()
    with torch.no_grad():
        model(images, r=8, trace=trace)
    assert trace.tokens == [56, 48, 40]
    assert all(int(s.max()) < n for s, n in zip(trace.sources, trace.tokens))
    with torch.no_grad():
        assert torch.allclose(model(images, r=0), model(images, r=[0, 0, 0]))


def test_fastv_keep_ranks_received_attention():
    attn = torch.zeros(1, 2, 4, 4)
    attn[0, 0, :, 1] = 1.0       # head 0: everyone attends to position 1
    attn[0, 1, :, 2] = 1.0       # head 1: everyone attends to position 2
    attn[0, 1, 3, 2] = 0.0
    attn[0, 1, 3, 0] = 1.0
    assert vit.fastv_keep(attn, 0, 3, 2).tolist() == [[1, 2]]
    assert vit.fastv_keep(attn, 0, 3, 1).tolist() == [[1]]
    assert vit.fastv_keep(attn, 1, 3, 1).tolist() == [[1]]


def test_tiny_vlm_prunes_and_keeps_the_question():
    torch.manual_seed(0)
    model = vit.TinyVLM(image_size=8, patch=2, channels=1, d_model=16, n_layers=3, n_heads=2, n_questions=3,
                        n_answers=12).eval()
    images, questions = torch.rand(2, 1, 8, 8), torch.tensor([0, 2])
    kept = []
    with torch.no_grad():
        full = model(images, questions)
        all_kept = model(images, questions, prune_layer=2, keep=16)
        pruned = model(images, questions, prune_layer=1, keep=4, kept=kept)
    assert torch.allclose(full, all_kept, atol=1e-6)
    assert pruned.shape == (2, 12) and kept[0].shape == (2, 4)
    assert bool((kept[0][:, 1:] > kept[0][:, :-1]).all())
