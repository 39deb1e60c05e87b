"""Helpers for the client tests (tests/test_client_*.py): where saved bytes are, and what the spool holds."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mldash.config import Settings
from mldash.keys import object_key
from mldash.spool.layout import SpoolLayout
from tests.spool_helpers import read_spooled


def store_dir(settings: Settings) -> Path:
    parsed = urlparse(settings.store)
    assert parsed.scheme == "file", "these helpers read the local store"
    return Path(unquote(parsed.path))


def store_path(settings: Settings, result: dict[str, Any]) -> Path:
    """Where the local store keeps a saved file — computed from the key layout, not asked of the code under test."""
    prefix = result["path"].strip("/")
    key = object_key(namespace=result["namespace"], project=result["project"], experiment=result["experiment"],
                     prefix=prefix, file_id=int(result["id"]), filename=result["filename"])
    return store_dir(settings) / key


def store_bytes(settings: Settings, result: dict[str, Any]) -> bytes:
    return store_path(settings, result).read_bytes()


def spool_blob(settings: Settings, result: dict[str, Any]) -> bytes:
    """The spooled bytes of a saved file: its blob, or the payload of its inline manifest."""
    return read_spooled(SpoolLayout(settings.spool), int(result["id"]))


def spool_snapshot(settings: Settings) -> set[str]:
    """Every file under the spool's tmp/, blobs/ and manifests/ (what a failed save must not leave behind)."""
    root = Path(settings.spool)
    out = set()
    for sub in ("tmp", "blobs", "manifests"):
        folder = root / sub
        if folder.exists():
            out |= {str(p.relative_to(root)) for p in folder.iterdir()}
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_result(result: dict[str, Any], *, filename: str, path: str, data: bytes | None = None) -> None:
    """The fields every save returns, with consistent values."""
    for name in ("id", "filename", "path", "sizeBytes", "checksum", "contentType", "createdAt", "status",
                 "description", "tags", "metadata"):
        assert name in result, f"{name} missing from {result}"
    assert isinstance(result["id"], str) and result["id"].isdigit()
    assert result["filename"] == filename
    assert result["path"] == path
    assert result["status"] == "queued"
    if data is not None:
        assert result["sizeBytes"] == len(data)
        assert result["checksum"] == sha256(data)
