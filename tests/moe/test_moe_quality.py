"""Chapter 06's capacity task (labsupport.moe.quality): sequences follow the table, and bad input is refused."""

from __future__ import annotations

import pytest
import torch

from labsupport.lm.tasks import IGNORE_INDEX
from labsupport.moe.quality import lookup_batch, lookup_table


def test_every_scored_target_is_the_table_entry_of_the_two_tokens_before_it() -> None:
    table = lookup_table(16, 3)
    batch = lookup_batch(table, 5, 12, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == batch.targets.shape == (5, 12)
    assert (batch.targets[:, 0] == IGNORE_INDEX).all()
    for t in range(1, 12):
        assert torch.equal(batch.targets[:, t], table[batch.inputs[:, t - 1], batch.inputs[:, t]])
    assert torch.equal(batch.targets[:, :-1][:, 1:], batch.inputs[:, 2:])  # targets are the next inputs
    assert torch.equal(lookup_table(16, 3), table) and not torch.equal(lookup_table(16, 4), table)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        lookup_batch(torch.zeros(3, 4, dtype=torch.long), 2, 5, torch.Generator())
    with pytest.raises((ValueError, TypeError), match="length"):
        lookup_batch(lookup_table(4), 2, 1, torch.Generator())
    with pytest.raises((ValueError, TypeError), match="vocab"):
        lookup_table(1)
