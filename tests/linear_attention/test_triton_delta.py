"""Chapter 03's Triton delta rule, run on the CPU through Triton's interpreter, against the reference forms.

Kept tiny: the interpreter executes each tile step in numpy. The references are the chunkwise WY/UT form
(:func:`delta_rule_chunkwise`) and the token-by-token recurrence, both evaluated in float64.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from labsupport.harness.numerics import rel_err  # noqa: E402
from labsupport.linear_attention import reference as ref  # noqa: E402
from labsupport.linear_attention import triton_delta  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not triton_delta.triton_available() or not triton_delta.interpreter_enabled(),
    reason="needs triton with TRITON_INTERPRET=1 set before triton was imported",
)
run = triton_delta.delta_rule_chunkwise_triton

FP32_TOL = 1e-5  # float32 arithmetic against float64: observed around 1e-7
BF16_TOL = 2e-2  # bf16 inputs and outputs: rounding the output alone gives about 3e-3


def inputs(b=2, h=2, length=45, dk=16, dv=32, seed=0, gated=True, key_scale=None, dtype=torch.float32):
    """Unit keys (or keys of norm ``key_scale``), β in (0, 1), log-decays mostly in log(0.75 … 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, length, dk, generator=gen)
    k = F.normalize(torch.randn(b, h, length, dk, generator=gen), dim=-1)
    if key_scale is not None:
        k = k * key_scale
    v = torch.randn(b, h, length, dv, generator=gen)
    beta = torch.sigmoid(torch.randn(b, h, length, generator=gen))
    log_decay = F.logsigmoid(torch.randn(b, h, length, generator=gen) + 2.0) if gated else None
    x = [q, k, v, beta, log_decay]
    return [None if t is None else t.to(dtype) for t in x]


def exact(q, k, v, beta, log_decay, **kw):
    """The token-by-token recurrence in float64."""
    return ref.delta_rule_recurrent(q.double(), k.double(), v.double(), beta.double(),
                                    None if log_decay is None else log_decay.double(), **kw)


@needs_interpreter
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk,length,dk,dv", [(16, 45, 16, 32), (32, 45, 32, 16), (64, 100, 24, 20),
                                                (128, 130, 16, 16), (16, 16, 16, 16)])
def test_float32_matches_the_recurrence_and_the_chunkwise_form(fused, gated, chunk, length, dk, dv):
    q, k, v, beta, log_decay = inputs(length=length, dk=dk, dv=dv, gated=gated)
    out, state = run(q, k, v, beta, log_decay, chunk_size=chunk, return_state=True, fused_output=fused,
                     block_v=16)
    expected, expected_state = exact(q, k, v, beta, log_decay, return_state=True)
    chunkwise = ref.delta_rule_chunkwise(q.double(), k.double(), v.double(), beta.double(),
                                         None if log_decay is None else log_decay.double(), chunk_size=chunk)
    assert out.dtype == torch.float32 and out.shape == v.shape
    assert rel_err(out, expected) < FP32_TOL
    assert rel_err(out, chunkwise) < FP32_TOL
    assert rel_err(state, expected_state) < FP32_TOL


@needs_interpreter
@pytest.mark.parametrize("inverse", ["blocked", "doubling"])
@pytest.mark.parametrize("chunk", [64, 128])
def test_both_inverses_on_long_chunks(inverse, chunk):
    """Weak gates (α ≈ 0.99), so that blocks of the inverse far below the diagonal matter."""
    q, k, v, beta, _ = inputs(b=1, length=chunk + 37, key_scale=1.2, seed=7)
    log_decay = F.logsigmoid(torch.randn(beta.shape, generator=torch.Generator().manual_seed(8)) + 5.0)
    out = run(q, k, v, beta, log_decay, chunk_size=chunk, inverse=inverse, fused_output=inverse == "doubling")
    assert rel_err(out, exact(q, k, v, beta, log_decay)) < FP32_TOL
    out = run(q, k, v, beta, None, chunk_size=chunk, inverse=inverse)
    assert rel_err(out, exact(q, k, v, beta, None)) < FP32_TOL


@needs_interpreter
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk,length,dk,dv,columns", [(64, 100, 24, 40, 16), (64, 64, 48, 16, 32),
                                                         (128, 150, 16, 24, 16)])
def test_preparation_in_pieces_of_columns_equals_whole_rows(gated, chunk, length, dk, dv, columns):
    """``prep_columns``: the same W, U and scores, a piece of columns at a time (ragged D, ragged last chunk)."""
    q, k, v, beta, log_decay = inputs(b=1, length=length, dk=dk, dv=dv, gated=gated, key_scale=1.2, seed=5)
    expected, expected_state = exact(q, k, v, beta, log_decay, return_state=True)
    for fused in (True, False):
        for prep_columns in (columns, None):  # None: whole rows, the earlier kernel
            out, state = run(q, k, v, beta, log_decay, chunk_size=chunk, prep_columns=prep_columns,
                             fused_output=fused, return_state=True)
            assert rel_err(out, expected) < FP32_TOL
            assert rel_err(state, expected_state) < FP32_TOL
    assert triton_delta.last_kernel_resources()["prepare"] is not None


@needs_interpreter
def test_preparation_in_pieces_in_bf16_and_the_doubling_inverse_ignores_them():
    q, k, v, beta, log_decay = inputs(length=70, dk=32, dv=16, dtype=torch.bfloat16)
    out = run(q, k, v, beta, log_decay, chunk_size=64, prep_columns=16)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, exact(q, k, v, beta, log_decay)) < BF16_TOL
    assert rel_err(out, run(q, k, v, beta, log_decay, chunk_size=64, prep_columns=None)) < BF16_TOL
    assert rel_err(run(q, k, v, beta, log_decay, chunk_size=32, prep_columns=16), out) < BF16_TOL


@needs_interpreter
def test_the_gate_and_beta_are_used():
    """The tolerance separates close variants: dropping the gate or changing β is caught."""
    q, k, v, beta, log_decay = inputs()
    out = run(q, k, v, beta, log_decay, chunk_size=16)
    assert rel_err(out, exact(q, k, v, beta, None)) > 100 * FP32_TOL
    assert rel_err(out, exact(q, k, v, beta * 0.9, log_decay)) > 100 * FP32_TOL
    assert rel_err(out, exact(q, k, v, beta, log_decay)) < FP32_TOL


@needs_interpreter
def test_strong_keys_and_gates_stay_exact():
    """Keys of norm 1.4 with β near 1 make (I + A)⁻¹ large; strong gates make exp(b) underflow-prone."""
    q, k, v, beta, _ = inputs(length=64, key_scale=1.4, seed=3)
    beta = 0.6 + 0.4 * beta
    log_decay = -torch.rand(beta.shape, generator=torch.Generator().manual_seed(4)) * 3.0
    out = run(q, k, v, beta, log_decay, chunk_size=64)
    expected = exact(q, k, v, beta, log_decay)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < 1e-4


@needs_interpreter
@pytest.mark.parametrize("gated", [False, True])
def test_bf16_matches_to_bf16_tolerance(gated):
    q, k, v, beta, log_decay = inputs(length=70, dk=32, dv=16, gated=gated, dtype=torch.bfloat16)
    out = run(q, k, v, beta, log_decay, chunk_size=32)
    assert out.dtype == torch.bfloat16
    expected = exact(q, k, v, beta, log_decay)
    assert rel_err(out, expected) < BF16_TOL
    assert rel_err(out, ref.delta_rule_chunkwise(q, k, v, beta, log_decay, chunk_size=32)) < BF16_TOL
    # bf16 intermediates between the kernels cost accuracy, but stay within bf16 tolerance
    for fused in (True, False):
        low = run(q, k, v, beta, log_decay, chunk_size=32, intermediate_dtype=torch.bfloat16, precision="tf32",
                  fused_output=fused)
        assert rel_err(low, expected) < BF16_TOL


@needs_interpreter
def test_initial_state_strided_inputs_and_small_value_blocks():
    q, k, v, beta, log_decay = inputs(b=1, h=3, length=40, dk=16, dv=48)
    s0 = torch.randn(1, 3, 16, 48, generator=torch.Generator().manual_seed(5)) * 0.3
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not qt.is_contiguous()
    out, state = run(qt, k, v, beta, log_decay, chunk_size=16, initial_state=s0, return_state=True, block_v=16)
    expected, expected_state = exact(q, k, v, beta, log_decay, initial_state=s0.double(), return_state=True)
    assert rel_err(out, expected) < FP32_TOL
    assert rel_err(state, expected_state) < FP32_TOL
    assert rel_err(run(q, k, v, beta, log_decay, chunk_size=16), expected) > 100 * FP32_TOL  # s0 mattered


@needs_interpreter
def test_inverse_precision_and_unchecked_values():
    q, k, v, beta, log_decay = inputs(length=33)
    expected = exact(q, k, v, beta, log_decay)
    out = run(q, k, v, beta, log_decay, chunk_size=16, precision="tf32", inverse_precision="tf32x3",
              check_values=False)
    assert rel_err(out, expected) < FP32_TOL  # the interpreter computes in float32 whatever the precision
    with pytest.raises(ValueError, match="log_decay must have shape"):
        run(q, k, v, beta, log_decay[..., :-1], check_values=False)
    with pytest.raises(ValueError, match="inverse_precision must be one of"):
        run(q, k, v, beta, log_decay, inverse_precision="fp16")


@needs_interpreter
def test_state_pass_retries_without_prefetching_when_shared_memory_runs_out(monkeypatch):
    """On a GPU, num_stages > 1 can exceed the shared memory; the pass is then launched again with 1 stage."""
    class OutOfResources(Exception):  # the name Triton's error has
        pass

    kernel = triton_delta._delta_state_kernel
    stages = []
    fits = [1]  # stage counts that fit

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                stages.append(kwargs["num_stages"])
                if kwargs["num_stages"] not in fits:
                    raise OutOfResources("shared memory")
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_delta, "_delta_state_kernel", Launcher())
    q, k, v, beta, log_decay = inputs(length=20)
    out = run(q, k, v, beta, log_decay, chunk_size=16, num_stages=3)
    assert stages == [3, 1]
    assert rel_err(out, exact(q, k, v, beta, log_decay)) < FP32_TOL
    stages.clear()
    fits.clear()
    with pytest.raises(OutOfResources):
        run(q, k, v, beta, log_decay, chunk_size=16, num_stages=1)  # nothing left to retry with
    assert stages == [1]


@needs_interpreter
@pytest.mark.parametrize("fused", [True, False])
def test_last_kernel_resources_names_every_launch(fused):
    q, k, v, beta, log_decay = inputs(length=20)
    run(q, k, v, beta, log_decay, chunk_size=16, fused_output=fused)
    resources = triton_delta.last_kernel_resources()
    assert sorted(resources) == sorted(["prepare", "state pass"] + ([] if fused else ["output"]))
    assert all(set(r) == {"registers", "spills", "shared_bytes"} for r in resources.values())


@needs_interpreter
def test_float_beta_is_accepted():
    q, k, v, _, log_decay = inputs(length=20)
    out = run(q, k, v, 0.5, log_decay, chunk_size=16)
    assert rel_err(out, exact(q, k, v, torch.full(q.shape[:3], 0.5), log_decay)) < FP32_TOL


@pytest.mark.parametrize("bad,error,message", [
    (dict(chunk_size=48), ValueError, "chunk_size must be one of"),
    (dict(chunk_size=64.0), TypeError, "chunk_size must be an int"),
    (dict(precision="fp8"), ValueError, "precision must be one of"),
    (dict(intermediate_dtype=torch.float64), TypeError, "intermediate_dtype"),
    (dict(block_v=24), ValueError, "block_v must be a power of two"),
    (dict(block_v=8), ValueError, "block_v must be >= 16"),
    (dict(num_warps=0), ValueError, "num_warps must be >= 1"),
    (dict(chunk_size=32, inverse="blocked"), ValueError, "inverse='blocked' needs chunk_size 64 or 128"),
    (dict(inverse="lu"), ValueError, "inverse must be one of"),
    (dict(prep_columns=24), ValueError, "prep_columns must be a power of two"),
    (dict(prep_columns=8), ValueError, "prep_columns must be >= 16"),
])
def test_bad_settings_are_refused(bad, error, message):
    q, k, v, beta, log_decay = inputs(length=8)
    with pytest.raises(error, match=message):
        run(q, k, v, beta, log_decay, **bad)


def test_bad_tensors_are_refused():
    q, k, v, beta, log_decay = inputs(length=8)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        run(q.double(), k.double(), v.double(), beta.double())
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        run(q, k, v, beta, -log_decay)
    with pytest.raises(ValueError, match="q and k must have the same"):
        run(q, k[..., :8], v, beta)
    with pytest.raises(ValueError, match="beta must be a float or have shape"):
        run(q, k, v, beta[..., :4])
    with pytest.raises(RuntimeError, match="forward-only"):
        run(q.requires_grad_(), k, v, beta, log_decay)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    q, k, v, beta, log_decay = inputs(length=8)
    monkeypatch.setattr(triton_delta, "interpreter_enabled", lambda: False)
    if not triton_delta.triton_available():
        pytest.skip("triton is not installed")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        run(q, k, v, beta, log_decay)


@needs_interpreter
def test_gpu_benchmark_script_runs_every_step_on_the_cpu(tmp_path):
    """``benchmarks/linear_attention_gpu.py --cpu-smoke``: the script's own code, end to end, on tiny shapes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "linear_attention_gpu.py"), "--cpu-smoke",
                           "--out", str(tmp_path), "--variants", "Triton state pass", "--budget-s", "3000"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "linear_attention_gpu.json").read_text())["rows"]
    assert [r["gated"] for r in rows] == [False, True]
    for row in rows:
        forward = {m["name"]: m for m in row["forward"]}
        assert forward["course, Triton state pass"]["err"] < BF16_TOL
        assert forward["course, eager"]["err"] < BF16_TOL
        assert forward["course, Triton state pass, CUDA graph"]["error"].startswith("failed: ")  # no CUDA here
        assert {m["name"] for m in row["backward"]} == {"fla", "course, eager"}
    assert "| 70 | yes | course, Triton state pass |" in (tmp_path / "linear_attention_gpu.md").read_text()
