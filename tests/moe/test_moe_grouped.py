"""The no-sync grouped dispatch (chapter 06's GPU path) computes what the sorted dispatch computes."""

import pytest
import torch

from labsupport.moe import moe_grouped, moe_sorted
from labsupport.moe.routing import top_k_routing


def _weights(gen, e, d, h, dtype=torch.float64):
    return (torch.randn(e, d, h, generator=gen, dtype=dtype), torch.randn(e, h, generator=gen, dtype=dtype),
            torch.randn(e, h, d, generator=gen, dtype=dtype), torch.randn(e, d, generator=gen, dtype=dtype))


@pytest.mark.parametrize("combine", ["gather", "index_add"])
@pytest.mark.parametrize("up_bias", ["folded", "one_hot"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouped_equals_sorted_with_inactive_slots_and_empty_experts(k, up_bias, combine):
    gen = torch.Generator().manual_seed(k)
    t, d, h, e = 37, 8, 16, 6
    x = torch.randn(t, d, generator=gen, dtype=torch.float64)
    logits = torch.randn(t, e, generator=gen, dtype=torch.float64)
    logits[:, 2] = -1e9  # expert 2 never chosen: an empty group
    routing = top_k_routing(logits, k)
    routing.active = routing.active & (torch.rand(t, k, generator=gen) > 0.3)  # some slots dropped
    weights = _weights(gen, e, d, h)
    torch.testing.assert_close(moe_grouped(x, routing, *weights, up_bias=up_bias, combine=combine),
                               moe_sorted(x, routing, *weights))


@pytest.mark.parametrize("combine", ["gather", "index_add"])
@pytest.mark.parametrize("up_bias", ["folded", "one_hot"])
def test_grouped_gradients_equal_sorted(up_bias, combine):
    gen = torch.Generator().manual_seed(0)
    t, d, h, e = 20, 8, 8, 4
    x = torch.randn(t, d, generator=gen, dtype=torch.float64)
    routing = top_k_routing(torch.randn(t, e, generator=gen, dtype=torch.float64), 2)
    grads = []
    for fn in (lambda *a: moe_grouped(*a, up_bias=up_bias, combine=combine), moe_sorted):
        leaves = [w.clone().requires_grad_() for w in _weights(torch.Generator().manual_seed(1), e, d, h)]
        xi = x.clone().requires_grad_()
        fn(xi, routing, *leaves).square().sum().backward()
        grads.append([xi.grad, *(w.grad for w in leaves)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_grouped_rejects_mismatched_weights():
    x = torch.randn(4, 8)
    routing = top_k_routing(torch.randn(4, 3), 1)
    w_up, b_up, w_down, b_down = _weights(torch.Generator().manual_seed(0), 3, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="w_down must have shape"):
        moe_grouped(x, routing, w_up, b_up, w_down[:, :2], b_down)


def test_grouped_rejects_an_unknown_bias_mode():
    x = torch.randn(4, 8)
    routing = top_k_routing(torch.randn(4, 3), 1)
    weights = _weights(torch.Generator().manual_seed(0), 3, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="up_bias must be one of"):
        moe_grouped(x, routing, *weights, up_bias="gather")
    with pytest.raises(ValueError, match="combine must be one of"):
        moe_grouped(x, routing, *weights, combine="scatter")


def test_gather_combine_passes_gradcheck_with_inactive_slots():
    """The hand-written backwards (a permutation's gradient is its inverse) against finite differences."""
    gen = torch.Generator().manual_seed(3)
    t, d, h, e, k = 9, 4, 8, 3, 2
    x = torch.randn(t, d, generator=gen, dtype=torch.float64, requires_grad=True)
    routing = top_k_routing(torch.randn(t, e, generator=gen, dtype=torch.float64), k)
    routing.active = routing.active & (torch.rand(t, k, generator=gen) > 0.25)
    weights = [w.requires_grad_() for w in _weights(gen, e, d, h)]
    assert torch.autograd.gradcheck(lambda xi, *w: moe_grouped(xi, routing, *w), (x, *weights))
