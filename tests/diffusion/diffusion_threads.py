"""Chapter 08's tests run on one torch thread: their models are tiny, and on a busy 2-core machine a second
thread waiting on the first makes small operations many times slower.

Each test module imports :func:`one_torch_thread` (an autouse fixture). This is not a ``conftest.py``: the
top-level tests import their helpers with ``from conftest import ...``, which a second conftest would shadow."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
