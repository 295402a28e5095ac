"""Chapter 01's Hopper ladder (labsupport.flash.hopper): every step, on the CPU through Triton's interpreter,
against float64 attention; and the steps benchmark script end to end (``--cpu-smoke``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from labsupport.flash import hopper  # noqa: E402
from labsupport.flash import triton as flash_triton  # noqa: E402
from labsupport.flash.reference import causal_mask, naive_attention  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not flash_triton.triton_available() or not flash_triton.interpreter_enabled(),
    reason="needs triton with TRITON_INTERPRET=1 set before triton was imported",
)
STEPS = [s.key for s in hopper.LADDER + hopper.EXTRAS]
ROOT = Path(__file__).resolve().parents[2]


def qkv(lq, lk, d=16, dtype=torch.float32, seed=0, b=1, h=2):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=gen).to(dtype) for n in (lq, lk, lk))


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def reference_lse(q, k, causal):
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2]), float("-inf"))
    return torch.logsumexp(s, -1)


@needs_interpreter
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize(
    "lq,lk,causal,d,dtype",
    [
        (40, 40, True, 16, torch.float32),  # ragged: 40 is not a multiple of the 16-row tiles
        (20, 12, True, 16, torch.float16),  # Lq > Lk: the first 8 rows see no key
        (9, 30, False, 64, torch.bfloat16),  # Lq < Lk, not causal
        (33, 50, True, 128, torch.float16),  # Lq < Lk, causal (bottom-right)
    ],
)
def test_every_step_matches_float64_attention(step, lq, lk, causal, d, dtype):
    q, k, v = qkv(lq, lk, d=d, dtype=dtype)
    out, lse = hopper.ladder_forward(q, k, v, step, causal=causal)
    ref = naive_attention(q.double(), k.double(), v.double(), causal=causal)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    if hopper.ladder_step(step).fma_exp2:  # the cubic exp2 is good to 1.5e-4, below fp16's rounding only
        tol = max(tol, 1e-4)
    assert rel(out, ref) < tol
    want = reference_lse(q, k, causal)
    assert torch.equal(torch.isinf(lse), torch.isinf(want))
    finite = torch.isfinite(want)
    assert float((lse.double()[finite] - want[finite]).abs().max()) < 1e-3


@needs_interpreter
@pytest.mark.parametrize("step", STEPS)
def test_fully_masked_rows_are_zero_with_lse_minus_inf(step):
    q, k, v = qkv(36, 20)  # causal, Lq > Lk: rows 0..15 see no key, across two query tiles
    out, lse = hopper.ladder_forward(q, k, v, step, causal=True)
    assert torch.equal(out[..., :16, :], torch.zeros_like(out[..., :16, :]))
    assert torch.isneginf(lse[..., :16]).all() and torch.isfinite(lse[..., 16:]).all()


@needs_interpreter
@pytest.mark.parametrize("step", ["a", "d", "e", "g"])
def test_other_tile_shapes(step):
    q, k, v = qkv(45, 70, d=32)
    for config in (hopper.KernelConfig(32, 16, 4, 1), hopper.KernelConfig(16, 32, 4, 1)):
        out, _ = hopper.ladder_forward(q, k, v, step, causal=True, config=config)
        assert rel(out, naive_attention(q.double(), k.double(), v.double(), causal=True)) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("step", ["e", "f", "g", "h"])
def test_flat_descriptors_when_lengths_are_tile_multiples(step):
    """Lengths that are multiples of the tiles take the flat (B·H·L, D) descriptors: a tile offset wrong by one
    head would read or overwrite a neighbour's rows, which two batches of two heads would show."""
    q, k, v = qkv(32, 48, d=16, b=2, h=2)
    for causal in (False, True):
        out, lse = hopper.ladder_forward(q, k, v, step, causal=causal)
        assert rel(out, naive_attention(q.double(), k.double(), v.double(), causal=causal)) < 1e-5
        want = reference_lse(q, k, causal)
        assert float((lse.double() - want).abs().max()) < 1e-4


@needs_interpreter
def test_fma_exp2_matches_exp2_to_its_cubic_error():
    """The FMA-unit exponential: within 1.5e-4 of exp2 over the range a softmax uses, 0 for very negative inputs."""
    import triton
    import triton.language as tl

    @triton.jit
    def run(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, hopper._exp2_fma(tl.load(X + offs)))

    x = torch.cat([-torch.rand(4000, generator=torch.Generator().manual_seed(0)) * 40,
                   torch.tensor([0.0, -0.5, -0.49999, -0.50001, -1.5, -7.25] + [-20.0] * 90)])
    y = torch.empty_like(x)
    run[(1,)](x, y, 4096)
    want = torch.exp2(x.double())
    assert float(((y.double() - want) / want).abs().max()) < 1.5e-4
    z = torch.empty(16)
    run[(1,)](torch.full((16,), -500.0), z, 16)
    assert float(z.abs().max()) < 1e-37


@needs_interpreter
@pytest.mark.parametrize("programs", [1, 2, 5, 1000])
def test_persistent_grid_covers_every_tile_once(programs):
    q, k, v = qkv(50, 50, h=3)  # 4 query tiles x 3 heads = 12 tiles, shared unevenly among the programs
    for causal in (False, True):
        out, _ = hopper.ladder_forward(q, k, v, "f", causal=causal, num_programs=programs)
        assert rel(out, naive_attention(q.double(), k.double(), v.double(), causal=causal)) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("growth", [0.05, 3.0, 40.0])
def test_lazy_rescale_is_exact_when_maxima_grow_slowly_or_fast(growth):
    """Scores rising along the keys: small steps are absorbed without rescaling, large ones force it.

    A wrong threshold test either lets probabilities overflow (NaN / inf in the fp16 product) or skips a
    needed rescale; both break the match with float64.
    """
    q, k, v = qkv(32, 64, d=16, dtype=torch.float16)
    q = torch.ones_like(q)
    ramp = torch.arange(64, dtype=torch.float32)[:, None] * growth / 16
    k = (torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(2)) * 0.1 + ramp).half()
    for causal in (False, True):
        want = naive_attention(q.double(), k.double(), v.double(), causal=causal)
        for step in ("f", "g"):
            out, lse = hopper.ladder_forward(q, k, v, step, causal=causal)
            assert torch.isfinite(out).all() and rel(out, want) < 2e-3, (step, causal)
            assert float((lse.double() - reference_lse(q, k, causal)).abs().max()) < 1e-3


def test_ladder_is_cumulative_and_documented():
    """Each step switches on what the one before had, plus exactly one change."""
    flags = ("exp2", "split", "tuned", "tma", "persistent", "lazy")
    previous = None
    for s in hopper.LADDER:
        on = {f for f in flags if getattr(s, f)}
        assert s.change and s.name
        if previous is not None:
            assert previous <= on and len(on - previous) == 1, s.key
        previous = on
    assert [s.key for s in hopper.LADDER] == list("abcdefg")
    assert hopper.ladder_step("c") is hopper.LADDER[2]
    ws, fma = hopper.EXTRAS  # (h): step (e) plus warp specialisation; (i): step (d) plus the FMA exp2
    for extra, base, switch in ((ws, "e", "warp_specialize"), (fma, "d", "fma_exp2")):
        parent = hopper.ladder_step(base)
        assert getattr(extra, switch) and not getattr(parent, switch)
        assert all(getattr(extra, f) == getattr(parent, f) for f in flags)
    assert [e.key for e in hopper.EXTRAS] == ["h", "i"]


def test_configs_per_head_dimension():
    assert hopper.tuned_config(128).num_warps == 8 and hopper.tuned_config(128).block_m == 128
    assert hopper.tuned_config(64).block_m == 128
    for d in (64, 128):
        cands = hopper.sweep_candidates(d)
        assert 2 <= len(cands) <= 4 and hopper.tuned_config(d) in cands
    assert hopper.GENERIC_CONFIG.label() == "64x64 w4 s2"
    with pytest.raises(ValueError, match="head_dim"):
        hopper.tuned_config(48)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"step": "z"}, ValueError, "step"),
        ({"config": (64, 64, 4, 2)}, TypeError, "KernelConfig"),
        ({"config": hopper.KernelConfig(24, 16, 4, 1)}, ValueError, "block_m"),
        ({"num_programs": 0, "step": "f"}, ValueError, "num_programs"),
        ({"step": hopper.LadderStep("x", "bad", "lazy without exp2", False, True, True, False, False, True)},
         ValueError, "exp2"),
        ({"step": hopper.LadderStep("x", "bad", "FMA exp2 with TMA", True, True, True, True, False, False,
                                    False, True)}, ValueError, "pointer loads"),
        ({"step": "i", "config": hopper.KernelConfig(16, 16, 4, 1)}, ValueError, "block_n >= 32"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    if not flash_triton.triton_available():
        pytest.skip("triton is not installed")
    q, k, v = qkv(8, 8)
    with pytest.raises(error, match=match):
        hopper.ladder_forward(q, k, v, **kwargs)


@needs_interpreter
def test_steps_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    """The GPU script's whole flow (sweep, contract check, grid, report) under the interpreter, tiny shapes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "flash_attention_steps_gpu.py"), "--cpu-smoke", "--quick",
         "--dims", "32", "--lengths", "48", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "flash_steps.json").read_text())
    assert [(r["dtype"], r["D"], r["N"], r["causal"]) for r in result["rows"]] == [
        ("fp16", 32, 48, False), ("fp16", 32, 48, True)]
    for row in result["rows"]:
        for name in [*STEPS, "fp8", "sdpa_default"]:
            assert row[f"ms_{name}"] > 0 and row[f"err_{name}"] < (0.1 if name == "fp8" else 1e-2), name
    assert set(result["contract"].values()) == {"ok"} and not result["failures"]
    assert {a["recipe"] for a in result["fp8_accuracy"]} >= {"fp16", "fp8 per-block"}
    table = (tmp_path / "flash_steps.md").read_text()
    assert "(g) lazy rescale" in table and "geometric mean" in table


def _fake_results(tmp_path, **over):
    rows = [{"dtype": "fp16", "D": 64, "N": 4096, "causal": c, "flops": 4e12 * (0.5 if c else 1.0),
             "ms_sdpa_default": 10.0, "ms_a": 20.0, "ms_b": 16.0, "ms_c": 16.0, "ms_d": 8.0, "ms_e": None,
             "ms_f": 9.0, "ms_g": 8.0, "ms_h": None, "ms_fp8": 5.0} for c in (False, True)]
    data = {"info": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6.0", "B": 4, "H": 16},
            "rows": rows, "steps": list("abcdefgh"), "fp8": True, "failures": ["h: did not compile"],
            "step_names": {s.key: s.name for s in hopper.LADDER + hopper.EXTRAS}}
    data.update(over)
    path = tmp_path / "flash_steps.json"
    path.write_text(json.dumps(data))
    return path


def test_stored_results_summaries(tmp_path):
    from labsupport.flash import gpu_results

    results = gpu_results.load_step_results(_fake_results(tmp_path))
    gains = gpu_results.step_gains(results)
    assert gains["b"] == pytest.approx(1.25) and gains["d"] == pytest.approx(2.0)
    assert gains["e"] is None and gains["f"] is None  # (e) did not run: no gain either side of it
    assert gains["g"] == pytest.approx(9 / 8) and gains["h"] is None
    table = gpu_results.step_table(results)
    assert "NVIDIA H100" in table and "triton 3.6.0" in table
    gain_line = next(line for line in table.splitlines() if line.startswith("mean gain"))
    assert "(b) exp2 1.25x" in gain_line and "(d) tiles per D 2.00x" in gain_line
    assert "best step / SDPA default, D=64: 1.25x to 1.25x" in table  # best step 8 ms against SDPA's 10 ms
    assert "FP8 / SDPA default: 2.00x to 2.00x" in table and "FP8 / best step: 1.60x to 1.60x" in table
    first = table.splitlines()[2].split()
    assert first[:4] == ["fp16", "64", "4096", "no"] and first[4] == "400" and first[-1] == "1.25x"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="missing"):
        gpu_results.load_step_results(bad)


def test_stored_results_are_found_from_the_notebooks_folder(tmp_path, monkeypatch):
    from labsupport.flash import gpu_results

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    from labsupport.harness import stored

    monkeypatch.setattr(stored, "_checkout_root", lambda: tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "notebooks")
    assert gpu_results.find_stored_results() is None
    target = tmp_path / "benchmarks" / "results" / gpu_results.STORED_STEPS
    target.write_text("{}")
    assert gpu_results.find_stored_results() == target
    with pytest.raises(ValueError):
        gpu_results.find_stored_results("results.csv")


def _steps_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("steps_script", ROOT / "benchmarks" / "flash_attention_steps_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steps_report_survives_variants_that_failed(tmp_path):
    """The report the GPU run writes when variants did not compile, were wrong, or were not reached."""
    script = _steps_script()
    row = {"dtype": "bf16", "D": 128, "N": 16384, "causal": True, "flops": 1e12, "ms_sdpa_default": 2.0,
           "ms_sdpa_flash": 3.0, "ms_a": 4.0, "err_a": 1e-3, "note_b": "did not compile", "ms_c": 3.0,
           "note_d": "wrong result (rel. error 1.0e+00)", "note_fp8": "not reached", "ms_fp8_quantize": 0.5}
    state = {"info": {"device": "X", "sms": 132, "capability": [9, 0], "torch": "t", "cuda": "c", "cudnn": 1,
                      "triton": "3.6.0", "python": "3"},
             "rows": [row], "steps": list("abcdefghi"), "fp8": True, "failures": ["h: did not compile: boom"],
             "started": 0.0, "step_names": {s.key: s.name for s in hopper.LADDER + hopper.EXTRAS},
             "generic_config": "64x64 w4 s2", "configs": {"128": "128x64 w8 s3"}, "fp8_configs": {},
             "sweep": {"128": {"128x64 w8 s3": 1.0, "128x128 w8 s2": "did not compile: OutOfResources"}},
             "contract": {"h D=128 causal=True (ragged)": "did not compile: boom"},
             "fp8_accuracy": [{"D": 128, "inputs": "normal", "recipe": "fp8 per-block", "max_abs": 0.1,
                               "mean_abs": 0.01, "rel": 0.05}]}
    script.write_report(state, str(tmp_path))
    table = (tmp_path / "flash_steps.md").read_text()
    assert "did not compile" in table and "wrong result" in table and "not reached" in table
    assert "| 0.67× |" in table  # best step (c, 3 ms) against SDPA default (2 ms)
    assert "(c) mask split" in table and "h: did not compile: boom" in table
    saved = json.loads((tmp_path / "flash_steps.json").read_text())
    assert saved["gain_geomean"]["b"] is None and saved["rows"][0]["note_b"] == "did not compile"


def test_steps_time_guard_interrupts_a_slow_call():
    import time as _time

    script = _steps_script()
    with pytest.raises(script.GuardTimeout, match="ran past"):
        with script.time_guard(0.2):
            _time.sleep(2.0)
    with script.time_guard(1.0):  # a quick call passes, and the alarm is cleared afterwards
        pass
    _time.sleep(1.2)
