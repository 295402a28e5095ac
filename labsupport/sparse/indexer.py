"""DeepSeek Sparse Attention's lightning indexer, trained to imitate the dense attention it replaces.

DeepSeek-V3.2 puts a small scorer in front of attention: a few *index heads* with ReLU scores,

    I[t, s] = Σ_j w[t, j] · ReLU(q[t, j] · k[s]),

(queries ``q`` and weights ``w`` per index head, one shared key ``k`` per token), cheap enough to run over the
whole cache in low precision; attention then reads only the top-``k`` tokens of ``I[t, :]``. The indexer is first
trained, with the model frozen, to match the dense attention distribution (a KL divergence), which is what
:func:`train_indexer` does on this course's model.

* :class:`LightningIndexer` — the scorer (:meth:`~LightningIndexer.scores` gives causal ``(B, L, L)`` scores);
* :func:`indexer_kl` — ``KL(target ‖ softmax(I))`` over the causal keys of every query;
* :func:`topk_mask` — each query's top-``k`` keys by index score (itself always included);
* :func:`train_indexer` — fit an indexer to one attention layer of a trained model;
* :func:`indexer_selection` — run a model with each indexed layer reading only its top-``k`` keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.validation import require_int, require_positive_int, require_tensor
from labsupport.lm.tasks import TaskBatch
from labsupport.sparse.mixers import SparseAttention

__all__ = ["LightningIndexer", "indexer_kl", "indexer_selection", "topk_mask", "train_indexer"]


class LightningIndexer(nn.Module):
    """``n_heads`` ReLU index heads of width ``head_dim`` over inputs of width ``d_model``."""

    def __init__(self, d_model: int, n_heads: int = 4, head_dim: int = 16) -> None:
        super().__init__()
        d_model = require_positive_int("d_model", d_model)
        self.n_heads = require_positive_int("n_heads", n_heads)
        self.head_dim = require_positive_int("head_dim", head_dim)
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k = nn.Linear(d_model, head_dim, bias=False)
        self.w = nn.Linear(d_model, n_heads, bias=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Causal index scores ``(B, L, L)`` for inputs ``x (B, L, d_model)``; ``−inf`` above the diagonal."""
        x = require_tensor("x", x, ndim=3)
        b, length, _ = x.shape
        q = self.q(x).view(b, length, self.n_heads, self.head_dim)
        k = self.k(x)  # (B, L, d): one key per token, shared by the index heads
        per_head = F.relu(torch.einsum("bthd,bsd->bths", q, k))  # (B, L, H, L)
        scores = torch.einsum("bth,bths->bts", self.w(x), per_head)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf"))


def indexer_kl(index_scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over queries of ``KL(target ‖ softmax(index_scores))``; both ``(B, L, L)``, causal."""
    index_scores = require_tensor("index_scores", index_scores, ndim=3)
    target = require_tensor("target", target, ndim=3)
    if index_scores.shape != target.shape:
        raise ValueError(f"index_scores and target must have the same shape (B, L, L); got "
                         f"{tuple(index_scores.shape)} and {tuple(target.shape)}")
    log_p = torch.log_softmax(index_scores, dim=-1)
    terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - log_p), torch.zeros_like(target))
    return terms.sum(dim=-1).mean()


def topk_mask(index_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each query's ``k`` highest-scoring causal keys, itself included: a bool ``(B, L, L)``.

    Causal by construction: keys after the query are never chosen, whatever their scores (finite or not).
    """
    index_scores = require_tensor("index_scores", index_scores, ndim=3)
    k = require_positive_int("k", k)
    length = index_scores.shape[-1]
    if index_scores.shape[-2] != length:
        raise ValueError(f"index_scores must be square (B, L, L), one row per query; got {tuple(index_scores.shape)}")
    causal = torch.ones(length, length, dtype=torch.bool, device=index_scores.device).tril()
    diagonal = torch.eye(length, dtype=torch.bool, device=index_scores.device)
    ranked = index_scores.masked_fill(~causal, float("-inf")).masked_fill(diagonal, float("inf"))
    top = ranked.topk(min(k, length), dim=-1).indices
    chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top, True)
    return chosen & causal & ~torch.isneginf(ranked)


def train_indexer(model: nn.Module, layer: int, make_batch: Callable[[torch.Generator], TaskBatch], *,
                  steps: int = 200, lr: float = 3e-3, n_heads: int = 4, head_dim: int = 16,
                  seed: int = 0) -> tuple[LightningIndexer, list[float]]:
    """Fit a :class:`LightningIndexer` to the head-averaged attention of ``model``'s ``layer``-th sparse layer.

    The model stays frozen; the indexer reads the same inputs as that attention layer. Returns the indexer and
    its loss (KL) at every step.
    """
    layers = [m for m in model.modules() if isinstance(m, SparseAttention)]
    attention = layers[require_int("layer", layer, minimum=-len(layers), maximum=len(layers) - 1)]
    steps = require_positive_int("steps", steps)
    torch.manual_seed(seed)
    indexer = LightningIndexer(attention.d_model, n_heads, head_dim)
    optimizer = torch.optim.Adam(indexer.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    captured: dict[str, torch.Tensor] = {}
    hook = attention.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0].detach()))
    attention.record_attention = True
    losses = []
    try:
        model.eval()
        for _ in range(steps):
            batch = make_batch(generator)
            with torch.no_grad():
                model(batch.inputs)
            target = attention.last_attention.mean(dim=1)  # (B, L, L), averaged over heads
            loss = indexer_kl(indexer.scores(captured["x"]), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        hook.remove()
        attention.record_attention = False
    return indexer.eval(), losses


@contextmanager
def indexer_selection(model: nn.Module, indexers: Mapping[int, LightningIndexer], k: int) -> Iterator[None]:
    """Inside the block, sparse layer ``i`` of ``model`` attends only to the top-``k`` keys its indexer picks.

    Each indexed layer gets a forward pre-hook that scores its own input and sets a per-sequence mask
    ``(B, 1, L, L)``; the masks and hooks are removed on exit.
    """
    k = require_positive_int("k", k)
    layers = [m for m in model.modules() if isinstance(m, SparseAttention)]
    handles = []

    def select(indexer: LightningIndexer) -> Callable:
        def hook(module: SparseAttention, inputs: tuple[torch.Tensor, ...]) -> None:
            with torch.no_grad():
                module.static_mask = topk_mask(indexer.scores(inputs[0]), k)[:, None]
        return hook

    try:
        for index, indexer in indexers.items():
            handles.append(layers[index].register_forward_pre_hook(select(indexer)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for index in indexers:
            layers[index].static_mask = None
