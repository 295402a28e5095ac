"""A fused CPU scan: the sequential loop compiled to native code, one pass over memory.

Why it exists. On a CPU the scan ``h_t = a_t h_{t-1} + b_t`` over a selective
SSM's ``(B, L, channels, state)`` tensors is limited by memory traffic and by
Python's per-operation overhead, not by arithmetic. The eager scans in
:mod:`labsupport.ssm.scans` pay one or both: the loop launches ``L`` small
operations (≈ 2–5 µs each), and :func:`~labsupport.ssm.scans.chunked_scan`
reads ``a`` and ``b`` twice through strided slices. This kernel is the same
loop with the positions walked in C++: it reads ``a`` and ``b`` once and writes
``h`` once — the least any scan can move — which is what Mamba's fused CUDA
kernel does on a GPU (it keeps the state in registers and never writes it out).

It is built on first use with :func:`torch.utils.cpp_extension.load_inline`
(a C++ compiler and ``ninja`` are needed; the build takes about a minute and is
cached by torch in its extensions folder). Use :func:`native_scan_available`
to ask before calling. Forward only: for training use ``chunked_scan``, which
has a backward. The benchmark ``benchmarks/ssm_scans_cpu.py`` measures it.
"""

from __future__ import annotations

import shutil
from functools import lru_cache
from types import ModuleType

import torch

from labsupport.ssm.scans import prepare_scan_inputs

__all__ = ["native_scan", "native_scan_available"]

_SOURCE = r"""
#include <torch/extension.h>

template <typename scalar_t>
static void scan_kernel(const scalar_t* a, const scalar_t* b, const scalar_t* h0, scalar_t* out,
                        int64_t batch, int64_t length, int64_t width) {
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t base = i * length * width;
    const scalar_t* start = h0 ? h0 + i * width : nullptr;
    for (int64_t j = 0; j < width; ++j) {
      out[base + j] = (start ? a[base + j] * start[j] : scalar_t(0)) + b[base + j];
    }
    for (int64_t t = 1; t < length; ++t) {
      const scalar_t* at = a + base + t * width;
      const scalar_t* bt = b + base + t * width;
      const scalar_t* previous = out + base + (t - 1) * width;
      scalar_t* ot = out + base + t * width;
      for (int64_t j = 0; j < width; ++j) ot[j] = at[j] * previous[j] + bt[j];
    }
  }
}

torch::Tensor fused_scan(torch::Tensor a, torch::Tensor b, c10::optional<torch::Tensor> h0) {
  auto out = torch::empty_like(b);
  const int64_t batch = b.size(0), length = b.size(1);
  const int64_t width = length == 0 ? 0 : b.numel() / (batch * length);
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "fused_scan", [&] {
    scan_kernel<scalar_t>(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                          h0.has_value() ? h0->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                          batch, length, width);
  });
  return out;
}
"""


def native_scan_available() -> tuple[bool, str]:
    """Whether the fused scan can be built here, and if not, why (a C++ compiler and ninja are needed)."""
    from torch.utils.cpp_extension import is_ninja_available

    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return False, "no C++ compiler (c++, g++ or clang++) on PATH"
    if not is_ninja_available():
        return False, "ninja is not on PATH (torch builds extensions with it: pip install ninja)"
    return True, f"builds with {compiler}"


@lru_cache(maxsize=1)
def _extension() -> ModuleType:
    available, reason = native_scan_available()
    if not available:
        raise RuntimeError(f"the fused native scan cannot be built here: {reason}. "
                           "Use labsupport.ssm.chunked_scan instead (pure PyTorch).")
    from torch.utils.cpp_extension import load_inline

    return load_inline("labsupport_ssm_fused_scan", cpp_sources=_SOURCE, functions=["fused_scan"],
                       extra_cflags=["-O3"], verbose=False)


def native_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """``h_t = a_t h_{t-1} + b_t`` along dimension 1, by the compiled loop (one pass over memory).

    Same contract as :func:`labsupport.ssm.scans.sequential_scan`: ``a`` and ``b`` are
    ``(B, L, ...)`` of one float dtype (half precision runs in float32 and is cast back),
    ``h0`` is ``(B, ...)`` or ``None``. Not differentiable: raises if a gradient is needed.
    """
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (a, b, h0)):
        raise RuntimeError("native_scan has no backward pass; use labsupport.ssm.chunked_scan to train "
                           "(or call native_scan under torch.no_grad())")
    a_, b_, h0_, out_dtype = prepare_scan_inputs(a, b, h0)
    if a_.device.type != "cpu":
        raise ValueError(f"native_scan runs on the CPU; got tensors on {a_.device}")
    h = _extension().fused_scan(a_.contiguous(), b_.contiguous(),
                                None if h0_ is None else h0_.contiguous())
    return h.to(out_dtype)
