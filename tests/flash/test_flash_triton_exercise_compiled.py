"""Chapter 01, exercise 4: the checker's GPU path (kernels compiled, not interpreted), as far as a CPU can take it.

On a GPU, Triton is imported without ``TRITON_INTERPRET``, so every ``@triton.jit`` function is a compiled
``JITFunction``: the learner's kernel, and Triton's own ``tl.zeros``, ``tl.max`` and ``tl.sum``, which are
written in Triton. The checker audits a compiled kernel's loads by running an interpreted copy of its source
on the CPU, and only then runs it on the GPU. None of that needs a GPU until the last launch, so this file
runs it in a fresh Python process without ``TRITON_INTERPRET`` (the interpreter tests in
``test_flash_triton_exercise.py`` set it in this one), with the GPU's run stood in by the interpreter:

* the audit of a compiled kernel works (it raised "Cannot call @triton.jit'd outside of the scope of a
  kernel" at the first ``tl.zeros``), so the solution passes and each wrong kernel fails with its diagnosis;
* the audit leaves Triton's language as it found it, so the kernel compiled afterwards is the same;
* a compiled kernel is launched with its fp32 ``tl.dot`` in IEEE precision: Triton builds the kernel's
  intermediate representation here (no GPU needed) and the dot carries no ``inputPrecision = tf32``.
  The launch option alone (``default_dot_input_precision``) left it TF32.

What only a GPU shows (the compiled kernel's numbers) is in ``test_flash_triton_exercise_gpu.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("triton") is None:  # found, not imported: this process keeps its TRITON_INTERPRET
    pytest.skip("needs triton", allow_module_level=True)

_KERNELS = ("solution", "dense_shortcut", "dense_with_a_dummy_loop", "no_rescale", "unmasked_tail", "not_done")

# A correct kernel whose update step is a @triton.jit helper of the learner's (compiled, it is a JITFunction too).
_HELPER_KERNEL_SOURCE = '''\
import triton
import triton.language as tl


@triton.jit
def _online_step(m, l, acc, s, v):
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, l * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def solution_with_a_helper(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, n_q, n_k, scale,
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
        m, l, acc = _online_step(m, l, acc, s, v)
    tl.store(o_ptr + (bh * n_q + rows[:, None]) * D + dims[None, :], acc / l[:, None], mask=row_ok[:, None])
    tl.store(lse_ptr + bh * n_q + rows, m + tl.log(l), mask=row_ok)
'''

_SIGNATURE = {"q_ptr": "*fp32", "k_ptr": "*fp32", "v_ptr": "*fp32", "o_ptr": "*fp32", "lse_ptr": "*fp32",
              "n_q": "i32", "n_k": "i32", "scale": "fp32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
              "D": "constexpr"}


# ---------------------------------------------------------------------------------------------------------------
# What the fresh process runs (``python this_file.py``): it prints one JSON report.
# ---------------------------------------------------------------------------------------------------------------

def _compiled_kernels() -> dict[str, Any]:
    """The interpreter tests' kernels as ``@triton.jit`` makes them without the interpreter (as the GPU test does)."""
    from triton.runtime.jit import JITFunction

    spec = importlib.util.spec_from_file_location("_ch01_kernels_compiled",
                                                  Path(__file__).with_name("test_flash_triton_exercise.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # sets TRITON_INTERPRET=1 for its own decorators: undo that
    os.environ.pop("TRITON_INTERPRET", None)
    kernels = {name: JITFunction(getattr(module, name).fn) for name in _KERNELS}
    kernels["solution_with_a_helper"] = _kernel_with_a_helper()
    return kernels


def _kernel_with_a_helper() -> Any:
    """``solution_with_a_helper`` of :data:`_HELPER_KERNEL_SOURCE`, decorated as the environment says (no
    ``TRITON_INTERPRET``: a JITFunction calling a JITFunction). ``test_flash_triton_exercise_gpu.py`` uses it too."""
    folder = Path(tempfile.mkdtemp())
    (folder / "_ch01_helper_kernel.py").write_text(_HELPER_KERNEL_SOURCE)
    spec = importlib.util.spec_from_file_location("_ch01_helper_kernel", folder / "_ch01_helper_kernel.py")
    helper_module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper_module)
    return helper_module.solution_with_a_helper


def _ttir(kernel: Any) -> str:
    """The kernel's Triton IR for an H100 (block sizes 16, D = 16), built with the settings now in force."""
    import inspect

    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from labsupport.flash import triton_exercise as ex

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options(ex._ieee_launch_options())
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = ASTSource(kernel, _SIGNATURE, {"BLOCK_M": 16, "BLOCK_N": 16, "D": 16})
    args = [options, backend.get_codegen_implementation(options), backend.get_module_map(), context]
    if "target" in inspect.signature(source.make_ir).parameters:
        args.insert(0, target)
    return str(source.make_ir(*args))


def _dots(ttir: str) -> list[str]:
    """The ``tt.dot`` operations of a Triton IR listing, without SSA names and locations."""
    dots = [line.split(" loc(")[0] for line in ttir.splitlines() if "tt.dot" in line]
    return [re.sub(r"%[\w.]+", "%", line.split("=", 1)[1]).strip() for line in dots]


def _snapshot() -> dict[str, int]:
    """The identity of every attribute of Triton's language that the interpreter patches, and of JITFunction's."""
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    owners = {"tl": tl, "tl.core": tl.core, "tl.math": tl.math, "tl.standard": tl.standard, "tl.tensor": tl.tensor,
              "tl.dtype": tl.dtype, "JITFunction": JITFunction, "interpreter": interpreter}
    return {f"{owner}.{name}": id(value) for owner, obj in owners.items() for name, value in vars(obj).items()}


def _report() -> dict[str, Any]:
    import torch
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    kernels = _compiled_kernels()
    from labsupport.flash import triton_exercise as ex

    report: dict[str, Any] = {"version": triton.__version__, "tl.zeros": type(tl.zeros).__name__,
                              "helper": type(sys.modules["_ch01_helper_kernel"]._online_step).__name__}
    try:
        report["ttir_before"] = _ttir(kernels["solution"])
    except Exception as error:  # another Triton's internals: the parts that need the IR are skipped
        report["ttir_error"] = repr(error)
    before = _snapshot()

    real_launch = ex.launch_attention_kernel
    budget_left: list[float] = []

    def gpu_stood_in(kernel: Any, *args: Any, **kwargs: Any) -> Any:
        """The checker's launch; a compiled kernel's own run (the GPU's) is stood in by its interpreted copy."""
        if ex._is_interpreted(kernel):
            return real_launch(kernel, *args, **kwargs)
        budget_left.append(signal.getitimer(signal.ITIMER_REAL)[0])  # the case's time budget, left at the launch
        with getattr(ex, "_jit_calls_interpreted", contextlib.nullcontext)():
            return real_launch(ex._interpreted_copy(kernel), *args, **kwargs)

    ex.launch_attention_kernel = gpu_stood_in
    try:
        for name, kernel in kernels.items():
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                result = ex.check_triton_attention_kernel(kernel)
            report[name] = {"status": result.status, "printed": printed.getvalue()}
    finally:
        ex.launch_attention_kernel = real_launch
    report["budget_left_at_compiled_launches"] = budget_left
    after = _snapshot()
    report["changed_by_the_checks"] = sorted(name for name, value in before.items() if after.get(name) != value)
    if "ttir_before" in report:
        for key, name in (("ttir_after", "solution"), ("ttir_helper_after", "solution_with_a_helper")):
            try:
                report[key] = _ttir(kernels[name])
            except Exception as error:  # Triton's language left patched by the audit: the kernel no longer compiles
                report[key] = f"failed to compile: {error!r}"

    seen: list[dict[str, Any]] = []

    class Launched(JITFunction):  # records what the compiled launch is built with, instead of launching it
        def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            knob = getattr(getattr(getattr(triton, "knobs", None), "language", None), "fp32_default", None)
            seen.append({"option": kwargs.get("default_dot_input_precision"), "knob": knob,
                         "env": os.environ.get("TRITON_F32_DEFAULT"),
                         "ttir": _ttir(self) if "ttir_before" in report else None})

    q = torch.zeros(1, 16, 16)
    lse = torch.zeros(1, 16)
    try:
        ex._launch(Launched(kernels["solution"].fn), (1, 1), q, q, q, q, lse, 16, 16, 0.25, BLOCK_M=16, BLOCK_N=16,
                   D=16)
    except Exception as error:
        seen.append({"error": repr(error)})
    report["launch"] = seen
    report["env_after_launch"] = os.environ.get("TRITON_F32_DEFAULT")
    return report


# ---------------------------------------------------------------------------------------------------------------
# The tests (in this process): one fresh process for all of them.
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    # no interpreter, no preset precision, and failures printed (not raised: the report holds the messages)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_F32_DEFAULT", "LABSUPPORT_STRICT_CHECKS")}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600,
                          cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_fresh_process_has_compiled_triton_functions(report) -> None:
    assert report["tl.zeros"] == "JITFunction", report["tl.zeros"]  # as on a GPU: what the audit must call
    assert report["helper"] == "JITFunction", report["helper"]


@pytest.mark.parametrize("name", ["solution", "solution_with_a_helper"])
def test_the_solution_passes_compiled(report, name) -> None:
    result = report[name]
    assert result["status"] == "passed", result["printed"]
    assert "passed 5 cases" in result["printed"]


@pytest.mark.parametrize("name", ["dense_shortcut", "dense_with_a_dummy_loop"])
def test_dense_kernels_fail_compiled_with_the_diagnosis(report, name) -> None:
    result = report[name]
    printed = result["printed"]
    assert result["status"] == "failed" and "dense attention" in printed and "BLOCK_N" in printed, printed
    assert "Traceback" not in printed and "InterpreterError" not in printed, printed


@pytest.mark.parametrize("name", ["no_rescale", "unmasked_tail"])
def test_wrong_kernels_fail_compiled_at_case_2(report, name) -> None:
    result = report[name]
    printed = result["printed"]
    assert result["status"] == "failed" and "case 2" in printed, printed
    assert "Traceback" not in printed and "InterpreterError" not in printed, printed


def test_a_compiled_launch_has_time_to_compile(report) -> None:
    """A first launch compiles the kernel (seconds on a GPU machine): the case's budget leaves room for it."""
    left = report["budget_left_at_compiled_launches"]
    if not hasattr(signal, "setitimer"):
        pytest.skip("no timer signal here: the time budget is measured, not enforced")
    assert len(left) >= 5 and min(left) > 60, left  # the harness's default budget is 10 s a case


def test_a_compiled_kernel_not_written_yet_is_not_done(report) -> None:
    assert report["not_done"]["status"] == "not done", report["not_done"]["printed"]


def test_the_audit_leaves_tritons_language_as_it_found_it(report) -> None:
    assert report["changed_by_the_checks"] == []
    if "ttir_error" in report:
        pytest.skip(f"this Triton's IR cannot be built here: {report['ttir_error']}")
    assert "failed to compile" not in report["ttir_after"], report["ttir_after"]
    assert _dots(report["ttir_after"]) == _dots(report["ttir_before"])  # the kernel compiled afterwards is the same
    assert "failed to compile" not in report["ttir_helper_after"], report["ttir_helper_after"]
    assert _dots(report["ttir_helper_after"]) == _dots(report["ttir_before"])  # its helper's dots: the same two


def test_a_compiled_launch_builds_its_fp32_dots_in_ieee_precision(report) -> None:
    (launch,) = report["launch"]
    assert "error" not in launch, launch
    assert launch["option"] == "ieee" and launch["knob"] == "ieee" and launch["env"] == "ieee", launch
    assert report["env_after_launch"] is None  # set for the launch only
    if "ttir_error" in report:
        pytest.skip(f"this Triton's IR cannot be built here: {report['ttir_error']}")
    before, launched = _dots(report["ttir_before"]), _dots(launch["ttir"])
    assert len(before) == len(launched) == 2
    assert all("inputPrecision = tf32" in dot for dot in before), before  # the launch option alone: TF32
    assert not any("inputPrecision" in dot for dot in launched), launched  # IEEE, the attribute's default


if __name__ == "__main__":
    print(json.dumps(_report()))
