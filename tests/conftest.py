"""Root fixtures: the shared-data rule (``tests/shared_data.py``) for tests marked with
``shared_data.needs(path)``: skipped when the data are missing, failed under ``CI=true``."""

from __future__ import annotations

import pytest
from shared_data import need


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shared_data(*paths): the test needs these files of ../shared/data")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("shared_data"):
        need(*mark.args)
