"""Patches, their inverse, positions, the shipped digits and the generated segment task."""

from __future__ import annotations

import pytest
import torch

from labsupport.harness.data import read_manifest
from labsupport.multimodal import images as mm


@pytest.mark.parametrize("b,c,h,w,p", [(2, 1, 8, 8, 1), (2, 1, 8, 8, 2), (3, 3, 12, 6, 3), (1, 2, 4, 8, 4)])
def test_unpatchify_inverts_patchify(b, c, h, w, p):
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    patches = mm.patchify(x, p)
    assert patches.shape == (b, (h // p) * (w // p), c * p * p)
    assert torch.equal(mm.unpatchify(patches, p, h, w), x)


def test_patchify_matches_an_independent_loop():
    x = torch.arange(2 * 2 * 4 * 6, dtype=torch.float32).view(2, 2, 4, 6)
    patches = mm.patchify(x, 2)
    k = 0
    for i in range(2):
        for j in range(3):
            assert torch.equal(patches[:, k], x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, -1))
            k += 1


def test_patchify_rejects_a_size_that_does_not_divide():
    with pytest.raises(ValueError, match="not divisible"):
        mm.patchify(torch.zeros(1, 1, 8, 8), 3)
    with pytest.raises(ValueError, match="dimensions"):
        mm.patchify(torch.zeros(8, 8), 2)


def test_patch_grid_is_row_major():
    grid = mm.patch_grid(2, 3)
    assert grid.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_patch_embedding_adds_row_and_column_positions():
    emb = mm.PatchEmbedding(4, 8, 2, 3)
    zeros = torch.zeros(1, 6, 4)
    out = emb(zeros)
    assert torch.allclose(out[0, 4], emb.proj.bias + emb.rows[1] + emb.cols[1])


def test_digits_load_checked_and_split():
    assert "digits.safetensors" in read_manifest()
    d = mm.load_digits()
    assert d.train_images.shape == (1438, 1, 8, 8) and d.test_images.shape == (359, 1, 8, 8)
    assert 0.0 <= float(d.train_images.min()) and float(d.train_images.max()) == 1.0
    assert sorted(torch.cat([d.train_labels, d.test_labels]).unique().tolist()) == list(range(10))
    assert d.licence == "CC BY 4.0"
    again = mm.load_digits()
    assert torch.equal(again.test_labels, d.test_labels)


def test_segment_task_has_exactly_the_planted_segment():
    x, y = mm.segment_task(90, 6, seed=3)
    assert x.shape == (90, 1, 6, 6) and y.tolist() == [i % 3 for i in range(90)]
    img = x[:, 0]
    horizontal = (img[:, :, :-2] * img[:, :, 1:-1] * img[:, :, 2:]).flatten(1).sum(1)
    vertical = (img[:, :-2] * img[:, 1:-1] * img[:, 2:]).flatten(1).sum(1)
    assert bool((horizontal[y == 0] > 0).all()) and bool((vertical[y == 0] == 0).all())
    assert bool((vertical[y == 1] > 0).all()) and bool((horizontal[y == 1] == 0).all())
    assert bool((horizontal[y == 2] == 0).all()) and bool((vertical[y == 2] == 0).all())
    assert torch.equal(mm.segment_task(90, 6, seed=3)[0], x)
