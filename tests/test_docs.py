"""Docs that are generated from code must not drift from it."""

from scripts.gen_config_docs import render
from tests.paths import REPO


def test_configuration_doc_is_current() -> None:
    assert (REPO / "docs" / "configuration.md").read_text() == render(), (
        "docs/configuration.md is stale: run `python scripts/gen_config_docs.py`")
