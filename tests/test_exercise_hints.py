"""Exercises give hints in tiers, and a checker's failure message never hands out the solution formula.

House style: the exercise's markdown cell states the spec and carries folded ``<details>`` hints (the idea
first, the formula only in the last tier); a checker's ``hint=`` names the usual mistake and points at those
tiers. The second test feeds chapters 00–03's checkers a plausible wrong answer and looks for the formulas
their messages used to print.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from labsupport import attention, flash, grouped, linear_attention
from labsupport.harness.checking import STRICT_ENV_VAR

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def _exercise_statements(path: Path) -> list[tuple[str, str]]:
    """(code cell id, the markdown just above it) for every code cell holding a solution and a checker call."""
    cells = json.loads(path.read_text())["cells"]
    found = []
    for number, cell in enumerate(cells):
        source = "".join(cell["source"])
        if cell["cell_type"] != "code" or "### BEGIN SOLUTION" not in source or "check_" not in source:
            continue
        above = next(("".join(c["source"]) for c in reversed(cells[:number]) if c["cell_type"] == "markdown"), "")
        found.append((cell.get("id", str(number)), above))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_has_folded_hints_idea_first(path: Path) -> None:
    statements = _exercise_statements(path)
    assert statements, f"{path.name}: no exercise found"
    for cell_id, text in statements:
        summaries = re.findall(r"<details><summary>(.*?)</summary>", text)
        assert summaries and all(s.startswith("Hint") for s in summaries[:1]), (
            f"{path.name}: the exercise above code cell {cell_id} has no folded hint "
            "(<details><summary>Hint 1 — the idea</summary> ...)")
        assert text.count("<details>") == text.count("</details>"), f"{path.name}: unbalanced <details> above {cell_id}"
        if len(summaries) > 1:
            assert summaries[0].startswith("Hint 1"), (
                f"{path.name}: tiered hints above {cell_id} must open with 'Hint 1' (the idea), got {summaries[0]!r}")


def _scores_without_scale(q, k, v):
    return (q @ k.transpose(-1, -2)).softmax(dim=-1) @ v


def _online_update_without_rescaling_acc(m, l, acc, scores, v):
    m_new = torch.maximum(m, scores.amax(dim=-1))
    m_ref = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(scores - m_ref[..., None])
    return m_new, torch.exp(m - m_ref) * l + p.sum(dim=-1), acc + p @ v


def _forward_with_halved_lse(q, k, v, causal=False, block_q=64, block_k=64):
    out, lse = flash.tiled._tiled_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)  # public: refused
    return out, lse / 2


def _backward_with_doubled_dq(q, k, v, out, lse, dout, causal=False, block_q=64, block_k=64):
    dq, dk, dv = flash.tiled._tiled_backward(q, k, v, out, lse, dout, causal=causal, block_q=block_q,
                                                block_k=block_k)
    return 2 * dq, dk, dv


def _grouped_with_repeat(q, k, v):
    heads, groups = q.shape[1], k.shape[1]
    k, v = k.repeat(1, heads // groups, 1, 1), v.repeat(1, heads // groups, 1, 1)
    return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(dim=-1) @ v


def _quantise_with_2_to_the_b_levels(x, bits, dim):
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = (hi - lo) / 2**bits
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round((x - lo) / scale).clamp(0, 2**bits - 1) * scale + lo


def _recurrent_reading_the_old_state(state, q, k, v, log_decay=None):
    return (q[..., :, None] * state).sum(dim=-2), state + k[..., :, None] * v[..., None, :]


def _chunk_without_the_diagonal(state, q, k, v):
    return q @ state + (q @ k.transpose(-1, -2)).tril(-1) @ v, state + k.transpose(-1, -2) @ v


def _delta_without_the_read(state, k, v, beta):
    return state + k[..., :, None] * (beta[..., None] * v)[..., None, :]


def _decay_chunk_writing_undecayed(state, q, k, v, log_decay):
    out, _ = linear_attention._solutions.chunkwise_decay_step(state, q, k, v, log_decay)
    return out, state + k.transpose(-1, -2) @ v


WRONG_ANSWERS = [
    (attention.check_attention_decode_step, _scores_without_scale, ["1/sqrt(head_dim)", "softmax over the cached"]),
    (flash.check_online_softmax_update, _online_update_without_rescaling_acc, ["m_new = max(", "exp(m - m_new)"]),
    (flash.check_flash_forward, _forward_with_halved_lse, ["m + log l", "j > i + (Lk - Lq)"]),
    (flash.check_flash_backward, _backward_with_doubled_dq, ["dS = P", "dV += Pᵀ dO", "rowsum(dO"]),
    (grouped.check_grouped_decode_step, _grouped_with_repeat, ["reshape q to (B, G, H // G, D)"]),
    (grouped.check_absorb_mla_weights,
     lambda w_q, w_uk, w_uv, w_o: (w_q @ w_uk.transpose(-1, -2), (w_uv @ w_o).transpose(-1, -2)),
     ["w_uv[h] @ w_o[h]", "w_q[h] @ w_uk[h]"]),
    (grouped.check_quantize_dequantize, _quantise_with_2_to_the_b_levels, ["(2**bits - 1)", "round((x - min)"]),
    (linear_attention.check_recurrent_step, _recurrent_reading_the_old_state, ["o = S'ᵀ q"]),
    (linear_attention.check_chunkwise_step, _chunk_without_the_diagonal, ["O = Q S", "S' = S + Kᵀ V"]),
    (linear_attention.check_delta_rule_step, _delta_without_the_read, ["β k (v − Sᵀk)ᵀ"]),
    (linear_attention.check_chunkwise_decay_step, _decay_chunk_writing_undecayed, ["exp(b_C", "(Q Kᵀ ⊙ Γ) V"]),
]


@pytest.mark.parametrize("checker, wrong, formula_fragments", WRONG_ANSWERS,
                         ids=[checker.__name__ for checker, _, _ in WRONG_ANSWERS])
def test_a_failure_points_at_the_hints_without_printing_the_formula(checker, wrong, formula_fragments, monkeypatch,
                                                                    capsys) -> None:
    monkeypatch.delenv(STRICT_ENV_VAR, raising=False)
    result = checker(wrong)
    message = capsys.readouterr().out
    assert not result.passed and "❌" in message and "expected" in message
    assert "hint" in message and "hints are above the exercise" in message.lower()
    for fragment in formula_fragments:
        assert fragment not in message, f"{checker.__name__} prints the solution formula: {fragment!r}"


# Issue 27: a failure says what this answer did ("found"), and the recipe comes only when asked (reveal=True).
DIAGNOSED = [
    (attention.check_attention_decode_step, _scores_without_scale, "without the 1/√d scale"),
    (flash.check_online_softmax_update, _online_update_without_rescaling_acc, "without repairing acc"),
    (flash.check_flash_forward, _forward_with_halved_lse, "exactly 1/2 ×"),
    (flash.check_flash_backward, _backward_with_doubled_dq, "exactly 2 ×"),
    (grouped.check_grouped_decode_step, _grouped_with_repeat, "reads KV head h % G"),
    (grouped.check_quantize_dequantize, _quantise_with_2_to_the_b_levels, "2**bits steps"),
    (linear_attention.check_recurrent_step, _recurrent_reading_the_old_state, "before this token's write"),
    (linear_attention.check_chunkwise_step, _chunk_without_the_diagonal, "leaves out the diagonal"),
    (linear_attention.check_delta_rule_step, _delta_without_the_read, "without first taking away"),
    (linear_attention.check_chunkwise_decay_step, _decay_chunk_writing_undecayed, "no decay at all"),
    (attention.check_kv_cache_bytes, lambda l, h, d, c, b: l * h * d * c * b, "keys OR values"),
    (attention.check_decode_intensity,
     lambda s, c, b: b * s.flops_per_token(c) / (b * s.params * s.bytes_per_element + b * c * s.kv_bytes_per_token()),
     "once per sequence"),
]


@pytest.mark.parametrize("checker, wrong, diagnosis", DIAGNOSED, ids=[c.__name__ for c, _, _ in DIAGNOSED])
def test_a_failure_names_what_this_answer_did(checker, wrong, diagnosis, monkeypatch, capsys) -> None:
    monkeypatch.delenv(STRICT_ENV_VAR, raising=False)
    result = checker(wrong)
    message = capsys.readouterr().out
    assert not result.passed and f"\n   found   " in message and diagnosis in result.diagnosis, message
    assert "reveal=True)` prints the full recipe" in message and "\n   recipe  try the tiered hints first" in message


def _chapter_checkers() -> list:
    import importlib

    families = ("attention", "flash", "grouped", "linear_attention", "diffusion", "ssm", "sparse", "moe", "multimodal")
    modules = [f"labsupport.{family}.{name}" for family in families
               for name in ("exercises", "exercises_core")]
    found = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        found += [getattr(module, n) for n in sorted(dir(module)) if n.startswith("check_")
                  and callable(getattr(module, n)) and getattr(module, n).__module__ == name]
    return found


CHAPTER_CHECKERS = _chapter_checkers()


@pytest.mark.parametrize("checker", CHAPTER_CHECKERS, ids=lambda c: c.__name__)
def test_the_recipe_is_printed_only_when_asked_for(checker, monkeypatch, capsys) -> None:
    monkeypatch.delenv(STRICT_ENV_VAR, raising=False)

    def wrong(*args, **kwargs):
        return None

    hidden = checker(wrong).message
    shown = checker(wrong, reveal=True).message
    capsys.readouterr()
    assert f"`{checker.__name__}(wrong, reveal=True)` prints the full recipe" in hidden
    recipe = shown.split("\n   recipe  ")[-1]
    assert len(recipe) > 40 and recipe not in hidden
