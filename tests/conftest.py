"""Shared fixtures. Backend fixtures live in tests/fixtures/ (one module per backend)."""

import os

import pytest

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.mongo",
    "tests.fixtures.spool",
    "tests.fixtures.faults",
    "tests.fixtures.daemon",
    "tests.spool_helpers",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a parallel run (pytest-xdist), the long tests — those that raise their timeout above the default —
    go first: started last, one of them would keep its worker busy after the others ran out of tests."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    default = float(config.getini("timeout") or 0)

    def long(item: pytest.Item) -> bool:
        marker = item.get_closest_marker("timeout")
        return marker is not None and bool(marker.args) and (marker.args[0] == 0 or marker.args[0] > default)

    items.sort(key=lambda item: not long(item))
