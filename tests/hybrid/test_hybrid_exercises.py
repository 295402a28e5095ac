"""The chapter-07 checkers: the references pass, an unfinished answer is 'not done yet', the usual mistakes fail."""

from __future__ import annotations

import torch

from labsupport.hybrid import exercises as ex
from labsupport.hybrid import registry


def _todo(*args, **kwargs):
    raise NotImplementedError("your code here")


def test_the_references_pass_and_leave_the_registry_as_it_was() -> None:
    before = registry.names()
    assert ex.check_pattern_builder(ex._reference_builder)
    assert ex.check_hybrid_bytes_per_token(ex._reference_bytes_per_token)
    assert ex.check_pareto_front(ex.reference_pareto_front)
    assert ex.check_register_gqa(ex._reference_register_gqa)
    assert registry.names() == before


def test_unfinished_answers_are_not_done_yet() -> None:
    for checker in (ex.check_pattern_builder, ex.check_hybrid_bytes_per_token, ex.check_pareto_front,
                    ex.check_register_gqa):
        assert checker(_todo).status == "not done"


def test_the_usual_mistakes_fail() -> None:
    assert not ex.check_pattern_builder(lambda p, legend: (lambda d, i: legend[p[i % len(p)]](d, i % len(p))))
    assert not ex.check_hybrid_bytes_per_token(
        lambda layers, context, b: ex._reference_bytes_per_token(layers, context, b) * context)
    duplicates_dropped = lambda c, s: ex.reference_pareto_front(c, s) & ~torch.tensor(  # noqa: E731
        [bool((c[:i] == c[i]).any() & (s[:i] == s[i]).any()) for i in range(len(c))])
    assert not ex.check_pareto_front(duplicates_dropped)
    assert registry.names() == [n for n in registry.names() if not n.startswith("my_gqa")]


def _first_letter(pattern, legend):
    return lambda d, i: legend[pattern[0]](d, i)


def _window_in_full(layers, context, bytes_per_element):
    return ex._bytes_counting("window")(layers, context, bytes_per_element)


def _strict_on_both(costs, scores):
    return ex._pareto_strict_on_both(costs, scores)


def _no_factor_two(n_kv_heads):
    from labsupport.grouped.mixers import GroupedQueryAttention

    return registry.register(f"my_gqa_{n_kv_heads}", lambda d, i: GroupedQueryAttention(d, 4, n_kv_heads),
                             family="mine", state_numbers=lambda c, d: n_kv_heads * (d // 4) * c,
                             replace_existing=True)


def test_each_checker_names_the_mistake_and_keeps_the_recipe_until_asked() -> None:
    cases = [(ex.check_pattern_builder, _first_letter, "first letter", "layer_index % len(pattern)"),
             (ex.check_hybrid_bytes_per_token, _window_in_full, "whole window", "min(L, window)"),
             (ex.check_pareto_front, _strict_on_both, "strictly better on both", "dominated[i, j]"),
             (ex.check_register_gqa, _no_factor_two, "factor 2", "state_numbers=lambda context")]
    for checker, wrong, diagnosis, recipe in cases:
        hidden = checker(wrong)
        assert not hidden and diagnosis in hidden.message, (checker.__name__, hidden.message)
        assert recipe not in hidden.message and "reveal=True" in hidden.message
        shown = checker(wrong, reveal=True)
        assert recipe in shown.message, (checker.__name__, shown.message)
    assert not [n for n in registry.names() if n.startswith("my_gqa")]
