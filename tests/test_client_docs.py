"""The examples of docs/client.md run as written (in order, in one namespace), then land in the store."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import pytest

from mldash import dxp
from mldash.config import Settings
from tests.client_helpers import store_bytes
from tests.fixtures.daemon import settings_env

DOC = Path(__file__).resolve().parent.parent / "docs" / "client.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_doc_has_examples():
    assert len(python_blocks(DOC.read_text(encoding="utf-8"))) >= 10


def test_doc_examples_run_as_written(settings: Settings, drain: Any, tmp_path: Path, monkeypatch, capsys):
    for name, value in settings_env(settings).items():
        if name.startswith("MLDASH_"):
            monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    dxp._reset()
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    try:
        for number, block in enumerate(python_blocks(DOC.read_text(encoding="utf-8"))):
            try:
                exec(compile(block, f"docs/client.md block {number}", "exec"), namespace)
            except Exception as exc:  # pragma: no cover - the message says which block broke
                pytest.fail(f"docs/client.md python block {number} failed: {type(exc).__name__}: {exc}\n{block}")
    finally:
        dxp._reset()
    assert "still uploading" in capsys.readouterr().out  # the flush example without a daemon
    report = drain(settings)
    assert report.failed == 0 and report.quarantined == 0 and report.committed > 20
    result = namespace["result"]
    assert store_bytes(settings, result)[:2] == b"PK"  # torch's zip format
