"""Speculative decoding: the autoregressive side's answer to parallel decoding.

A cheap **draft** model proposes ``k`` tokens one after another; the **target** (the AR model) scores all of them
in *one* call (its KV cache plus ``k + 1`` new positions), and an acceptance rule keeps a prefix of the draft and
adds one token of its own. The rule (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023,
arXiv:2302.01318) makes the output distribution *exactly* the target's: a drafted token ``x ~ q`` is accepted with
probability ``min(1, p(x) / q(x))``; at the first rejection the replacement is drawn from ``max(p − q, 0)``
normalised; if every drafted token is accepted, one more is drawn from the target's next distribution for free.

* :func:`verify_draft` — the rule on one round's probabilities (what the chapter's exercise builds).
* :func:`round_output_distribution` — the exact distribution of the first token a round emits (the proof that the
  rule is exact, by enumeration: it equals ``p``).
* :class:`NGramDrafter` — the draft model: a character n-gram of the training text, each order backed off to the
  one below (never a zero probability), a dictionary lookup per token.
* :class:`CausalCache` — the target's keys and values, extended by several positions in one call and cut back to
  the accepted prefix.
* :func:`speculative_generate` — the loop, batch 1, at any temperature; it counts target calls and accepted tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labsupport.harness.validation import require_float, require_int, require_positive_int
from labsupport.lm.layers import SoftmaxAttention
from labsupport.lm.model import TinyLM

__all__ = [
    "CausalCache",
    "NGramDrafter",
    "SpeculativeTrace",
    "round_output_distribution",
    "speculative_generate",
    "verify_draft",
]

Drafter = Callable[[torch.Tensor], torch.Tensor]


def _require_probs(name: str, value: object, rows: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 2:
        got = f"{value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else \
            type(value).__name__
        raise ValueError(f"{name} must be float probabilities of shape (positions, vocab); got {got}")
    if rows is not None and value.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows; got {value.shape[0]}")
    if bool((value < 0).any()) or not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must hold finite probabilities ≥ 0")
    return value


def verify_draft(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, u: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One round's acceptance rule: ``(n_accepted, next_probs)``.

    Args:
        p: ``(k + 1, V)`` the target's distributions at the ``k`` drafted positions and the one after them.
        q: ``(k, V)`` the draft's distributions the drafted tokens were drawn from.
        drafted: ``(k,)`` int64, the drafted tokens.
        u: ``(k,)`` uniforms in [0, 1), one per drafted token.

    Returns:
        ``n_accepted`` (int64, 0-dim): drafted token ``i`` is accepted while ``u[i] < p[i, x] / q[i, x]``;
        ``next_probs (V,)``: where the round's own token is drawn from — ``max(p[n] − q[n], 0)`` normalised at
        the first rejection ``n``, or ``p[k]`` when all ``k`` were accepted.
    """
    if not isinstance(drafted, torch.Tensor) or drafted.dtype != torch.long or drafted.dim() != 1:
        raise ValueError("drafted must be int64 token ids of shape (k,)")
    k = drafted.shape[0]
    q = _require_probs("q", q, rows=k)
    p = _require_probs("p", p, rows=k + 1)
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"p and q must share the vocabulary; got {p.shape[1]} and {q.shape[1]} columns")
    if not isinstance(u, torch.Tensor) or tuple(u.shape) != (k,):
        raise ValueError(f"u must be a tensor of shape ({k},), one uniform per drafted token")
    rows = torch.arange(k)
    p_x, q_x = p[rows, drafted], q[rows, drafted]
    accepted = u.to(p.dtype) * q_x < p_x              # u < p/q, written without dividing (q_x > 0 for a drawn x)
    rejected = (~accepted).nonzero()
    if rejected.numel() == 0:
        return torch.tensor(k), p[k].clone()
    n = int(rejected[0, 0])
    residual = (p[n] - q[n]).clamp(min=0)
    total = residual.sum()
    return torch.tensor(n), residual / total if float(total) > 0 else p[n].clone()


def round_output_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The exact distribution of the first token one round emits, when ``x ~ q`` is drafted and checked against ``p``.

    ``p, q`` are ``(V,)``. Enumerates the drafted token: it is emitted with probability ``q(x) min(1, p(x)/q(x))``,
    and with the remaining probability the token is drawn from ``max(p − q, 0)`` normalised. The result equals
    ``p`` (Leviathan et al., Theorem 1); the test suite holds it to rounding for random ``p, q``.
    """
    if p.dim() != 1 or q.shape != p.shape:
        raise ValueError("p and q must be (V,) probability vectors of the same size")
    accept = torch.minimum(q, p)                       # q(x) · min(1, p(x)/q(x))
    residual = (p - q).clamp(min=0)
    reject = 1 - accept.sum()
    total = residual.sum()
    return accept + (reject * residual / total if float(total) > 0 else torch.zeros_like(p))


class NGramDrafter:
    """A character n-gram of ``tokens``: ``drafter(context (n,)) -> (V,)`` float64 next-token probabilities.

    Order ``n`` looks at the last ``n − 1`` tokens. Each order is a Dirichlet smoothing of its counts towards the
    order below, ``q_n(x | c) = (N(c, x) + β · q_{n−1}(x | c')) / (N(c) + β)`` with ``c'`` the context without its
    oldest token, down to the uniform distribution: never a zero, so ``p/q`` is always defined. Lookups are
    memoised per context.
    """

    def __init__(self, tokens: torch.Tensor, vocab_size: int, *, order: int = 4, beta: float = 2.0) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 1:
            raise ValueError("tokens must be a 1-D int64 tensor of ids (the training text)")
        self.vocab_size = require_positive_int("vocab_size", vocab_size)
        self.order = require_int("order", order, minimum=1, maximum=6)
        self.beta = require_float("beta", beta, positive=True)
        if tokens.numel() < self.order or bool(((tokens < 0) | (tokens >= self.vocab_size)).any()):
            raise ValueError(f"tokens must hold at least {self.order} ids in 0..{self.vocab_size - 1}")
        v = self.vocab_size
        self._tables: list[tuple[dict[int, int], torch.Tensor]] = []
        ids = tokens.long()
        for n in range(1, self.order):                 # contexts of length n = 1 .. order − 1
            context = torch.zeros(ids.numel() - n, dtype=torch.long)
            for j in range(n):
                context = context * v + ids[j:ids.numel() - n + j]
            nxt = ids[n:]
            keys, inverse = torch.unique(context, return_inverse=True)
            counts = torch.zeros(keys.numel(), v, dtype=torch.float64)
            counts.index_put_((inverse, nxt), torch.ones(nxt.numel(), dtype=torch.float64), accumulate=True)
            self._tables.append(({int(key): row for row, key in enumerate(keys.tolist())}, counts))
        self._unigram = torch.bincount(ids, minlength=v).double()
        self._memo: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, context: torch.Tensor) -> torch.Tensor:
        """Next-token probabilities ``(V,)`` float64 after ``context`` (1-D ids; only its last ``order − 1`` used)."""
        tail = tuple(int(t) for t in context[-(self.order - 1):].tolist()) if self.order > 1 else ()
        cached = self._memo.get(tail)
        if cached is not None:
            return cached
        v = self.vocab_size
        q = (self._unigram + self.beta / v) / (self._unigram.sum() + self.beta)
        for n in range(1, len(tail) + 1):
            key = 0
            for t in tail[len(tail) - n:]:
                key = key * v + t
            index, counts = self._tables[n - 1]
            row = index.get(key)
            if row is None:
                break                                  # unseen context: keep the lower order's answer
            seen = counts[row]
            q = (seen + self.beta * q) / (seen.sum() + self.beta)
        self._memo[tail] = q
        return q


class CausalCache:
    """Keys and values of a causal softmax-attention :class:`~labsupport.lm.model.TinyLM`, ``(B, H, T, D)`` per layer.

    :meth:`extend` runs several new positions in one call, each attending to the cache and to the new positions up
    to itself, and appends their keys and values; :meth:`truncate` cuts the cache back (rejected draft tokens).
    Its logits equal the uncached forward's at the same positions (a test holds them to float rounding).
    """

    def __init__(self, model: TinyLM) -> None:
        if not isinstance(model, TinyLM) or not model.causal or model.pos is None:
            raise TypeError("CausalCache needs a causal TinyLM with learned positions (the chapter's AR model)")
        for i, block in enumerate(model.blocks):
            if not isinstance(block.mixer, SoftmaxAttention) or block.conv is not None:
                raise TypeError(f"layer {i}: CausalCache supports SoftmaxAttention mixers without a short "
                                f"convolution, got {type(block.mixer).__name__}")
        self.model = model
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        """Positions held."""
        return self.keys[0].shape[2] if self.keys else 0

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run ``tokens (B, n)`` at positions ``length .. length + n − 1``; return their logits ``(B, n, V)``."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
            raise ValueError("tokens must be int64 ids of shape (batch, new positions)")
        lm, start, n = self.model, self.length, tokens.shape[1]
        if start + n > lm.max_len:
            raise ValueError(f"positions up to {start + n - 1} exceed the model's max_len={lm.max_len}")
        x = lm.embed(tokens) + lm.pos(torch.arange(start, start + n, device=tokens.device))
        allowed = torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None]   # (n, start + n)
        for index, block in enumerate(lm.blocks):
            mixer = block.mixer
            q, k, v = mixer.qkv(block.norm1(x)).split(mixer.d_model, dim=-1)
            shape = (x.shape[0], n, mixer.n_heads, mixer.head_dim)
            q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
            if index < len(self.keys):
                k = torch.cat([self.keys[index], k], dim=2)
                v = torch.cat([self.values[index], v], dim=2)
                self.keys[index], self.values[index] = k, v
            else:
                self.keys.append(k)
                self.values.append(v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            x = x + mixer.out(y.transpose(1, 2).reshape(x.shape[0], n, mixer.d_model))
            x = block._channel(x)
        return lm.head(lm.norm(x))

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (drop rejected drafts' keys and values)."""
        length = require_int("length", length, minimum=0, maximum=self.length)
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]


@dataclass
class SpeculativeTrace:
    """What :func:`speculative_generate` did.

    Attributes:
        tokens: ``(1, P + new_tokens)`` the prompt and the generated tokens.
        target_calls: calls of the target after the prompt's prefill (one per round).
        drafted, accepted: draft tokens proposed and accepted, summed over rounds.
    """

    tokens: torch.Tensor
    target_calls: int
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the target accepted."""
        return self.accepted / max(1, self.drafted)


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probabilities (float64) at ``temperature``; temperature 0 is the argmax's one-hot."""
    if temperature == 0.0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    return (logits.double() / temperature).softmax(dim=-1)


@torch.no_grad()
def speculative_generate(target: TinyLM, drafter: Drafter, prompt: torch.Tensor, new_tokens: int, *,
                         draft_length: int = 4, temperature: float = 1.0,
                         generator: torch.Generator | None = None) -> SpeculativeTrace:
    """Generate ``new_tokens`` after ``prompt (1, P)`` from the target's distribution, drafting ``draft_length`` ahead.

    Each round: the last emitted token is pending (not yet in the target's cache); the drafter proposes up to
    ``draft_length`` tokens, each drawn from ``drafter(context)`` at the same temperature; one
    :meth:`CausalCache.extend` over the pending token and the drafts gives the target's distributions;
    :func:`verify_draft` keeps a prefix and names the distribution of the round's own token. The output is
    distributed exactly as :func:`~labsupport.diffusion.sampling.ar_generate` at the same temperature (not the
    same draws). Random draws, in order per round: the drafts, one uniform per draft, then the round's own token.
    """
    if not isinstance(prompt, torch.Tensor) or prompt.dtype != torch.long or prompt.dim() != 2 \
            or prompt.shape[0] != 1 or prompt.shape[1] < 1:
        raise ValueError("prompt must be int64 ids of shape (1, P) with P ≥ 1 (speculative decoding here is batch 1)")
    if not callable(drafter):
        raise TypeError("drafter must be a callable context (n,) -> next-token probabilities (V,)")
    new_tokens = require_int("new_tokens", new_tokens, minimum=0)
    draft_length = require_positive_int("draft_length", draft_length)
    temperature = require_float("temperature", temperature, minimum=0.0)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    total = prompt.shape[1] + new_tokens
    if total > target.max_len:
        raise ValueError(f"prompt + new_tokens = {total} exceeds the target's max_len={target.max_len}")
    cache = CausalCache(target)
    if prompt.shape[1] > 1:
        cache.extend(prompt[:, :-1])
    out = prompt[0].tolist()
    calls = drafted_total = accepted_total = 0
    while len(out) < total:
        k = min(draft_length, total - len(out))
        context = torch.tensor(out)
        drafts, q_rows = [], []
        for _ in range(k):
            q = drafter(context)
            if temperature == 0.0:
                q_t = F.one_hot(q.argmax(), q.shape[0]).double()
            else:
                q_t = q.double().pow(1.0 / temperature)
                q_t = q_t / q_t.sum()
            token = int(torch.multinomial(q_t.float(), 1, generator=gen))
            drafts.append(token)
            q_rows.append(q_t)
            context = torch.cat([context, torch.tensor([token])])
        pending = out[-1]
        logits = cache.extend(torch.tensor([[pending] + drafts]))[0]       # (k + 1, V): the target, one call
        calls += 1
        p = _tempered(logits, temperature)
        u = torch.rand(k, generator=gen, dtype=torch.float64)
        n, next_probs = verify_draft(p, torch.stack(q_rows), torch.tensor(drafts), u)
        n = int(n)
        drafted_total += k
        accepted_total += n
        out += drafts[:n]
        cache.truncate(len(out))              # keep the pending token and the accepted drafts; drop the rejected
        if len(out) < total:
            out.append(int(torch.multinomial(next_probs.float(), 1, generator=gen)))
    return SpeculativeTrace(torch.tensor([out[:total]]), calls, drafted_total, accepted_total)
