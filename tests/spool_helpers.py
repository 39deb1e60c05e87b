"""Shared helpers for the spool tests: an integrity checker, entry factories, and the --iterations option.

Registered as a pytest plugin in tests/conftest.py (for `pytest_addoption`); the test modules import
the helpers directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from mldash.config import Settings
from mldash.errors import SpoolCorruptError
from mldash.spool.enqueue import Enqueuer, EntrySpec
from mldash.spool.index import SpoolIndex
from mldash.spool.layout import DIR_MODE, FILE_MODE, SpoolLayout
from mldash.spool.manifest import INLINE_FORMAT_VERSION, Manifest
from mldash.spool.recovery import manifest_ids, read_manifest
from mldash.spool.states import PENDING, State

ITERATIONS_ENV = "MLDASH_TEST_ITERATIONS"
SLOW_ENV = "MLDASH_TEST_SLOW"


def pytest_addoption(parser: pytest.Parser) -> None:
    with contextlib.suppress(ValueError):  # another plugin already registered it: share it
        parser.addoption("--iterations", type=int, default=None,
                         help=f"iterations of crash/fault loops (env {ITERATIONS_ENV}); each test has a CI default")


def iterations(config: pytest.Config, default: int) -> int:
    """The loop count: --iterations, else $MLDASH_TEST_ITERATIONS, else the test's CI default."""
    value = config.getoption("iterations", default=None)
    if value is None and os.environ.get(ITERATIONS_ENV):
        value = int(os.environ[ITERATIONS_ENV])
    return default if value is None else value


def slow_enabled(config: pytest.Config) -> bool:
    """Long versions run only when asked: `-m slow` (or any mark expression naming it) or $MLDASH_TEST_SLOW=1."""
    markexpr = config.option.markexpr or ""
    return ("slow" in markexpr and "not slow" not in markexpr) or os.environ.get(SLOW_ENV) == "1"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def spec(filename: str = "a.bin", **changes: object) -> EntrySpec:
    fields: dict[str, object] = dict(namespace="ns", project="proj", experiment="exp", prefix="ckpt",
                                     filename=filename, content_type="application/octet-stream", kind="blob")
    fields.update(changes)
    return EntrySpec(**fields)  # type: ignore[arg-type]


def put(enqueuer: Enqueuer, data: bytes, filename: str = "a.bin", **changes: object) -> Manifest:
    """Enqueue `data` in one write call."""
    return enqueuer.enqueue(spec(filename, **changes), lambda sink: sink.write(data), expected_size=len(data))


def make_settings(spool: Path, **overrides: object) -> Settings:
    """Settings for a spool at `spool`, immune to the caller's environment and config file."""
    base: dict[str, object] = dict(spool=str(spool), store=(spool.parent / "store").as_uri(),
                                   catalog="sqlite://" + str(spool.parent / "catalog.sqlite"),
                                   autostart=False, save_timeout=2.0)
    base.update(overrides)
    return Settings.load(env={"MLDASH_CONFIG": os.devnull}, **base)


@dataclass(frozen=True)
class Ack:
    """What a writer was told when enqueue returned."""

    id: int
    size: int
    sha256: str | None  # None: saved in the deferred checksum mode


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_spooled(layout: SpoolLayout, file_id: int) -> bytes:
    """The spooled bytes of an entry: its blob, or the payload of its inline manifest."""
    blob = layout.blob_path(file_id)
    return blob.read_bytes() if blob.exists() else _inline_payload(layout, file_id)


def overwrite_spooled(layout: SpoolLayout, file_id: int, data: bytes) -> None:
    """Change an entry's spooled bytes in place, as bit rot or a careless person would, its manifest's size
    and sha256 untouched: in the blob, or in the payload of an inline manifest."""
    blob = layout.blob_path(file_id)
    if blob.exists():
        blob.write_bytes(data)
        return
    manifest = read_manifest(layout, file_id)
    assert manifest.inline and len(data) == manifest.size, "an inline payload can only be altered at its size"
    layout.manifest_path(file_id).write_bytes(dataclasses.replace(manifest, payload=data).encode())


def flip_spooled_byte(layout: SpoolLayout, file_id: int, offset: int) -> None:
    data = bytearray(read_spooled(layout, file_id))
    data[offset] ^= 0xFF
    overwrite_spooled(layout, file_id, bytes(data))


def _inline_payload(layout: SpoolLayout, file_id: int) -> bytes:
    payload = read_manifest(layout, file_id).payload
    assert payload is not None, f"entry {file_id} has neither a blob nor an inline payload"
    return payload


def assert_inline_intact(layout: SpoolLayout, manifest: Manifest, *, hash_bytes: bool = True) -> None:
    """An inline entry (format 2) holds exactly its bytes and has no blob beside it."""
    assert manifest.format == INLINE_FORMAT_VERSION and manifest.payload is not None
    assert not layout.blob_path(manifest.id).exists(), f"inline entry {manifest.id} also has a blob"
    assert len(manifest.payload) == manifest.size, f"inline entry {manifest.id} is not complete"
    if hash_bytes and manifest.sha256 is not None:
        assert hashlib.sha256(manifest.payload).hexdigest() == manifest.sha256, \
            f"inline entry {manifest.id} does not match its manifest sha256"


def assert_entry_intact(layout: SpoolLayout, ack: Ack, *, hash_bytes: bool = True) -> None:
    manifest = read_manifest(layout, ack.id)
    assert (manifest.size, manifest.sha256) == (ack.size, ack.sha256), f"manifest of {ack.id} differs from its ack"
    if manifest.inline:
        assert_inline_intact(layout, manifest, hash_bytes=hash_bytes)
        return
    blob = layout.blob_path(ack.id)
    assert blob.exists(), f"acknowledged entry {ack.id} has no blob"
    assert blob.stat().st_size == ack.size, f"blob {ack.id}: {blob.stat().st_size} bytes, acknowledged {ack.size}"
    if hash_bytes and ack.sha256 is not None:
        assert sha256_file(blob) == ack.sha256, f"blob {ack.id}: bytes differ from the acknowledged sha256"


def assert_spool_integrity(
    layout: SpoolLayout,
    index: SpoolIndex | None = None,
    acknowledged: Mapping[int, Ack] | None = None,
    *,
    allow_orphan_blobs: bool = False,
    allow_quarantined: bool = False,
    hash_bytes: bool = True,
) -> None:
    """The invariants that must hold on a spool that no writer is currently writing to.

    - every manifest decodes, is named after its own id, and has a complete blob (size and, with
      `hash_bytes`, SHA256): no manifest without its bytes;
    - no blob without a manifest (unless `allow_orphan_blobs`: before recovery ran);
    - tmp/ holds nothing of a dead process;
    - with an index: `PRAGMA integrity_check` passes; every manifest has exactly one row whose fields
      match it; every pending row has its manifest and blob (no row without bytes); no quarantined
      row unless allowed;
    - every acknowledged entry is present and intact.
    """
    manifests = manifest_ids(layout)
    quarantined = {row["id"] for row in index.rows(states=[State.QUARANTINED])} if index is not None else set()
    by_id: dict[int, Manifest] = {}
    for file_id in sorted(manifests):
        try:
            manifest = read_manifest(layout, file_id)
        except SpoolCorruptError:
            if allow_quarantined and file_id in quarantined:
                continue  # a hand-damaged manifest, already quarantined by the daemon
            raise  # a manifest the spool itself committed is corrupt: the commit protocol is broken
        by_id[file_id] = manifest
        if manifest.inline:
            assert_inline_intact(layout, manifest, hash_bytes=hash_bytes)
            continue
        blob = layout.blob_path(file_id)
        assert blob.exists(), f"manifest {file_id} has no blob"
        assert blob.stat().st_size == manifest.size, f"blob {file_id} is not complete"
        if hash_bytes and manifest.sha256 is not None:  # None: deferred checksum, nothing recorded to check
            assert sha256_file(blob) == manifest.sha256, f"blob {file_id} does not match its manifest sha256"
    blobs = {i for i in map(SpoolLayout.blob_id, os.listdir(layout.blobs_dir)) if i is not None}
    if not allow_orphan_blobs:
        assert blobs <= manifests, f"blobs without manifest: {sorted(blobs - manifests)}"
    for name in os.listdir(layout.tmp_dir):
        pid = SpoolLayout.tmp_owner_pid(name)
        assert pid is not None and _pid_alive(pid), f"tmp debris of a dead writer: {name}"
    if index is not None:
        assert index.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {row["id"]: row for row in index.rows()}
        for file_id, manifest in by_id.items():
            row = rows.get(file_id)
            assert row is not None, f"manifest {file_id} is not in the index"
            for column, value in (("size", manifest.size), ("sha256", manifest.sha256),
                                  ("filename", manifest.filename), ("prefix", manifest.prefix)):
                if column == "sha256" and value is None and row[column] is not None:
                    # deferred checksum: the daemon records the SHA256 it computed; it must be the bytes'
                    if hash_bytes and manifest.payload is not None:
                        assert row[column] == hashlib.sha256(manifest.payload).hexdigest(), \
                            f"index row {file_id}.sha256"
                    elif hash_bytes and file_id in blobs:
                        assert row[column] == sha256_file(layout.blob_path(file_id)), f"index row {file_id}.sha256"
                    continue
                assert row[column] == value, f"index row {file_id}.{column} = {row[column]!r}, manifest {value!r}"
        for file_id, row in rows.items():
            state = State(row["state"])
            if state == State.QUARANTINED:
                assert allow_quarantined, f"entry {file_id} quarantined: {row['last_error']}"
            elif state in PENDING:
                assert file_id in manifests, f"index row {file_id} ({state}) has no manifest"
                inline = file_id in by_id and by_id[file_id].inline
                assert file_id in blobs or inline, f"index row {file_id} ({state}) has no bytes"
    for ack in (acknowledged or {}).values():
        assert_entry_intact(layout, ack, hash_bytes=hash_bytes)


def assert_private_modes(root: Path) -> list[str]:
    """Every directory under `root` (and root) is 0700 and every file 0600; returns what was checked."""
    checked = []
    for directory, _dirnames, filenames in os.walk(root):
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        assert mode == DIR_MODE, f"{directory} has mode {mode:o}, expected {DIR_MODE:o}"
        checked.append(os.path.relpath(directory, root))
        for name in filenames:
            path = os.path.join(directory, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            assert mode == FILE_MODE, f"{path} has mode {mode:o}, expected {FILE_MODE:o}"
            checked.append(os.path.relpath(path, root))
    return checked
