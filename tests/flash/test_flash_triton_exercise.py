"""Chapter 01, exercise 4 (labsupport.flash.triton_exercise): the learner's Triton tile kernel and its checker.

The checker must pass the solution and reject every wrong kernel below, the dense shortcut included
(right numbers, but all keys loaded at once). Runs under Triton's CPU interpreter in a few seconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from labsupport.flash import triton_exercise as ex  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="needs TRITON_INTERPRET=1 set before triton was imported")


@triton.jit
def solution(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, n_q, n_k, scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    row_ok = rows < n_q
    q = tl.load(q_ptr + (bh * n_q + rows[:, None]) * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, n_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k
        k = tl.load(k_ptr + (bh * n_k + cols[:, None]) * D + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + (bh * n_k + cols[:, None]) * D + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.where(col_ok[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    tl.store(o_ptr + (bh * n_q + rows[:, None]) * D + dims[None, :], acc / l[:, None], mask=row_ok[:, None])
    tl.store(lse_ptr + bh * n_q + rows, m + tl.log(l), mask=row_ok)


@triton.jit
def dense_shortcut(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, n_q, n_k, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Right numbers for Lk <= 128, but every key in one tile: the dense computation."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    row_ok = rows < n_q
    q = tl.load(q_ptr + (bh * n_q + rows[:, None]) * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    cols = tl.arange(0, 128)
    col_ok = cols < n_k
    k = tl.load(k_ptr + (bh * n_k + cols[:, None]) * D + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptr + (bh * n_k + cols[:, None]) * D + dims[None, :], mask=col_ok[:, None], other=0.0)
    s = tl.where(col_ok[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    l = tl.sum(p, axis=1)
    tl.store(o_ptr + (bh * n_q + rows[:, None]) * D + dims[None, :], tl.dot(p.to(v.dtype), v) / l[:, None],
             mask=row_ok[:, None])
    tl.store(lse_ptr + bh * n_q + rows, m + tl.log(l), mask=row_ok)



@triton.jit
def dense_with_a_dummy_loop(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, n_q, n_k, scale,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """The dense shortcut with a loop over key blocks that does nothing: its source has a loop, its loads don't."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    row_ok = rows < n_q
    q = tl.load(q_ptr + (bh * n_q + rows[:, None]) * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    cols = tl.arange(0, 128)
    col_ok = cols < n_k
    k = tl.load(k_ptr + (bh * n_k + cols[:, None]) * D + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptr + (bh * n_k + cols[:, None]) * D + dims[None, :], mask=col_ok[:, None], other=0.0)
    s = tl.where(col_ok[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    l = tl.sum(p, axis=1)
    for start in range(0, n_k, BLOCK_N):  # a loop "over key blocks" that changes nothing
        l = l * 1.0
    tl.store(o_ptr + (bh * n_q + rows[:, None]) * D + dims[None, :], tl.dot(p.to(v.dtype), v) / l[:, None],
             mask=row_ok[:, None])
    tl.store(lse_ptr + bh * n_q + rows, m + tl.log(l), mask=row_ok)

@triton.jit
def no_rescale(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, n_q, n_k, scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Forgets to rescale l and acc when the running maximum moves."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    row_ok = rows < n_q
    q = tl.load(q_ptr + (bh * n_q + rows[:, None]) * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, n_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k
        k = tl.load(k_ptr + (bh * n_k + cols[:, None]) * D + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + (bh * n_k + cols[:, None]) * D + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.where(col_ok[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m[:, None])
        l = l + tl.sum(p, axis=1)
        acc = acc + tl.dot(p.to(v.dtype), v)
    tl.store(o_ptr + (bh * n_q + rows[:, None]) * D + dims[None, :], acc / l[:, None], mask=row_ok[:, None])
    tl.store(lse_ptr + bh * n_q + rows, m + tl.log(l), mask=row_ok)


@triton.jit
def unmasked_tail(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, n_q, n_k, scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Loads the padded keys of the last block as zeros but lets their score (0) into the softmax."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    row_ok = rows < n_q
    q = tl.load(q_ptr + (bh * n_q + rows[:, None]) * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(0, n_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k
        k = tl.load(k_ptr + (bh * n_k + cols[:, None]) * D + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + (bh * n_k + cols[:, None]) * D + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    tl.store(o_ptr + (bh * n_q + rows[:, None]) * D + dims[None, :], acc / l[:, None], mask=row_ok[:, None])
    tl.store(lse_ptr + bh * n_q + rows, m + tl.log(l), mask=row_ok)


@triton.jit
def not_done(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, n_q, n_k, scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    raise NotImplementedError("your code here")


def test_the_solution_passes(capsys) -> None:
    result = ex.check_triton_attention_kernel(solution)
    assert result.passed, capsys.readouterr().out
    assert "passed 5 cases" in capsys.readouterr().out


@pytest.mark.parametrize("dense", [dense_shortcut, dense_with_a_dummy_loop])
def test_the_dense_shortcut_is_rejected_although_its_numbers_are_right(capsys, dense) -> None:
    q, k, v = (torch.randn(1, 1, n, 16) for n in (16, 40, 40))
    out, _ = ex.launch_attention_kernel(dense, q, k, v)
    assert torch.allclose(out, torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v, atol=1e-5)  # right numbers
    result = ex.check_triton_attention_kernel(dense)
    out = capsys.readouterr().out
    assert result.status == "failed"
    assert "dense attention" in out and "BLOCK_N" in out and "Traceback" not in out


@pytest.mark.parametrize(("kernel", "where"), [(no_rescale, "case 2"), (unmasked_tail, "case 2")])
def test_wrong_kernels_fail_with_the_case_named(capsys, kernel, where) -> None:
    result = ex.check_triton_attention_kernel(kernel)
    out = capsys.readouterr().out
    assert result.status == "failed" and where in out and "Traceback" not in out


def test_a_kernel_that_is_not_written_yet_is_not_done(capsys) -> None:
    result = ex.check_triton_attention_kernel(not_done)
    assert result.status == "not done" and "not done yet" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [None, lambda *args: None, "kernel"])
def test_something_that_is_not_a_kernel_fails_clearly(capsys, wrong) -> None:
    result = ex.check_triton_attention_kernel(wrong)
    out = capsys.readouterr().out
    assert result.status == "failed" and "triton.jit" in out and "Traceback" not in out


def test_launch_validates_its_inputs() -> None:
    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="power of two"):
        ex.launch_attention_kernel(solution, q, q, q, block_n=24)
    with pytest.raises(ValueError, match="head dim"):
        ex.launch_attention_kernel(solution, *(torch.randn(1, 1, 16, 8) for _ in range(3)))
    with pytest.raises(TypeError, match="triton.jit"):
        ex.launch_attention_kernel(print, q, q, q)


def test_the_stand_in_lets_a_kernel_cell_run_without_triton(monkeypatch, capsys) -> None:
    import builtins

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    fake_triton, fake_tl = ex.triton_or_stand_in()

    @fake_triton.jit
    def kernel(x_ptr, BLOCK: fake_tl.constexpr):
        return fake_tl.program_id(0)

    assert callable(kernel)
    result = ex.check_triton_attention_kernel(kernel)
    assert result.status == "not done" and "Triton is not installed" in capsys.readouterr().out
    monkeypatch.setattr(builtins, "__import__", real_import)
    real_triton, real_tl = ex.triton_or_stand_in()
    assert real_triton is triton and real_tl is tl


def test_a_kernel_compiled_for_the_gpu_has_its_loads_audited_on_the_cpu() -> None:
    """The GPU path's tiling check: an interpreted copy of a compiled kernel's source, watched load by load."""
    from triton.runtime.jit import JITFunction

    q, k, v = (torch.randn(1, 1, n, 16) for n in (16, 40, 40))
    compiled = JITFunction(dense_with_a_dummy_loop.fn)  # what @triton.jit makes without TRITON_INTERPRET
    assert not ex._is_interpreted(compiled) and ex._source_has_a_loop(compiled)  # the old source check passed it
    with pytest.raises(ex.TileRuleError, match="dense attention"):
        ex._audit_tiles(compiled, q, k, v, block_m=16, block_n=16)
    (out, lse), watched = ex._audit_tiles(JITFunction(solution.fn), q, k, v, block_m=16, block_n=16)
    assert watched and torch.allclose(out, torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v, atol=1e-5)


def test_compiled_fp32_dots_are_launched_in_ieee_precision() -> None:
    assert ex._ieee_launch_options() == {"default_dot_input_precision": "ieee"}  # this Triton takes the option
    assert ex._tolerances(compiled=True) == ex._tolerances(compiled=False) == (2e-3, 1e-3)
