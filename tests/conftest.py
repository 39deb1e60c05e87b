"""Shared fixtures. Backend fixtures live in tests/fixtures/ (one module per backend)."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.mongo",
    "tests.fixtures.spool",
    "tests.fixtures.faults",
    "tests.fixtures.daemon",
    "tests.spool_helpers",
]
