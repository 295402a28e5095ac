"""Chapter 02's core exercises (labsupport.grouped.exercises_core): mean-pool conversion and the absorbed MLA step.

The references pass; wrong answers of every kind fail with a message and no traceback; the naive MLA step —
right values, but the whole cache up-projected at every step — is refused by its work per cached token.
"""

from __future__ import annotations

import pytest
import torch

from labsupport import grouped as ga
from labsupport.grouped import _solutions
from labsupport.grouped._solutions import naive_mla_decode_step
from labsupport.grouped.exercises_core import _mla_step_args


def test_core_checkers_pass_the_references(capsys) -> None:
    assert ga.check_mean_pool_kv(_solutions.mean_pool_kv)
    assert ga.check_absorbed_mla_decode_step(_solutions.absorbed_mla_decode_step)
    assert capsys.readouterr().out.count("✅") == 2


def test_mean_pool_kv_is_what_the_library_conversion_does() -> None:
    torch.manual_seed(0)
    attention = ga.GroupedQueryAttention(24, 8, 4)
    for n_kv in (4, 2, 1):
        pooled = ga.mean_pool_kv_heads(attention, n_kv)
        assert torch.equal(pooled.kv.weight, _solutions.mean_pool_kv(attention.kv.weight, attention.head_dim, n_kv))


def test_absorbed_step_equals_naive_step_and_the_mixer() -> None:
    args = _mla_step_args(torch.Generator().manual_seed(0), 2, 3, 11, 4, 6, 2, torch.float64)
    assert torch.allclose(_solutions.absorbed_mla_decode_step(*args), naive_mla_decode_step(*args), atol=1e-13, rtol=0)
    torch.manual_seed(1)
    mla = ga.LatentAttention(d_model=16, n_heads=2, latent_dim=6, rope_dim=4).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        state = None
        for t in range(5):
            y, state = mla.decode_step(x[:, t:t + 1], state)
        q_c, rows, q_r = mla._project(x[:, 4:5], 4)
        w_uk = mla.w_uk.weight.view(2, mla.head_dim, 6).transpose(-1, -2)       # (H, d_c, d_h)
        w_uv = mla.w_uv.weight.view(2, mla.head_dim, 6).transpose(-1, -2)
        heads = _solutions.absorbed_mla_decode_step(q_c, q_r, state.view(), w_uk, w_uv, mla.scale)
        assert torch.allclose(mla._merge(heads), y, atol=1e-12, rtol=0)


def test_guards_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match="must divide"):
        _solutions.mean_pool_kv(torch.randn(2 * 3 * 2, 4), 2, 2)
    with pytest.raises(ValueError, match="2 · G · head_dim"):
        _solutions.mean_pool_kv(torch.randn(10, 4), 3, 1)
    with pytest.raises(TypeError, match="kv_weight"):
        _solutions.mean_pool_kv([[1.0]], 1, 1)
    args = list(_mla_step_args(torch.Generator().manual_seed(0), 1, 2, 3, 4, 6, 2))
    with pytest.raises(ValueError, match="cache must be"):
        _solutions.absorbed_mla_decode_step(*args[:2], args[2][..., :-1], *args[3:])
    with pytest.raises(ValueError, match="w_uk and w_uv"):
        _solutions.absorbed_mla_decode_step(*args[:3], args[3][:1], *args[4:])


def not_done(*args):
    raise NotImplementedError("your code here")


def _pool_interleaved(w, d, g):            # heads h, h + G', ... grouped together instead of consecutive heads
    old = w.shape[0] // (2 * d)
    return w.reshape(2, old // g, g, d, -1).mean(1).reshape(2 * g * d, -1)


def _pool_pick_first(w, d, g):             # keeps the first head of each group instead of the mean
    old = w.shape[0] // (2 * d)
    return w.reshape(2, g, old // g, d, -1)[:, :, 0].reshape(2 * g * d, -1)


def _pool_keys_with_values(w, d, g):       # averages keys and values together
    pooled = _solutions.mean_pool_kv(w, d, g)
    half = pooled.shape[0] // 2
    both = (pooled[:half] + pooled[half:]) / 2
    return torch.cat([both, both])


def _pool_sum(w, d, g):                    # sums the group instead of averaging it
    old = w.shape[0] // (2 * d)
    return w.reshape(2, g, old // g, d, -1).sum(2).reshape(2 * g * d, -1)


POOL_WRONG = {
    "not done": not_done,
    "None": lambda w, d, g: None,
    "raises": lambda w, d, g: w.view(3, -1, 7),
    "unchanged weight (wrong shape)": lambda w, d, g: w.clone(),
    "wrong dtype": lambda w, d, g: _solutions.mean_pool_kv(w, d, g).double(),
    "NaN": lambda w, d, g: _solutions.mean_pool_kv(w, d, g) * float("nan"),
    "interleaved groups": _pool_interleaved,
    "first head of each group": _pool_pick_first,
    "keys averaged with values": _pool_keys_with_values,
    "sum instead of mean": _pool_sum,
}


def _step_no_scale(q_c, q_r, cache, w_uk, w_uv, scale):
    return _solutions.absorbed_mla_decode_step(q_c, q_r, cache, w_uk, w_uv, 1.0)


def _step_no_rope(q_c, q_r, cache, w_uk, w_uv, scale):
    return _solutions.absorbed_mla_decode_step(q_c, torch.zeros_like(q_r), cache, w_uk, w_uv, scale)


def _step_values_before_attention_wrong_weight(q_c, q_r, cache, w_uk, w_uv, scale):
    return _solutions.absorbed_mla_decode_step(q_c, q_r, cache, w_uk, w_uk, scale)


def _step_latent_out(q_c, q_r, cache, w_uk, w_uv, scale):   # forgets W_UV: returns the attended latent
    return _solutions.absorbed_mla_decode_step(q_c, q_r, cache, w_uk, w_uv, scale) @ w_uv.transpose(-1, -2)


def _step_skips_newest(q_c, q_r, cache, w_uk, w_uv, scale):  # off by one: the newest token left out
    if cache.shape[2] == 1:
        return torch.zeros_like(q_c)
    return _solutions.absorbed_mla_decode_step(q_c, q_r, cache[:, :, :-1], w_uk, w_uv, scale)


MLA_STEP_WRONG = {
    "not done": not_done,
    "None": lambda *a: None,
    "raises": lambda q_c, q_r, cache, w_uk, w_uv, scale: q_c @ cache,
    "wrong dtype": lambda *a: _solutions.absorbed_mla_decode_step(*a).double(),
    "NaN": lambda *a: _solutions.absorbed_mla_decode_step(*a) * float("nan"),
    "merged heads (wrong shape)": lambda *a: _solutions.absorbed_mla_decode_step(*a).sum(1),
    "unscaled scores": _step_no_scale,
    "RoPE part ignored": _step_no_rope,
    "W_UK used for the values": _step_values_before_attention_wrong_weight,
    "latent returned, W_UV not applied": _step_latent_out,
    "newest token left out (off by one)": _step_skips_newest,
    "the naive form (up-projects the cache)": naive_mla_decode_step,
}


WRONG_ANSWERS = [
    pytest.param(checker, wrong, answer, id=f"{checker.__name__}-{wrong}")
    for checker, answers in ((ga.check_mean_pool_kv, POOL_WRONG), (ga.check_absorbed_mla_decode_step, MLA_STEP_WRONG))
    for wrong, answer in answers.items()
]


@pytest.mark.parametrize("checker, wrong, answer", WRONG_ANSWERS)
def test_core_checkers_reject_wrong_answers_politely(checker, wrong: str, answer, capsys) -> None:
    result = checker(answer)
    out = capsys.readouterr().out
    assert not result
    if wrong == "not done":
        assert result.status == "not done" and "not done yet" in out
    else:
        assert result.status == "failed" and out.startswith("❌") and "Traceback" not in out
    if wrong.startswith("the naive form"):
        assert "values are right" in out and "per cached token" in out


def test_naive_form_is_refused_in_strict_mode(monkeypatch, capsys) -> None:
    monkeypatch.setenv("LABSUPPORT_STRICT_CHECKS", "1")
    with pytest.raises(AssertionError, match="per cached token"):
        ga.check_absorbed_mla_decode_step(naive_mla_decode_step)
