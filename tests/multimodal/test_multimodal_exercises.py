"""The chapter's checkers: a correct answer passes, an unfinished one is "not done yet", wrong ones fail."""

from __future__ import annotations

import pytest
import torch

from labsupport.multimodal import exercises as ex
from labsupport.multimodal import images, merging, scans, vit


def _not_done(*args, **kwargs):
    raise NotImplementedError("your code here")


CORRECT = {
    "check_patches_of": lambda x, p: images.patchify(x, p),
    "check_image_of": lambda y, p, h, w: images.unpatchify(y, p, h, w),
    "check_snake_scan": lambda h, w: scans.scan_permutations("snake", h, w)[0],
    "check_invert": lambda perm: torch.argsort(perm),
    "check_merge_step": lambda x, s, m, r: tuple(t[0] for t in merging.tome_merge(x[None], s[None], m[None], r)),
    "check_fastv_keep_set": lambda a, i0, i1, k: vit.fastv_keep(a[None], i0, i1, k)[0],
}


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_a_correct_answer_passes(name, monkeypatch):
    monkeypatch.setenv("LABSUPPORT_STRICT_CHECKS", "1")
    assert getattr(ex, name)(CORRECT[name])


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_an_unfinished_answer_is_not_done_yet(name, capsys, monkeypatch):
    monkeypatch.delenv("LABSUPPORT_STRICT_CHECKS", raising=False)
    result = getattr(ex, name)(_not_done)
    assert result.status == "not done" and "not done yet" in capsys.readouterr().out


def _strips(x, p):
    b, c, h, w = x.shape
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def _unweighted(x, size, metric, r):
    src, dst = merging.bipartite_matches(metric[None], r)
    out, _ = merging.merge_tokens(x[None], torch.ones_like(size)[None], src, dst)
    _, new_size = merging.merge_tokens(x[None], size[None], src, dst)
    return out[0], new_size[0]


def _rows(attn, i0, i1, k):
    return attn.mean(0).mean(-1)[i0:i1].topk(k).indices.sort().values + i0


@pytest.mark.parametrize("name,wrong,says", [
    ("check_patches_of", _strips, "strips"),
    ("check_invert", lambda perm: perm.clone(), "cycle"),
    ("check_merge_step", _unweighted, "sizes"),
    ("check_fastv_keep_set", _rows, "receives"),
])
def test_the_chapters_shortcuts_fail_with_a_pointer(name, wrong, says, capsys, monkeypatch):
    monkeypatch.delenv("LABSUPPORT_STRICT_CHECKS", raising=False)
    assert not getattr(ex, name)(wrong)
    assert says in capsys.readouterr().out
