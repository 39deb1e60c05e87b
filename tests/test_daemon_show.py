"""`mldash-syncd show ID`: one entry's whole story — saved, not indexed, quarantined with its reason, retried,
committed and evicted — from the same spool a person would look at, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mldash.config import Settings
from mldash.spool import SpoolLayout
from tests.fixtures.daemon import enqueue_bytes, settings_env
from tests.spool_helpers import overwrite_spooled


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mldash_syncd", *args], env=settings_env(settings),
                          capture_output=True, text=True, timeout=120)


def show(settings: Settings, file_id: int) -> tuple[str, dict]:
    shown, as_json = cli(settings, "show", str(file_id)), cli(settings, "show", str(file_id), "--json")
    assert shown.returncode == 0 and as_json.returncode == 0, shown.stderr + as_json.stderr
    return shown.stdout, json.loads(as_json.stdout)


def test_show_follows_an_entry_from_save_to_eviction(settings: Settings) -> None:
    layout = SpoolLayout(settings.spool)
    good = os.urandom(300_000)
    entry = enqueue_bytes(settings, good, filename="model.pt", prefix="ckpt", tags=["best"],
                          description="epoch 3")

    text, data = show(settings, entry.id)  # saved on an offline node: only its manifest knows it
    assert data["state"] == "not indexed" and "index" not in data
    assert data["manifest"]["path"] == "ns/proj/exp/ckpt/model.pt" and data["manifest"]["tags"] == ["best"]
    assert data["destination"].endswith(f"/files/ns/proj/exp/ckpt/{entry.id}/model.pt")
    assert "state       not indexed" in text and "tags        best" in text and "description epoch 3" in text
    assert f"sha256      {entry.sha256}" in text

    overwrite_spooled(layout, entry.id, os.urandom(300_000))  # bit rot before the upload
    assert cli(settings, "run", "--once", "--quiet").returncode == 1
    text, data = show(settings, entry.id)
    assert data["state"] == "quarantined" and "changed" in data["index"]["last_error"]
    assert [e["level"] for e in data["events"]] == ["error"] and "changed" in data["events"][0]["message"]
    assert "state       quarantined (attempts 1, corrupt)" in text and "last error  " in text and "events" in text

    overwrite_spooled(layout, entry.id, good)  # restored from a backup
    assert cli(settings, "retry", str(entry.id)).returncode == 0
    assert cli(settings, "run", "--once", "--quiet").returncode == 0
    text, data = show(settings, entry.id)
    assert data["state"] == "evicted" and "manifest" not in data  # committed, then its bytes left the spool
    assert data["storageUri"].startswith("file://")
    assert data["storageUri"].endswith(f"/files/ns/proj/exp/ckpt/{entry.id}/model.pt")
    assert data["index"]["bytes_sent"] >= 300_000
    messages = [e["message"] for e in data["events"]]
    assert len(messages) == 2 and messages[1].startswith("re-queued by retry (was quarantined: ")
    for label in ("committed   ", "evicted     ", "stored at   ", "saved       "):
        assert label in text, (label, text)
    assert f"sent to     store {settings.store}; catalog sqlite://" in text and "not where" not in text, text


def test_show_names_what_is_wrong_with_the_id(settings: Settings) -> None:
    enqueue_bytes(settings, b"x", filename="x.bin")
    missing = cli(settings, "show", "123")
    assert missing.returncode == 2 and "no entry 123 in the spool" in missing.stderr
    typo = cli(settings, "show", "12a")
    assert typo.returncode == 2 and "'12a': an entry id is a decimal number" in typo.stderr
