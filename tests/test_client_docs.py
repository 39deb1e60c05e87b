"""The Python examples of docs/client.md (and of README.md, once it exists) run as written.

Blocks run in order in one namespace, in a scratch directory, against the isolated test settings (no
autostart); `model` is pre-defined as a tiny torch module because ML-Dash-style examples assume one. Then the
spool is drained and the result is checked in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from mldash import dxp
from mldash.config import Settings
from tests.client_helpers import store_bytes
from tests.fixtures.daemon import settings_env

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["docs/client.md", "README.md"]


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def run_examples(doc: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch, workdir: Path) -> dict[str, Any]:
    for name, value in settings_env(settings).items():
        if name.startswith("MLDASH_"):
            monkeypatch.setenv(name, value)
    monkeypatch.chdir(workdir)
    dxp._reset()
    namespace: dict[str, Any] = {"__name__": "docs_example", "model": torch.nn.Linear(4, 2)}
    try:
        for number, block in enumerate(python_blocks(doc.read_text(encoding="utf-8"))):
            try:
                exec(compile(block, f"{doc.name} block {number}", "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"{doc.name} python block {number} failed: {type(exc).__name__}: {exc}\n{block}")
    finally:
        dxp._reset()
    return namespace


@contextlib.contextmanager
def daemon_thread(settings: Settings) -> Iterator[None]:
    """A real mldash-syncd running in a background thread for the duration of the block."""
    from mldash_syncd import Daemon

    loop = asyncio.new_event_loop()
    daemon = Daemon(settings)
    thread = threading.Thread(target=loop.run_until_complete, args=(daemon.run(),), daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(daemon.request_stop)
        thread.join(timeout=60)
        loop.close()


def test_the_client_doc_has_examples():
    assert len(python_blocks((ROOT / "docs/client.md").read_text(encoding="utf-8"))) >= 10


@pytest.mark.parametrize("doc", DOCS)
def test_doc_examples_run_as_written(doc: str, settings: Settings, drain: Any, tmp_path: Path, monkeypatch):
    path = ROOT / doc
    if not path.exists() or not python_blocks(path.read_text(encoding="utf-8")):
        pytest.skip(f"{doc} has no Python examples yet")
    if doc == "README.md":  # the README waits with flush(): run a daemon beside it, as autostart would
        with daemon_thread(settings):
            namespace = run_examples(path, settings, monkeypatch, tmp_path)
    else:
        namespace = run_examples(path, settings, monkeypatch, tmp_path)
    report = drain(settings)
    assert report.failed == 0 and report.quarantined == 0
    if doc == "docs/client.md":
        assert report.committed > 20
        assert store_bytes(settings, namespace["result"])[:2] == b"PK"  # torch's zip format
