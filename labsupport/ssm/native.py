"""A fused CPU scan: the sequential loop compiled to native code, one pass over memory.

Why it exists. On a CPU the scan ``h_t = a_t h_{t-1} + b_t`` over a selective
SSM's ``(B, L, channels, state)`` tensors is limited by memory traffic and by
Python's per-operation overhead, not by arithmetic. The eager scans in
:mod:`labsupport.ssm.scans` pay one or both: the loop launches ``L`` small
operations (≈ 2–5 µs each), and :func:`~labsupport.ssm.scans.chunked_scan`
reads ``a`` and ``b`` twice through strided slices. This kernel is the same
loop with the positions walked in C++: it reads ``a`` and ``b`` once and writes
``h`` once — the least a scan *of expanded* ``(a, b)`` can move. Mamba's CUDA kernel
goes further: it never builds ``a`` and ``b`` at all. :func:`native_selective_scan`
does the same on a CPU: from ``(u, Δ, A, B, C)`` it keeps one channel's ``N`` state
numbers in a small buffer, computes ``exp(Δ A)`` and ``Δ B u`` on the fly, and writes
only ``y`` and the last state.

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

__all__ = ["native_scan", "native_scan_available", "native_selective_scan"]

_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <vector>

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

template <typename scalar_t>
static void selective_kernel(const scalar_t* u, const scalar_t* delta, const scalar_t* A, const scalar_t* B,
                             const scalar_t* C, scalar_t* y, scalar_t* last, int64_t batch, int64_t length,
                             int64_t channels, int64_t n_state) {
  std::vector<scalar_t> h(n_state);
  for (int64_t i = 0; i < batch; ++i) {
    for (int64_t d = 0; d < channels; ++d) {
      const scalar_t* a_row = A + d * n_state;
      std::fill(h.begin(), h.end(), scalar_t(0));
      for (int64_t t = 0; t < length; ++t) {
        const int64_t bt = i * length + t;
        const scalar_t dt = delta[bt * channels + d];
        const scalar_t dtu = dt * u[bt * channels + d];
        const scalar_t* b_t = B + bt * n_state;
        const scalar_t* c_t = C + bt * n_state;
        scalar_t out = 0;
        for (int64_t n = 0; n < n_state; ++n) {
          h[n] = std::exp(dt * a_row[n]) * h[n] + dtu * b_t[n];
          out += c_t[n] * h[n];
        }
        y[bt * channels + d] = out;
      }
      for (int64_t n = 0; n < n_state; ++n) last[(i * channels + d) * n_state + n] = h[n];
    }
  }
}

std::vector<torch::Tensor> fused_selective(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                                           torch::Tensor C) {
  auto y = torch::empty_like(u);
  const int64_t batch = u.size(0), length = u.size(1), channels = u.size(2), n_state = A.size(1);
  auto last = torch::empty({batch, channels, n_state}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "fused_selective", [&] {
    selective_kernel<scalar_t>(u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                               B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                               last.data_ptr<scalar_t>(), batch, length, channels, n_state);
  });
  return {y, last};
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

    return load_inline("labsupport_ssm_fused_scan_v2", cpp_sources=_SOURCE, functions=["fused_scan", "fused_selective"],
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


def native_selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          D: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective SSM from ``(u, Δ, A, B, C)`` in compiled code, never expanding to ``(batch, L, D, N)``.

    Same contract as :func:`labsupport.ssm.reference.selective_scan` without ``h0``: ``u, delta
    (batch, L, D)``, ``A (D, N)``, ``B, C (batch, L, N)``, ``D (D,)`` or ``None`` → ``(y, last state)``.
    Float32 or float64, CPU, forward only.
    """
    from labsupport.ssm.reference import _check_selective

    _check_selective(u, delta, A, B, C)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C)):
        raise RuntimeError("native_selective_scan has no backward pass; use fused_selective_scan or selective_scan "
                           "to train (or call it under torch.no_grad())")
    dtype = u.dtype
    if dtype not in (torch.float32, torch.float64) or any(t.dtype != dtype for t in (delta, A, B, C)):
        raise TypeError(f"native_selective_scan needs u, delta, A, B, C of one dtype, float32 or float64; got "
                        f"{[str(t.dtype) for t in (u, delta, A, B, C)]}")
    if u.device.type != "cpu":
        raise ValueError(f"native_selective_scan runs on the CPU; got tensors on {u.device}")
    y, last = _extension().fused_selective(*(t.contiguous() for t in (u, delta, A, B, C)))
    if D is not None:
        y = y + D * u
    return y, last
