"""The chapter's checkers: a correct answer passes, an unfinished one is "not done yet", wrong ones fail."""

from __future__ import annotations

import pytest
import torch

from labsupport.multimodal import exercises as ex
from labsupport.multimodal import images, merging, routing, scans, vit


def _not_done(*args, **kwargs):
    raise NotImplementedError("your code here")


CORRECT = {
    "check_patches_of": lambda x, p: images.patchify(x, p),
    "check_image_of": lambda y, p, h, w: images.unpatchify(y, p, h, w),
    "check_snake_scan": lambda h, w: scans.scan_permutations("snake", h, w)[0],
    "check_invert": lambda perm: torch.argsort(perm),
    "check_merge_step": lambda x, s, m, r: tuple(t[0] for t in merging.tome_merge(x[None], s[None], m[None], r)),
    "check_fastv_keep_set": lambda a, i0, i1, k: vit.fastv_keep(a[None], i0, i1, k)[0],
    "check_route_tokens": lambda x, s, c, u: tuple(t[0] for t in routing.mod_route(x[None], s[None], c,
                                                                                    lambda t: u(t[0])[None])),
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


# --------------------------------------------------------------------------- known mistakes, and the recipe on request


def _route(**slips):
    return lambda x, s, c, u: ex._route_with(x, s, c, u, **slips)


def _unit_route(x, s, c, u):
    """The right answer, but the router's weight detached: the numbers match, the router gets no gradient."""
    out, chosen = ex._route_with(x, s.detach(), c, u)
    return out, chosen


@pytest.mark.parametrize("name,wrong,found", [
    ("check_patches_of", _strips, "strips of whole rows"),
    ("check_snake_scan", ex._even_rows_reversed, "row 0 must run left to right"),
    ("check_snake_scan", ex._snake_swapped, "height and width are swapped"),
    ("check_invert", lambda perm: perm.clone(), "the permutation itself"),
    ("check_merge_step", _unweighted, "plain means"),
    ("check_fastv_keep_set", _rows, "gives (rows)"),
    ("check_route_tokens", _route(gate="none"), "no router weight"),
    ("check_route_tokens", _route(gate="whole"), "multiplies x + update"),
    ("check_route_tokens", _route(skipped="zero"), "zeros"),
    ("check_route_tokens", _route(count="floor"), "rounded down"),
    ("check_route_tokens", _route(order="rank"), "score order"),
    ("check_route_tokens", _route(run_on="all"), "all N tokens"),
])
def test_a_known_mistake_is_named(name, wrong, found, capsys, monkeypatch):
    monkeypatch.delenv("LABSUPPORT_STRICT_CHECKS", raising=False)
    result = getattr(ex, name)(wrong)
    message = capsys.readouterr().out
    assert not result and "\n   found   " in message and found in message, message


def test_the_router_must_receive_a_gradient(capsys, monkeypatch):
    monkeypatch.delenv("LABSUPPORT_STRICT_CHECKS", raising=False)
    assert not ex.check_route_tokens(_unit_route)
    assert "scores" in capsys.readouterr().out


def test_the_route_checker_refuses_a_batched_update_call(capsys, monkeypatch):
    monkeypatch.delenv("LABSUPPORT_STRICT_CHECKS", raising=False)
    assert not ex.check_route_tokens(lambda x, s, c, u: ex._route_with(x, s, c, lambda t: u(t[None])[0]))
    assert "(k, D)" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_the_recipe_is_hidden_unless_asked_for(name, capsys, monkeypatch):
    monkeypatch.delenv("LABSUPPORT_STRICT_CHECKS", raising=False)

    def wrong(*args, **kwargs):
        return None

    hidden = getattr(ex, name)(wrong).message
    shown = getattr(ex, name)(wrong, reveal=True).message
    capsys.readouterr()
    assert f"`{name}(wrong, reveal=True)` prints the full recipe" in hidden
    recipe = shown.split("\n   recipe  ")[-1]
    assert len(recipe) > 40 and recipe not in hidden
