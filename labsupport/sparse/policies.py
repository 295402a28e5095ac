"""Decode-time KV policies: which cached tokens a step keeps, and which it reads.

A :class:`CachePolicy` names a policy and its budget; a :class:`PolicyKVCache` is one attention layer's
cache under that policy, for a batch of sequences and all heads at once (each head keeps its own tokens).
Every decode step first evicts one token per head if the cache is full (``budget`` tokens), then appends the
new key and value, attends, and updates the policy's statistics: a step never reads more than ``budget``
tokens, and the cache stays bounded.

==========  ================================================================================================
policy      keeps (budget ``n``)
==========  ================================================================================================
``full``    everything (the baseline; unbounded)
``window``  the ``n`` most recent tokens
``sinks``   the first ``sinks`` tokens + the ``n − sinks`` most recent (StreamingLLM, arXiv:2309.17453)
``h2o``     the ``recent`` most recent + the "heavy hitters" with the largest attention accumulated over
            all steps so far (H2O, arXiv:2306.14048); the victim is :func:`h2o_victim`
``tova``    evicts the token the *current* query attends to least, averaged over the layer's heads, the
            same token from every head (TOVA, Oren et al., arXiv:2401.06104; ``tova_per_head=True``: each
            head its own); the victim is :func:`tova_victim`
``quest``   everything, but each step *reads* only the top ``n / page`` pages by Quest's bound
``snapkv``  the prompt (its first ``prompt`` tokens) compressed once, when it ends, to ``n`` tokens: the last
            ``observe`` prompt tokens plus the ``n − observe`` earlier ones that those tokens' queries attended
            to most (summed over them, smoothed by an average pool of width ``kernel``), per head (SnapKV, Li
            et al., arXiv:2404.14469); every later token is kept, so the cache holds ``n + generated`` tokens
==========  ================================================================================================

Positions for rotary embeddings: ``"original"`` (the token's position in the text; keys are stored rotated
once) or ``"cache"`` (its rank among the kept tokens, as StreamingLLM assigns them: the cache never shows the
model a distance it did not see in training; keys are stored un-rotated and rotated at every step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from labsupport.harness.validation import require_choice, require_float_tensor, require_int, require_positive_int
from labsupport.sparse.selection import quest_token_mask

__all__ = ["POLICIES", "CachePolicy", "PolicyKVCache", "h2o_victim", "tova_victim"]

POLICIES = ("full", "window", "sinks", "h2o", "tova", "quest", "snapkv")

#: ``rotate(x, positions) -> x`` applied to queries and keys, ``x (..., T, D)``, ``positions (..., T)``.
Rotation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CachePolicy:
    """A decode-time KV policy and its budget (see the module's table).

    Attributes:
        name: one of :data:`POLICIES`.
        budget: tokens kept (``quest``: tokens read per step); ignored by ``full``.
        sinks: first tokens always kept (``sinks``).
        recent: most recent tokens always kept (``h2o``; default half the budget).
        page: page size in tokens (``quest``).
        positions: ``"original"`` or ``"cache"`` (default: ``"cache"`` for ``window`` and ``sinks``,
            ``"original"`` otherwise).
        tova_per_head: ``tova`` only: each head evicts its own token instead of the head-averaged choice.
        prompt, observe, kernel: ``snapkv`` only: the prompt's length, its observation window, the pooling width.
    """

    name: str = "full"
    budget: int = 0
    sinks: int = 4
    recent: int | None = None
    page: int = 16
    positions: str | None = None
    tova_per_head: bool = False
    prompt: int = 0
    observe: int = 8
    kernel: int = 5

    def __post_init__(self) -> None:
        require_choice("name", self.name, POLICIES)
        require_int("budget", self.budget, minimum=0)
        require_int("sinks", self.sinks, minimum=0)
        require_positive_int("page", self.page)
        if self.positions is not None:
            require_choice("positions", self.positions, ("original", "cache"))
        if self.name != "full" and self.budget < 2:
            raise ValueError(f"policy {self.name!r} needs a budget of at least 2 tokens, got {self.budget}")
        if self.name == "sinks" and self.sinks >= self.budget:
            raise ValueError(f"sinks ({self.sinks}) must leave room for a window in the budget ({self.budget})")
        if self.name == "quest" and self.budget < self.page:
            raise ValueError(f"quest reads whole pages: budget ({self.budget}) must be at least page ({self.page})")
        if self.recent is not None:
            require_int("recent", self.recent, minimum=1, maximum=max(1, self.budget - 1))
        if self.name == "snapkv":
            require_positive_int("prompt", self.prompt)
            require_positive_int("observe", self.observe)
            require_positive_int("kernel", self.kernel)
            if self.observe >= self.budget:
                raise ValueError(f"snapkv keeps its observation window ({self.observe}) inside the budget "
                                 f"({self.budget}): the budget must be larger")

    @property
    def position_mode(self) -> str:
        if self.positions is not None:
            return self.positions
        return "cache" if self.name in ("window", "sinks") else "original"

    @property
    def bounded(self) -> bool:
        """True when the cache never holds more than ``budget`` tokens."""
        return self.name in ("window", "sinks", "h2o", "tova")

    @property
    def recent_kept(self) -> int:
        return self.recent if self.recent is not None else max(1, self.budget // 2)

    def label(self) -> str:
        if self.name == "full":
            return "full cache"
        extra = {"sinks": f", {self.sinks} sinks", "quest": f", pages of {self.page}",
                 "h2o": f", {self.recent_kept} recent",
                 "snapkv": f" of a {self.prompt}-token prompt, window {self.observe}"}.get(self.name, "")
        return f"{self.name} ({self.budget} tokens{extra})"


def h2o_victim(accumulated: torch.Tensor, positions: torch.Tensor, newest: int, recent: int) -> torch.Tensor:
    """H2O's eviction choice: per ``(batch, head)``, the slot to evict.

    Among the filled slots (``positions ≥ 0``) outside the recent window (``positions ≤ newest − recent``),
    the one with the smallest accumulated attention; when every filled slot is recent, the oldest.

    Args:
        accumulated: ``(..., C)`` attention each slot's token has received, summed over the steps so far.
        positions: ``(..., C)`` int64, the token's position in the text, ``−1`` for an empty slot.
        newest: position of the token about to enter the cache. recent: the window the policy protects,
            the incoming token included (so positions ``> newest − recent`` are never evicted).

    Returns:
        ``(...)`` int64 slot indices.
    """
    require_float_tensor("accumulated", accumulated)
    if not isinstance(positions, torch.Tensor) or positions.shape != accumulated.shape:
        raise ValueError("positions must be an int64 tensor with the shape of accumulated")
    filled = positions >= 0
    candidate = filled & (positions <= newest - recent)
    by_score = torch.where(candidate, accumulated, torch.full_like(accumulated, float("inf"))).argmin(dim=-1)
    oldest = torch.where(filled, positions, torch.full_like(positions, torch.iinfo(torch.int64).max)).argmin(dim=-1)
    return torch.where(candidate.any(dim=-1), by_score, oldest)


def tova_victim(attention: torch.Tensor, positions: torch.Tensor, newest: int, *, per_head: bool = False) -> torch.Tensor:
    """TOVA's eviction choice: the filled slot, other than the newest token's, that the current query attends least.

    TOVA (Oren et al., arXiv:2401.06104) averages the current query's attention over the heads of a layer and
    drops the same token from every head (the authors' code, ``src/tova_cache.py``, takes the mean over
    dimension 1, the heads). ``per_head=True`` is the variant that lets each head drop its own token.

    Args:
        attention: ``(B, H, C)`` the current query's attention over the slots.
        positions: ``(B, H, C)`` int64 token positions, ``−1`` for an empty slot; with ``per_head=False`` the
            heads must hold the same tokens in the same slots (as a TOVA cache does).
        newest: position of the token that is never evicted (the one the query belongs to).

    Returns:
        ``(B, H)`` int64 slot indices (with ``per_head=False``, one slot repeated over the heads).
    """
    require_float_tensor("attention", attention)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be an int64 tensor shaped like attention, got {type(positions).__name__}")
    if positions.shape != attention.shape or positions.dim() != 3:
        raise ValueError(f"positions must have the shape of attention, (B, H, C) = {tuple(attention.shape)}; "
                         f"got {tuple(positions.shape)}")
    newest = require_int("newest", newest)
    candidate = (positions >= 0) & (positions != newest)
    if per_head:
        return torch.where(candidate, attention, torch.full_like(attention, float("inf"))).argmin(dim=-1)
    if not torch.equal(positions, positions[:, :1].expand_as(positions)):
        raise ValueError("per_head=False needs every head to hold the same tokens in the same slots")
    mean = attention.mean(dim=1)  # (B, C), averaged over the heads as in the paper
    victim = torch.where(candidate[:, 0], mean, torch.full_like(mean, float("inf"))).argmin(dim=-1)
    return victim[:, None].expand(attention.shape[0], attention.shape[1])


class PolicyKVCache:
    """One attention layer's KV cache under a :class:`CachePolicy`, for ``(batch, heads)`` at once.

    Slots: ``keys, values (B, H, C, D)``, ``positions (B, H, C)`` (``−1`` = empty) and
    ``accumulated (B, H, C)`` (H2O's statistic). :meth:`attend` runs one decode step.
    """

    def __init__(self, policy: CachePolicy, batch: int, heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", record: bool = False) -> None:
        if not isinstance(policy, CachePolicy):
            raise TypeError(f"policy must be a CachePolicy, got {type(policy).__name__}")
        self.policy = policy
        capacity = policy.budget if policy.bounded else 64
        shape = (batch, heads, capacity)
        self.keys = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full(shape, -1, dtype=torch.long, device=device)
        self.accumulated = torch.zeros(shape, dtype=dtype, device=device)
        self.steps = 0
        self.last_attention: torch.Tensor | None = None  # (B, H, C), the previous step's (TOVA)
        self.tokens_read: list[int] = []  # tokens whose K and V each step read (per head)
        self.record = bool(record)
        self.read_log: list[torch.Tensor] = []  # with record: positions read at each step, (H, T) bool of sequence 0

    @property
    def length(self) -> int:
        """Tokens held per head."""
        return int((self.positions[0, 0] >= 0).sum())

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held (filled slots only)."""
        per_token = 2 * self.keys.shape[-1] * self.keys.element_size()
        return self.keys.shape[0] * self.keys.shape[1] * self.length * per_token

    def _grow(self) -> None:
        extra = self.keys.shape[2]
        pad = lambda t, value: torch.nn.functional.pad(t, (0, 0, 0, extra) if t.dim() == 4 else (0, extra), value=value)  # noqa: E731
        self.keys, self.values = pad(self.keys, 0.0), pad(self.values, 0.0)
        self.positions, self.accumulated = pad(self.positions, -1), pad(self.accumulated, 0.0)

    def _rope_positions(self) -> torch.Tensor:
        """Each slot's rank among the filled slots, in text order (positions inside the cache)."""
        order = torch.where(self.positions >= 0, self.positions, torch.iinfo(torch.int64).max)
        return order.argsort(dim=-1).argsort(dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotate: Rotation | None = None) -> torch.Tensor:
        """One decode step: ``q, k, v (B, H, 1, D)`` of the new token (un-rotated) → output ``(B, H, 1, D)``."""
        b, h, d = self.keys.shape[0], self.keys.shape[1], self.keys.shape[-1]
        for name, t in (("q", q), ("k", k), ("v", v)):
            require_float_tensor(name, t)
            if tuple(t.shape) != (b, h, 1, d):
                raise ValueError(f"attend runs one token per step: {name} must be (B, H, 1, D) = {(b, h, 1, d)}, "
                                 f"got {tuple(t.shape)}; feed a prompt one token at a time")
        position = self.steps
        if self.policy.name == "snapkv" and position == self.policy.prompt:
            self._compress()  # the prompt has ended: keep `budget` of its tokens, once
        if self.policy.bounded and self.length >= self.policy.budget:
            self._evict(position)  # make room first: a step never reads more than `budget` tokens
        free = self.positions < 0
        if not bool(free.any(dim=-1).all()):
            self._grow()
            free = self.positions < 0
        slot = free.to(torch.int8).argmax(dim=-1, keepdim=True)  # (B, H, 1): first free slot per head
        self.keys.scatter_(2, slot[..., None].expand_as(k), k)
        self.values.scatter_(2, slot[..., None].expand_as(v), v)
        self.positions.scatter_(2, slot, torch.full_like(slot, position))
        self.accumulated.scatter_(2, slot, torch.zeros_like(slot, dtype=self.accumulated.dtype))
        filled = self.positions >= 0
        keys, query = self.keys, q
        if rotate is not None and self.policy.position_mode == "original":
            # a token's position never changes: store its key rotated once, rotate only the query
            new_key = rotate(k, torch.full(k.shape[:-1], position, dtype=torch.long, device=k.device))
            self.keys.scatter_(2, slot[..., None].expand_as(k), new_key)
            keys, query = self.keys, rotate(q, torch.full(q.shape[:-1], position, dtype=torch.long, device=q.device))
        elif rotate is not None:  # positions inside the cache: ranks change as tokens leave, so rotate every step
            rope_pos = self._rope_positions()
            keys = rotate(self.keys, rope_pos)
            query = rotate(q, rope_pos.gather(2, slot))  # the new token's own rank
        read = filled
        if self.policy.name == "quest":  # read only the top pages, in text order (the cache never evicts)
            n = self.length
            order = self.positions.masked_fill(~filled, torch.iinfo(torch.int64).max).argsort(dim=-1)[..., :n]
            sorted_keys = keys.gather(2, order[..., None].expand(*order.shape, keys.shape[-1]))
            sorted_read = quest_token_mask(query[:, :, 0], sorted_keys, self.policy.page,
                                           max(1, self.policy.budget // self.policy.page))
            read = torch.zeros_like(filled).scatter_(2, order, sorted_read)
        scores = (query @ keys.transpose(-1, -2))[:, :, 0] / math.sqrt(q.shape[-1])  # (B, H, C)
        scores = scores.masked_fill(~read, float("-inf"))
        attention = torch.softmax(scores, dim=-1)
        out = (attention[:, :, None, :] @ self.values)
        self.tokens_read.append(int(read[0, 0].sum()))
        if self.record:
            row = torch.zeros(read.shape[1], position + 1, dtype=torch.bool, device=read.device)
            heads, slots = torch.nonzero(read[0], as_tuple=True)
            row[heads, self.positions[0, heads, slots]] = True
            self.read_log.append(row)
        if self.policy.name != "snapkv" or self.policy.prompt - self.policy.observe <= position < self.policy.prompt:
            self.accumulated += attention  # SnapKV: only the observation window's queries vote
        self.last_attention = attention
        self.steps += 1
        return out

    def _compress(self) -> None:
        """SnapKV: keep the observation window and the ``budget − observe`` prompt tokens it voted for most."""
        policy = self.policy
        keep_old = policy.budget - policy.observe
        votes = self.accumulated.flatten(0, 1)[:, None, :]  # (B·H, 1, C): before compression, slot = position
        pooled = torch.nn.functional.avg_pool1d(votes, policy.kernel, stride=1, padding=policy.kernel // 2,
                                                count_include_pad=False)[:, 0, : votes.shape[-1]]
        pooled = pooled.view_as(self.accumulated)
        candidate = (self.positions >= 0) & (self.positions < policy.prompt - policy.observe)
        if int(candidate[0, 0].sum()) <= keep_old:
            return
        ranked = pooled.masked_fill(~candidate, float("-inf"))
        top = ranked.topk(keep_old, dim=-1).indices
        keep = torch.zeros_like(candidate).scatter_(-1, top, True) | ~candidate
        self.positions = self.positions.masked_fill(~keep, -1)
        self.accumulated = self.accumulated.masked_fill(~keep, 0.0)

    def _evict(self, incoming: int) -> None:
        """Free one slot per head before the token at position ``incoming`` is appended."""
        name = self.policy.name
        big = torch.iinfo(torch.int64).max
        if name == "h2o":
            victim = h2o_victim(self.accumulated, self.positions, incoming, self.policy.recent_kept)
        elif name == "tova":
            victim = tova_victim(self.last_attention, self.positions, incoming - 1,
                                 per_head=self.policy.tova_per_head)
        else:  # window / sinks: the oldest token that is not a sink
            protected = self.positions < (self.policy.sinks if name == "sinks" else 0)
            age = self.positions.masked_fill((self.positions < 0) | protected, big)
            victim = age.argmin(dim=-1)
        victim = victim[..., None]
        self.positions.scatter_(2, victim, torch.full_like(victim, -1))
        self.accumulated.scatter_(2, victim, torch.zeros_like(victim, dtype=self.accumulated.dtype))
