"""Docs that are generated from code must not drift from it."""

import re

from scripts.gen_config_docs import render
from tests.paths import REPO


def test_configuration_doc_is_current() -> None:
    assert (REPO / "docs" / "configuration.md").read_text() == render(), (
        "docs/configuration.md is stale: run `python scripts/gen_config_docs.py`")


def test_configuration_doc_default_column_agrees_with_the_help_text() -> None:
    """A help text that names its default ("'auto' (default)") and a default column saying "unset" contradict
    each other (verify_etag's did: its None means auto)."""
    rows = [line.split(" | ") for line in render().splitlines() if line.startswith("| `")]
    named = {row[0].strip("| `"): (row[2], match.group(1)) for row in rows
             if (match := re.search(r"'([^']+)' \(default\)", row[3]))}
    assert "verify_etag" in named and "checksum" in named
    for key, (column, default) in named.items():
        assert column == f"`{default}`", f"{key}: the default column says {column}, the help text '{default}'"
