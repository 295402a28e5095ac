"""Chapter 05's block-sparse Triton kernel, run on the CPU through Triton's interpreter, against dense attention.

Kept tiny (a few seconds): the interpreter executes each tile step in numpy.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

from labsupport import sparse  # noqa: E402
from labsupport.harness.numerics import rel_err  # noqa: E402
from labsupport.sparse import triton as sparse_triton  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not sparse_triton.triton_available() or not sparse_triton.interpreter_enabled(),
    reason="needs triton with TRITON_INTERPRET=1 set before triton was imported",
)


def qkv(lq, lk, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, n, 16, generator=g).to(dtype) for n in (lq, lk, lk))


@needs_interpreter
@pytest.mark.parametrize("lq,lk,window,sinks", [(48, 48, 20, 0), (40, 40, 10, 3), (36, 20, 6, 0)])
def test_interpreted_kernel_matches_dense(lq, lk, window, sinks):
    q, k, v = qkv(lq, lk)
    pattern = sparse.WindowPattern(window, sinks)
    out, lse = sparse_triton.triton_block_sparse_forward(q, k, v, pattern)
    mask = pattern.mask(lq, lk)
    ref, ref_lse = sparse.masked_attention(q.double(), k.double(), v.double(), mask)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert float((lse.double() - ref_lse)[finite].abs().max()) < 1e-4
    empty = ~mask.any(dim=1)
    assert torch.equal(out[..., empty, :], torch.zeros_like(out[..., empty, :]))


@needs_interpreter
def test_interpreted_kernel_fp16_and_lists():
    q, k, v = qkv(32, 32, torch.float16)
    pattern = sparse.WindowPattern(8, 2)
    layout = pattern.layout(32, 32, 16, 16)
    lists = sparse_triton.block_lists(layout)
    assert lists["full_cnt"].tolist() == [0, 0] and lists["part_cnt"].tolist() == [1, 2]
    out, _ = sparse_triton.triton_block_sparse_forward(q, k, v, pattern, lists=lists)
    ref, _ = sparse.masked_attention(q.double(), k.double(), v.double(), pattern.mask(32, 32))
    assert out.dtype == torch.float16 and rel_err(out, ref) < 2e-3


def test_guards():
    q, k, v = qkv(16, 16)
    with pytest.raises(TypeError, match="WindowPattern"):
        sparse_triton.triton_block_sparse_forward(q, k, v, torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="head dimension"):
        sparse_triton.triton_block_sparse_forward(q[..., :12], k[..., :12], v[..., :12], sparse.WindowPattern(4))


@needs_interpreter
def test_forward_only_kernel_refuses_tensors_that_need_gradients():
    q, k, v = qkv(16, 16)
    pattern = sparse.WindowPattern(4)
    with pytest.raises(RuntimeError, match="forward-only"):
        sparse_triton.triton_block_sparse_forward(q.requires_grad_(), k, v, pattern)
    with torch.no_grad():  # the same call without a graph runs
        out, _ = sparse_triton.triton_block_sparse_forward(q, k, v, pattern)
    assert out.shape == q.shape
