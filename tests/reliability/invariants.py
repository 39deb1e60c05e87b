"""The one checker of DESIGN.md's invariants, run at the end of every reliability run.

`check_invariants(settings, acked)` is called once the daemon has stopped (it asserts that nobody holds
the spool lock) and reads every backend through an independent view — sqlite3 on the index, boto3 or
the plain directory for the store, sqlite3/pymongo for the catalog (see tests/backend_helpers.py) — so
a bug in our own store/catalog code cannot make its own check pass. It asserts:

1. Acknowledged means durable: every acknowledged save is committed (or evicted after commit) — or, when
   a scenario says so, in one of the `allow`ed states — with the size and SHA256 it was acknowledged with.
2. Exactly once: each entry has at most one object (exactly one once uploaded/committed) and at most one
   catalog document (exactly one once committed); no object or document belongs to an unknown id.
3. No metadata without verified bytes, and never wrong bytes: every object's SHA256 (read back from the
   store) equals its entry's manifest SHA256 — whatever its state — and every document's checksum, size
   and storage key match that object.
4. No orphaned multipart uploads after `gc`: gc runs here (the daemon's own `collect`), then every upload
   still pending in the store must be the recorded, resumable upload of a queued/failed entry.
5. Nothing silently dropped: failed/quarantined entries carry `last_error`; an entry waiting after an
   error says why; entries that still need their bytes have them in the spool (so `retry` can act).
6. Nothing stuck: no entry is `uploading` and no lease is held once the daemon stopped; no temp file
   of a dead writer is left (after the daemon's start-up recovery).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import sqlite3
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from mldash.config import Settings
from mldash.errors import SpoolCorruptError
from mldash.keys import file_id_from_key, object_key
from mldash.spool.layout import SpoolLayout
from mldash.spool.lock import DaemonLock, is_held
from mldash.spool.recovery import read_manifest
from mldash.spool.states import PENDING, State
from tests.backend_helpers import _s3, catalog_docs, list_objects, store_root
from tests.spool_helpers import Ack, _pid_alive

DONE = frozenset({State.COMMITTED, State.EVICTED})


@dataclass
class InvariantReport:
    """What the checker saw (handy in failure messages and for scenario-specific assertions)."""

    states: dict[str, int] = field(default_factory=dict)
    objects: int = 0
    documents: int = 0
    aborted_by_gc: int = 0
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)


def ack_of(item: Any) -> Ack:
    """An Ack from a Manifest, a client save result dict (`id`, `sizeBytes`, `checksum`) or an Ack."""
    if isinstance(item, Ack):
        return item
    # (checksum None: a deferred-checksum save; the daemon computes it from the spooled bytes)
    if isinstance(item, Mapping):
        return Ack(int(item["id"]), int(item["sizeBytes"]), item["checksum"])
    return Ack(int(item.id), int(item.size), item.sha256)


def acks(items: Iterable[Any]) -> dict[int, Ack]:
    out = {}
    for item in items:
        ack = ack_of(item)
        out[ack.id] = ack
    return out


# ---- independent views ------------------------------------------------------------------------------------

def _index_rows(layout: SpoolLayout) -> dict[int, dict[str, Any]]:
    if not layout.index_path.exists():
        return {}
    conn = sqlite3.connect(f"file:{layout.index_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", "spool index is corrupt"
        return {row["id"]: dict(row) for row in conn.execute("SELECT * FROM entries")}
    finally:
        conn.close()


def _object_sha256(view: Settings, key: str) -> str:
    scheme, where = store_root(view)
    digest = hashlib.sha256()
    if scheme == "file":
        with open(Path(where) / key, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    else:
        # Our own hash of the raw bytes (botocore would raise on a checksum mismatch instead of showing them).
        client = boto3.client("s3", endpoint_url=view.s3_endpoint_url, region_name="us-east-1",
                              config=Config(response_checksum_validation="when_required"))
        body = client.get_object(Bucket=where, Key=key)["Body"]
        while chunk := body.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def list_keys(view: Settings) -> list[str]:
    """Every object key in the store. (For a directory store only the store's own top-level dot-directories
    are skipped — tests.backend_helpers.list_objects skips any dot component, which hides keys such as
    ".../123/.env".)"""
    scheme, where = store_root(view)
    if scheme != "file":
        return list_objects(view)
    root = Path(where)
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not p.relative_to(root).parts[0].startswith("."))


def _pending_uploads(view: Settings) -> list[tuple[str, str]]:
    """(key, upload id) of every unfinished multipart upload under the store's root."""
    scheme, where = store_root(view)
    if scheme == "file":
        uploads = Path(where) / ".uploads"
        out = []
        for entry in (uploads.iterdir() if uploads.exists() else []):
            meta = entry / "upload.json"
            key = json.loads(meta.read_text())["key"] if meta.exists() else ""
            out.append((key, entry.name))
        return out
    root = _root_prefix(view)
    client = _s3(view)
    out = []
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=where, Prefix=root):
        out += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
    return out


def _root_prefix(settings: Settings) -> str:
    from mldash.files import store_root as key_root

    root = key_root(settings.store)
    return f"{root}/" if root else ""


def _expected_key(settings: Settings, row: Mapping[str, Any]) -> str:
    from mldash.files import store_root as key_root

    return object_key(namespace=row["namespace"], project=row["project"], experiment=row["experiment"],
                      prefix=row["prefix"] or "", file_id=row["id"], filename=row["filename"],
                      root=key_root(settings.store))


def run_gc(settings: Settings) -> int:
    """The daemon's own gc (`mldash-syncd gc`), in this process; returns how many uploads it aborted."""
    from mldash.spool.index import SpoolIndex
    from mldash.store import make_store
    from mldash_syncd.gc import collect

    layout = SpoolLayout(settings.spool)
    with DaemonLock(layout):
        index = SpoolIndex(layout, power_safe=settings.power_safe)
        try:
            async def run() -> Any:
                async with make_store(settings) as store:
                    return await collect(store, index, layout)
            return len(asyncio.run(run()).aborted)
        finally:
            index.close()


# ---- the checker --------------------------------------------------------------------------------------------

def _has_spooled_bytes(layout: SpoolLayout, file_id: int, size: int) -> bool:
    """The manifest is there, and the bytes: a blob of `size` bytes, or an inline payload (format 2)."""
    if not layout.manifest_path(file_id).exists():
        return False
    blob = layout.blob_path(file_id)
    if blob.exists():
        return blob.stat().st_size == size
    try:
        payload = read_manifest(layout, file_id).payload
    except SpoolCorruptError:
        return False
    return payload is not None and len(payload) == size


def check_invariants(settings: Settings, acked: Iterable[Any] | Mapping[int, Ack] = (), *,
                     view: Settings | None = None, allow: Collection[State] = (), gc: bool = True,
                     allow_orphan_blobs: bool = False) -> InvariantReport:
    """Assert DESIGN.md's invariants on a spool whose daemon has stopped (see the module doc).

    `settings`: what the daemon ran with. `view`: the same backends reached directly (e.g. moto's own
    endpoint when the daemon went through a fault proxy, a catalog URI without the proxy); also used for
    gc. `acked`: the saves acknowledged to writers (Manifests, client result dicts or Acks). `allow`:
    states besides committed/evicted an acknowledged entry may end in for this scenario (each must still
    show its reason). `allow_orphan_blobs`: a writer killed between its two links leaves a blob without a
    manifest, which recovery keeps for ORPHAN_BLOB_GRACE before removing it.
    """
    view = view or settings
    layout = SpoolLayout(settings.spool)
    acked = dict(acked) if isinstance(acked, Mapping) else acks(acked)
    assert not is_held(layout), "check_invariants needs the daemon stopped (the spool lock is held)"
    report = InvariantReport()

    aborted = run_gc(view) if gc and layout.exists() else 0
    report.aborted_by_gc = aborted
    rows = _index_rows(layout)
    report.rows = rows
    report.states = dict(collections.Counter(row["state"] for row in rows.values()))
    problems: list[str] = []

    # -- 5/6: every entry's state is visible and nothing is stuck
    for file_id, row in rows.items():
        state = State(row["state"])
        if state is State.UPLOADING:
            problems.append(f"{file_id} stuck in 'uploading' after the daemon stopped")
        if row["lease_owner"] is not None:
            problems.append(f"{file_id} ({state}) still leased by {row['lease_owner']} after the daemon stopped")
        if state in (State.FAILED, State.QUARANTINED) and not row["last_error"]:
            problems.append(f"{file_id} is {state} without a reason (last_error empty)")
        if state in (State.QUEUED, State.UPLOADED) and row["error_kind"] and not row["last_error"]:
            problems.append(f"{file_id} waits after a {row['error_kind']} error without saying which")
        if state in PENDING and state is not State.QUARANTINED and not _has_spooled_bytes(layout, file_id, row["size"]):
            problems.append(f"{file_id} ({state}) lost its spooled manifest or bytes: retry could not act")
    for path in layout.tmp_dir.iterdir() if layout.tmp_dir.exists() else ():
        pid = SpoolLayout.tmp_owner_pid(path.name)
        if pid is None or not _pid_alive(pid):
            problems.append(f"temp file of a dead writer left in the spool: {path.name}")
    if not allow_orphan_blobs and layout.blobs_dir.exists():
        for path in layout.blobs_dir.iterdir():
            file_id = SpoolLayout.blob_id(path.name)
            # (committed entries keep their bytes until the eviction policy says otherwise)
            if file_id is not None and (file_id not in rows or rows[file_id]["state"] == State.EVICTED):
                problems.append(f"blob {path.name} without a pending or committed entry (partial save, or an "
                                "eviction that left its bytes)")

    # -- 1: acknowledged saves
    for ack in acked.values():
        row = rows.get(ack.id)
        if row is None:
            problems.append(f"acknowledged save {ack.id} is not in the spool index (lost)")
            continue
        state = State(row["state"])
        if state not in DONE and state not in allow:
            problems.append(f"acknowledged save {ack.id} ended {state}: {row['last_error']}")
        if row["size"] != ack.size or (ack.sha256 is not None and row["sha256"] != ack.sha256):
            problems.append(f"{ack.id}: index says {row['size']} bytes / {row['sha256']}, acknowledged "
                            f"{ack.size} / {ack.sha256}")

    # -- 2/3: objects
    prefix = _root_prefix(view)
    objects: dict[int, list[str]] = collections.defaultdict(list)
    for key in list_keys(view):
        if not key.startswith(prefix):
            continue  # another test's root in a shared bucket
        file_id = file_id_from_key(key)
        if file_id is None or file_id not in rows:
            problems.append(f"object {key!r} belongs to no entry of this spool")
            continue
        objects[file_id].append(key)
    report.objects = sum(len(keys) for keys in objects.values())
    for file_id, keys in objects.items():
        row = rows[file_id]
        if len(keys) != 1:
            problems.append(f"{file_id} has {len(keys)} objects: {keys}")
        expected = _expected_key(settings, row)
        for key in keys:
            if key != expected:
                problems.append(f"{file_id}: object at {key!r}, expected {expected!r}")
            sha = _object_sha256(view, key)
            if sha != row["sha256"]:
                problems.append(f"{file_id} ({row['state']}): the store holds WRONG BYTES at {key!r} "
                                f"(sha256 {sha} ≠ {row['sha256']})")
    for file_id, row in rows.items():
        if State(row["state"]) in DONE | {State.UPLOADED} and not row["sha256"]:
            problems.append(f"{file_id} is {row['state']} without a checksum (a deferred one was never computed)")
        if State(row["state"]) in DONE | {State.UPLOADED} and not objects.get(file_id):
            problems.append(f"{file_id} is {row['state']} but the store has no object for it")

    # -- 2/3: catalog documents
    docs = catalog_docs(view)
    report.documents = len(docs)
    by_id = collections.Counter(str(doc["id"]) for doc in docs)
    for doc in docs:
        file_id = int(doc["id"])
        row = rows.get(file_id)
        if row is None:
            problems.append(f"catalog document {doc['id']} belongs to no entry of this spool")
            continue
        if by_id[str(file_id)] != 1:
            problems.append(f"{file_id} has {by_id[str(file_id)]} catalog documents")
        if State(row["state"]) not in DONE:
            problems.append(f"catalog document for {file_id}, which is {row['state']} (not committed)")
        keys = objects.get(file_id, [])
        if not keys:
            problems.append(f"catalog document {file_id} without an object: metadata without bytes")
        elif doc["storageKey"] != keys[0]:
            problems.append(f"catalog document {file_id} names {doc['storageKey']!r}, object is {keys[0]!r}")
        if (doc["checksum"], doc["sizeBytes"]) != (row["sha256"], row["size"]):
            problems.append(f"catalog document {file_id}: {doc['sizeBytes']} bytes / {doc['checksum']}, spooled "
                            f"{row['size']} / {row['sha256']}")
    for file_id, row in rows.items():
        if State(row["state"]) in DONE and by_id[str(file_id)] == 0:
            problems.append(f"{file_id} is {row['state']} but has no catalog document")

    # -- 4: multipart uploads after gc
    for key, upload_id in _pending_uploads(view):
        if prefix and not key.startswith(prefix):
            continue
        file_id = file_id_from_key(key)
        row = rows.get(file_id) if file_id is not None else None
        if row is None or row["state"] not in ("queued", "failed") or row["upload_id"] != upload_id:
            state = row["state"] if row else "unknown"
            problems.append(f"orphaned multipart upload {upload_id} of {key!r} ({state}) survived gc")

    assert not problems, "invariants violated:\n  " + "\n  ".join(problems[:50]) + (
        f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else "") + f"\nstates: {report.states}"
    return report
