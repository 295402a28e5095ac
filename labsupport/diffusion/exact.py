"""The bound made exact: a vocabulary and a length small enough to enumerate every sequence and every mask.

A masked-diffusion model run with one token per step (in the continuous-time limit) unmasks positions in a
uniformly random order ``σ``, so its likelihood is a mixture over orders::

    p_θ(x) = E_σ [ Π_k p_θ(x_σ(k) | x_σ(<k)) ]                      (exact NLL = −log of this)
    ELBO   = E_σ [ −Σ_k log p_θ(x_σ(k) | x_σ(<k)) ]  ≥ −log p_θ(x)   (Jensen)

and that expectation is the continuous-time objective ``E_t[(1/t) Σ_masked −log p]``: integrating the binomial
number of masks against ``1/t`` gives weight ``1 / (k · C(L, k))`` to each mask set of size ``k``.

* :func:`all_sequences` — every sequence of ``length`` tokens over ``vocab`` ids.
* :func:`toy_distribution` — a seeded data distribution over them.
* :func:`masked_log_probs` — the table ``log p_θ(x_i | x with the set S masked)`` for every sequence, S, i ∈ S.
* :func:`order_bounds` — exact NLL and exact ELBO from that table, by dynamic programming over mask sets.
* :func:`elbo_by_mask_sets` — the same ELBO from the closed-form weights (an independent check).
* :func:`true_log_prob_table` — the same table for the data distribution itself (a perfect denoiser).
* :func:`estimator_moments` — exact mean and variance of :func:`~labsupport.diffusion.process.elbo_per_sequence`'s
  Monte-Carlo estimate (stratified ``t``, random masks), by quadrature over ``t`` and a sum over mask sets.
* :func:`sample_estimates` — draws of that estimate, read off the table (no network call), to see its spread.
* :func:`truncated_objective` — the exact expectation of the training loss when ``t ~ U(t_min, 1)``.
* :func:`train_toy` — train a tiny denoiser on samples of the distribution, recording the exact numbers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from labsupport.diffusion.process import SCHEDULES, loss_weight, mask_probability
from labsupport.harness.validation import (
    require_choice,
    require_float,
    require_float_tensor,
    require_int,
    require_positive_int,
)
from labsupport.lm.objectives import MaskedTokenObjective
from labsupport.lm.tasks import TaskBatch

__all__ = [
    "ToyRecord",
    "all_sequences",
    "elbo_by_mask_sets",
    "estimator_moments",
    "masked_log_probs",
    "order_bounds",
    "sample_estimates",
    "toy_distribution",
    "train_toy",
    "true_log_prob_table",
    "truncated_objective",
]


def all_sequences(vocab: int, length: int) -> torch.Tensor:
    """All ``vocab ** length`` sequences, ``(vocab ** length, length)`` int64, in lexicographic order."""
    vocab = require_int("vocab", vocab, minimum=2, maximum=16)
    length = require_int("length", length, minimum=1, maximum=8)
    if vocab ** length > 100_000:
        raise ValueError(f"vocab ** length = {vocab ** length} sequences is too many to enumerate (max 100,000)")
    return torch.tensor(list(itertools.product(range(vocab), repeat=length)), dtype=torch.long)


def toy_distribution(vocab: int, length: int, *, seed: int = 0, sharpness: float = 2.0) -> torch.Tensor:
    """A seeded distribution over :func:`all_sequences`: a softmax of ``sharpness``-scaled Gaussian scores.

    Returns float64 probabilities ``(vocab ** length,)`` summing to 1.
    """
    count = all_sequences(vocab, length).shape[0]
    gen = torch.Generator().manual_seed(require_int("seed", seed))
    scores = sharpness * torch.randn(count, generator=gen, dtype=torch.float64)
    return scores.softmax(dim=0)


def _subset_members(length: int) -> torch.Tensor:
    """``(2^L, L)`` bool: position i is in mask set number m."""
    bits = torch.arange(2 ** length)[:, None]
    return ((bits >> torch.arange(length)) & 1).bool()


@torch.no_grad()
def masked_log_probs(model: nn.Module, sequences: torch.Tensor) -> torch.Tensor:
    """``(N, 2^L, L)`` float64: ``log p_θ(x_i | x with positions in set m masked)`` for ``i ∈ m``, 0 elsewhere.

    Mask set ``m`` is a bit mask (bit ``i`` set = position ``i`` masked). ``model`` is a denoiser with a
    ``mask_id`` (a :class:`~labsupport.diffusion.process.MaskedDenoiser`).
    """
    return _log_prob_table(model, sequences)


def _log_prob_table(model: nn.Module, sequences: torch.Tensor) -> torch.Tensor:
    mask_id = getattr(model, "mask_id", None)
    if not isinstance(mask_id, int):
        raise TypeError("model must carry an int attribute mask_id (a MaskedDenoiser)")
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.dtype != torch.long:
        raise ValueError("sequences must be int64 ids of shape (N, L)")
    n, length = sequences.shape
    members = _subset_members(length)  # (M, L)
    noisy = sequences[:, None, :].expand(n, members.shape[0], length).clone()
    noisy[members[None].expand_as(noisy)] = mask_id
    logits = model(noisy.reshape(-1, length)).double()
    log_probs = logits.log_softmax(dim=-1).gather(-1, sequences.repeat_interleave(members.shape[0], 0)[..., None])
    log_probs = log_probs.view(n, members.shape[0], length)
    return torch.where(members[None], log_probs, torch.zeros((), dtype=torch.float64))


def order_bounds(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(nll, elbo)`` per sequence, ``(N,)`` each, from a :func:`masked_log_probs` table.

    ``nll = −log E_σ[Π p]`` and ``elbo = E_σ[−Σ log p]`` over uniformly random unmasking orders, computed by
    recursion over mask sets: from set ``m``, the next position to unmask is uniform over ``m``.
    """
    table = require_float_tensor("table", table, ndim=3)
    n, subsets, length = table.shape
    if subsets != 2 ** length:
        raise ValueError(f"table must be (N, 2^L, L); got {tuple(table.shape)}")
    members = _subset_members(length)
    log_p = [torch.zeros(n, dtype=table.dtype)]  # log P(reveal everything in m, in a random order)
    expected = [torch.zeros(n, dtype=table.dtype)]  # E[-Σ log p] along that random order
    for m in range(1, subsets):
        inside = members[m].nonzero().flatten().tolist()
        terms_p = torch.stack([table[:, m, i] + log_p[m & ~(1 << i)] for i in inside])
        terms_e = torch.stack([-table[:, m, i] + expected[m & ~(1 << i)] for i in inside])
        log_p.append(torch.logsumexp(terms_p, dim=0) - math.log(len(inside)))
        expected.append(terms_e.mean(dim=0))
    return -log_p[-1], expected[-1]


def elbo_by_mask_sets(table: torch.Tensor) -> torch.Tensor:
    """The exact ELBO ``Σ_m Σ_{i∈m} −log p / (|m| · C(L, |m|))`` per sequence: the ``1/t`` weight integrated."""
    table = require_float_tensor("table", table, ndim=3)
    length = table.shape[2]
    sizes = _subset_members(length).sum(dim=1)
    weights = torch.tensor([0.0] + [1.0 / (int(k) * math.comb(length, int(k))) for k in sizes[1:]],
                           dtype=table.dtype)
    return -(table.sum(dim=2) * weights).sum(dim=1)


def true_log_prob_table(probs: torch.Tensor, vocab: int, length: int) -> torch.Tensor:
    """The :func:`masked_log_probs` table of a *perfect* denoiser: ``log p_data(x_i | x's unmasked positions)``.

    ``probs`` is a distribution over :func:`all_sequences` ``(vocab, length)``; every sequence needs
    probability above 0. For this table the bound equals the exact NLL, ``−log p_data(x)``, sequence by sequence
    (every unmasking order gives the same product).
    """
    sequences = all_sequences(vocab, length)
    probs = require_float_tensor("probs", probs, ndim=1).double()
    if probs.shape[0] != sequences.shape[0] or bool((probs <= 0).any()):
        raise ValueError(f"probs must hold {sequences.shape[0]} positive probabilities, one per sequence")
    members = _subset_members(length)
    n, subsets = sequences.shape[0], members.shape[0]
    table = torch.zeros(n, subsets, length, dtype=torch.float64)
    for m in range(1, subsets):
        kept = ~members[m]
        # P(the unmasked positions show what x shows), and P(that and x_i), summed over the matching sequences.
        agree_kept = (sequences[:, None, kept] == sequences[None, :, kept]).all(dim=-1)      # (N, N)
        context = agree_kept.double() @ probs                                               # (N,)
        for i in members[m].nonzero().flatten().tolist():
            joint = (agree_kept & (sequences[:, None, i] == sequences[None, :, i])).double() @ probs
            table[:, m, i] = (joint / context).log()
    return table


def _mask_set_sums(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence and mask-set size ``k``: ``Σ_{|m|=k} ℓ(m)`` and ``Σ_{|m|=k} ℓ(m)²``, ``ℓ(m) = Σ_{i∈m} −log p``."""
    length = table.shape[2]
    loss = -table.sum(dim=2)                                        # (N, 2^L)
    sizes = _subset_members(length).sum(dim=1)
    first = torch.stack([loss[:, sizes == k].sum(dim=1) for k in range(length + 1)], dim=1)
    second = torch.stack([(loss[:, sizes == k] ** 2).sum(dim=1) for k in range(length + 1)], dim=1)
    return first, second


def _integrals(lo: torch.Tensor | float, hi: torch.Tensor | float, length: int, schedule: str, power: int,
               nodes: int = 64) -> torch.Tensor:
    """``∫_lo^hi w(t)^power · p(t)^k (1 − p(t))^(L−k) dt`` for ``k = 0..L``, by Gauss–Legendre in ``log t``.

    ``lo`` and ``hi`` may be tensors of ``S`` intervals: the result is then ``(S, L + 1)``.
    """
    import numpy as np

    x, wq = np.polynomial.legendre.leggauss(nodes)
    a = torch.as_tensor(lo, dtype=torch.float64).log()[..., None]
    b = torch.as_tensor(hi, dtype=torch.float64).log()[..., None]
    u = 0.5 * (b - a) * torch.tensor(x) + 0.5 * (b + a)                # (..., nodes)
    t = u.exp()
    jac = 0.5 * (b - a) * torch.tensor(wq) * t
    p, w = mask_probability(t.reshape(-1), schedule).view_as(t), loss_weight(t.reshape(-1), schedule).view_as(t)
    k = torch.arange(length + 1, dtype=torch.float64)
    mass = p[..., None] ** k * (1 - p[..., None]) ** (length - k)     # (..., nodes, L+1)
    return ((w ** power * jac)[..., None] * mass).sum(dim=-2)


def _floor_term(t: float, length: int, schedule: str, power: int) -> torch.Tensor:
    tt = torch.tensor([t], dtype=torch.float64)
    p, w = mask_probability(tt, schedule), loss_weight(tt, schedule)
    k = torch.arange(length + 1, dtype=torch.float64)
    return w ** power * p ** k * (1 - p) ** (length - k)


def estimator_moments(table: torch.Tensor, *, samples: int, schedule: str = "linear", t_floor: float = 1e-6
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(mean, variance)`` per sequence of ``elbo_per_sequence(..., samples=samples, schedule=schedule)``.

    That estimate averages ``samples`` draws ``w(t) · ℓ(m)``, one ``t`` uniform in each of ``samples`` equal
    slices of (0, 1] (raised to ``t_floor`` if below, as the estimator does) and a mask ``m`` drawn at that
    ``t``. Given ``t`` the mask set's probability depends only on its size, so both moments are sums over sizes
    of integrals over ``t``, computed here by quadrature: no sampling. For the linear schedule the second
    moment grows like ``log(1 / t_floor)`` — without the floor the variance of a single draw is infinite.
    """
    table = require_float_tensor("table", table, ndim=3).double()
    samples = require_positive_int("samples", samples)
    require_choice("schedule", schedule, SCHEDULES)
    t_floor = require_float("t_floor", t_floor, positive=True, maximum=1.0 / samples)
    length = table.shape[2]
    first, second = _mask_set_sums(table)                            # (N, L+1)
    lo = torch.arange(samples, dtype=torch.float64) / samples
    lo[0] = t_floor
    hi = torch.arange(1, samples + 1, dtype=torch.float64) / samples
    m1 = _integrals(lo, hi, length, schedule, 1) * samples           # (S, L+1): E[X_j] per unit ℓ-sum
    m2 = _integrals(lo, hi, length, schedule, 2) * samples
    m1[0] += samples * t_floor * _floor_term(t_floor, length, schedule, 1)
    m2[0] += samples * t_floor * _floor_term(t_floor, length, schedule, 2)
    e1, e2 = first @ m1.T, second @ m2.T                             # (N, S)
    return e1.mean(dim=1), (e2 - e1 ** 2).sum(dim=1) / samples ** 2


def sample_estimates(table: torch.Tensor, *, samples: int, draws: int, schedule: str = "linear",
                     generator: torch.Generator | None = None, t_floor: float = 1e-6) -> torch.Tensor:
    """``(draws, N)`` independent copies of the stratified ``samples``-draw estimate, read off ``table``.

    The same random procedure as :func:`~labsupport.diffusion.process.elbo_per_sequence`, with the network's
    answers looked up in the :func:`masked_log_probs` table instead of recomputed: the same distribution.
    Draws are made in chunks of about a million masks, so memory stays small.
    """
    table = require_float_tensor("table", table, ndim=3).double()
    samples, draws = require_positive_int("samples", samples), require_positive_int("draws", draws)
    require_choice("schedule", schedule, SCHEDULES)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    n, _, length = table.shape
    loss = -table.sum(dim=2)                                         # (N, 2^L)
    chunk = max(1, 1_000_000 // (n * samples * length))
    out = []
    for lo in range(0, draws, chunk):
        d = min(chunk, draws - lo)
        t = ((torch.arange(samples, dtype=torch.float64) + torch.rand(d, n, samples, generator=gen,
                                                                      dtype=torch.float64)) / samples)
        t = t.clamp(min=t_floor)
        masked = torch.rand(d, n, samples, length, generator=gen, dtype=torch.float64) < mask_probability(
            t.reshape(-1), schedule).view_as(t)[..., None]
        index = (masked.long() << torch.arange(length)).sum(dim=-1)  # mask-set number
        picked = loss[torch.arange(n)[None, :, None], index]
        out.append((loss_weight(t.reshape(-1), schedule).view_as(t) * picked).mean(dim=-1))
    return torch.cat(out)


def truncated_objective(table: torch.Tensor, t_min: float) -> torch.Tensor:
    """Exact expected training loss per sequence (nats) when ``t ~ U(t_min, 1)`` with the ``1/t`` weight.

    ``t_min = 0`` would give the bound (:func:`elbo_by_mask_sets`); with ``t_min > 0`` the integral misses
    ``(0, t_min)`` and is rescaled by ``1/(1 − t_min)``, which moves it by about ``t_min`` × (bound − the sum of
    the one-masked-token losses): for a perfect model, below the NLL wherever that sum exceeds it.
    """
    table = require_float_tensor("table", table, ndim=3).double()
    t_min = require_float("t_min", t_min, positive=True, maximum=0.5)
    first, _ = _mask_set_sums(table)
    return first @ _integrals(t_min, 1.0, table.shape[2], "linear", 1, nodes=128) / (1 - t_min)


@dataclass
class ToyRecord:
    """Exact expectations under the data distribution, in nats per sequence, at each recorded step."""

    steps: list[int] = field(default_factory=list)
    elbo: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    entropy: float = float("nan")

    @property
    def gap(self) -> list[float]:
        """ELBO − exact NLL of the model (the Jensen gap), per recorded step."""
        return [e - n for e, n in zip(self.elbo, self.nll)]


def train_toy(model: nn.Module, probs: torch.Tensor, sequences: torch.Tensor, *, steps: int = 300,
              batch_size: int = 128, lr: float = 3e-3, record_every: int = 25, seed: int = 0,
              objective: str = "sampled") -> ToyRecord:
    """Train ``model`` on the ``1/t`` objective for ``probs``; record the exact ELBO and NLL as it learns.

    ``objective="sampled"`` is the usual training: ``batch_size`` sequences drawn from ``probs``, one ``t`` and
    one mask each (:class:`~labsupport.lm.objectives.MaskedTokenObjective`). ``"exact"`` minimises the
    objective's expectation itself, ``Σ_x p(x) · ELBO(x)`` by enumeration (:func:`elbo_by_mask_sets`): the
    same gradient on average, without the sampling noise. The recorded numbers are expectations under the data
    distribution, in nats per sequence; ``entropy = −Σ p log p`` is what both reach for a perfect model.
    """
    require_choice("objective", objective, ("sampled", "exact"))
    steps = require_positive_int("steps", steps)
    batch_size = require_positive_int("batch_size", batch_size)
    record_every = require_positive_int("record_every", record_every)
    probs = require_float_tensor("probs", probs, ndim=1)
    if probs.shape[0] != sequences.shape[0]:
        raise ValueError(f"probs has {probs.shape[0]} entries for {sequences.shape[0]} sequences")
    gen = torch.Generator().manual_seed(seed)
    sampled = MaskedTokenObjective(model.mask_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    record = ToyRecord(entropy=float(-(probs * probs.clamp_min(1e-300).log()).sum()))

    def measure(step: int) -> None:
        model.eval()
        nll, elbo = order_bounds(masked_log_probs(model, sequences))
        record.steps.append(step)
        record.nll.append(float((probs * nll).sum()))
        record.elbo.append(float((probs * elbo).sum()))
        model.train()

    measure(0)
    model.train()
    for step in range(1, steps + 1):
        if objective == "exact":
            loss = (probs * elbo_by_mask_sets(_log_prob_table(model, sequences))).sum()
        else:
            rows = torch.multinomial(probs, batch_size, replacement=True, generator=gen)
            batch = sequences[rows]
            loss = sampled(model, TaskBatch(batch, batch), gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % record_every == 0 or step == steps:
            measure(step)
    model.eval()
    return record
