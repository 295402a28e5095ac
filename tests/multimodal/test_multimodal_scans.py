"""Scan orders are permutations with inverses; the recurrence's fast path equals its loop; the scan mixer merges back."""

from __future__ import annotations

import pytest
import torch

from labsupport.multimodal import scans


@pytest.mark.parametrize("order", scans.SCAN_ORDERS)
@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (4, 1), (3, 5), (6, 6)])
def test_every_order_is_a_permutation_and_its_inverse_undoes_it(order, h, w):
    x = torch.randn(2, h * w, 3)
    for perm in scans.scan_permutations(order, h, w):
        assert torch.equal(perm.sort().values, torch.arange(h * w))
        inv = scans.inverse_permutation(perm)
        assert torch.equal(perm[inv], torch.arange(h * w)) and torch.equal(inv[perm], torch.arange(h * w))
        assert torch.equal(x[:, perm][:, inv], x)


def test_orders_visit_the_grid_as_named():
    assert scans.scan_permutations("column", 2, 3)[0].tolist() == [0, 3, 1, 4, 2, 5]
    assert scans.scan_permutations("snake", 3, 3)[0].tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]
    row, back = scans.scan_permutations("bidirectional", 2, 2)
    assert back.tolist() == row.flip(0).tolist()
    assert len(scans.scan_permutations("cross", 2, 3)) == 4


def test_snake_steps_are_always_grid_neighbours():
    perm = scans.scan_permutations("snake", 5, 4)[0]
    r, c = perm // 4, perm % 4
    assert bool(((r[1:] - r[:-1]).abs() + (c[1:] - c[:-1]).abs() == 1).all())


def test_inverse_permutation_rejects_a_non_permutation():
    with pytest.raises(ValueError, match="not a permutation"):
        scans.inverse_permutation(torch.tensor([0, 0, 1]))
    with pytest.raises(TypeError):
        scans.inverse_permutation(torch.tensor([0.0, 1.0]))


def test_seen_mask_causal_and_unions():
    row = scans.seen_mask("row", 3, 3)
    assert row[0].sum() == 1 and row[8].all()                       # first patch sees itself, last sees all
    assert bool(scans.seen_mask("bidirectional", 3, 3).all())      # forward ∪ backward = everything
    assert bool(scans.seen_mask("cross", 4, 5).all())
    column = scans.seen_mask("column", 3, 3)
    assert column[1].sum() == 4                                     # (0,1) is read after all of column 0


def test_neighbour_distance_per_axis():
    d = scans.neighbour_distance("row", 4, 6)
    assert d["horizontal"] == 1.0 and d["vertical"] == 6.0
    d = scans.neighbour_distance("column", 4, 6)
    assert d["horizontal"] == 4.0 and d["vertical"] == 1.0
    d = scans.neighbour_distance("cross", 4, 6)
    assert d == {"horizontal": 1.0, "vertical": 1.0}


@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 4), (16, 16), (37, 8)])
def test_chunked_recurrence_equals_the_loop(length, chunk):
    gen = torch.Generator().manual_seed(length)
    log_a = torch.nn.functional.logsigmoid(torch.randn(2, length, 5, generator=gen, dtype=torch.float64))
    u = torch.randn(2, length, 5, generator=gen, dtype=torch.float64)
    h, states = torch.zeros(2, 5, dtype=torch.float64), []
    for t in range(length):
        h = log_a[:, t].exp() * h + u[:, t]
        states.append(h)
    assert torch.allclose(scans.diagonal_recurrence(log_a, u, chunk=chunk), torch.stack(states, 1), atol=1e-12)


def test_gated_recurrence_forms_agree_and_are_causal():
    torch.manual_seed(0)
    m = scans.GatedRecurrence(8, chunk=4).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    assert torch.allclose(m(x), m.forward_chunked(x), atol=1e-12)
    y2 = x.clone()
    y2[:, 6:] += 1.0
    assert torch.allclose(m(x)[:, :6], m(y2)[:, :6])
    assert m.state_bytes() == 8 * 8


@pytest.mark.parametrize("order", scans.SCAN_ORDERS)
def test_scan_mixer_equals_running_each_direction_by_hand(order):
    torch.manual_seed(1)
    mixer = scans.scan_mixer(order, 3, 4)(8, 0).double()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    expected = sum(m.forward_chunked(x[:, p])[:, scans.inverse_permutation(p)]
                   for p, m in zip(scans.scan_permutations(order, 3, 4), mixer.directions))
    assert torch.allclose(mixer(x), expected, atol=1e-12)
    assert mixer.state_bytes() == len(mixer.directions) * 8 * 8


def test_scan_mixer_takes_any_inner_factory():
    from labsupport.lm.layers import attention_mixer
    mixer = scans.scan_mixer("bidirectional", 2, 3, inner=attention_mixer(2))(8, 0)
    x = torch.randn(1, 6, 8)
    manual = mixer.directions[0](x) + mixer.directions[1](x.flip(1)).flip(1)
    assert torch.allclose(mixer(x), manual, atol=1e-6)


def test_scan_mixer_names_the_wrong_length():
    with pytest.raises(ValueError, match="patches"):
        scans.scan_mixer("row", 2, 2)(4, 0)(torch.randn(1, 5, 4))
