"""No wrong answer passes any checker of chapters 00-03 (and 04, 06): a hypothesis property test.

The wrong answers are built from each checker's own reference (``tests/harness/wrong_answers.py``): a wrong
shape or dtype, NaN / +inf / -inf at a random place, -inf turned into NaN or +inf, a scaled output, an
off-by-one, an input changed in place, None, an exception, a different answer on strided inputs, and the
chapter's own shortcuts (a dense answer to a tiling exercise, a backward without the -inf guard).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import wrong_answers as wa  # noqa: E402

NAMES = [name for _, name in wa.CHECKERS]


@functools.lru_cache(maxsize=None)
def _loaded(name: str):
    module = dict((n, m) for m, n in wa.CHECKERS)[name]
    checker, spied = wa.load_checker(module, name)
    return checker, spied, tuple(k for k in wa.applicable_kinds(spied) if (name, k) not in wa.EXEMPT)


@pytest.mark.parametrize("name", NAMES)
def test_each_checker_passes_its_own_reference(name):
    checker, spied, _ = _loaded(name)
    assert wa.run_checker(checker, spied.reference)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(data=st.data())
def test_no_wrong_answer_passes(name, data):
    checker, spied, kinds = _loaded(name)
    if not kinds:  # a learner-form checker (wrong_answers.LEARNER_FORM): its wrong answers are all in SPECIFIC
        assert name in wa.LEARNER_FORM and wa.SPECIFIC.get(name), f"{name} has no wrong answers at all"
        return
    kind = data.draw(st.sampled_from(kinds), label="kind")
    wrong = wa.make_wrong(
        spied.reference, kind,
        where=data.draw(st.floats(0.0, 0.999), label="where"),
        factor=data.draw(st.sampled_from([0.5, 0.9, 0.99, 1.01, 1.1, 2.0, -1.0]), label="factor"),
        which=data.draw(st.integers(0, 5), label="which"),
    )
    assert not wa.run_checker(checker, wrong), f"{name} passed a wrong answer of kind {kind!r}"


@pytest.mark.parametrize("name, label", [(n, label) for n, shortcuts in wa.SPECIFIC.items() for label, _ in shortcuts])
def test_no_shortcut_passes(name, label):
    checker, _, _ = _loaded(name)
    assert not wa.run_checker(checker, dict(wa.SPECIFIC[name])[label])


def test_the_count_script_finds_no_passing_wrong_answer():
    passed, total, lines = wa.count({"raises", "none", "mutate"})
    assert total > 40 and passed == 0, lines


def test_numpy_answers_are_accepted():
    from labsupport.attention import check_decode_intensity, check_kv_cache_bytes
    from labsupport.attention._solutions import kv_cache_bytes_answer as kv_cache_bytes_reference

    def decode_intensity_reference(shape, context, batch):  # written out: the checker refuses shape.decode_step
        flops = batch * (2 * shape.params + 4 * shape.layers * shape.q_heads * shape.head_dim * context)
        return flops / (shape.params * shape.bytes_per_element + batch * context * shape.kv_bytes_per_token())

    assert wa.run_checker(check_kv_cache_bytes, lambda *a: np.int64(kv_cache_bytes_reference(*a)))
    assert wa.run_checker(check_decode_intensity, lambda *a: np.float64(decode_intensity_reference(*a)))
    # np.float32 keeps 7 digits; the checker's rtol (1e-6) accepts a correctly rounded float32.
    assert wa.run_checker(check_decode_intensity, lambda *a: np.float32(decode_intensity_reference(*a)))
