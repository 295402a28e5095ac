"""Pytest set-up for the whole repository: the notebook runs under nbval.

nbval waits a hard-coded 5 s for each output message once a cell has finished
(it has no option for it; see computationalmodelling/nbval#136 and #231). On a
busy 2-core CI machine a long training cell with progress bars can exceed that
and fail although it ran correctly. Give every nbval cell a generous wait
instead; a cell that really hangs is still stopped by ``--nbval-cell-timeout``.
"""

from __future__ import annotations

import pytest

NBVAL_OUTPUT_TIMEOUT_S = 120


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if type(item).__name__ == "IPyNbCell" and hasattr(item, "output_timeout"):
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT_S
