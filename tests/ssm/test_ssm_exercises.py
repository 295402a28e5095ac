"""The chapter's checkers pass the references and fail every kind of wrong answer without a traceback."""

from __future__ import annotations

import pytest
import torch

from labsupport import ssm
from labsupport.ssm.reference import fft_causal_conv, selective_step, zoh
from labsupport.ssm.scans import combine


def _not_done(*args):
    raise NotImplementedError


def _raises(*args):
    raise RuntimeError("boom")


def _none(*args):
    return None


CHECKERS = [(ssm.check_zoh, zoh), (ssm.check_combine, combine), (ssm.check_selective_step, selective_step),
            (ssm.check_fft_conv, fft_causal_conv)]


@pytest.mark.parametrize("checker, reference", CHECKERS)
def test_reference_passes_and_generic_wrong_answers_fail(checker, reference, capsys) -> None:
    assert checker(reference).passed
    result = checker(_not_done)
    assert result.status == "not done"
    for wrong in (_raises, _none, 42):
        assert checker(wrong).status == "failed"

    def nan_answer(*args):
        out = reference(*args)
        return tuple(torch.full_like(t, float("nan")) for t in out) if isinstance(out, tuple) else out * float("nan")

    def wrong_dtype(*args):
        out = reference(*args)
        return tuple(t.to(torch.complex128 if t.is_complex() else torch.float16) for t in out) \
            if isinstance(out, tuple) else out.half()

    def wrong_shape(*args):
        out = reference(*args)
        return tuple(t[..., None] for t in out) if isinstance(out, tuple) else out[..., None]

    for wrong in (nan_answer, wrong_dtype, wrong_shape):
        assert checker(wrong).status == "failed", wrong.__name__
    output = capsys.readouterr().out
    assert "Traceback" not in output and "boom" in output


def test_zoh_rejects_euler() -> None:
    assert not ssm.check_zoh(lambda A, B, d: (1 + d[:, None] * A, d[:, None] * B))
    assert not ssm.check_zoh(lambda A, B, d: (torch.exp(d[:, None] * A), d[:, None] * B))
    assert not ssm.check_zoh(lambda A, B, d: ssm.bilinear(A, B, d))


def test_combine_rejects_the_reversed_order() -> None:
    assert not ssm.check_combine(lambda a1, b1, a2, b2: (a1 * a2, a1 * b2 + b1))
    assert not ssm.check_combine(lambda a1, b1, a2, b2: (a1 * a2, b1 + b2))


def test_selective_step_rejects_reading_the_old_state_and_forgetting_d() -> None:
    def old_state(h, u, delta, A, B, C, D):
        y = (h * C[:, None]).sum(-1) + D * u
        return y, torch.exp(delta[..., None] * A) * h + (delta * u)[..., None] * B[:, None]

    def no_skip(h, u, delta, A, B, C, D):
        y, h_new = selective_step(h, u, delta, A, B, C, None)
        return y, h_new

    def in_place(h, u, delta, A, B, C, D):
        y, h_new = selective_step(h, u, delta, A, B, C, D)
        h.copy_(h_new)
        return y, h

    assert not ssm.check_selective_step(old_state)
    assert not ssm.check_selective_step(no_skip)
    assert ssm.check_selective_step(in_place)  # writing into its own copy of h is harmless


def test_fft_conv_rejects_circular_convolution() -> None:
    def circular(u, kernel):
        n = u.shape[1]
        y = torch.fft.irfft(torch.fft.rfft(u.transpose(1, 2), n=n) * torch.fft.rfft(kernel, n=n), n=n)
        return y.transpose(1, 2)

    def off_by_one(u, kernel):
        return torch.cat([torch.zeros_like(u[:, :1]), fft_causal_conv(u, kernel)[:, :-1]], dim=1)

    assert not ssm.check_fft_conv(circular)
    assert not ssm.check_fft_conv(off_by_one)


# ----------------------------------------------------------------------- issue 19: the checkers refuse the shortcuts


def _wrong_answers():
    import importlib.util
    import sys
    from pathlib import Path
    if "_wrong_answers_ch04" not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "harness" / "wrong_answers.py"
        spec = importlib.util.spec_from_file_location("_wrong_answers_ch04", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["_wrong_answers_ch04"]


def _wrong(name: str):
    return getattr(_wrong_answers(), name)


def _passes(checker, fn) -> bool:
    return _wrong_answers().run_checker(checker, fn)   # strict mode off: a failure returns False


def test_fft_checker_refuses_a_direct_convolution() -> None:
    from labsupport.ssm import check_fft_conv, fft_causal_conv
    assert check_fft_conv(fft_causal_conv)
    assert not _passes(check_fft_conv, _wrong("_direct_conv"))
    assert not _passes(check_fft_conv, _wrong("_direct_conv_with_a_decoy_fft"))
    assert not _passes(check_fft_conv, _wrong("_circular_fft_conv"))


def test_chunked_scan_checker_refuses_the_loop_and_the_closed_form() -> None:
    from labsupport.ssm import check_chunked_scan, chunked_scan
    assert check_chunked_scan(lambda a, b, h0, chunk_size: chunked_scan(a, b, h0, chunk_size=chunk_size))
    assert not _passes(check_chunked_scan, _wrong("_scan_loop"))
    assert not _passes(check_chunked_scan, _wrong("_scan_closed_form"))


def test_ssd_checker_refuses_the_whole_matrix_and_cancelling_decays() -> None:
    from labsupport.ssm import check_ssd_chunked, ssd_chunked
    assert check_ssd_chunked(lambda x, dt, A, B, C, chunk_size: ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size))
    assert not _passes(check_ssd_chunked, _wrong("_ssd_quadratic_answer"))
    assert not _passes(check_ssd_chunked, _wrong("_ssd_chunked_by_differences"))


# --------------------------------------------------------------------------- the engine's feedback: found, and the recipe


def _ssd_chunks_alone_with_the_right_state(x, dt, A, B, C, chunk_size):
    from labsupport.ssm import exercises as ex
    return ex._ssd_chunks_alone(x, dt, A, B, C, chunk_size)[0], ex._reference_ssd(x, dt, A, B, C, chunk_size)[1]


@pytest.mark.parametrize("checker, wrong, found", [
    ("check_zoh", lambda A, B, d: (1 + d[..., None] * A, torch.expm1(d[..., None] * A) / A * B), "Euler's 1 + ΔA"),
    ("check_zoh", lambda A, B, d: (torch.exp(d[..., None] * A), d[..., None] * B), "Euler's ΔB"),
    ("check_combine", lambda a1, b1, a2, b2: (a1 * a2, a1 * b2 + b1), "a1·b2 + b1"),
    ("check_fft_conv", lambda u, k: torch.fft.irfft(torch.fft.rfft(u.transpose(1, 2), n=u.shape[1])
                                                   * torch.fft.rfft(k, n=u.shape[1]), n=u.shape[1]).transpose(1, 2),
     "circular convolution"),
    ("check_chunked_scan", lambda a, b, h0, c: ssm.chunked_scan(a, b, None, chunk_size=c), "h0 was not carried"),
    ("check_ssd_chunked", _ssd_chunks_alone_with_the_right_state, "computed on its own"),
])
def test_a_known_mistake_is_named_and_the_recipe_waits(checker, wrong, found, capsys, monkeypatch) -> None:
    monkeypatch.delenv("LABSUPPORT_STRICT_CHECKS", raising=False)
    from labsupport.ssm import exercises as ex
    result = getattr(ex, checker)(wrong)
    out = capsys.readouterr().out
    assert not result and "\n   found   " in out and found in out, out
    assert "reveal=True)` prints the full recipe" in out
    shown = getattr(ex, checker)(wrong, reveal=True).message
    assert "try the tiered hints first" not in shown.split("\n   recipe  ")[-1]
