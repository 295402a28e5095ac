"""labsupport.harness.measuring: the timer, peak memory, sweeps, power-law fits."""

from __future__ import annotations

import time

import plotly.graph_objects as go
import pytest
import torch

from labsupport.harness.measuring import ScalingResult, fit_power_law, peak_memory_bytes, sweep, time_callable

MB = 1_000_000


# --------------------------------------------------------------------------- time_callable


def test_time_callable_returns_the_fastest_call_and_runs_warmup_plus_repeats() -> None:
    calls = []
    durations = iter([0.2, 0.03, 0.05, 0.002, 0.03, 0.03])  # first is warm-up (never counted)

    def fn() -> None:
        calls.append(1)
        time.sleep(next(durations))

    seconds = time_callable(fn, warmup=1, repeats=5)
    assert len(calls) == 6
    assert 0.0019 < seconds < 0.02  # the fastest call; the median would be about 0.03


def test_time_callable_can_return_the_median() -> None:
    durations = iter([0.0, 0.001, 0.05, 0.001, 0.001, 0.001])

    seconds = time_callable(lambda: time.sleep(next(durations)), warmup=1, repeats=5, statistic="median")
    assert 0.0009 < seconds < 0.02  # the 50 ms outlier does not move the median


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"fn": 3}, TypeError),
        ({"fn": lambda: None, "repeats": 0}, ValueError),
        ({"fn": lambda: None, "warmup": -1}, ValueError),
        ({"fn": lambda: None, "repeats": 2.5}, TypeError),
        ({"fn": lambda: None, "repeats": True}, TypeError),
        ({"fn": lambda: None, "statistic": "mean"}, ValueError),
    ],
)
def test_time_callable_rejects_bad_input(kwargs, error) -> None:
    fn = kwargs.pop("fn")
    with pytest.raises(error):
        time_callable(fn, **kwargs)


# --------------------------------------------------------------------------- peak_memory_bytes


def test_peak_memory_of_one_tensor_is_its_size() -> None:
    peak = peak_memory_bytes(lambda: torch.empty(1000, 1000, dtype=torch.float32))
    assert peak == 4 * MB


def test_peak_memory_of_a_matmul_chain_counts_live_tensors_only() -> None:
    def chain() -> None:
        a = torch.ones(500, 500)  # 1 MB
        b = a @ a  # 2 MB live
        del a
        c = b @ b  # 2 MB live again (a freed first)
        del b
        d = c @ c  # 2 MB
        del c, d

    def all_alive() -> None:
        a = torch.ones(500, 500)
        b = a @ a
        c = b @ b
        d = c @ c
        del a, b, c, d

    assert peak_memory_bytes(chain) == 2 * MB
    assert peak_memory_bytes(all_alive) == 4 * MB


def test_peak_memory_is_relative_to_the_start_and_never_negative() -> None:
    existing = [torch.ones(1000, 1000)]
    assert peak_memory_bytes(lambda: existing.clear()) == 0
    assert peak_memory_bytes(lambda: None) == 0


def test_peak_memory_rejects_non_callables() -> None:
    with pytest.raises(TypeError, match="callable"):
        peak_memory_bytes(torch.ones(2))


# --------------------------------------------------------------------------- sweep


def test_sweep_measures_each_size_with_fresh_inputs() -> None:
    built = []

    def make(n: int):
        built.append(n)
        x = torch.ones(n, 250)
        return lambda: torch.empty_like(x)

    result = sweep(make, [250, 500], label="double", memory=True, warmup=0, repeats=1)
    assert built == [250, 500]
    assert result.label == "double" and result.sizes == [250, 500]
    assert len(result.seconds) == 2 and all(s > 0 for s in result.seconds)
    assert result.peak_bytes == [250 * 250 * 4, 500 * 250 * 4]
    assert sweep(make, [3], label="t", repeats=1).peak_bytes is None


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((lambda n: lambda: None, []), {"label": "x"}, ValueError),
        ((lambda n: lambda: None, [0, 4]), {"label": "x"}, ValueError),
        ((lambda n: lambda: None, [2.5]), {"label": "x"}, TypeError),
        ((lambda n: lambda: None, 8), {"label": "x"}, TypeError),
        ((lambda n: lambda: None, [4]), {"label": ""}, TypeError),
        ((lambda n: lambda: None, [4]), {"label": "x", "memory": "yes"}, TypeError),
        (("not callable", [4]), {"label": "x"}, TypeError),
        ((lambda n: 42, [4]), {"label": "x"}, TypeError),  # make_fn must return a callable
    ],
)
def test_sweep_rejects_bad_input(args, kwargs, error) -> None:
    with pytest.raises(error):
        sweep(*args, **kwargs)


# --------------------------------------------------------------------------- fit_power_law


def test_fit_power_law_recovers_exponent_and_prefactor() -> None:
    sizes = [10, 20, 40, 80]
    exponent, prefactor = fit_power_law(sizes, [3.0 * n**2 for n in sizes])
    assert exponent == pytest.approx(2.0)
    assert prefactor == pytest.approx(3.0)


def test_fit_power_law_tail_ignores_overhead_dominated_small_sizes() -> None:
    sizes = [1, 2, 4, 8, 16, 32, 64]
    values = [50.0 + n**2 for n in sizes]  # constant overhead, then quadratic
    full, _ = fit_power_law(sizes, values)
    tail, _ = fit_power_law(sizes, values, tail=2)
    assert full < 1.5
    assert tail == pytest.approx(2.0, abs=0.3)
    # unsorted input: the tail is still the largest sizes
    tail_shuffled, _ = fit_power_law(sizes[::-1], values[::-1], tail=2)
    assert tail_shuffled == pytest.approx(tail)


@pytest.mark.parametrize(
    ("sizes", "values", "kwargs", "error"),
    [
        ([], [], {}, ValueError),
        ([1, 2], [1.0], {}, ValueError),
        ([1, 2], [1.0, 0.0], {}, ValueError),
        ([1, -2], [1.0, 2.0], {}, ValueError),
        ([1, 2], [1.0, float("nan")], {}, ValueError),
        ([4], [1.0], {}, ValueError),
        ([4, 4], [1.0, 2.0], {}, ValueError),
        ([1, 2, 3], [1.0, 2.0, 3.0], {"tail": 1}, ValueError),
        ([1, 2, 3], [1.0, 2.0, 3.0], {"tail": 4}, ValueError),
        ([1, 2, 3], [1.0, 2.0, 3.0], {"tail": 2.0}, TypeError),
        ([1, "2"], [1.0, 2.0], {}, TypeError),
        ("12", [1.0, 2.0], {}, TypeError),
    ],
)
def test_fit_power_law_rejects_bad_input(sizes, values, kwargs, error) -> None:
    with pytest.raises(error):
        fit_power_law(sizes, values, **kwargs)


# --------------------------------------------------------------------------- one thread, busy machines, implausible fits


def test_sweep_runs_on_one_thread_and_restores_the_count(monkeypatch) -> None:
    from labsupport.harness import settings

    before = torch.get_num_threads()
    seen = []
    try:
        monkeypatch.setattr(settings, "cpu_budget", lambda *args: 2)
        torch.set_num_threads(2)

        def make(n):
            seen.append(torch.get_num_threads())
            return lambda: None

        sweep(make, [1, 2], label="threads", repeats=1, warmup=0)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        sweep(make, [1], label="threads", repeats=1, warmup=0, threads=None)
        assert seen[-1] == 2
    finally:
        torch.set_num_threads(before)


def test_sweep_warns_plainly_on_a_busy_machine(monkeypatch, capsys) -> None:
    from labsupport.harness import contention

    monkeypatch.setattr(contention, "machine_cpus", lambda: 2)
    monkeypatch.setattr(contention, "load_average", lambda: 5.0)
    sweep(lambda n: (lambda: None), [1], label="busy run", repeats=1, warmup=0)
    out = capsys.readouterr().out
    assert "busy run" in out and "busy" in out and "5.0" in out
    monkeypatch.setattr(contention, "load_average", lambda: 0.3)
    sweep(lambda n: (lambda: None), [1], label="quiet run", repeats=1, warmup=0)
    out = capsys.readouterr().out
    assert "busy" not in out
    assert "quiet run: 100%" in out and "1/1 sizes" in out  # a finished text bar, not a widget frozen at 0%


@pytest.mark.parametrize(
    ("exponent", "expected", "warned"),
    [(2.1, None, False), (2.1, 2.0, False), (-0.34, None, True), (0.2, 2.0, True), (4.2, None, True), (1.4, 2.0, True)],
)
def test_exponent_warning_flags_implausible_fits(exponent, expected, warned) -> None:
    from labsupport.harness.measuring import exponent_warning

    message = exponent_warning("tiled", exponent, expected=expected)
    assert (message is not None) is warned
    if warned:
        assert "tiled" in message and f"{exponent:.2f}" in message and "busy" in message


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"exponent": float("nan")}, ValueError), ({"exponent": "2"}, ValueError),
     ({"exponent": 2.0, "expected": "2"}, TypeError), ({"exponent": 2.0, "tolerance": 0}, ValueError)],
)
def test_exponent_warning_rejects_bad_input(kwargs, error) -> None:
    from labsupport.harness.measuring import exponent_warning

    with pytest.raises(error):
        exponent_warning("x", **kwargs)


def test_exponent_warning_names_a_cache_as_a_cause_not_only_a_busy_machine() -> None:
    # a decode slope of 1.6 where the cache leaves the last-level cache is real, not contention (issue 24)
    from labsupport.harness.measuring import exponent_warning

    message = exponent_warning("decode", 1.6, expected=1.0)
    assert message is not None and "outgrow a CPU cache" in message and "compare the sizes with your caches" in message
