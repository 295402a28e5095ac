"""Samplers: turn a canvas of ``[MASK]`` tokens into text in a fixed number of denoising steps.

A canvas is ``(B, L)`` ids in which the positions to generate hold ``mask_id`` and every other position is
given (a prompt, the two ends of an infilling task). Each step runs the denoiser on the whole canvas, predicts
every masked token, and **commits** some of them; a committed token is never changed again.

* :func:`transfer_schedule` — how many tokens each step commits (LLaDA's linear schedule).
* :func:`commit_tokens` — one step's commit: the ``k`` most confident predictions (low-confidence remasking)
  or ``k`` random ones (random remasking), among the masked positions a step may touch.
* :func:`diffusion_sample` — the whole loop, optionally semi-autoregressive (blocks left to right, BD3-LM /
  LLaDA style) with a cache of everything outside the current block (:mod:`labsupport.diffusion.cache`): the
  approximate one of a bidirectional model, or BD3-LM's exact one under block-causal attention; optionally with
  LLaDA's classifier-free guidance (:mod:`labsupport.diffusion.guidance`).
* :func:`threshold_sample` — Fast-dLLM's parallel decoding: each step commits every masked prediction whose
  confidence clears a threshold (at least the most confident one), so the number of steps adapts to the text.
* :func:`infill_canvas` — mask the middle of sequences, keeping both ends.
* :func:`ar_generate` — the autoregressive baseline: prefill, then one token per step from the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from labsupport.harness.validation import require_choice, require_float, require_int, require_positive_int
from labsupport.diffusion.cache import BlockKVCache, ExactBlockCache, block_causal_logits
from labsupport.diffusion.guidance import guided_logits
from labsupport.lm.model import TinyLM

__all__ = [
    "ATTENTION",
    "CACHES",
    "REMASKING",
    "SampleTrace",
    "ar_generate",
    "commit_tokens",
    "diffusion_sample",
    "infill_canvas",
    "threshold_sample",
    "transfer_schedule",
]

#: Which masked predictions a step commits: the most confident, or random ones.
REMASKING = ("low_confidence", "random")
#: The attention a sampler runs the denoiser with: as trained (every position sees every other), or BD3-LM's
#: block-causal pattern (a block sees itself and the blocks before it).
ATTENTION = ("bidirectional", "block_causal")
#: The caches of block decoding: none, the approximate one (bidirectional), the exact one (block-causal).
CACHES = (False, True, "approximate", "exact")


def transfer_schedule(n_masked: int, steps: int) -> torch.Tensor:
    """Tokens to commit at each of ``steps`` steps, ``(steps,)`` int64 summing to ``n_masked``.

    Every step gets ``n_masked // steps`` tokens, and the first ``n_masked % steps`` steps one more
    (LLaDA's linear schedule: the same number of tokens per step, the remainder early).
    """
    n_masked = require_int("n_masked", n_masked, minimum=0)
    steps = require_positive_int("steps", steps)
    base, extra = divmod(n_masked, steps)
    counts = torch.full((steps,), base, dtype=torch.long)
    counts[:extra] += 1
    return counts


def commit_tokens(canvas: torch.Tensor, predicted: torch.Tensor, confidence: torch.Tensor, counts: torch.Tensor,
                  allowed: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit, in each row ``b``, the ``counts[b]`` highest-``confidence`` masked positions where ``allowed``.

    Returns the new canvas and the bool ``(B, L)`` of positions committed now. Positions that are not masked
    are never touched, whatever their confidence.

    Args:
        canvas, predicted: ``(B, L)`` int64 ids (the canvas, and the token each position would take).
        confidence: ``(B, L)`` scores, higher first (ties go to the leftmost position).
        counts: ``(B,)`` int64, how many to commit in each row (more than the candidates: all of them).
        allowed: ``(B, L)`` bool, the positions this step may touch (e.g. the current block).
        mask_id: the id of ``[MASK]``.
    """
    for name, value in (("canvas", canvas), ("predicted", predicted)):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.long or value.dim() != 2:
            raise ValueError(f"{name} must be int64 ids of shape (batch, length); got {_describe(value)}")
    shape = tuple(canvas.shape)
    for name, value in (("predicted", predicted), ("confidence", confidence), ("allowed", allowed)):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            raise ValueError(f"{name} must have the canvas's shape {shape}; got {_describe(value)}")
    if allowed.dtype != torch.bool:
        raise ValueError(f"allowed must be a bool tensor; got {allowed.dtype}")
    if (not isinstance(counts, torch.Tensor) or counts.dtype != torch.long
            or tuple(counts.shape) != (shape[0],)):
        raise ValueError(f"counts must be int64 of shape ({shape[0]},), one count per row of the canvas; "
                         f"got {_describe(counts)}")
    if bool((counts < 0).any()):
        raise ValueError(f"counts must be ≥ 0; got {counts.tolist()}")
    mask_id = require_int("mask_id", mask_id, minimum=0)
    candidates = (canvas == mask_id) & allowed
    score = torch.where(candidates, confidence.float(), float("-inf"))
    order = score.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(canvas.shape[1], device=canvas.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    commit = candidates & (rank < counts[:, None])
    return torch.where(commit, predicted, canvas), commit


@dataclass
class SampleTrace:
    """What a sampler did.

    Attributes:
        tokens: the final ``(B, L)`` ids.
        commit_step: ``(B, L)`` the step (from 0) at which each position was committed; −1 where given.
        confidence: ``(B, L)`` the probability the model gave each committed token when committing it
            (1 where given).
        frames: the canvas after each step (``steps`` tensors of ``(B, L)``) when recorded.
        candidates: when recorded, for each step the model's ``top``-3 tokens and their probabilities at every
            position of the canvas, ``((B, L, 3) int64, (B, L, 3) float32)``, as predicted *before* that step's
            commit (positions outside the step's block hold ``-1`` and 0).
        forward_tokens: positions the network processed, summed over steps (the work done).
        steps: sequential denoiser calls.
    """

    tokens: torch.Tensor
    commit_step: torch.Tensor
    confidence: torch.Tensor
    frames: list[torch.Tensor] = field(default_factory=list)
    candidates: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    forward_tokens: int = 0
    steps: int = 0


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _block_spans(masked: torch.Tensor, block_length: int | None) -> list[tuple[int, int]]:
    """Blocks of ``block_length`` positions from the first masked column on (LLaDA: blocks of the answer)."""
    length = masked.shape[1]
    if block_length is None:
        return [(0, length)]
    columns = masked.any(dim=0).nonzero().flatten()
    if columns.numel() == 0:
        return []
    first = int(columns[0])
    spans = [(s, min(s + block_length, length)) for s in range(first, length, block_length)]
    return [(s, e) for s, e in spans if bool(masked[:, s:e].any())]


@torch.no_grad()
def diffusion_sample(model: nn.Module, canvas: torch.Tensor, *, steps: int, remasking: str = "low_confidence",
                     block_length: int | None = None, cache: bool | str = False, temperature: float = 0.0,
                     generator: torch.Generator | None = None, record: bool = False,
                     attention: str = "bidirectional", guidance: float = 0.0) -> SampleTrace:
    """Fill every ``mask_id`` of ``canvas`` in ``steps`` denoising steps.

    Args:
        model: a denoiser with ``mask_id`` (a :class:`~labsupport.diffusion.process.MaskedDenoiser`).
        canvas: ``(B, L)`` ids; positions to generate hold ``mask_id``. All rows must hold the same number of
            masks in every block (true for the course's prompt and infilling canvases).
        steps: denoiser calls in all; with blocks they are shared out over the blocks (at least one each).
        remasking: ``"low_confidence"`` commits the most probable predictions first; ``"random"`` commits
            random masked positions (each with its predicted token).
        block_length: ``None`` for one block over the whole canvas; otherwise blocks of this many positions,
            counted from the first masked position (the end of the prompt), are filled left to right
            (semi-autoregressive), each in its share of the steps (equal shares, the remainder to the first).
        cache: with blocks, ``True`` / ``"approximate"`` computes keys and values of every position outside the
            current block once per block and runs only the block's positions at its later steps (approximate:
            they go stale); ``"exact"`` (needs ``attention="block_causal"``) is BD3-LM's cache: the prompt and each
            finished block are run once with their final tokens and their keys and values kept, and every step
            runs only the current block against them — the same logits as the uncached block-causal pass.
        temperature: 0 takes the most probable token (greedy); above 0 samples from the tempered softmax.
        generator: randomness of sampling and of random remasking (a fixed default seed when ``None``).
        record: keep the canvas after every step (for the widget).
        attention: ``"bidirectional"`` (as trained) or ``"block_causal"`` (needs blocks: each step sees the prompt,
            the finished blocks and the current block, never the masked future; uncached unless ``cache="exact"``).
        guidance: LLaDA's classifier-free guidance weight ``w ≥ 0`` (:func:`~labsupport.diffusion.guidance.
            guided_logits`; the given positions of ``canvas`` are the condition); each step then runs the network on
            twice the rows. Not combined with a cache or block-causal attention.
    """
    mask_id = getattr(model, "mask_id", None)
    if not isinstance(mask_id, int):
        raise TypeError("model must carry an int attribute mask_id (a MaskedDenoiser)")
    if not isinstance(canvas, torch.Tensor) or canvas.dim() != 2 or canvas.dtype != torch.long:
        raise ValueError(f"canvas must be int64 ids of shape (batch, length); got "
                         f"{canvas.dtype if isinstance(canvas, torch.Tensor) else type(canvas).__name__}")
    steps = require_positive_int("steps", steps)
    require_choice("remasking", remasking, REMASKING)
    if block_length is not None:
        block_length = require_positive_int("block_length", block_length)
    if not any(cache is c or (isinstance(c, str) and cache == c) for c in CACHES):
        raise ValueError(f"cache must be one of {CACHES}; got {cache!r}")
    attention = require_choice("attention", attention, ATTENTION)
    guidance = require_float("guidance", guidance, minimum=0.0)
    if cache and block_length is None:
        raise ValueError("a cache needs block_length: the cache holds everything outside the current block")
    if attention == "block_causal" and block_length is None:
        raise ValueError("attention='block_causal' needs block_length: blocks are what it is causal over")
    if cache == "exact" and attention != "block_causal":
        raise ValueError("cache='exact' is BD3-LM's cache and needs attention='block_causal': under bidirectional "
                         "attention a finished block's keys and values change with every commit (use "
                         "cache='approximate' for that)")
    if attention == "block_causal" and cache in (True, "approximate"):
        raise ValueError("under attention='block_causal' the cache is exact: pass cache='exact' (or no cache)")
    if guidance > 0 and (cache or attention != "bidirectional"):
        raise ValueError("guidance is built for the uncached bidirectional sampler; pass cache=False and "
                         "attention='bidirectional' with guidance > 0")
    temperature = require_float("temperature", temperature, minimum=0.0)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = canvas.device
    x = canvas.clone()
    masked0 = x == mask_id
    spans = _block_spans(masked0, block_length)
    for s, e in spans:
        per_row = masked0[:, s:e].sum(dim=1)
        if bool((per_row != per_row[0]).any()):
            raise ValueError(f"every row must hold the same number of masks in positions {s}..{e - 1}; "
                             f"got {per_row.tolist()}")
    if spans and steps < len(spans):
        raise ValueError(f"steps={steps} is fewer than the {len(spans)} blocks to fill; give each block a step")
    block_steps = transfer_schedule(steps, max(1, len(spans))).tolist() if spans else []
    commit_step = torch.full(x.shape, -1, dtype=torch.long, device=device)
    confidence = torch.ones(x.shape, dtype=torch.float32, device=device)
    trace = SampleTrace(x, commit_step, confidence)
    step = 0
    prompt = ~masked0
    starts = [s for s, _ in spans if s > 0]
    exact = ExactBlockCache(model) if cache == "exact" else None
    for (s, e), n_steps in zip(spans, block_steps):
        counts = transfer_schedule(int(masked0[0, s:e].sum()), n_steps)
        kv = None
        if exact is not None and exact.length < s:        # the prompt, or the block just finished: clean tokens
            trace.forward_tokens += x[:, exact.length:s].numel()
            exact.append_clean(x[:, exact.length:s])
        for k in range(n_steps):
            if exact is not None:
                logits = exact.block_logits(x[:, s:e])          # the block only, against exact cached keys
                trace.forward_tokens += x[:, s:e].numel()
            elif attention == "block_causal":
                logits = block_causal_logits(model, x[:, :e], starts)[:, s:e]   # uncached: the prefix again
                trace.forward_tokens += x[:, :e].numel()
            elif guidance > 0:
                logits = guided_logits(model, x, prompt, guidance)[:, s:e]
                trace.forward_tokens += 2 * x.numel()
            elif cache and kv is not None:
                logits = kv.window(x[:, s:e], s)                     # the block only, against cached keys
                trace.forward_tokens += x[:, s:e].numel()
            elif cache:
                kv = BlockKVCache(model)
                logits = kv.refresh(x)[:, s:e]                       # one full pass fills the cache
                trace.forward_tokens += x.numel()
            else:
                logits = model(x)[:, s:e]
                trace.forward_tokens += x.numel()
            predicted, probs = _sample_tokens(logits, temperature, gen)   # (B, e - s), (B, e - s, V)
            p_pred = probs.gather(-1, predicted[..., None]).squeeze(-1)
            if remasking == "low_confidence":
                score = p_pred
            else:
                score = torch.rand(p_pred.shape, generator=gen).to(device)
            if record:
                trace.candidates.append(_top_candidates(probs, x.shape, s))
            block, now = commit_tokens(x[:, s:e], predicted, score, counts[k].expand(x.shape[0]).to(device),
                                       torch.ones_like(predicted, dtype=torch.bool), mask_id)
            x[:, s:e] = block
            commit_step[:, s:e][now] = step
            confidence[:, s:e][now] = p_pred[now]
            if record:
                trace.frames.append(x.clone())
            step += 1
    trace.tokens, trace.steps = x, step
    return trace


def _top_candidates(probs: torch.Tensor, shape: torch.Size, start: int, k: int = 3
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable tokens at positions ``start ..`` of a canvas of ``shape`` (−1 / 0 elsewhere)."""
    ids = torch.full((*shape, k), -1, dtype=torch.long)
    values = torch.zeros((*shape, k), dtype=torch.float32)
    top = probs.float().cpu().topk(min(k, probs.shape[-1]), dim=-1)
    ids[:, start:start + probs.shape[1], :top.indices.shape[-1]] = top.indices
    values[:, start:start + probs.shape[1], :top.values.shape[-1]] = top.values
    return ids, values


def _sample_tokens(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """``(predicted, probs)``: argmax (temperature 0) or a draw from the tempered softmax; probs untempered."""
    probs = logits.float().softmax(dim=-1)
    if temperature == 0.0:
        return probs.argmax(dim=-1), probs
    tempered = (logits.float() / temperature).softmax(dim=-1)
    drawn = torch.multinomial(tempered.reshape(-1, tempered.shape[-1]).cpu(), 1, generator=gen)
    return drawn.view(probs.shape[:2]).to(logits.device), probs


@torch.no_grad()
def threshold_sample(model: nn.Module, canvas: torch.Tensor, *, threshold: float, block_length: int | None = None,
                     temperature: float = 0.0, generator: torch.Generator | None = None,
                     max_steps: int | None = None) -> SampleTrace:
    """Fast-dLLM's confidence-threshold parallel decoding (Wu et al. 2025, arXiv:2505.22618).

    Each step runs the denoiser on the whole canvas and commits, in each row, every masked position of the
    current block whose predicted token has probability ≥ ``threshold``, and at least the single most confident
    one (so every step makes progress). Easy stretches go many tokens per step, hard ones one at a time: the
    number of steps is an output (``trace.steps``), not a setting. ``threshold = 1`` is one token per step,
    low-confidence order; a threshold near 0 commits a whole block in one step.

    Args:
        model, canvas, block_length, temperature, generator: as for :func:`diffusion_sample`.
        threshold: the confidence a prediction needs to be committed alongside the most confident one, in (0, 1].
        max_steps: refuse to run longer than this (default: the number of masks, the most it can take).
    """
    mask_id = getattr(model, "mask_id", None)
    if not isinstance(mask_id, int):
        raise TypeError("model must carry an int attribute mask_id (a MaskedDenoiser)")
    if not isinstance(canvas, torch.Tensor) or canvas.dim() != 2 or canvas.dtype != torch.long:
        raise ValueError(f"canvas must be int64 ids of shape (batch, length); got {_describe(canvas)}")
    threshold = require_float("threshold", threshold, minimum=0.0, maximum=1.0)
    if threshold <= 0.0:
        raise ValueError("threshold must be above 0 (0 would commit every prediction at once)")
    if block_length is not None:
        block_length = require_positive_int("block_length", block_length)
    temperature = require_float("temperature", temperature, minimum=0.0)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x = canvas.clone()
    masked0 = x == mask_id
    limit = int(masked0.sum(dim=1).max()) if max_steps is None else require_positive_int("max_steps", max_steps)
    commit_step = torch.full(x.shape, -1, dtype=torch.long, device=x.device)
    confidence = torch.ones(x.shape, dtype=torch.float32, device=x.device)
    trace = SampleTrace(x, commit_step, confidence)
    step = 0
    for s, e in _block_spans(masked0, block_length):
        while bool((x[:, s:e] == mask_id).any()):
            if step >= limit:
                raise RuntimeError(f"threshold sampling did not finish in max_steps={limit} steps")
            logits = model(x)[:, s:e]
            trace.forward_tokens += x.numel()
            predicted, probs = _sample_tokens(logits, temperature, gen)
            p_pred = probs.gather(-1, predicted[..., None]).squeeze(-1)
            still = x[:, s:e] == mask_id
            above = ((p_pred >= threshold) & still).sum(dim=1)
            counts = torch.where(still.any(dim=1), above.clamp(min=1), torch.zeros_like(above))
            block, now = commit_tokens(x[:, s:e], predicted, p_pred, counts, torch.ones_like(still), mask_id)
            x[:, s:e] = block
            commit_step[:, s:e][now] = step
            confidence[:, s:e][now] = p_pred[now]
            step += 1
    trace.tokens, trace.steps = x, step
    return trace


def infill_canvas(tokens: torch.Tensor, start: int, end: int, mask_id: int) -> torch.Tensor:
    """``tokens`` with positions ``start .. end − 1`` replaced by ``mask_id`` (both ends kept)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError("tokens must be int64 ids of shape (batch, length)")
    start = require_int("start", start, minimum=0)
    end = require_int("end", end, minimum=start + 1, maximum=tokens.shape[1])
    canvas = tokens.clone()
    canvas[:, start:end] = require_int("mask_id", mask_id, minimum=0)
    return canvas


@torch.no_grad()
def ar_generate(model: TinyLM, prompt: torch.Tensor, new_tokens: int, *, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The autoregressive baseline: prefill ``prompt (B, P)``, then ``new_tokens`` cached decode steps.

    Returns ``(B, P + new_tokens)``. Temperature 0 is greedy; above 0 samples from the tempered softmax.
    """
    if not isinstance(model, TinyLM):
        raise TypeError(f"model must be a causal TinyLM, got {type(model).__name__}")
    new_tokens = require_int("new_tokens", new_tokens, minimum=0)
    temperature = require_float("temperature", temperature, minimum=0.0)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    logits, states = model.prefill(prompt)
    out = [prompt]
    position = prompt.shape[1]
    for i in range(new_tokens):
        if temperature == 0.0:
            token = logits.argmax(dim=-1)
        else:
            token = torch.multinomial((logits.float() / temperature).softmax(-1).cpu(), 1,
                                      generator=gen).squeeze(1).to(prompt.device)
        out.append(token[:, None])
        if i + 1 < new_tokens:
            logits, states = model.decode_step(token, states, position)
            position += 1
    return torch.cat(out, dim=1)
