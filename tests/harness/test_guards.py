"""labsupport.harness.guards: the work guards every chapter's checkers use (each test can fail)."""

from __future__ import annotations

import pytest
import torch

from labsupport.harness import checking, guards, limits


def test_largest_tensor_recorder_counts_new_tensors_not_views() -> None:
    x = torch.randn(8, 16)
    with guards.LargestTensorRecorder() as rec:
        x.t()[2:]                  # views: nothing allocated
        x.unsqueeze(0).expand(4, 8, 16)
        x.add_(1)                  # in place
    assert rec.largest_elements == 0
    with guards.LargestTensorRecorder() as rec:
        x @ x.t()                  # (8, 8)
        x.repeat(3, 1)             # (24, 16): the largest
    assert rec.largest_shape == (24, 16) and rec.largest_elements == 384


def test_largest_tensor_recorder_is_importable_where_it_was() -> None:
    assert checking.LargestTensorRecorder is guards.LargestTensorRecorder is limits.LargestTensorRecorder


def test_operation_counter_counts_each_operation_and_names_it() -> None:
    a = torch.randn(4, 4)
    with guards.OperationCounter() as ops:
        for _ in range(3):
            a = a @ a
        a.exp()
    assert ops.count == 4
    assert ops.counts["mm"] == 3 and ops.counts["exp"] == 1
    assert ops.names == {"mm", "exp"}


def test_work_counter_counts_matmul_flops_and_elementwise_writes() -> None:
    a, b = torch.randn(3, 8, 5), torch.randn(5, 7)
    with guards.WorkCounter() as work:
        a @ b
    assert work.matmul_flops == 2 * 3 * 8 * 5 * 7 and work.elements_written == 0
    with guards.WorkCounter() as work:
        (a[..., :, :, None] * b).sum(-2)            # the same product by broadcasting
    assert work.matmul_flops == 0
    assert work.elements_written == 3 * 8 * 5 * 7 + 3 * 8 * 7
    assert work.work == work.elements_written


def test_guards_nest_and_run_guarded_reports_failure() -> None:
    ops, largest = guards.OperationCounter(), guards.LargestTensorRecorder()
    x = torch.ones(5)
    assert guards.run_guarded(lambda t: t.mul_(2).sum(), (x,), ops, largest)
    assert torch.equal(x, torch.ones(5))              # ran on a copy
    assert ops.count >= 2 and largest.largest_elements == 1

    def broken(t):
        raise RuntimeError("no")

    assert not guards.run_guarded(broken, (x,), guards.OperationCounter())
    with pytest.raises(TypeError, match="WorkGuard"):
        guards.run_guarded(lambda: None, (), object())


def _library(x):
    return x * 2


def test_call_recorder_sees_a_call_through_any_name() -> None:
    alias = _library
    with guards.CallRecorder([_library]) as calls:
        (lambda y: alias(y))(1)
    assert calls.called == [_library]
    with guards.CallRecorder([_library]) as calls:
        (lambda y: y * 2)(1)
    assert calls.called == []


def test_refuse_calls_raises_only_when_the_library_runs() -> None:
    own = guards.refuse_calls(lambda x: x * 2, {_library: "write it yourself"})
    assert own(3) == 6
    lazy = guards.refuse_calls(lambda x: _library(x), {_library: "write it yourself"})
    with pytest.raises(guards.LibraryCallRefused, match="write it yourself"):
        lazy(3)


def test_a_checker_reports_a_refused_library_call(capsys) -> None:
    result = checking.check_function(
        guards.refuse_calls(lambda x: _library(x), {_library: "the library's version: write it yourself"}),
        _library, [checking.Case("x", (torch.ones(3),))], exercise="double")
    assert not result.passed
    assert "write it yourself" in capsys.readouterr().out
