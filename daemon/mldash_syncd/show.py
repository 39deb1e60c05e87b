"""`mldash-syncd show ID`: everything the spool knows of one entry, in one place.

`ls` gives one line per entry and `status` the spool as a whole; someone asking "what happened to *this*
checkpoint?" needs its history: where it is going, when it was saved, uploaded, committed and evicted, how far a
multipart upload got, how many bytes went on the wire, and every error it met (the index's events). Read-only:
it works beside a running daemon, on a copied spool, and for a save no daemon has indexed yet (its manifest).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from mldash.errors import MldashError, SpoolCorruptError
from mldash.keys import storage_uri
from mldash.spool.index import SpoolIndex, entry_path
from mldash.spool.layout import SpoolLayout
from mldash.spool.manifest import Manifest
from mldash.spool.recovery import read_manifest
from mldash.targets import mismatch, parse_fingerprint, store_url
from mldash_syncd.follow import NOT_INDEXED
from mldash_syncd.progress import human_bytes, human_duration

MAX_EVENTS = 50


def entry_details(layout: SpoolLayout, index: SpoolIndex | None, file_id: int, store: str,
                  targets: dict[str, str] | None = None) -> dict[str, Any]:
    """The entry as a JSON-ready dict: its index row (None if not indexed), its manifest's fields while the
    manifest is in the spool, its recorded parts and its events, newest last. `targets` (asked_targets of the
    configuration asking): a committed entry's store and catalog are compared with them."""
    row = index.get(file_id) if index is not None else None
    manifest: Manifest | None = None
    manifest_error = None
    if layout.manifest_path(file_id).exists():
        try:
            manifest = read_manifest(layout, file_id)
        except SpoolCorruptError as exc:
            manifest_error = str(exc)
    if row is None and manifest is None and manifest_error is None:
        raise MldashError(f"no entry {file_id} in the spool {layout.root} (neither indexed nor saved there; "
                          "`mldash-syncd ls` lists the entries)")
    details: dict[str, Any] = {"id": str(file_id), "state": row["state"] if row else NOT_INDEXED}
    if row is not None:
        details["index"] = {k: v for k, v in row.items() if k != "id" and v is not None}
        parts = index.parts(file_id)  # type: ignore[union-attr]  (row is not None: index is not None)
        details["parts"] = {"recorded": len(parts), "bytes": sum(p["size"] or 0 for p in parts.values())}
        details["events"] = [{"ts": e["ts"], "level": e["level"], "message": e["message"]}
                             for e in index.events_for(file_id, MAX_EVENTS)]  # type: ignore[union-attr]
    if manifest is not None:
        details["manifest"] = {
            "path": f"{manifest.namespace}/{manifest.project}/{manifest.experiment}{manifest.logical_path}",
            "size": manifest.size, "sha256": manifest.sha256, "contentType": manifest.content_type,
            "kind": manifest.kind, "createdAt": manifest.created_at, "description": manifest.description,
            "tags": manifest.tags, "metadata": manifest.metadata, "host": manifest.host, "pid": manifest.pid,
            "inline": manifest.inline}
    elif manifest_error is not None:
        details["manifestError"] = manifest_error
    if sent_to := parse_fingerprint((row or {}).get("committed_to")):
        details["committedTo"] = sent_to
        if elsewhere := mismatch(targets, sent_to):
            details["committedElsewhere"] = elsewhere
        store = store_url(sent_to)
    key = (row or {}).get("store_key")
    if key is None and manifest is not None:  # not uploaded yet: where it will go (the store's root not included)
        key = manifest.key()
        details["destination"] = storage_uri(store, key)
    elif key is not None:
        details["storageUri"] = storage_uri(store, key)
    return details


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    stamp = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({human_duration(now - ts)} ago)"


def render(details: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    row, manifest = details.get("index", {}), details.get("manifest")
    lines = [f"id          {details['id']}"]
    state = details["state"]
    if row:
        state += f" (attempts {row.get('attempts', 0)}" + (f", {row['error_kind']}" if row.get("error_kind") else "")
        state += ")"
    elif state == NOT_INDEXED:
        state += " (saved; no daemon has indexed it yet: the next `mldash-syncd run` does)"
    lines.append(f"state       {state}")
    if manifest is not None:
        lines.append(f"file        {manifest['path']}")
    elif row.get("filename"):
        lines.append(f"file        {entry_path(row)}")
    size = manifest["size"] if manifest else row.get("size")
    if size is not None:
        lines.append(f"size        {human_bytes(size)} ({size} bytes)")
    sha = (manifest or {}).get("sha256") or row.get("sha256")
    lines.append(f"sha256      {sha or '(computed by the daemon as it reads the bytes)'}")
    if manifest is not None:
        lines.append(f"saved       {_when(manifest['createdAt'], now)} by {manifest['host'] or '?'} pid "
                     f"{manifest['pid']} ({manifest['kind']}, {manifest['contentType']})")
        if manifest["tags"]:
            lines.append(f"tags        {', '.join(manifest['tags'])}")
        if manifest["description"]:
            lines.append(f"description {manifest['description']}")
    elif "manifestError" in details:
        lines.append(f"manifest    unreadable: {details['manifestError']}")
    elif row:
        lines.append(f"saved       {_when(row.get('created_at'), now)}")
        lines.append("manifest    gone from the spool (evicted after its commit)")
    for label, key in (("uploaded", "uploaded_at"), ("committed", "committed_at"), ("evicted", "evicted_at")):
        if row.get(key) is not None:
            lines.append(f"{label:<12}{_when(row[key], now)}")
    if row.get("resaved_as"):
        lines.append(f"re-saved as {row['resaved_as']} (its id belonged to another file: `mldash-syncd show "
                     f"{row['resaved_as']}`)")
    if "storageUri" in details:  # a queued or uploading entry has its key already, and no object yet
        stored = row.get("state") in ("committed", "evicted", "uploaded")
        lines.append(f"{'stored at' if stored else 'goes to':<12}{details['storageUri']}")
    if sent_to := details.get("committedTo"):
        lines.append(f"sent to     store {sent_to['store']}; catalog {sent_to['catalog']}")
        if "committedElsewhere" in details:
            lines.append(f"            not where this configuration sends: {details['committedElsewhere']}")
    elif "destination" in details:
        lines.append(f"goes to     {details['destination']}")
    if row.get("upload_id"):
        parts = details.get("parts", {})
        lines.append(f"multipart   upload {row['upload_id']}, parts of {human_bytes(row.get('part_size') or 0)}: "
                     f"{parts.get('recorded', 0)} recorded ({human_bytes(parts.get('bytes', 0))})")
    if row.get("bytes_sent"):
        lines.append(f"bytes sent  {human_bytes(row['bytes_sent'])} over all attempts")
    if row.get("next_attempt_at") and row["next_attempt_at"] > now and details["state"] == "queued":
        lines.append(f"next try    in {human_duration(row['next_attempt_at'] - now)}")
    if row.get("last_error"):
        lines.append(f"last error  {row['last_error']}")
    events = details.get("events", [])
    if events:
        lines.append("events")
        lines += [f"  {_when(e['ts'], now)}  {e['level']:<5}  {e['message']}" for e in events]
    return "\n".join(lines)
