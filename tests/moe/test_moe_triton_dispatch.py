"""Chapter 06's fused Triton dispatch (``moe_scatter``), run on the CPU through Triton's interpreter.

Against the float64 ``moe_grouped`` (itself tested against ``moe_sorted`` and ``moe_loop``): the forward and
the gradients of ``x``, of the four weights and of the routing weights, on ragged expert blocks, empty experts,
inactive slots, and widths that are not multiples of the tiles. Kept tiny: the interpreter runs every program
in numpy.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

from labsupport.harness.numerics import rel_err  # noqa: E402
from labsupport.moe import moe_grouped  # noqa: E402
from labsupport.moe.routing import Routing, top_k_routing  # noqa: E402
from labsupport.moe import triton_dispatch as td  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not td.triton_available() or not td.interpreter_enabled(),
    reason="needs triton with TRITON_INTERPRET=1 set before triton was imported",
)

FP32_TOL = 1e-5   # float32 against float64: observed 1.4e-7 (the largest over output and gradients)
LOW_TOL = 1.5e-2  # bf16 / fp16: observed 4.2e-3 / 6.0e-4 (torch's grouped path in the same dtype: 5.5e-3 / 6.6e-4)


def problem(t, d, h, e, k, seed=0, empty=(), drop=0.3):
    """Tokens, a top-k routing with some experts never chosen and some slots inactive, and weights (float64)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen, dtype=torch.float64)
    logits = torch.randn(t, e, generator=gen, dtype=torch.float64)
    for expert in empty:
        logits[:, expert] = -1e9
    routing = top_k_routing(logits, k)
    routing.active = routing.active & (torch.rand(t, k, generator=gen) >= drop)
    weights = [torch.randn(e, d, h, generator=gen, dtype=torch.float64) / d ** 0.5,
               torch.randn(e, h, generator=gen, dtype=torch.float64),
               torch.randn(e, h, d, generator=gen, dtype=torch.float64) / h ** 0.5,
               torch.randn(e, d, generator=gen, dtype=torch.float64)]
    return x, routing, weights


def forward_backward(fn, x, routing, weights, dtype, **kw):
    """``fn``'s output and the gradients of x, the routing weights and the four weights, for a fixed ``dy``."""
    xi = x.detach().to(dtype).requires_grad_()
    leaves = [w.detach().to(dtype).requires_grad_() for w in weights]
    rw = routing.weights.detach().to(dtype).requires_grad_()
    r = Routing(routing.experts, rw, routing.active, routing.probs)
    y = fn(xi, r, *leaves, **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(dtype)
    y.backward(dy)
    return [y, xi.grad, rw.grad, *(w.grad for w in leaves)]


NAMES = ["y", "dx", "d_routing_weights", "dw_up", "db_up", "dw_down", "db_down"]


def assert_matches(got, expected, tol):
    for name, a, b in zip(NAMES, got, expected):
        assert a is not None and a.shape == b.shape, name
        assert rel_err(a.double(), b) < tol, (name, rel_err(a.double(), b))


@needs_interpreter
@pytest.mark.parametrize("t,d,h,e,k,empty,blocks", [
    (37, 24, 40, 5, 2, (2,), td.Blocks()),                          # ragged blocks, an empty expert, odd d, h
    (16, 16, 32, 2, 1, (), td.Blocks()),                            # everything a multiple of the tiles
    (29, 20, 36, 4, 3, (0, 3), td.Blocks(block_m=32, block_n=32)),  # expert 0 empty, k = 3, a 32-row tile
    (150, 96, 160, 3, 2, (1,), td.Blocks(128, 128, 64, 8, 3)),      # the H100's tiles, ragged in d, h and rows
    (150, 128, 256, 3, 2, (), td.Blocks(128, 128, 64, 8, 3)),       # the H100's tiles, whole in d and h
])
def test_float32_equals_the_grouped_dispatch_forward_and_backward(t, d, h, e, k, empty, blocks):
    x, routing, weights = problem(t, d, h, e, k, empty=empty)
    expected = forward_backward(moe_grouped, x, routing, weights, torch.float64)
    got = forward_backward(td.moe_scatter, x, routing, weights, torch.float32, blocks=blocks)
    assert got[0].dtype == torch.float32
    assert_matches(got, expected, FP32_TOL)
    inactive = ~routing.active
    assert inactive.any() and bool((got[2][inactive] == 0).all()), "an inactive slot's weight gets no gradient"


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_equals_the_grouped_dispatch_loosely(dtype):
    x, routing, weights = problem(45, 24, 48, 4, 2, seed=1, empty=(1,))
    expected = forward_backward(moe_grouped, x, routing, weights, torch.float64)
    got = forward_backward(td.moe_scatter, x, routing, weights, dtype)
    assert got[0].dtype == dtype
    assert_matches(got, expected, LOW_TOL)


@needs_interpreter
def test_two_runs_give_identical_bits():
    """No atomics: every sum is one program's, in a fixed order (several K-steps per expert here)."""
    x, routing, weights = problem(40, 16, 32, 2, 2, seed=2, drop=0.1)
    runs = [forward_backward(td.moe_scatter, x, routing, weights, torch.float16) for _ in range(2)]
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), name


@needs_interpreter
def test_the_grouped_dispatch_option_calls_it():
    x, routing, weights = problem(21, 16, 16, 3, 2, seed=3)
    args = (x.float(), routing, *(w.float() for w in weights))
    with torch.no_grad():
        torch.testing.assert_close(moe_grouped(*args, kernel="triton"), td.moe_scatter(*args))
        assert rel_err(moe_grouped(*args, kernel="triton"), moe_grouped(*args)) < FP32_TOL


@needs_interpreter
def test_the_layer_runs_it_when_asked():
    from labsupport.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(16, n_experts=4, top_k=2, expert_hidden=32)
    with torch.no_grad():
        layer.b_up.normal_()
        layer.b_down.normal_()
    x = torch.randn(2, 9, 16)
    results = []
    for kernel in ("torch", "triton"):
        layer.zero_grad()
        layer.dispatch_kernel = kernel
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y.square().sum() + sum(layer.auxiliary_losses().values())).backward()
        results.append([y, xi.grad, layer.router.weight.grad, layer.w_up.grad, layer.b_down.grad])
    for a, b in zip(*results):
        assert rel_err(b, a) < FP32_TOL


@pytest.mark.parametrize("block_m", [16, 32])
def test_the_tile_table_covers_every_sorted_row_once_within_one_expert(block_m):
    counts = torch.tensor([0, 17, 32, 0, 1, 50, 0])
    expert_sorted = torch.repeat_interleave(torch.arange(len(counts)), counts)
    tile_expert, start, end, bounds = td.slot_tiles(expert_sorted, len(counts), block_m)
    assert tile_expert.numel() == -(-int(counts.sum()) // block_m) + len(counts)
    assert bounds.tolist() == [0, *counts.cumsum(0).tolist()]
    covered = torch.zeros(int(counts.sum()), dtype=torch.long)
    for e, s, f in zip(tile_expert.tolist(), start.tolist(), end.tolist()):
        if e < 0:
            continue
        assert 0 < f - s <= block_m
        assert bool((expert_sorted[s:f] == e).all()), "a tile straddles two experts"
        covered[s:f] += 1
    assert bool((covered == 1).all())
    assert (tile_expert[:int((tile_expert >= 0).sum())] >= 0).all(), "unused tiles come last"
    with pytest.raises(TypeError, match="1-D int64"):
        td.slot_tiles(expert_sorted.int(), len(counts), block_m)
    with pytest.raises(ValueError, match="block_m"):
        td.slot_tiles(expert_sorted, len(counts), 0)


@needs_interpreter
def test_rejects_bad_inputs(monkeypatch):
    x, routing, weights = problem(8, 16, 16, 3, 2)
    x, weights = x.float(), [w.float() for w in weights]
    with pytest.raises(ValueError, match="w_down must have shape"):
        td.moe_scatter(x, routing, weights[0], weights[1], weights[2][:, :8], weights[3])
    with pytest.raises(ValueError, match="dtype of x"):
        td.moe_scatter(x, routing, weights[0].half(), *weights[1:])
    with pytest.raises(TypeError, match="float64"):
        td.moe_scatter(x.double(), routing, *(w.double() for w in weights))
    with pytest.raises(ValueError, match="routing is for 8 tokens"):
        td.moe_scatter(x[:5], routing, *weights)
    with pytest.raises(ValueError, match="power of two"):
        td.moe_scatter(x, routing, *weights, blocks=td.Blocks(block_n=24))
    with pytest.raises(ValueError, match="kernel must be one of"):
        moe_grouped(x, routing, *weights, kernel="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA device"):
        td.moe_scatter(x, routing, *weights)


@pytest.mark.skipif(not td.triton_available(), reason="needs triton")
def test_the_resource_script_compiles_a_kept_configuration_for_sm90_without_spills():
    """``benchmarks/moe_triton_resources.py`` on one kernel: it compiles for an H100 here and reads the cubin."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "benchmarks/moe_triton_resources.py", "--kernels", "dx", "--configs", "0"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    if "did not compile" in done.stdout and "nvidia" not in str(td.triton.backends.backends):
        pytest.skip("this triton has no CUDA backend")
    assert "dx       config 0" in done.stdout and "'registers'" in done.stdout, done.stdout
    assert "'stack': 0," in done.stdout, done.stdout


@pytest.mark.skipif(not td.triton_available(), reason="needs triton")
def test_the_gpu_benchmark_runs_its_triton_variants_on_the_cpu(tmp_path):
    """``benchmarks/moe_gpu.py --cpu-smoke``: every line the GPU run would take for the fused path, on tiny sizes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path))
    done = subprocess.run([sys.executable, "benchmarks/moe_gpu.py", "--cpu-smoke", "--only", "moe_layer_triton",
                           "dispatch_triton", "dispatch_grouped"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((tmp_path / "moe_gpu.json").read_text())["rows"][0]
    assert not [key for key in row if "error" in key], row
    assert row["fb_ms_moe_layer_triton"] > 0 and row["fwd_ms_dispatch_triton"] > 0
    assert row["triton_vs_sorted_rel"] < 1e-5 and row["triton_grad_rel_max"] < 1e-5
    assert "Fused Triton dispatch" in (tmp_path / "moe_gpu.md").read_text()


@needs_interpreter
def test_only_the_gradients_asked_for_and_no_tokens():
    x, routing, weights = problem(19, 16, 16, 3, 2, seed=4)
    x, weights = x.float(), [w.float() for w in weights]
    expected = forward_backward(moe_grouped, x.double(), routing, [w.double() for w in weights], torch.float64)
    w_down = weights[2].clone().requires_grad_()  # only W_down asks for a gradient
    y = td.moe_scatter(x, routing, weights[0], weights[1], w_down, weights[3])
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).float())
    assert rel_err(w_down.grad.double(), expected[5]) < FP32_TOL
    empty = td.moe_scatter(x[:0], Routing(routing.experts[:0], routing.weights[:0], routing.active[:0],
                                          routing.probs[:0]), *weights)
    assert empty.shape == (0, 16)
