"""Scoring the denoiser against the autoregressive model: likelihood, infilling, sample quality.

* :func:`ar_token_nll` — the AR model's exact ``−log p(x_i | x_<i)`` at every position (the first has none).
* :func:`span_nll` — nats per character of a span ``[start, end)``: exact for the AR model (given the prefix
  only), the ELBO bound for the denoiser (given both sides).
* :func:`ar_gap_log_posterior`, :func:`ar_infill_one` — the AR model's *exact* ``p(c | left, right)`` for a one-character gap, by scoring
  every candidate ``c`` with the right side appended (Bayes' rule over the vocabulary).
* :func:`span_accuracy` — share of a span's characters a sampler got exactly right.
* :func:`unigram_entropy_bits` — entropy of the characters of a span (low = repetitive, degenerate text).
* :func:`judge_nll` — nats per character of generated text under the AR model ("generative perplexity").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.diffusion.process import elbo_per_sequence
from labsupport.harness.validation import require_int, require_positive_int
from labsupport.lm.model import TinyLM

__all__ = ["ar_gap_log_posterior", "ar_infill_one", "ar_token_nll", "judge_nll", "span_accuracy", "span_nll", "unigram_entropy_bits"]


def _require_ids(name: str, tokens: object) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"{name} must be int64 ids of shape (batch, length)")
    return tokens


def _require_span(tokens: torch.Tensor, start: int, end: int, *, first: int = 0) -> tuple[int, int]:
    start = require_int("start", start, minimum=first)
    end = require_int("end", end, minimum=start + 1, maximum=tokens.shape[1])
    return start, end


@torch.no_grad()
def ar_token_nll(model: TinyLM, tokens: torch.Tensor) -> torch.Tensor:
    """``(B, L − 1)``: ``−log p(tokens[:, i] | tokens[:, :i])`` for ``i = 1 .. L − 1`` under a causal model."""
    if not isinstance(model, TinyLM) or not model.causal:
        raise TypeError("model must be a causal TinyLM")
    tokens = _require_ids("tokens", tokens)
    logits = model(tokens[:, :-1])
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    return nll.view(tokens.shape[0], -1)


@torch.no_grad()
def span_nll(model: nn.Module, tokens: torch.Tensor, start: int, end: int, *, samples: int = 16,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Nats per character of ``tokens[:, start:end]``, ``(B,)``.

    A causal ``TinyLM`` gives the exact ``−log p(span | prefix) / len`` (it cannot look at the suffix); a
    denoiser gives its bound on ``−log p(span | prefix, suffix) / len`` (:func:`elbo_per_sequence` restricted
    to the span).
    """
    tokens = _require_ids("tokens", tokens)
    if isinstance(model, TinyLM) and model.causal:
        start, end = _require_span(tokens, start, end, first=1)
        return ar_token_nll(model, tokens)[:, start - 1:end - 1].mean(dim=1)
    start, end = _require_span(tokens, start, end)
    where = torch.zeros_like(tokens, dtype=torch.bool)
    where[:, start:end] = True
    return elbo_per_sequence(model, tokens, samples=require_positive_int("samples", samples), where=where,
                             generator=generator) / (end - start)


@torch.no_grad()
def ar_gap_log_posterior(model: TinyLM, tokens: torch.Tensor, position: int, *, max_rows: int = 512
                         ) -> torch.Tensor:
    """``(B, V)`` float64: the AR model's exact ``log p(c | left, right)`` for a one-character gap at ``position``.

    ``p(c | left, right) ∝ p(c | left) · p(right | left, c)``: each of the ``V`` candidates is written into the
    gap, the window scored from the gap to its end, and the scores normalised over ``c`` (Bayes' rule). Exact,
    but ``V`` forward passes per window, where a denoiser needs one.
    """
    if not isinstance(model, TinyLM) or not model.causal:
        raise TypeError("model must be a causal TinyLM")
    tokens = _require_ids("tokens", tokens)
    position = require_int("position", position, minimum=1, maximum=tokens.shape[1] - 1)
    max_rows = require_positive_int("max_rows", max_rows)
    b = tokens.shape[0]
    vocab = model.vocab_size
    rows = tokens.repeat_interleave(vocab, dim=0)                      # (B·V, L): every candidate in the gap
    rows[:, position] = torch.arange(vocab, device=tokens.device).repeat(b)
    scores = torch.empty(b * vocab, dtype=torch.float64)
    for lo in range(0, rows.shape[0], max_rows):
        chunk = rows[lo:lo + max_rows]
        log_p = model(chunk[:, :-1]).double().log_softmax(dim=-1)
        picked = log_p.gather(-1, chunk[:, 1:, None]).squeeze(-1)        # log p(x_i | x_<i), i = 1 .. L − 1
        scores[lo:lo + max_rows] = picked[:, position - 1:].sum(dim=1).cpu()  # the gap and everything after it
    return scores.view(b, vocab).log_softmax(dim=-1)


def ar_infill_one(model: TinyLM, tokens: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(−log p(true character | left, right), most probable character)``, two ``(B,)`` tensors, from
    :func:`ar_gap_log_posterior`."""
    log_post = ar_gap_log_posterior(model, tokens, position)
    nll = -log_post.gather(1, tokens[:, position:position + 1].cpu()).squeeze(1)
    return nll.float(), log_post.argmax(dim=-1)


def span_accuracy(predicted: torch.Tensor, truth: torch.Tensor, start: int, end: int) -> float:
    """Share of the characters ``[start, end)`` where ``predicted`` equals ``truth``.

    Both are ``(B, ·)`` ids holding at least ``end`` positions (an AR continuation may stop at ``end``).
    """
    predicted, truth = _require_ids("predicted", predicted), _require_ids("truth", truth)
    start, end = _require_span(truth, start, end)
    if predicted.shape[0] != truth.shape[0] or predicted.shape[1] < end:
        raise ValueError(f"predicted {tuple(predicted.shape)} must have truth's batch {truth.shape[0]} and at least "
                         f"{end} positions")
    return float((predicted[:, start:end] == truth[:, start:end]).float().mean())


def unigram_entropy_bits(tokens: torch.Tensor) -> float:
    """Entropy in bits of the character frequencies of ``tokens`` (any shape of int64 ids)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.numel() == 0:
        raise ValueError("tokens must be a non-empty int64 tensor of ids")
    counts = torch.bincount(tokens.reshape(-1)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


@torch.no_grad()
def judge_nll(judge: TinyLM, tokens: torch.Tensor, start: int) -> float:
    """Mean nats per character of ``tokens[:, start:]`` under the AR ``judge`` given what precedes them.

    The usual "generative perplexity" of samples is ``exp`` of this. It rewards dull text too (a run of
    spaces can score well), so read it beside :func:`unigram_entropy_bits`; and a judge scoring its own greedy
    output is flattered.
    """
    tokens = _require_ids("tokens", tokens)
    start, _ = _require_span(tokens, start, tokens.shape[1], first=1)
    value = float(ar_token_nll(judge, tokens)[:, start - 1:].mean())
    if not math.isfinite(value):
        raise FloatingPointError("the judge's NLL is not finite")
    return value
