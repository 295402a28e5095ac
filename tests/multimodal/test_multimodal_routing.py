"""Mixture-of-Depths routing: the kept count, skip = identity, capacity 1 = the plain block, the router learns."""

from __future__ import annotations

import pytest
import torch

from labsupport.multimodal import routing, vit


def _block(seed: int = 0) -> routing.MoDBlock:
    torch.manual_seed(seed)
    block = routing.MoDBlock(8, 2, capacity=0.5).double()
    with torch.no_grad():
        block.router.weight.normal_()
    return block


@pytest.mark.parametrize(("n", "capacity", "k"), [(64, 1.0, 64), (64, 0.5, 32), (64, 0.25, 16), (10, 0.33, 3),
                                                   (5, 0.01, 1)])
def test_kept_count(n, capacity, k):
    assert routing.kept_count(n, capacity) == k
    x = torch.randn(2, n, 8, dtype=torch.float64)
    block = _block()
    chosen: list[torch.Tensor] = []
    block(x, capacity, chosen)
    assert chosen[0].shape == (2, k)
    assert (chosen[0].diff(dim=-1) > 0).all()                  # distinct, in original order


@pytest.mark.parametrize("capacity", [0.0, 1.5, -0.1, True, "half"])
def test_capacity_is_validated(capacity):
    with pytest.raises(ValueError, match="capacity"):
        routing.kept_count(8, capacity)


def test_chosen_are_the_top_scores_and_the_rest_skip_unchanged():
    block = _block()
    x = torch.randn(3, 12, 8, dtype=torch.float64)
    chosen: list[torch.Tensor] = []
    with torch.no_grad():
        out = block(x, 0.25, chosen)
        scores = block.router(x).squeeze(-1)
    for b in range(3):
        picked = set(chosen[0][b].tolist())
        ranked = scores[b].argsort(descending=True).tolist()
        assert picked == set(ranked[:3])
        skipped = [i for i in range(12) if i not in picked]
        assert torch.equal(out[b, skipped], x[b, skipped])      # exact identity, not merely close
        assert not torch.allclose(out[b, sorted(picked)], x[b, sorted(picked)])


def test_chosen_tokens_see_only_each_other():
    """The routed tokens' outputs do not depend on the skipped tokens (they are not keys or values)."""
    block = _block()
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    chosen: list[torch.Tensor] = []
    with torch.no_grad():
        out = block(x, 0.5, chosen)
        idx = chosen[0][0]
        reference = x[:, idx] + torch.sigmoid(block.router(x[:, idx]).squeeze(-1))[..., None] * block.update(x[:, idx])
    assert torch.allclose(out[:, idx], reference)


def test_capacity_one_equals_the_plain_block_scaled_by_its_router():
    block = _block()
    plain = vit._Block(8, 2, False, 2).double()
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("router")})
    x = torch.randn(2, 9, 8, dtype=torch.float64)

    def plain_forward(h):
        h = h + plain.attn(plain.norm1(h))[0]
        return h + plain.mlp(plain.norm2(h))

    with torch.no_grad():
        gate = torch.sigmoid(block.router(x))
        assert torch.allclose(block(x, 1.0), x + gate * (plain_forward(x) - x))
        block.router.weight.zero_()
        block.router.bias.fill_(100.0)                           # sigmoid(100) == 1 in float64: no scaling
        assert torch.allclose(block(x, 1.0), plain_forward(x))


def test_gradient_reaches_the_router():
    block = _block()
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    block(x, 0.25).square().sum().backward()
    assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0
    assert block.router.bias.grad.abs() > 0


def test_mod_route_rejects_mismatched_scores():
    with pytest.raises(ValueError, match="scores"):
        routing.mod_route(torch.zeros(2, 5, 3), torch.zeros(2, 4), 0.5, lambda t: t)


def test_vit_shapes_and_capacity_override():
    torch.manual_seed(0)
    model = routing.MoDViT(image_size=8, patch=2, channels=1, d_model=16, n_layers=2, n_heads=2, n_classes=10,
                           capacity=0.5)
    images = torch.rand(4, 1, 8, 8)
    chosen: list[torch.Tensor] = []
    assert model(images, chosen=chosen).shape == (4, 10)
    assert [c.shape for c in chosen] == [(4, 8), (4, 8)]
    chosen.clear()
    model(images, capacity=0.25, chosen=chosen)
    assert [c.shape for c in chosen] == [(4, 4), (4, 4)]
