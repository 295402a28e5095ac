"""Token merging (ToMe, Bolya et al., arXiv:2210.09461): bipartite soft matching, size-weighted merges.

One merge step on tokens ``x (B, N, C)`` with sizes ``size (B, N)`` (how many original patches each token
stands for) and a similarity metric ``metric (B, N, C')`` (ToMe uses the attention keys, averaged over heads):

1. split the tokens alternately: set A = even positions ``0, 2, 4, …``, set B = odd positions;
2. cosine similarity of every A token to every B token; each A token's best B match is its edge;
3. keep the ``r`` edges with the highest similarity; those ``r`` A tokens merge into their B partners
   (several may merge into one B token);
4. a merged token is the **size-weighted** mean of its members, and its size is their sum, so
   ``Σ size·x`` over the sequence is unchanged;
5. the ``r`` merged A tokens leave the sequence; every other token keeps its place (this module's order
   convention — the paper's code reorders, which does not matter to a bidirectional encoder).

**Proportional attention**: a token of size ``s`` stands for ``s`` patches, so attention adds ``log s`` to the
scores of every key: ``softmax(q·k/√d + log s)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from labsupport.harness.validation import require_int, require_tensor

__all__ = ["bipartite_matches", "merge_sources", "merge_tokens", "tome_merge"]


def _require_tokens(x: object, size: object) -> tuple[torch.Tensor, torch.Tensor]:
    x = require_tensor("x", x, ndim=3)
    size = require_tensor("size", size, ndim=2)
    if size.shape != x.shape[:2]:
        raise ValueError(f"size must have shape (B, N) = {tuple(x.shape[:2])}, got {tuple(size.shape)}")
    return x, size


def bipartite_matches(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src, dst)``, both ``(B, r)`` int64 positions in the sequence: A token ``src`` merges into B token ``dst``.

    ``src`` lists the chosen A tokens from the most similar edge down.
    """
    metric = require_tensor("metric", metric, ndim=3)
    n = metric.shape[1]
    r = require_int("r", r, minimum=0)
    if r > n // 2:
        raise ValueError(f"r={r}: a sequence of {n} tokens can merge at most {n // 2} (its A tokens into its B tokens)")
    unit = F.normalize(metric, dim=-1)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)          # (B, |A|, |B|) cosine similarities
    best, partner = scores.max(dim=-1)                                # each A token's best B token
    order = best.argsort(dim=-1, descending=True, stable=True)[:, :r]  # the r strongest edges
    src = 2 * order
    dst = 2 * partner.gather(1, order) + 1
    return src, dst


def merge_tokens(x: torch.Tensor, size: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge token ``src[b, i]`` into ``dst[b, i]`` (size-weighted mean, sizes added); drop the ``src`` tokens.

    Returns ``(x (B, N − r, C), size (B, N − r))``, the surviving tokens in their original order.
    """
    x, size = _require_tokens(x, size)
    src, dst = require_tensor("src", src, ndim=2), require_tensor("dst", dst, ndim=2)
    b, n, c = x.shape
    r = src.shape[1]
    if r == 0:
        return x, size
    weight = size.to(x.dtype)
    total = x * weight[..., None]                                     # Σ size·x per token
    total = total.scatter_add(1, dst[..., None].expand(b, r, c), total.gather(1, src[..., None].expand(b, r, c)))
    new_size = weight.scatter_add(1, dst, weight.gather(1, src))
    keep = torch.ones(b, n, dtype=torch.bool, device=x.device)
    keep.scatter_(1, src, False)
    kept_total = total[keep].view(b, n - r, c)
    kept_size = new_size[keep].view(b, n - r)
    return kept_total / kept_size[..., None], kept_size.to(size.dtype)


def tome_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ToMe step: :func:`bipartite_matches` on ``metric``, then :func:`merge_tokens`."""
    x, size = _require_tokens(x, size)
    metric = require_tensor("metric", metric, ndim=3)
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"metric must have shape (B, N, ·) with (B, N) = {tuple(x.shape[:2])}, "
                         f"got {tuple(metric.shape)}")
    src, dst = bipartite_matches(metric, r)
    return merge_tokens(x, size, src, dst)


def merge_sources(source: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Follow a merge step for bookkeeping: ``source (B, P)`` maps each original patch to its current token.

    Returns the map after the step (tokens renumbered in the surviving order).
    """
    source = require_tensor("source", source, ndim=2)
    n_tokens = require_int("n_tokens", n_tokens, minimum=1)
    b = source.shape[0]
    target = torch.arange(n_tokens, device=source.device).expand(b, n_tokens).clone()
    target.scatter_(1, src, dst)                                      # a merged token now lives in its partner
    keep = torch.ones(b, n_tokens, dtype=torch.bool, device=source.device)
    keep.scatter_(1, src, False)
    renumber = keep.long().cumsum(dim=1) - 1                          # old position -> new position
    return renumber.gather(1, target.gather(1, source))
