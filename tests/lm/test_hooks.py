"""The bench is open to the families to come, through its public hooks only.

Three toy modules, written here against ``labsupport.lm.contracts`` and nothing
private, each trained for 20 steps:

(a) a top-2 mixture-of-experts channel mixer whose load-balancing loss reaches
    the optimiser and whose expert counts are reported;
(b) a bidirectional model trained on the masked-token objective;
(c) a sliding-window softmax mixer whose decode step keeps a bounded cache.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.settings import seed_everything
from labsupport.lm.contracts import AuxiliaryLossSource, CacheReport, DecodingMixer, MetricSource
from labsupport.lm.model import TinyLM
from labsupport.lm.objectives import MaskedTokenObjective
from labsupport.lm.tasks import CharCorpus, TaskBatch, make_mqar
from labsupport.lm.training import auxiliary_losses, train

STEPS = 20


def _loss_fell(losses: list[float]) -> bool:
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    return last < 0.9 * first


# --------------------------------------------------------------------------- (a) a toy top-2 MoE


class ToyTopTwoExperts(nn.Module):
    """Top-2 token-choice routing over small MLP experts, with the Switch load-balancing loss."""

    def __init__(self, d_model: int, n_experts: int = 4, weight: float = 0.01) -> None:
        super().__init__()
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
            for _ in range(n_experts))
        self.n_experts, self.weight = n_experts, weight
        self._balance = torch.zeros(())
        self._counts = torch.zeros(n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        probs = self.router(tokens).softmax(dim=-1)
        top_p, top_i = probs.topk(2, dim=-1)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, top_p[rows, slot, None] * expert(tokens[rows]))
        counts = torch.bincount(top_i.flatten(), minlength=self.n_experts).float()
        fraction = counts / top_i.numel()
        self._balance = self.weight * self.n_experts * (fraction * probs.mean(dim=0)).sum()
        self._counts = counts
        return out.view_as(x)

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        return {"load_balance": self._balance}

    def training_metrics(self) -> dict[str, list[float]]:
        return {"tokens_per_expert": self._counts.tolist()}


def test_a_moe_channel_mixer_trains_with_its_auxiliary_loss_and_reports_expert_load() -> None:
    seed_everything(0)
    model = TinyLM(64, d_model=32, n_layers=2, max_len=32, channel_mixer=lambda d, i: ToyTopTwoExperts(d))
    experts = [block.channel_mixer for block in model.blocks]
    assert all(isinstance(m, AuxiliaryLossSource) and isinstance(m, MetricSource) for m in experts)
    routers_before = [m.router.weight.detach().clone() for m in experts]

    history = train(model, lambda g: make_mqar(32, 32, 4, 64, generator=g), steps=STEPS, lr=3e-3, progress=False)

    assert _loss_fell(history.losses)
    assert set(history.aux_losses) == {"blocks.0.channel_mixer.load_balance", "blocks.1.channel_mixer.load_balance"}
    assert all(len(v) == STEPS and all(math.isfinite(x) for x in v) for v in history.aux_losses.values())
    counts = history.metrics["blocks.0.channel_mixer.tokens_per_expert"]
    assert len(counts) == STEPS and len(counts[-1]) == 4
    assert sum(counts[-1]) == 32 * 32 * 2  # every token goes to two experts
    assert all(not torch.equal(before, m.router.weight) for before, m in zip(routers_before, experts))


class MLPWithAPenalty(nn.Module):
    """An MLP plus a parameter that only an auxiliary loss sees: it moves only if that loss is optimised."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.mlp = nn.Linear(d_model, d_model)
        self.lonely = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        return {"pull_to_one": (self.lonely - 1.0) ** 2}


def test_the_trainer_optimises_the_auxiliary_loss_itself() -> None:
    seed_everything(0)
    model = TinyLM(64, d_model=16, n_layers=1, max_len=32, channel_mixer=lambda d, i: MLPWithAPenalty(d))
    lonely = model.blocks[0].channel_mixer.lonely
    batch = make_mqar(8, 32, 4, 64, seed=0)
    model(batch.inputs)
    assert set(auxiliary_losses(model)) == {"blocks.0.channel_mixer.pull_to_one"}

    history = train(model, lambda g: make_mqar(8, 32, 4, 64, generator=g), steps=5, lr=1e-2, progress=False)
    assert 0.0 < float(lonely.detach()) < 1.0  # pulled towards 1 by its loss alone
    assert history.aux_losses["blocks.0.channel_mixer.pull_to_one"][0] == pytest.approx(1.0)


# --------------------------------------------------------------------------- (b) a bidirectional model


def test_b_a_bidirectional_model_learns_the_masked_token_objective() -> None:
    corpus = CharCorpus.from_data("shakespeare.txt", max_chars=20_000)
    mask_id = corpus.vocab_size  # one id past the characters
    seed_everything(0)
    model = TinyLM(corpus.vocab_size + 1, d_model=48, n_layers=2, max_len=32, causal=False)
    objective = MaskedTokenObjective(mask_id)

    history = train(model, lambda g: corpus.sample_batch(32, 32, generator=g), steps=STEPS, lr=1e-2,
                    objective=objective, progress=False)

    assert _loss_fell(history.losses)
    assert not model.supports_decoding() or not model.causal
    with pytest.raises(ValueError, match="bidirectional"):
        model.prefill(torch.zeros(1, 4, dtype=torch.long))


def test_a_bidirectional_model_sees_the_future_and_a_causal_one_does_not() -> None:
    seed_everything(0)
    tokens = torch.randint(0, 16, (1, 8))
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1) % 16
    for causal in (True, False):
        model = TinyLM(16, d_model=16, n_layers=1, max_len=8, causal=causal)
        moved = (model(tokens)[0, 0] - model(changed)[0, 0]).abs().max()
        assert (moved == 0) == causal


def test_a_causal_model_refuses_a_bidirectional_mixer_and_vice_versa() -> None:
    from labsupport.lm.layers import attention_mixer

    with pytest.raises(ValueError, match="causal"):
        TinyLM(16, d_model=16, sequence_mixer=attention_mixer(2, causal=False))
    with pytest.raises(ValueError, match="bidirectional"):
        TinyLM(16, d_model=16, sequence_mixer=attention_mixer(2, causal=True), causal=False)


# --------------------------------------------------------------------------- (c) a sliding-window mixer


class SlidingWindowAttention(nn.Module):
    """Causal softmax attention over the last ``window`` positions; its decode cache never exceeds them."""

    def __init__(self, d_model: int, n_heads: int, window: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.window = n_heads, d_model // n_heads, window
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, length, d = x.shape
        return [t.view(b, length, self.n_heads, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(d, -1)]

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, length, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        length = x.shape[1]
        i = torch.arange(length)[:, None]
        j = torch.arange(length)[None, :]
        allowed = (j <= i) & (j > i - self.window)
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        _, k, v = self._heads(x)
        return self(x), (k[:, :, -self.window:], v[:, :, -self.window:])

    def decode_step(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        q, k, v = self._heads(x)
        if state is not None:
            k, v = torch.cat([state[0], k], dim=2), torch.cat([state[1], v], dim=2)
        k, v = k[:, :, -self.window:], v[:, :, -self.window:]
        return self._merge(F.scaled_dot_product_attention(q, k, v)), (k, v)

    def cache_bytes(self, state: tuple[torch.Tensor, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in state)


def test_c_a_sliding_window_mixer_trains_and_decodes_with_a_bounded_cache() -> None:
    window = 8
    seed_everything(0)
    model = TinyLM(64, d_model=32, n_layers=2, max_len=64,
                   sequence_mixer=lambda d, i: SlidingWindowAttention(d, 2, window)).double()
    mixer = model.blocks[0].mixer
    assert isinstance(mixer, DecodingMixer) and isinstance(mixer, CacheReport)

    history = train(model, lambda g: make_mqar(32, 32, 2, 64, generator=g), steps=STEPS, lr=1e-2, progress=False)
    assert _loss_fell(history.losses)

    tokens = torch.randint(0, 64, (2, 48))
    with torch.no_grad():
        full = model(tokens)
    logits, states = model.prefill(tokens[:, :5])
    worst = float((logits - full[:, 4]).abs().max())
    sizes = []
    for t in range(5, 48):
        logits, states = model.decode_step(tokens[:, t], states, position=t)
        worst = max(worst, float((logits - full[:, t]).abs().max()))
        sizes.append(mixer.cache_bytes(states[0][1]))
    assert worst < 1e-10  # decoding with the bounded cache gives the full forward pass
    bound = 2 * 2 * 2 * window * 16 * 8  # keys and values, batch 2, 2 heads, window, head_dim 16, float64
    assert max(sizes) == bound and sizes[-1] == sizes[window]


def test_training_refuses_a_batch_that_is_not_a_task_batch() -> None:
    model = TinyLM(16, d_model=16, n_layers=1, max_len=8)
    with pytest.raises(TypeError, match="TaskBatch"):
        train(model, lambda g: torch.zeros(2, 8, dtype=torch.long), steps=1, progress=False)
    assert TaskBatch  # the type the trainer asks for
