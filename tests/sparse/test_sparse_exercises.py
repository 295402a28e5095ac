"""Chapter 05's checkers: each passes its reference, says "not done yet", and fails every kind of wrong answer."""

from __future__ import annotations

import pytest
import torch

from labsupport import sparse
from labsupport.sparse import exercises as ex


def _mask(lq, lk, sinks, window):
    return sparse.sink_window_mask(lq, lk, sinks=sinks, window=window)


def _loop(q, k, v, mask, block_q, block_k):
    return ex.block_sparse_loop(q, k, v, mask, block_q, block_k)


CHECKERS = {
    "sink_window_mask": (ex.check_sink_window_mask, _mask),
    "page_upper_bound": (ex.check_page_upper_bound, sparse.page_upper_bound),
    "h2o_evict": (ex.check_h2o_evict, ex.h2o_evict),
    "block_sparse_loop": (ex.check_block_sparse_loop, _loop),
    "streaming_step": (ex.check_streaming_step, ex.streaming_step),
    "block_select": (ex.check_block_select, ex.block_select),
    "tova_evict": (ex.check_tova_evict, ex.tova_evict),
}


@pytest.mark.parametrize("name", CHECKERS)
def test_checker_passes_the_reference(name, capsys):
    checker, reference = CHECKERS[name]
    result = checker(reference)
    assert result and result.status == "passed"
    assert "✅" in capsys.readouterr().out


@pytest.mark.parametrize("name", CHECKERS)
def test_checker_reports_not_done(name, capsys):
    def todo(*args):
        raise NotImplementedError("your code here")

    result = CHECKERS[name][0](todo)
    assert result.status == "not done" and "not done yet" in capsys.readouterr().out


def _wrong_outputs(reference):
    """Wrong answers of every kind, made from the reference's output."""
    def mapped(change):
        return lambda *args: change(reference(*args))

    def first(change):
        return mapped(lambda out: (change(out[0]), *out[1:]) if isinstance(out, tuple) else change(out))

    return {
        "returns None": lambda *args: None,
        "raises": lambda *args: 1 / 0,
        "not a function": None,
        "wrong shape": first(lambda t: t[..., :-1]),
        "wrong dtype": first(lambda t: t.to(torch.int32) if t.dtype == torch.bool else (t.to(torch.float16) if t.is_floating_point() else t.float())),
        "NaN": first(lambda t: torch.full_like(t.double(), float("nan")).to(t.dtype) if t.is_floating_point() else t),
    }


@pytest.mark.parametrize("name", CHECKERS)
@pytest.mark.parametrize("kind", ["returns None", "raises", "not a function", "wrong shape", "wrong dtype", "NaN"])
def test_checker_fails_generic_wrong_answers(name, kind, capsys):
    checker, reference = CHECKERS[name]
    wrong = _wrong_outputs(reference)[kind]
    if kind == "NaN" and name in ("sink_window_mask", "h2o_evict", "streaming_step", "block_select", "tova_evict"):
        pytest.skip("boolean / integer answers have no NaN")
    result = checker(wrong)
    out = capsys.readouterr().out
    assert result.status == "failed" and "❌" in out and "Traceback" not in out


def test_mask_checker_catches_off_by_ones_and_alignment():
    wrong = {
        "window one too wide": lambda lq, lk, s, w: _mask(lq, lk, s, w + 1),
        "top-left aligned": lambda lq, lk, s, w: _mask(lq, lq, s, w)[:, :lk] if lk <= lq else torch.zeros(lq, lk, dtype=torch.bool),
        "sinks visible before they exist": lambda lq, lk, s, w: _mask(lq, lk, s, w) | (torch.arange(lk) < s)[None, :],
        "no sinks": lambda lq, lk, s, w: sparse.sliding_window_mask(lq, lk, window=w),
    }
    for name, fn in wrong.items():
        assert not ex.check_sink_window_mask(fn), name


def test_bound_checker_catches_the_one_sided_bound():
    assert not ex.check_page_upper_bound(lambda q, kmin, kmax: (q[..., None, :] * kmax).sum(-1))
    assert not ex.check_page_upper_bound(lambda q, kmin, kmax: (q[..., None, :].abs() * kmax.abs()).sum(-1))
    assert not ex.check_page_upper_bound(lambda q, kmin, kmax: torch.maximum(q[..., None, :] * kmax, q[..., None, :] * kmin).amax(-1))


def test_evict_checker_catches_the_usual_mistakes():
    def naive_argmin(acc, pos, incoming, recent):  # may pick an empty slot or a recent token
        return pos.scatter(-1, acc.argmin(-1, keepdim=True), -1)

    def forgets_empty(acc, pos, incoming, recent):
        cand = pos <= incoming - recent
        victim = torch.where(cand, acc, torch.full_like(acc, float("inf"))).argmin(-1, keepdim=True)
        return pos.scatter(-1, victim, -1)

    def off_by_one_recent(acc, pos, incoming, recent):
        return ex.h2o_evict(acc, pos, incoming, recent + 1)

    def evicts_nothing(acc, pos, incoming, recent):
        return pos.clone()

    for fn in (naive_argmin, forgets_empty, off_by_one_recent, evicts_nothing):
        assert not ex.check_h2o_evict(fn), fn.__name__


def test_loop_checker_rejects_the_dense_shortcut_and_nan_logsumexp(capsys):
    def dense(q, k, v, mask, block_q, block_k):
        return sparse.masked_attention(q, k, v, mask)

    def nan_lse(q, k, v, mask, block_q, block_k):
        out, lse = _loop(q, k, v, mask, block_q, block_k)
        return out, torch.where(torch.isinf(lse), torch.full_like(lse, float("nan")), lse)

    def never_masks(q, k, v, mask, block_q, block_k):  # treats partial tiles as full
        full = torch.ones_like(mask) & sparse.causal_mask(*mask.shape) | mask
        return _loop(q, k, v, full, block_q, block_k)

    def off_by_one_lse(q, k, v, mask, block_q, block_k):
        out, lse = _loop(q, k, v, mask, block_q, block_k)
        return out, lse + 1

    def nan_rows(q, k, v, mask, block_q, block_k):
        out, lse = _loop(q, k, v, mask, block_q, block_k)
        return torch.where(torch.isinf(lse)[..., None], torch.full_like(out, float("nan")), out), lse

    for fn in (dense, nan_lse, never_masks, off_by_one_lse, nan_rows):
        assert not ex.check_block_sparse_loop(fn), fn.__name__
    assert "NaN" in capsys.readouterr().out


def test_loop_checker_caps_a_dense_answer_that_cleans_the_nan(capsys):
    def dense_cleaned(q, k, v, mask, block_q, block_k):
        return sparse.masked_attention(q, torch.nan_to_num(k), torch.nan_to_num(v), mask)

    assert not ex.check_block_sparse_loop(dense_cleaned)
    assert "materialised" in capsys.readouterr().out


def test_new_checkers_catch_the_chapter_mistakes():
    def rank_by_slot(positions, incoming, sinks):  # keeps text positions: no re-positioning inside the cache
        after, _ = ex.streaming_step(positions, incoming, sinks)
        return after, after.clone()

    def evicts_a_sink(positions, incoming, sinks):
        return ex.streaming_step(positions, incoming, 0)

    def always_evicts(positions, incoming, sinks):
        full = positions.clone()
        full[full < 0] = 10_000  # pretend the empty slots hold tokens, so one is always evicted
        after, _ = ex.streaming_step(full, incoming, sinks)
        after = torch.where(after == 10_000, torch.full_like(after, -1), after)
        filled = after >= 0
        rank = torch.where(filled, after, 1 << 40).argsort(-1).argsort(-1)
        return after, torch.where(filled, rank, -1)

    for fn in (rank_by_slot, evicts_a_sink, always_evicts):
        assert not ex.check_streaming_step(fn), fn.__name__

    def per_head(attention, positions, newest):
        return positions.scatter(-1, sparse.tova_victim(attention, positions, newest, per_head=True)[..., None], -1)

    def newest_not_protected(attention, positions, newest):
        return ex.tova_evict(attention, positions, -5)

    for fn in (per_head, newest_not_protected):
        assert not ex.check_tova_evict(fn), fn.__name__

    def no_own_block(q, keys, block, top_n):
        return ex.block_select(q, keys, block, top_n + 1) if top_n == 1 else ex.block_select(q, keys, block, top_n - 1)

    def largest_key(q, keys, block, top_n):  # scores a block by its best key, not by its mean key
        t = keys.shape[-2]
        pad = (-t) % block
        padded = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=-1e9).unflatten(-2, (-1, block))
        scores = (padded @ q[..., None, :, None])[..., 0].amax(-1)
        scores[..., -1] = float("inf")
        top = scores.topk(min(top_n, scores.shape[-1]), dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True).repeat_interleave(block, -1)[..., :t]

    for fn in (no_own_block, largest_key):
        assert not ex.check_block_select(fn), fn.__name__


# --------------------------------------------------------------------------- the engine's feedback: found, and the recipe


def _mistakes():
    from labsupport.sparse import exercises as ex
    return [
        ("check_sink_window_mask", lambda lq, lk, s, w: ex.sink_window_mask(lq, lk, sinks=0, window=w), "no sinks"),
        ("check_page_upper_bound", lambda q, lo, hi: (q[..., None, :] * hi).sum(-1), "kmax for every entry"),
        ("check_h2o_evict", lambda a, p, i, r: ex._h2o_with(a, p, i, r, hide_empty=False), "empty slot"),
        ("check_h2o_evict", lambda a, p, i, r: ex._h2o_with(a, p, i, r, protect_recent=False), "recent token"),
        ("check_block_sparse_loop", lambda q, k, v, m, bq, bk: ex.block_sparse_loop(q * q.shape[-1] ** 0.5, k, v, m,
                                                                                   bq, bk), "1/√D"),
        ("check_streaming_step", lambda p, i, s: (ex.streaming_step(p, i, s)[0],) * 2, "text positions"),
        ("check_streaming_step", lambda p, i, s: ex.streaming_step(p, i, 0), "evicted a sink"),
        ("check_block_select", lambda q, k, b, n: ex._select_with(q, k, b, n, pool="max"), "max-pooling"),
        ("check_block_select", lambda q, k, b, n: ex._select_with(q, k, b, n, own=False), "own (newest) block"),
        ("check_tova_evict", lambda a, p, n: p.scatter(-1, ex.tova_victim(a, p, n, per_head=True)[..., None], -1),
         "each evict their own"),
    ]


@pytest.mark.parametrize("index", range(10))
def test_a_known_mistake_is_named_and_the_recipe_waits(index, capsys, monkeypatch) -> None:
    monkeypatch.delenv("LABSUPPORT_STRICT_CHECKS", raising=False)
    from labsupport.sparse import exercises as ex
    checker, wrong, found = _mistakes()[index]
    result = getattr(ex, checker)(wrong)
    out = capsys.readouterr().out
    assert not result and "\n   found   " in out and found in out, out
    assert "reveal=True)` prints the full recipe" in out
