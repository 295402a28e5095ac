"""The checker engine, fed right answers and every kind of wrong answer."""

from __future__ import annotations

import math

import pytest
import torch

from labsupport.harness.checking import Case, CheckResult, check_function, describe_value


def reference_causal_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, L, D) x (B, L, D) -> causal masked scores (B, L, L), -inf above the diagonal."""
    scores = q @ k.transpose(-1, -2)
    length = q.shape[-2]
    mask = torch.ones(length, length, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf"))


def make_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    return [
        Case(f"L={n}", (torch.randn(2, n, 4, generator=gen), torch.randn(2, n, 4, generator=gen)))
        for n in (1, 3, 6)
    ]


def run(fn, capsys, **kwargs) -> tuple[CheckResult, str]:
    result = check_function(fn, reference_causal_scores, make_cases(), exercise="scores", **kwargs)
    return result, capsys.readouterr().out


def test_correct_answer_passes_with_one_line(capsys):
    result, out = run(reference_causal_scores, capsys)
    assert result and result.status == "passed"
    assert out.strip() == "✅ scores: passed 3 cases."


def test_not_implemented_reports_not_done(capsys):
    def learner(q, k):
        raise NotImplementedError("your code here")

    result, out = run(learner, capsys)
    assert not result and result.status == "not done"
    assert "not done yet" in out
    assert "Traceback" not in out


def test_wrong_shape(capsys):
    result, out = run(lambda q, k: reference_causal_scores(q, k)[..., :-1], capsys)
    assert result.status == "failed"
    assert "expected shape (2, 1, 1), got shape (2, 1, 0)" in out
    assert "case 1 of 3 (L=1)" in out


def test_wrong_dtype(capsys):
    result, out = run(lambda q, k: reference_causal_scores(q, k).double(), capsys)
    assert result.status == "failed"
    assert "expected dtype float32, got float64" in out


def test_nan_is_named(capsys):
    def learner(q, k):
        out = reference_causal_scores(q, k)
        out[..., 0, 0] = float("nan")
        return out

    result, out = run(learner, capsys)
    assert result.status == "failed"
    assert "NaN" in out and "index (0, 0, 0)" in out


def test_none_suggests_return(capsys):
    def learner(q, k):
        reference_causal_scores(q, k)

    result, out = run(learner, capsys)
    assert result.status == "failed"
    assert "got None" in out and "return" in out


def test_raised_exception_is_summarised_without_traceback(capsys):
    def learner(q, k):
        return q @ k  # shapes do not line up for L > 1... and for D != L

    result, out = run(learner, capsys)
    assert result.status == "failed"
    assert "your function raised RuntimeError" in out
    assert "q @ k" in out  # points at the learner's own line
    assert "Traceback" not in out and "File \"" not in out


def test_off_by_one_causal_mask(capsys):
    def learner(q, k):
        scores = q @ k.transpose(-1, -2)
        length = q.shape[-2]
        mask = torch.ones(length, length, dtype=torch.bool).triu(0)  # hides the diagonal too
        return scores.masked_fill(mask, float("-inf"))

    result, out = run(learner, capsys)
    assert result.status == "failed"
    assert "case 1 of 3 (L=1)" in out
    assert "index (0, 0, 0)" in out


def test_non_contiguous_inputs_reach_the_learner():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, generator=gen).transpose(-1, -2)  # (2, 5, 4), non-contiguous
    k = torch.randn(2, 5, 4, generator=gen)
    seen = {}

    def learner(q_, k_):
        seen["contiguous"] = q_.is_contiguous()
        return reference_causal_scores(q_.view(-1, 4).view(2, 5, 4), k_)  # .view needs contiguity

    result = check_function(
        learner, reference_causal_scores, [Case("transposed q", (q, k))], exercise="nc", quiet=True
    )
    assert seen["contiguous"] is False
    assert result.status == "failed"
    assert "RuntimeError" in result.message and "non-contiguous" in result.message


def test_value_mismatch_reports_relative_error(capsys):
    result, out = run(lambda q, k: reference_causal_scores(q, k) * 1.01, capsys)
    assert result.status == "failed"
    assert "relative error" in out and "0.01" in out


def test_not_a_function(capsys):
    result, out = run(reference_causal_scores(torch.ones(1, 1, 1), torch.ones(1, 1, 1)), capsys)
    assert result.status == "failed"
    assert "expected a function" in out


def test_tuple_outputs_and_numbers():
    def ref(x):
        return x.max(), float(x.sum())

    cases = [Case("x", (torch.arange(4.0),))]
    assert check_function(ref, ref, cases, exercise="t", quiet=True)
    wrong_len = check_function(lambda x: (x.max(),), ref, cases, exercise="t", quiet=True)
    assert "expected 2 values, got 1" in wrong_len.message
    wrong_num = check_function(lambda x: (x.max(), 5.0), ref, cases, exercise="t", quiet=True)
    assert "output[1]: expected 6, got 5" in wrong_num.message
    not_tuple = check_function(lambda x: x, ref, cases, exercise="t", quiet=True)
    assert "expected a tuple of 2 values" in not_tuple.message
    assert "return" not in not_tuple.message
    named = check_function(lambda x: (x.max(), 5.0), ref, cases, exercise="t", quiet=True,
                           output_names=("peak", "total"))
    assert "output[1] (total): expected 6, got 5" in named.message
    with pytest.raises(TypeError, match="output_names"):
        check_function(ref, ref, cases, exercise="t", output_names="peak")
    forgot_return = check_function(lambda x: None, ref, cases, exercise="t", quiet=True)
    assert "expected a tuple of 2 values, got None" in forgot_return.message
    assert "forget a `return`" in forgot_return.message


def test_gradients_are_compared():
    def ref(x):
        return (x * x).sum(-1)

    def wrong_grad(x):  # same forward, wrong backward
        return (x * x.detach()).sum(-1)

    def no_grad(x):
        return torch.from_numpy((x.detach().numpy() ** 2).sum(-1))

    cases = [Case("x", (torch.randn(3, 4, dtype=torch.float64),), grad_argnums=(0,))]
    assert check_function(ref, ref, cases, exercise="g", quiet=True)
    result = check_function(wrong_grad, ref, cases, exercise="g", quiet=True)
    assert result.status == "failed" and "gradient w.r.t. x" in result.message
    result = check_function(no_grad, ref, cases, exercise="g", quiet=True)
    assert result.status == "failed" and "no gradient reached" in result.message


def test_infinities_in_the_answer_are_matched():
    cases = make_cases()
    ok = check_function(reference_causal_scores, reference_causal_scores, cases, exercise="i", quiet=True)
    assert ok
    zeros_for_masked = check_function(
        lambda q, k: torch.nan_to_num(reference_causal_scores(q, k), neginf=0.0),
        reference_causal_scores,
        cases,
        exercise="i",
        quiet=True,
    )
    assert zeros_for_masked.status == "failed"


def test_integer_outputs():
    ref = lambda x: x.argmax(-1)  # noqa: E731
    cases = [Case("x", (torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]]),))]
    assert check_function(ref, ref, cases, exercise="a", quiet=True)
    result = check_function(lambda x: x.argmin(-1), ref, cases, exercise="a", quiet=True)
    assert "entries differ" in result.message


def test_learner_cannot_corrupt_the_reference_inputs():
    def mutating(q, k):
        q.zero_()
        return reference_causal_scores(q, k)

    result = check_function(mutating, reference_causal_scores, make_cases(), exercise="m", quiet=True)
    assert result.status == "failed"  # its answer is wrong, and the reference still saw real inputs


def test_bad_arguments_to_the_engine():
    with pytest.raises(TypeError, match="exercise"):
        check_function(len, len, [Case("x", ([],))], exercise="")
    with pytest.raises(TypeError, match="non-empty sequence"):
        check_function(len, len, [], exercise="e")
    with pytest.raises(TypeError, match="reference_fn"):
        check_function(len, None, [Case("x", ([],))], exercise="e")


def test_checker_bug_is_reported_politely(capsys):
    def broken_reference(x):
        raise KeyError("oops")

    result = check_function(lambda x: x, broken_reference, [Case("x", (1,))], exercise="b")
    out = capsys.readouterr().out
    assert result.status == "failed" and "bug in the course" in out


def test_result_display_does_not_repeat_message():
    result = CheckResult("e", "passed", "✅ e: passed 1 case.", 1, 1)
    assert result._ipython_display_() is None
    assert "passed" in repr(result)


def test_describe_value():
    assert describe_value(None) == "None"
    assert describe_value(torch.zeros(2, 3)) == "float32 tensor of shape (2, 3)"
    assert "non-contiguous" in describe_value(torch.zeros(2, 3).t())
    assert describe_value(3) == "int 3"
    assert describe_value(math.pi).startswith("float")


def test_strict_mode_raises_on_failure_only(monkeypatch):
    monkeypatch.setenv("LABSUPPORT_STRICT_CHECKS", "1")
    with pytest.raises(AssertionError, match="case 1 of 3"):
        check_function(lambda q, k: None, reference_causal_scores, make_cases(), exercise="s", quiet=True)
    assert check_function(reference_causal_scores, reference_causal_scores, make_cases(), exercise="s", quiet=True)

    def todo(q, k):
        raise NotImplementedError

    assert check_function(todo, reference_causal_scores, make_cases(), exercise="s", quiet=True).status == "not done"


# ----------------------------------------------------------------------------- issue 12: checkers that cannot be fooled


def _lse_reference(x: torch.Tensor) -> torch.Tensor:
    """Row logsumexp; a row of -inf gives -inf."""
    return torch.logsumexp(x, dim=-1)


def _lse_cases() -> list[Case]:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[1] = float("-inf")
    return [Case("row 1 fully masked", (x,))]


@pytest.mark.parametrize("wrong", [float("nan"), float("inf")])
def test_non_finite_values_are_compared_by_kind(wrong):
    def learner(x):
        out = _lse_reference(x)
        out[1] = wrong
        return out

    assert check_function(_lse_reference, _lse_reference, _lse_cases(), exercise="lse", quiet=True)
    result = check_function(learner, _lse_reference, _lse_cases(), exercise="lse", quiet=True)
    assert result.status == "failed"
    assert "expected -inf, got " + ("NaN" if wrong != wrong else "+inf") in result.message


def test_non_finite_numbers_are_compared_by_kind():
    ref = lambda x: float("-inf")  # noqa: E731
    cases = [Case("x", (1,))]
    assert check_function(ref, ref, cases, exercise="n", quiet=True)
    assert not check_function(lambda x: float("nan"), ref, cases, exercise="n", quiet=True)
    assert not check_function(lambda x: float("inf"), ref, cases, exercise="n", quiet=True)


def test_an_input_changed_in_place_is_named():
    def learner(q, k):
        out = reference_causal_scores(q, k)
        k.mul_(2.0)  # correct output, but the caller's k is spoiled
        return out

    result = check_function(learner, reference_causal_scores, make_cases(), exercise="m", quiet=True)
    assert result.status == "failed"
    assert "changed its input `k` in place" in result.message


def test_an_in_place_update_of_a_nan_input_is_caught_and_an_untouched_nan_is_not():
    x = torch.tensor([1.0, float("nan"), 3.0])
    ref = lambda x: x * 2  # noqa: E731
    assert check_function(ref, ref, [Case("nan", (x,))], exercise="m", quiet=True)

    def learner(x):
        return x.mul_(2)

    assert not check_function(learner, ref, [Case("nan", (x,))], exercise="m", quiet=True)


def test_a_strided_slice_reaches_the_learner_with_its_strides():
    big = torch.randn(2, 4, 9, 8, generator=torch.Generator().manual_seed(1))
    q = big[:, :, -1:]  # (2, 4, 1, 8) with the strides of `big`: not contiguous
    assert not q.is_contiguous()
    seen = {}

    def learner(x):
        seen["stride"] = x.stride()
        return x * 2

    check_function(learner, lambda x: x * 2, [Case("slice", (q,))], exercise="s", quiet=True)
    assert seen["stride"] == q.stride()


def test_a_slow_answer_is_stopped_with_a_clear_message():
    import time

    def slow(q, k):
        time.sleep(3)
        return reference_causal_scores(q, k)

    started = time.perf_counter()
    result = check_function(slow, reference_causal_scores, make_cases(), exercise="t", quiet=True,
                            time_budget_s=0.3)
    assert time.perf_counter() - started < 2.5  # interrupted, not waited for
    assert result.status == "failed"
    assert "longer than 0.3 s" in result.message and "Traceback" not in result.message


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    cases = [Case("a", (3, 4))]
    assert check_function(lambda a, b: np.int64(a * b), lambda a, b: a * b, cases, exercise="np", quiet=True)
    assert check_function(lambda a, b: np.float32(a / b), lambda a, b: a / b, cases, exercise="np", quiet=True,
                          rtol=1e-6)
    assert not check_function(lambda a, b: np.int64(a * b + 1), lambda a, b: a * b, cases, exercise="np",
                              quiet=True)


def _unfinished_helper(x):
    raise NotImplementedError("your code here")


def test_an_unfinished_helper_is_named():
    def learner(q, k):
        return _unfinished_helper(q @ k.transpose(-1, -2))

    result = check_function(learner, reference_causal_scores, make_cases(), exercise="h", quiet=True)
    assert result.status == "not done"
    assert "`_unfinished_helper`" in result.message


def test_a_dense_answer_to_a_tiling_case_is_caught():
    q = torch.randn(1, 64, 4, generator=torch.Generator().manual_seed(2))

    def reference(q, k):  # never holds more than 16 x 64 scores
        blocks = []
        for i in range(0, 64, 16):
            scores = (q[:, i:i + 16] @ k.transpose(-1, -2)).masked_fill(
                torch.ones(16, 64, dtype=torch.bool).triu(i + 1), float("-inf"))
            blocks.append(scores.sum(-1))
        return torch.cat(blocks, dim=1)

    def dense(q, k):
        return reference_causal_scores(q, k).sum(-1)

    case = Case("L=64", (q, q.clone()), max_elements=2 * 64 * 16, max_elements_note="one block of 16 rows at a time.")
    ok = check_function(reference, reference, [case], exercise="d", quiet=True)
    assert ok, ok.message
    result = check_function(dense, reference, [case], exercise="d", quiet=True)
    assert result.status == "failed"
    assert "materialised a tensor of shape (1, 64, 64)" in result.message
    assert "a 64×64 matrix" in result.message


# ----------------------------------------------------------------------------- feedback that teaches (issue 27)


def _router_reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N) logits -> the k largest softmax weights, renormalised, and their experts (int64)."""
    top, experts = logits.softmax(-1).topk(k, dim=-1)
    return top / top.sum(-1, keepdim=True), experts


def _router_cases() -> list[Case]:
    gen = torch.Generator().manual_seed(5)
    return [Case("T=3, N=4, k=2", (torch.randn(3, 4, generator=gen, dtype=torch.float64), 2))]


def _router(fn, **kwargs) -> CheckResult:
    return check_function(fn, _router_reference, _router_cases(), exercise="router", quiet=True,
                          output_names=("weights", "experts"), **kwargs)


def test_a_diagnosis_names_what_this_answer_did():
    def unnormalised(logits, k):
        top, experts = logits.softmax(-1).topk(k, dim=-1)
        return top, experts

    def rule(case, expected, got):
        sums = got[0].sum(-1)
        return f"your weights sum to {float(sums.mean()):.2f} per row, not 1" if not torch.allclose(
            sums, torch.ones_like(sums)) else None

    result = _router(unnormalised, diagnose=rule, hint="see Hint 1 above the exercise")
    assert "\n   found   your weights sum to 0." in result.message and "per row, not 1" in result.message
    assert result.diagnosis.startswith("your weights sum to")
    assert result.message.index("found") < result.message.index("hint    see Hint 1")
    # a rule that cannot tell (None) or breaks (raises) leaves the mismatch as it was
    def broken(case, expected, got):
        raise RuntimeError("bug in a rule")
    quiet = _router(unnormalised, diagnose=[broken, lambda c, e, g: None])
    assert "found" not in quiet.message and "bug in a rule" not in quiet.message and "entries are off" in quiet.message
    with pytest.raises(TypeError, match="diagnose"):
        _router(unnormalised, diagnose="sum to 1")


def test_known_mistakes_recognise_a_written_out_wrong_answer():
    from labsupport.harness.diagnosis import known_mistakes, output_rule

    def softmax_of_top_logits_without_renormalising(logits, k):
        values, experts = logits.topk(k, dim=-1)
        return values.softmax(-1) * 0.5, experts

    rule = known_mistakes({"your weights are the softmax over all N experts, not renormalised over the k kept":
                           lambda logits, k: logits.softmax(-1).topk(k, dim=-1)},
                          output=0)
    wrong = _router(lambda logits, k: logits.softmax(-1).topk(k, dim=-1), diagnose=rule)
    assert "found   your weights are the softmax over all N experts" in wrong.message
    other = _router(softmax_of_top_logits_without_renormalising, diagnose=rule)
    assert "softmax over all N experts" not in other.message
    by_element = _router(lambda logits, k: (_router_reference(logits, k)[0] * 3, _router_reference(logits, k)[1]),
                         diagnose=output_rule(0, lambda c, e, g: f"rows sum to {float(g.sum(-1)[0]):.0f}"))
    assert "found   rows sum to 3" in by_element.message


def test_the_recipe_is_printed_only_when_asked():
    recipe = "softmax over all experts, topk, then divide by the kept sum"

    def check_router(fn, reveal=False):
        return check_function(fn, _router_reference, _router_cases(), exercise="router", quiet=True,
                              hint="see Hint 1", recipe=recipe, reveal=reveal)

    def my_router(logits, k):
        return logits.topk(k, dim=-1)

    hidden = check_router(my_router)
    assert recipe not in hidden.message
    assert "`check_router(my_router, reveal=True)` prints the full recipe" in hidden.message
    shown = check_router(my_router, reveal=True)
    assert f"\n   recipe  {recipe}" in shown.message
    def unfinished(logits, k):
        raise NotImplementedError
    assert recipe not in check_router(unfinished).message
    asked = check_router(unfinished, reveal=True)
    assert asked.status == "not done" and recipe in asked.message
    assert check_router(_router_reference, reveal=True).message == "✅ router: passed 1 case."
    assert "reveal=True" not in _router(my_router).message  # no recipe given: nothing to ask for
    with pytest.raises(TypeError, match="recipe"):
        _router(my_router, recipe=3)


def test_swapped_outputs_are_suspected_not_blamed_on_a_stray_float():
    result = _router(lambda logits, k: tuple(reversed(_router_reference(logits, k))))
    assert "your outputs look swapped" in result.message
    assert "output[0] (weights) a float64 tensor of shape (3, 2)" in result.message
    assert "Return them in the order weights, experts" in result.message
    assert "stray .float()" not in result.message and "Keep the dtype" not in result.message


def test_same_dtype_outputs_in_the_wrong_order_are_found_by_value():
    def pair(x):
        return x * 2, x + 1

    result = check_function(lambda x: pair(x)[::-1], pair, [Case("x", (torch.arange(4.0),))], exercise="pair",
                            quiet=True, output_names=("double", "next"))
    assert "found   your output[0] (double) is what output[1] (next) should be" in result.message
    assert "wrong order" in result.message


def test_dtype_advice_is_chosen_by_what_the_output_holds():
    def keep(counts, capacity):
        return counts < capacity

    ints = (torch.tensor([3, 1, 4, 1]), 2)
    mask = check_function(lambda c, cap: keep(c, cap).long(), keep, [Case("int64 counts", ints)], exercise="keep",
                          quiet=True)
    assert "expected dtype bool, got int64" in mask.message and "yes/no mask" in mask.message
    assert "stray .float()" not in mask.message

    def halve(x):
        return x / 2

    x64 = (torch.arange(4, dtype=torch.float64),)
    drift = check_function(lambda x: (x / 2).float(), halve, [Case("float64", x64)], exercise="h", quiet=True)
    assert "The inputs are float64: keep their dtype" in drift.message
    index = check_function(lambda x: x.argsort().double(), lambda x: x.argsort(), [Case("float64", x64)],
                           exercise="i", quiet=True)
    assert "expected dtype int64, got float64" in index.message and "indices or counts" in index.message


def test_an_in_place_change_is_reported_as_found_by_the_check():
    from labsupport.harness.checking import InputChanged

    def spoils(q, k):
        out = reference_causal_scores(q, k)
        q.zero_()
        return out

    result = check_function(spoils, reference_causal_scores, make_cases(), exercise="s", quiet=True)
    assert "the check found that your function changed its input `q` in place" in result.message
    assert "nothing was raised" in result.message and "your function raised" not in result.message

    def wrapper_says(q, k):  # a chapter's own wrapper saw a change the engine cannot
        raise InputChanged("k")

    wrapped = check_function(wrapper_says, reference_causal_scores, make_cases(), exercise="s", quiet=True)
    assert "the check found that your function changed its input `k` in place" in wrapped.message
    assert "your function raised" not in wrapped.message


def test_small_integer_inputs_are_printed_by_value_and_notes_follow_their_argument():
    def first_masked(tokens, logits, mask_id):
        return (tokens == mask_id).long().argmax(-1)

    tokens = torch.tensor([[0, 4, 2], [4, 1, 4]])
    logits = torch.zeros(2, 3, 5)
    case = Case("B=2, L=3", (tokens, logits, 4), notes={"logits": "V = 4 + [MASK]"})
    result = check_function(lambda t, lg, m: t[:, 0], first_masked, [case], exercise="m", quiet=True)
    assert "tokens: int64 tensor of shape (2, 3) = [[0, 4, 2], [4, 1, 4]]" in result.message
    assert "logits: float32 tensor of shape (2, 3, 5) (V = 4 + [MASK])" in result.message
    assert "= [[" not in result.message.split("logits:")[1]  # floats are not listed
    big = Case("long", (torch.arange(40).reshape(2, 20), logits, 4))
    long_result = check_function(lambda t, lg, m: t[:, 0], first_masked, [big], exercise="m", quiet=True)
    assert "= [" not in long_result.message.split("inputs")[1].split("\n")[0]


def test_a_constant_factor_and_a_transpose_are_named():
    scaled = check_function(lambda q, k: 0.5 * reference_causal_scores(q, k), reference_causal_scores,
                            make_cases()[1:], exercise="s", quiet=True)
    assert "found   your answer is exactly 1/2 × the expected one everywhere" in scaled.message
    number = check_function(lambda a: 2 * a * 3, lambda a: a * 3, [Case("a=5", (5,))], exercise="n", quiet=True)
    assert "exactly 2 × the expected one" in number.message
    transposed = check_function(lambda q, k: reference_causal_scores(q, k).transpose(0, 1), reference_causal_scores,
                                [make_cases()[1]], exercise="t", quiet=True)
    assert "expected shape (2, 3, 3), got shape (3, 2, 3)" in transposed.message
    assert "a transpose, or the axes in the wrong order" in transposed.message


def test_the_old_hint_argument_still_prints_its_line():
    result = check_function(lambda q, k: q, reference_causal_scores, make_cases(), exercise="s", quiet=True,
                            hint="mask above the diagonal")
    assert "\n   hint    mask above the diagonal" in result.message


def test_a_factor_is_named_only_where_it_tells_something():
    from labsupport.harness.diagnosis import generic_diagnosis

    one = torch.tensor([0.571372], dtype=torch.float64)
    assert generic_diagnosis(one, one * 0.7706) is None  # one number: any ratio is "constant"
    assert "exactly 2 ×" in generic_diagnosis(one, one * 2)
    assert generic_diagnosis(3.0, 3.0 * 0.7706) is None
    assert "exactly 1/4 ×" in generic_diagnosis(torch.arange(1.0, 9.0), torch.arange(1.0, 9.0) / 4)
    assert "0.3536" in generic_diagnosis(torch.arange(1.0, 9.0), torch.arange(1.0, 9.0) / 8 ** 0.5)


def test_a_chapter_wrapper_that_refuses_an_in_place_change_reads_as_found_by_the_check():
    import labsupport.harness.diagnosis as course_module  # stands for a chapter's exercises module

    def spoils(q, k):
        k.add_(1.0)
        return reference_causal_scores(q, k - 1.0)

    def refuse(fn):  # what chapter 08's _refuse_in_place did: raise from the course's own code
        def wrapped(q, k):
            before = k.clone()
            out = fn(q, k)
            if not torch.equal(before, k):
                exec(compile("raise ValueError('k was modified in place')", course_module.__file__, "exec"))
            return out
        return wrapped

    def learner_raises(q, k):
        k.add_(1.0)
        raise ValueError("my own error")

    result = check_function(refuse(spoils), reference_causal_scores, make_cases(), exercise="s", quiet=True)
    assert "the check found that your function changed its input `k` in place" in result.message
    own = check_function(learner_raises, reference_causal_scores, make_cases(), exercise="s", quiet=True)
    assert "your function raised ValueError: my own error" in own.message
