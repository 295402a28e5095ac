"""Chapter 01's Triton kernels (labsupport.flash.triton), run on the CPU through Triton's interpreter,
against the dense reference.

Kept small (a few seconds): the interpreter executes each tile step in numpy.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

from labsupport.flash import triton as flash_triton  # noqa: E402
from labsupport.flash.reference import causal_mask, naive_attention  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not flash_triton.triton_available() or not flash_triton.interpreter_enabled(),
    reason="needs triton with TRITON_INTERPRET=1 set before triton was imported",
)


def qkv(lq, lk, d=16, dtype=torch.float32, seed=0, b=1, h=2):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=gen).to(dtype) for n in (lq, lk, lk))


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(40, 40), (20, 12), (9, 30)])
def test_interpreted_kernel_matches_dense(causal, lq, lk):
    q, k, v = qkv(lq, lk)
    out, lse = flash_triton.triton_flash_forward(q, k, v, causal=causal)
    ref = naive_attention(q.double(), k.double(), v.double(), causal=causal)
    assert out.dtype == torch.float32 and lse.shape == (1, 2, lq)
    assert not torch.isnan(out).any()
    assert rel(out, ref) < 1e-5
    s = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    if causal:
        s = s.masked_fill(~causal_mask(lq, lk), float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert float((lse.double()[finite] - ref_lse[finite]).abs().max()) < 1e-5


@needs_interpreter
def test_interpreted_kernel_fully_masked_rows_are_zero():
    q, k, v = qkv(20, 12)
    out, lse = flash_triton.triton_flash_forward(q, k, v, causal=True)
    assert torch.equal(out[..., :8, :], torch.zeros_like(out[..., :8, :]))
    assert torch.isneginf(lse[..., :8]).all()


@needs_interpreter
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_interpreted_kernel_low_precision(dtype, tol):
    q, k, v = qkv(32, 32, dtype=dtype)
    out, _ = flash_triton.triton_flash_forward(q, k, v, causal=True, block_m=16, block_n=32)
    assert out.dtype == dtype
    ref = naive_attention(q.double(), k.double(), v.double(), causal=True)
    assert rel(out, ref) < tol


@needs_interpreter
def test_interpreted_kernel_non_contiguous_input():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 24, 2, 16, generator=gen).transpose(1, 2)  # (B, H, L, D) view, non-contiguous
    k, v = (torch.randn(1, 2, 24, 16, generator=gen) for _ in range(2))
    out, _ = flash_triton.triton_flash_forward(q, k, v)
    assert rel(out, naive_attention(q.double(), k.double(), v.double())) < 1e-5


@needs_interpreter
@pytest.mark.parametrize(
    "causal,lq,lk,bm,bn", [(False, 40, 40, 16, 16), (True, 20, 12, 16, 16), (True, 50, 30, 16, 32), (False, 30, 50, 32, 16)]
)
def test_interpreted_backward_matches_autograd_of_dense(causal, lq, lk, bm, bn):
    q, k, v = qkv(lq, lk)
    dout = torch.randn(1, 2, lq, 16, generator=torch.Generator().manual_seed(5))
    out, lse = flash_triton.triton_flash_forward(q, k, v, causal=causal, block_m=bm, block_n=bn)
    grads = flash_triton.triton_flash_backward(q, k, v, out, lse, dout, causal=causal, block_m=bm, block_n=bn)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(naive_attention(q64, k64, v64, causal=causal), (q64, k64, v64), dout.double())
    for got, ref in zip(grads, want):
        assert got.dtype == torch.float32 and not torch.isnan(got).any()
        assert rel(got, ref) < 1e-5


@needs_interpreter
def test_interpreted_autograd_wrapper_fp16():
    q, k, v = (t.requires_grad_() for t in qkv(24, 24, dtype=torch.float16))
    out = flash_triton.triton_flash_attention(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(out.float().sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(naive_attention(q64, k64, v64, causal=True).sum(), (q64, k64, v64))
    for got, ref in zip((dq, dk, dv), want):
        assert got.dtype == torch.float16 and rel(got, ref) < 3e-3


@pytest.mark.parametrize(
    "args,kwargs,error",
    [
        ((torch.zeros(2, 3, 16),) * 3, {}, ValueError),
        ((torch.zeros(1, 1, 4, 16, dtype=torch.float64),) * 3, {}, TypeError),
        ((torch.zeros(1, 1, 4, 12),) * 3, {}, ValueError),
        ((torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 32), torch.zeros(1, 1, 4, 32)), {}, ValueError),
        (("q", "k", "v"), {}, TypeError),
        ((torch.zeros(1, 1, 4, 16),) * 3, {"block_m": 24, "block_n": 16}, ValueError),
    ],
)
def test_bad_input_raises_clear_errors(args, kwargs, error):
    if not flash_triton.triton_available():
        pytest.skip("triton is not installed")
    with pytest.raises(error):
        flash_triton.triton_flash_forward(*args, **kwargs)


def test_missing_triton_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(flash_triton, "triton", None)
    monkeypatch.setattr(flash_triton, "_TRITON_ERROR", ImportError("No module named 'triton'"))
    with pytest.raises(RuntimeError, match="needs Triton"):
        flash_triton.triton_flash_forward(*qkv(4, 4))


def test_module_imports_without_triton():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import labsupport.flash.triton as f\n"
        "assert not f.triton_available()\n"
        "try:\n"
        "    f.triton_flash_forward(None, None, None)\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_backward_refuses_missing_forward_results():
    if not flash_triton.triton_available():
        pytest.skip("triton is not installed")
    q, k, v = qkv(4, 4)
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        flash_triton.triton_flash_backward(q, k, v, None, torch.zeros(1, 2, 4), q)


def test_package_leaves_triton_unimported():
    """``import labsupport.flash`` must not import Triton: TRITON_INTERPRET can still be set afterwards."""
    import subprocess
    import sys

    code = "import sys, labsupport.flash\nassert 'triton' not in sys.modules, 'labsupport.flash imported triton'\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_length_bucket_is_the_next_power_of_two():
    assert [flash_triton.length_bucket(n) for n in (1, 16, 17, 3000, 4096, 4097)] == [16, 16, 32, 4096, 4096, 8192]
    with pytest.raises(ValueError):
        flash_triton.length_bucket(0)


def test_candidate_configs_are_few_and_fit_the_head_dimension():
    for d in (16, 32, 64, 128, 256):
        for backward in (False, True):
            cands = flash_triton.candidate_configs(d, backward=backward)
            assert 2 <= len(cands) <= 6
    # the widest head dimension never gets 128 x 64 tiles with a deep pipeline
    assert all(not (o >= 128 and i >= 64 and st > 1) for o, i, _, st in flash_triton.candidate_configs(256))
    with pytest.raises(ValueError, match="head dimension"):
        flash_triton.candidate_configs(48)


@needs_interpreter
def test_autotuner_tunes_once_per_length_bucket_and_prunes_per_head_dim(monkeypatch):
    """A new length in a tuned bucket reuses the tuned configuration: nothing is benchmarked again."""
    tuner = flash_triton._flash_fwd_autotuned
    benched: list = []

    def fake_bench(*args, config, **kwargs):  # the autotuner's timing step, counted instead of run
        benched.append(config)
        return [1.0 + 0.01 * len(benched)] * 3

    monkeypatch.setattr(tuner, "_bench", fake_bench)
    monkeypatch.setattr(tuner, "cache", {})

    def launch(n, d=32, causal=False):
        q, k, v = qkv(n, n, d=d)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3])
        args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), q.shape[1], n, n,
                flash_triton._LOG2E / d ** 0.5, flash_triton.length_bucket(n), flash_triton.length_bucket(n))
        grid = lambda meta: (-(-n // meta["BLOCK_M"]), q.shape[0] * q.shape[1])  # noqa: E731
        tuner[grid](*args, HEAD_DIM=d, CAUSAL=causal)
        ref = naive_attention(q.double(), k.double(), v.double(), causal=causal)
        assert rel(out, ref) < 1e-5

    launch(100)                      # bucket 128: tunes
    first = len(benched)
    wanted = {(o, i, w, st) for o, i, w, st in flash_triton.candidate_configs(32) if o <= 128}
    assert first == len(wanted)      # only this head dimension's candidates were timed
    launch(120)                      # same bucket, new length: no re-tuning
    assert len(benched) == first
    launch(130)                      # next bucket: tunes again
    assert len(benched) == 2 * first


@needs_interpreter
@pytest.mark.parametrize("warp_specialize", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk,d", [(40, 40, 16), (20, 12, 32), (9, 30, 16), (33, 50, 64)])
def test_tma_kernel_matches_dense(causal, lq, lk, d, warp_specialize):
    from labsupport.flash import tma

    q, k, v = qkv(lq, lk, d=d)
    out, lse = tma.tma_flash_forward(q, k, v, causal=causal, warp_specialize=warp_specialize)
    base_out, base_lse = flash_triton.triton_flash_forward(q, k, v, causal=causal)
    ref = naive_attention(q.double(), k.double(), v.double(), causal=causal)
    assert not torch.isnan(out).any()
    assert rel(out, ref) < 1e-5
    assert torch.equal(torch.isneginf(lse), torch.isneginf(base_lse))
    finite = torch.isfinite(base_lse)
    assert float((lse[finite] - base_lse[finite]).abs().max()) < 1e-5
    if causal and lq > lk:  # rows that see no key: zeros
        assert torch.equal(out[..., : lq - lk, :], torch.zeros_like(out[..., : lq - lk, :]))


@needs_interpreter
def test_tma_kernel_bf16_and_refuses_strided_inputs():
    from labsupport.flash import tma

    q, k, v = qkv(24, 24, dtype=torch.bfloat16)
    out, _ = tma.tma_flash_forward(q, k, v, causal=True)
    ref = naive_attention(q.double(), k.double(), v.double(), causal=True)
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2
    with pytest.raises(ValueError, match="contiguous"):
        tma.tma_flash_forward(q.transpose(2, 3).contiguous().transpose(2, 3), k, v)
