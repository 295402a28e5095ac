"""Chapter 02 checkers (labsupport.grouped.exercises): the references pass, wrong answers are explained politely."""

from __future__ import annotations

import math

import pytest
import torch

from labsupport import grouped as ga


def test_checkers_pass_the_references(capsys) -> None:
    assert ga.check_grouped_decode_step(ga.grouped_decode_step)
    assert ga.check_absorb_mla_weights(ga.absorb_mla_weights)
    assert ga.check_quantize_dequantize(_own_quantize_dequantize)
    assert capsys.readouterr().out.count("✅") == 3


def _own_quantize_dequantize(x, bits, dim):
    """The exercise's answer written out, as a learner would (the library's quantiser is refused)."""
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round((x - lo) / scale).clamp(0, 2**bits - 1) * scale + lo


@pytest.mark.parametrize("library", ["quantize_dequantize", "fake_quantize", "quantize_asymmetric"])
def test_quantiser_checker_refuses_the_library_quantisers(capsys, library) -> None:
    calls = {"quantize_dequantize": lambda x, bits, dim: ga.quantize_dequantize(x, bits, dim),
             "fake_quantize": lambda x, bits, dim: ga.fake_quantize(x, bits, dim=dim, group=x.shape[dim]),
             "quantize_asymmetric": lambda x, bits, dim: ga.dequantize(*ga.quantize_asymmetric(x, bits, dim=dim))}
    result = ga.check_quantize_dequantize(calls[library])
    assert not result
    assert "library's quantiser" in capsys.readouterr().out


def not_done(*args):
    raise NotImplementedError("your code here")


def _attention_decode(q, k, v):
    return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v


GQA_WRONG = {
    "not done": not_done,
    "None": lambda q, k, v: None,
    "raises": lambda q, k, v: 1 / 0,
    "wrong shape (G heads)": lambda q, k, v: ga.grouped_decode_step(q, k, v)[:, : k.shape[1]],
    "wrong dtype": lambda q, k, v: ga.grouped_decode_step(q, k, v).double(),
    "NaN": lambda q, k, v: ga.grouped_decode_step(q, k, v) * float("nan"),
    "repeat instead of repeat_interleave": lambda q, k, v: _attention_decode(
        q, k.repeat(1, q.shape[1] // k.shape[1], 1, 1), v.repeat(1, q.shape[1] // k.shape[1], 1, 1)),
    "scaled by the cache length": lambda q, k, v: ga.grouped_decode_step(q * math.sqrt(q.shape[-1] / k.shape[-2]), k, v),
    "drops the newest token (off by one)": lambda q, k, v: ga.grouped_decode_step(q, k[:, :, :-1], v[:, :, :-1])
    if k.shape[2] > 1 else torch.zeros_like(q),
    "breaks on non-contiguous": lambda q, k, v: ga.grouped_decode_step(q, k.view(-1).view(k.shape), v),
}


MLA_WRONG = {
    "not done": not_done,
    "None": lambda *w: None,
    "one matrix only": lambda w_q, w_uk, w_uv, w_o: w_q @ w_uk.transpose(-1, -2),
    "forgot the transpose": lambda w_q, w_uk, w_uv, w_o: (w_q @ w_uk.transpose(-1, -2)[..., :0], w_uv @ w_o),
    "w_uv and w_uk swapped": lambda w_q, w_uk, w_uv, w_o: (w_q @ w_uv.transpose(-1, -2), w_uk @ w_o),
    "wrong dtype": lambda *w: tuple(t.double() for t in ga.absorb_mla_weights(*w)),
    "NaN": lambda *w: tuple(t * float("nan") for t in ga.absorb_mla_weights(*w)),
    "raises": lambda w_q, w_uk, w_uv, w_o: w_q @ w_uk,
    "summed over heads": lambda *w: tuple(t.sum(0, keepdim=True).expand_as(t) for t in ga.absorb_mla_weights(*w)),
}


def _quant_levels_off_by_one(x, bits, dim):
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / 2**bits).clamp_min(1e-30)
    return torch.round((x - lo) / scale).clamp(0, 2**bits) * scale + lo


def _quant_symmetric(x, bits, dim):
    scale = x.abs().amax(dim, keepdim=True) / (2 ** (bits - 1) - 0.5)
    return torch.round(x / scale) * scale


def _quant_no_zero_guard(x, bits, dim):
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    return torch.round((x - lo) / scale) * scale + lo


QUANT_WRONG = {
    "not done": not_done,
    "None": lambda x, bits, dim: None,
    "raises": lambda x, bits, dim: x.view(-1, 7),
    "identity (no quantisation)": lambda x, bits, dim: x.clone(),
    "statistics over the wrong dimension": lambda x, bits, dim: _own_quantize_dequantize(x, bits, 0 if dim != 0 else 1),
    "2**bits levels (off by one)": _quant_levels_off_by_one,
    "symmetric instead of asymmetric": _quant_symmetric,
    "0/0 on constant slices": _quant_no_zero_guard,
    "returns codes, not values": lambda x, bits, dim: ga.quantize_asymmetric(x, bits, dim)[0],
    "wrong dtype": lambda x, bits, dim: _own_quantize_dequantize(x, bits, dim).double(),
    "wrong shape (keepdim=False)": lambda x, bits, dim: _own_quantize_dequantize(x, bits, dim).sum(dim),
}


WRONG_ANSWERS = [
    pytest.param(checker, wrong, answer, id=f"{checker.__name__}-{wrong}")
    for checker, answers in (
        (ga.check_grouped_decode_step, GQA_WRONG),
        (ga.check_absorb_mla_weights, MLA_WRONG),
        (ga.check_quantize_dequantize, QUANT_WRONG),
    )
    for wrong, answer in answers.items()
]


@pytest.mark.parametrize("checker, wrong, answer", WRONG_ANSWERS)
def test_checkers_reject_wrong_answers_politely(checker, wrong: str, answer, capsys) -> None:
    result = checker(answer)
    out = capsys.readouterr().out
    assert not result
    if wrong == "not done":
        assert result.status == "not done" and "not done yet" in out
    else:
        assert result.status == "failed" and out.startswith("❌") and "Traceback" not in out


def test_checker_not_callable(capsys) -> None:
    assert not ga.check_grouped_decode_step(ga.grouped_decode_step(torch.randn(1, 2, 1, 4), torch.randn(1, 1, 3, 4),
                                                                    torch.randn(1, 1, 3, 4)))
    assert "expected a function" in capsys.readouterr().out


def test_the_quantiser_checkers_reference_equals_the_library() -> None:
    from labsupport.grouped import _solutions

    x = torch.randn(3, 7, 5, dtype=torch.float64)
    for bits, dim in ((1, 0), (2, -1), (4, 1), (8, -2)):
        assert torch.equal(_solutions.quantize_dequantize(x, bits, dim), ga.quantize_dequantize(x, bits, dim))
