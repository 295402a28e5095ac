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
