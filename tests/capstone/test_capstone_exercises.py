"""Chapter 10's checkers: the reference passes, each shortcut fails with its diagnosis, unfinished says so."""

from __future__ import annotations

import pytest
import torch

from labsupport.capstone import exercises as ex
from labsupport.capstone.workloads import reference_workload_terms


def test_references_pass():
    assert ex.check_bottleneck_terms(reference_workload_terms)
    assert ex.check_cheapest_design(ex.reference_cheapest_design)


@pytest.mark.parametrize("slip, says", [
    ({"combine": "sum"}, "add the compute time and the memory time"),
    ({"combine": "flops"}, "count only FLOPs"),
    ({"context": "final"}, "final context"),
    ({"batch_in_memory": False}, "one sequence's KV cache"),
])
def test_bottleneck_terms_slips_are_named(slip, says, capsys):
    assert not ex.check_bottleneck_terms(lambda w: ex._roofline_variant(w, **slip))
    out = capsys.readouterr().out
    assert says in out and "max(F / hw.flops_per_s" not in out  # the recipe only on request


def test_the_recipe_is_printed_on_request(capsys):
    ex.check_bottleneck_terms(lambda w: torch.zeros(4, dtype=torch.float64), reveal=True)
    assert "max(F / hw.flops_per_s" in capsys.readouterr().out


@pytest.mark.parametrize("slip, says", [
    ({"by": "recall"}, "best recall"),
    ({"use_memory": False}, "ignores the memory budget"),
    ({"use_recall": False}, "ignores the recall bar"),
    ({"strict": True}, "bar is strict"),
    ({"tie": "first"}, "equal costs go to the higher recall"),
])
def test_cheapest_design_slips_are_named(slip, says, capsys):
    assert not ex.check_cheapest_design(lambda *a: ex._pick(*a, **slip))
    assert says in capsys.readouterr().out


def test_unfinished_says_not_done_yet(capsys):
    def unfinished(*args):
        raise NotImplementedError

    assert not ex.check_cheapest_design(unfinished)
    assert not ex.check_bottleneck_terms(unfinished)
    assert capsys.readouterr().out.count("not done yet") == 2


def test_no_design_qualifies_is_minus_one():
    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert ex.reference_cheapest_design(t, t / 4, t, 0.9, 10.0) == -1
