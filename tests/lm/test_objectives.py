"""labsupport.lm.objectives: next-token loss and the masked-token (diffusion) objective."""

from __future__ import annotations

import pytest
import torch

from labsupport.lm.model import TinyLM
from labsupport.lm.objectives import MaskedTokenObjective, next_token_loss, sequence_loss
from labsupport.lm.tasks import TaskBatch, make_mqar


def test_next_token_loss_is_the_sequence_loss_of_the_model() -> None:
    torch.manual_seed(0)
    model = TinyLM(64, d_model=16, n_layers=1, max_len=32)
    batch = make_mqar(4, 32, 4, 64, seed=0)
    expected = sequence_loss(model(batch.inputs), batch.targets)
    assert torch.equal(next_token_loss(model, batch, torch.Generator()), expected)


def test_masking_follows_the_drawn_ratio_and_is_reproducible() -> None:
    objective = MaskedTokenObjective(mask_id=99)
    tokens = torch.randint(0, 50, (64, 256), generator=torch.Generator().manual_seed(0))
    noisy, masked, t = objective.corrupt(tokens, torch.Generator().manual_seed(1))
    again = objective.corrupt(tokens, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again[0])
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], 99))
    assert torch.equal(noisy[~masked], tokens[~masked])
    observed = masked.float().mean(dim=1)
    assert (observed - t).abs().max() < 0.12  # 256 tokens per row: the fraction tracks t


def test_the_one_over_t_weighting_is_the_mean_over_masked_tokens_divided_by_t() -> None:
    torch.manual_seed(0)
    model = TinyLM(11, d_model=16, n_layers=1, max_len=8, causal=False)
    batch = TaskBatch(torch.randint(0, 10, (3, 8)), torch.zeros(3, 8, dtype=torch.long), {})
    objective = MaskedTokenObjective(mask_id=10)
    loss = objective(model, batch, torch.Generator().manual_seed(5))
    noisy, masked, t = objective.corrupt(batch.inputs, torch.Generator().manual_seed(5))
    per_token = torch.nn.functional.cross_entropy(model(noisy).transpose(1, 2), batch.inputs, reduction="none")
    expected = ((per_token * masked).sum(dim=1) / t).mean() / 8
    assert torch.allclose(loss, expected)


def test_masked_objective_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        MaskedTokenObjective(mask_id=-1)
    with pytest.raises(ValueError):
        MaskedTokenObjective(mask_id=3, weighting="t")
    with pytest.raises(ValueError, match="already contain"):
        MaskedTokenObjective(mask_id=3).corrupt(torch.full((1, 4), 3), torch.Generator())
    model = TinyLM(8, d_model=8, n_layers=1, max_len=4, causal=False)
    batch = TaskBatch(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), {})
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        MaskedTokenObjective(mask_id=8)(model, batch, torch.Generator())
