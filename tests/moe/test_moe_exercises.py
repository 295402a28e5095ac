"""Chapter 06 checkers (labsupport.moe.exercises): they pass the references and explain wrong answers."""

from __future__ import annotations

import pytest
import torch

from labsupport.moe import routing as r
from labsupport.moe.exercises import (
    check_capacity_keep,
    check_load_balancing_loss,
    check_top_k_router,
    check_update_balance_bias,
    reference_top_k_router,
)


def run(checker, fn, capsys):
    result = checker(fn)
    out = capsys.readouterr().out
    assert "Traceback" not in out
    return result, out


def not_done(*args):
    raise NotImplementedError


def raises(*args):
    raise RuntimeError("boom")


# --------------------------------------------------------------------------- top-k router

TOP_K_WRONG = {
    "not renormalised (the shortcut)": (lambda z, k: z.softmax(-1).topk(k, -1), "weights"),
    "wrong shape (T, E)": (lambda z, k: (z.softmax(-1), z.topk(k, -1).indices), "shape"),
    "float experts": (lambda z, k: (reference_top_k_router(z, k)[0], reference_top_k_router(z, k)[1].double()),
                      "dtype"),
    "NaN weights": (lambda z, k: (reference_top_k_router(z, k)[0] * float("nan"), reference_top_k_router(z, k)[1]),
                    "NaN"),
    "None": (lambda z, k: None, "None"),
    "raises": (raises, "RuntimeError"),
    "k - 1 experts (off by one)": (lambda z, k: reference_top_k_router(z, k + 1) if k < z.shape[1]
                                   else reference_top_k_router(z, k - 1), "shape"),
    "smallest first": (lambda z, k: tuple(t.flip(-1) for t in reference_top_k_router(z, k)), "weights"),
}


def test_top_k_router_checker_passes_the_reference(capsys) -> None:
    result, out = run(check_top_k_router, reference_top_k_router, capsys)
    assert result and "✅" in out


@pytest.mark.parametrize("name", list(TOP_K_WRONG))
def test_top_k_router_checker_rejects(name, capsys) -> None:
    fn, word = TOP_K_WRONG[name]
    result, out = run(check_top_k_router, fn, capsys)
    assert not result and "❌" in out and word in out, out


def test_checkers_say_not_done_yet(capsys) -> None:
    for checker in (check_top_k_router, check_load_balancing_loss, check_capacity_keep, check_update_balance_bias):
        result, out = run(checker, not_done, capsys)
        assert result.status == "not done" and "not done yet" in out


# --------------------------------------------------------------------------- load-balancing loss


def differentiable_counts(probs, experts):
    n = probs.shape[1]
    f = torch.nn.functional.one_hot(probs.argmax(-1), n).double().mean(0) + 0 * probs.sum()
    soft_f = probs.mean(0)  # "counts" that carry a gradient
    return n * (f.detach() * probs.mean(0)).sum() + (soft_f - soft_f.detach()).sum() * 3


BALANCE_WRONG = {
    "Mixtral's counting (balanced -> k)": (lambda p, e: r.load_balancing_loss(p, e, convention="mixtral"), "expected"),
    "forgot the factor N": (lambda p, e: r.load_balancing_loss(p, e) / p.shape[1], "expected"),
    "gradient through the counts": (differentiable_counts, "gradient"),
    "NaN": (lambda p, e: r.load_balancing_loss(p, e) * float("nan"), "NaN"),
    "None": (lambda p, e: None, "None"),
    "raises": (raises, "RuntimeError"),
    "counts only the first choice": (lambda p, e: r.load_balancing_loss(p, e[:, :1]), "expected"),
}


def test_balance_checker_passes_the_reference(capsys) -> None:
    result, _ = run(check_load_balancing_loss, lambda p, e: r.load_balancing_loss(p, e), capsys)
    assert result


@pytest.mark.parametrize("name", list(BALANCE_WRONG))
def test_balance_checker_rejects(name, capsys) -> None:
    fn, word = BALANCE_WRONG[name]
    result, out = run(check_load_balancing_loss, fn, capsys)
    assert not result and word in out, out


# --------------------------------------------------------------------------- capacity


def token_major(experts, n, capacity):
    keep = torch.zeros_like(experts, dtype=torch.bool)
    used = [0] * n
    for t in range(experts.shape[0]):
        for s in range(experts.shape[1]):
            e = int(experts[t, s])
            if used[e] < capacity:
                keep[t, s], used[e] = True, used[e] + 1
    return keep


CAPACITY_WRONG = {
    "token by token (the shortcut)": (token_major, "differ"),
    "capacity + 1 (off by one)": (lambda e, n, c: r.capacity_keep(e, n, c + 1), "differ"),
    "keeps everything": (lambda e, n, c: torch.ones_like(e, dtype=torch.bool), "differ"),
    "int instead of bool": (lambda e, n, c: r.capacity_keep(e, n, c).long(), "dtype"),
    "transposed (k, T)": (lambda e, n, c: r.capacity_keep(e, n, c).t(), "shape"),
    "None": (lambda e, n, c: None, "None"),
    "raises": (raises, "RuntimeError"),
}


def test_capacity_checker_passes_the_reference(capsys) -> None:
    result, _ = run(check_capacity_keep, r.capacity_keep, capsys)
    assert result


@pytest.mark.parametrize("name", list(CAPACITY_WRONG))
def test_capacity_checker_rejects(name, capsys) -> None:
    fn, word = CAPACITY_WRONG[name]
    result, out = run(check_capacity_keep, fn, capsys)
    assert not result and word in out, out


# --------------------------------------------------------------------------- bias update


def in_place(bias, counts, gamma):
    bias += gamma * torch.sign(counts.to(bias.dtype).mean() - counts.to(bias.dtype))
    return bias


BIAS_WRONG = {
    "in place (the shortcut)": (in_place, "in place"),
    "wrong sign": (lambda b, c, g: r.update_balance_bias(b, c, -g), "expected"),
    "moves by the load, not its sign": (lambda b, c, g: b + g * (c.to(b.dtype).mean() - c.to(b.dtype)), "expected"),
    "NaN": (lambda b, c, g: r.update_balance_bias(b, c, g) * float("nan"), "NaN"),
    "None": (lambda b, c, g: None, "None"),
    "returns the counts' dtype": (lambda b, c, g: r.update_balance_bias(b, c, g).to(c.dtype), "dtype"),
    "raises": (raises, "RuntimeError"),
}


def test_bias_checker_passes_the_reference(capsys) -> None:
    result, _ = run(check_update_balance_bias, r.update_balance_bias, capsys)
    assert result


@pytest.mark.parametrize("name", list(BIAS_WRONG))
def test_bias_checker_rejects(name, capsys) -> None:
    fn, word = BIAS_WRONG[name]
    result, out = run(check_update_balance_bias, fn, capsys)
    assert not result and word in out, out


def test_a_checker_given_a_non_function_explains(capsys) -> None:
    for checker in (check_top_k_router, check_update_balance_bias):
        result, out = run(checker, 42, capsys)
        assert not result and "expected a function" in out


# --------------------------------------------------------------------------- issue 20: the new checkers

from labsupport.moe.exercises import (  # noqa: E402
    check_bias_balance,
    check_gate_top_k,
    check_sequence_balance_loss,
    reference_bias_balance,
    reference_gate_top_k,
    reference_sequence_balance_loss,
)


def _one_rule(z, k, gate):
    top, experts = z.softmax(-1).topk(k, -1)
    return top / top.sum(-1, keepdim=True), experts


def _no_renormalise(z, k, gate):
    return z.softmax(-1).topk(k, -1)


def _batch_wise(scores, experts):
    return reference_sequence_balance_loss(scores.reshape(1, -1, scores.shape[-1]),
                                           experts.reshape(1, -1, experts.shape[-1]))


def _raw_scores(scores, experts):
    b, length, n = scores.shape
    k = experts.shape[-1]
    counts = torch.zeros(b, n, dtype=scores.dtype).scatter_add_(
        1, experts.reshape(b, -1), torch.ones(b, length * k, dtype=scores.dtype))
    return (counts * n / (k * length) * scores.mean(1)).sum(-1).mean()


@pytest.mark.parametrize("checker, reference", [
    (check_gate_top_k, reference_gate_top_k),
    (check_sequence_balance_loss, reference_sequence_balance_loss),
    (check_bias_balance, reference_bias_balance),
])
def test_new_checkers_pass_their_references_and_report_not_done(checker, reference, capsys) -> None:
    result, out = run(checker, reference, capsys)
    assert result and "✅" in out
    result, out = run(checker, not_done, capsys)
    assert result.status == "not done" and "⏳" in out


@pytest.mark.parametrize("checker, fn, words", [
    (check_gate_top_k, _one_rule, ["weights are 1.00", "no gradient"]),
    (check_gate_top_k, _no_renormalise, ["'renormalize' your weights sum to", "per row"]),
    (check_sequence_balance_loss, _batch_wise, ["whole batch"]),
    (check_sequence_balance_loss, _raw_scores, ["scored 3.60"]),
    (check_bias_balance, lambda s, k, g, n: -reference_bias_balance(s, k, g, n), ["went up"]),
    (check_bias_balance, lambda s, k, g, n: 2 * reference_bias_balance(s, k, g, n), ["exactly gamma"]),
    (check_gate_top_k, raises, ["RuntimeError"]),
    (check_bias_balance, lambda s, k, g, n: None, ["None"]),
])
def test_new_checkers_diagnose_the_mistake_without_the_recipe(checker, fn, words, capsys) -> None:
    result, out = run(checker, fn, capsys)
    assert not result and "❌" in out
    for word in words:
        assert word in out, out
    assert "torch.sign" not in out and "topk" not in out and "/ (k·L)" not in out


def test_capacity_checker_names_token_order_filling(capsys) -> None:
    def token_order(experts, n_experts, capacity):
        keep = torch.zeros_like(experts, dtype=torch.bool)
        used = [0] * n_experts
        for t in range(experts.shape[0]):
            for j in range(experts.shape[1]):
                e = int(experts[t, j])
                if used[e] < capacity:
                    used[e] += 1
                    keep[t, j] = True
        return keep
    result, out = run(check_capacity_keep, token_order, capsys)
    assert not result and "before any second choice" in out


# --------------------------------------------------------------------------- the engine's feedback: found, and the recipe

from labsupport.moe import exercises as moe_ex  # noqa: E402


@pytest.mark.parametrize("checker, wrong, found", [
    (moe_ex.check_top_k_router, lambda z, k: tuple(z.softmax(-1).topk(k, -1)), "not renormalised"),
    (moe_ex.check_load_balancing_loss,
     lambda p, e: e.shape[-1] * r.load_balancing_loss(p, e, convention="switch"), "Mixtral's counting"),
    (moe_ex.check_update_balance_bias, lambda b, c, g: b + g * torch.sign(c.to(b.dtype) - c.to(b.dtype).mean()),
     "moves an overloaded expert's bias up"),
    (moe_ex.check_update_balance_bias, lambda b, c, g: b + g * (c.to(b.dtype).mean() - c.to(b.dtype)),
     "proportional to the overload"),
    (moe_ex.check_gate_top_k, _one_rule, "no gradient"),
    (moe_ex.check_bias_balance, lambda s, k, g, n: -reference_bias_balance(s, k, g, n), "went up"),
])
def test_a_known_mistake_is_found_and_the_recipe_waits(checker, wrong, found, capsys, monkeypatch) -> None:
    monkeypatch.delenv("LABSUPPORT_STRICT_CHECKS", raising=False)
    result = checker(wrong)
    out = capsys.readouterr().out
    assert not result and "\n   found   " in out and found in out, out
    assert "reveal=True)` prints the full recipe" in out
    assert "\n   recipe  try the tiered hints first" not in checker(wrong, reveal=True).message
