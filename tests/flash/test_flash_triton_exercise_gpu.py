"""Chapter 01, exercise 4 on a GPU (the Colab path): the checker grades a kernel compiled for the GPU.

Skipped without CUDA. On a GPU machine run it on its own, without ``TRITON_INTERPRET`` (the interpreter
tests in ``test_flash_triton_exercise.py`` set it for their process)::

    env -u TRITON_INTERPRET python -m pytest --noconftest -o addopts="" -q -p no:cacheprovider \
        tests/flash/test_flash_triton_exercise_gpu.py tests/flash/test_flash_triton_exercise_compiled.py

The kernels are the CPU tests' (solution and wrong answers), recompiled from their source as
``@triton.jit`` makes them without the interpreter, and ``test_flash_triton_exercise_compiled.py``'s
correct kernel whose update step is a ``@triton.jit`` helper (compiled, a JITFunction calling a
JITFunction, as ``tl.zeros``, ``tl.max`` and ``tl.sum`` are). That file runs the same path on the CPU
with the GPU's run stood in by the interpreter. The checker must (1) audit a compiled kernel's loads
through an interpreted copy, so a dense kernel with a dummy loop fails although its source has a loop,
and (2) pass the correct kernel at the fp32 tolerance, its fp32 ``tl.dot`` launched in IEEE precision
(in TF32, the default, the correct kernel's error is about 1e-2).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton = pytest.importorskip("triton")


def _compiled_kernels():
    """The CPU tests' kernels, recompiled as JITFunctions (loaded with the environment left as it was)."""
    from triton.runtime.jit import JITFunction

    saved = os.environ.get("TRITON_INTERPRET")
    spec = importlib.util.spec_from_file_location("_ch01_kernels_for_gpu",
                                                  Path(__file__).with_name("test_flash_triton_exercise.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # sets TRITON_INTERPRET=1 for its own decorators: undo that
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved
    names = ("solution", "dense_shortcut", "dense_with_a_dummy_loop", "no_rescale", "unmasked_tail")
    kernels = {name: JITFunction(getattr(module, name).fn) for name in names}
    spec = importlib.util.spec_from_file_location("_ch01_compiled_tests",
                                                  Path(__file__).with_name("test_flash_triton_exercise_compiled.py"))
    compiled_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compiled_tests)
    kernels["solution_with_a_helper"] = compiled_tests._kernel_with_a_helper()  # its helper a JITFunction too
    return kernels


@pytest.fixture(scope="module")
def kernels():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("run without TRITON_INTERPRET: this file tests kernels compiled for the GPU")
    return _compiled_kernels()


@pytest.mark.parametrize("name", ["solution", "solution_with_a_helper"])
def test_the_solution_passes_compiled_at_the_fp32_tolerance(kernels, capsys, name) -> None:
    from labsupport.flash import triton_exercise as ex

    assert ex._ieee_launch_options(), "this Triton cannot launch fp32 dots in IEEE precision"
    result = ex.check_triton_attention_kernel(kernels[name])
    out = capsys.readouterr().out
    assert result.passed, out
    assert "passed 5 cases" in out


@pytest.mark.parametrize("name", ["dense_shortcut", "dense_with_a_dummy_loop"])
def test_dense_kernels_fail_compiled_although_their_source_may_loop(kernels, capsys, name) -> None:
    from labsupport.flash import triton_exercise as ex

    result = ex.check_triton_attention_kernel(kernels[name])
    out = capsys.readouterr().out
    assert result.status == "failed" and "dense attention" in out and "Traceback" not in out


@pytest.mark.parametrize("name", ["no_rescale", "unmasked_tail"])
def test_wrong_kernels_fail_compiled(kernels, capsys, name) -> None:
    from labsupport.flash import triton_exercise as ex

    result = ex.check_triton_attention_kernel(kernels[name])
    out = capsys.readouterr().out
    assert result.status == "failed" and "case 2" in out and "Traceback" not in out


def test_the_graded_output_is_the_gpus_and_ieee_makes_fp32_exact(kernels) -> None:
    from labsupport.flash import triton_exercise as ex

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 24, 16, generator=gen) * 40  # large scores: TF32's error shows most here
    k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(2))
    out, lse = ex.launch_attention_kernel(kernels["solution"], q.cuda(), k.cuda(), v.cuda())
    exact_out, exact_lse = ex._reference(q, k, v)
    assert (out - exact_out).abs().max() < 2e-3 and (lse - exact_lse).abs().max() < 2e-3
