"""Saving a spooled artifact again under a new id — when its id turns out to be another file's.

Ids are drawn without coordination (mldash/ids.py): unique between the live processes of a host, across hosts
only with high probability. When the catalog (or the store, at the entry's key) already holds another file under
an entry's id, the entry cannot be delivered under it. Its bytes are still in the spool, so the daemon gives the
artifact a new id: the blob is hard-linked (no copy, no change to the quota's count), the manifest written again
with only the id changed, published like a client's. The old entry becomes `resaved` with `resaved_as` = the new
id, which readers follow (`wait`, `get` by id).

Crash safety: the index records the move *before* the new entry is published, and `finish_resaves` (run at
every daemon start) publishes whatever a crash left unpublished and removes the old entry's files — so a crash
never leaves the artifact delivered twice, under both ids, or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

from mldash.errors import SpoolCorruptError
from mldash.spool.index import SpoolIndex
from mldash.spool.layout import SpoolLayout
from mldash.spool.manifest import Manifest
from mldash.spool.newfile import publish_bytes
from mldash.spool.recovery import read_manifest
from mldash.spool.states import State

log = logging.getLogger(__name__)


def publish_resaved(layout: SpoolLayout, manifest: Manifest, new_id: int, *, fsync: bool) -> Manifest:
    """The same artifact as entry `new_id`: its blob hard-linked, its manifest with only the id changed. Parts
    already there (a crash between the two steps) are kept. The old entry's files are the caller's to remove."""
    moved = dataclasses.replace(manifest, id=new_id)
    if not manifest.inline:
        with contextlib.suppress(FileExistsError):
            os.link(layout.blob_path(manifest.id), layout.blob_path(new_id))
    with contextlib.suppress(FileExistsError):
        publish_bytes(moved.encode(), layout.manifest_path(new_id), layout.tmp_dir,
                      lambda: layout.tmp_path(new_id, "manifest"), fsync=fsync)
    return moved


def remove_old_files(layout: SpoolLayout, file_id: int) -> None:
    """The manifest first: without it the blob is debris, never an entry of its own."""
    for path in (layout.manifest_path(file_id), layout.blob_path(file_id)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def finish_resaves(index: SpoolIndex, layout: SpoolLayout, *, fsync: bool) -> int:
    """Complete moves a crash interrupted: resaved entries whose files are still in the spool. Returns how many."""
    finished = 0
    for row in index.rows(states=[State.RESAVED]):
        old_id, new_id = row["id"], row.get("resaved_as")
        if new_id is None or not layout.manifest_path(old_id).exists():
            continue
        if not layout.manifest_path(new_id).exists():
            try:
                publish_resaved(layout, read_manifest(layout, old_id), new_id, fsync=fsync)
            except (OSError, SpoolCorruptError) as exc:
                log.error("entry %s: its move to %s cannot be finished (%s); its files are kept", old_id, new_id, exc)
                continue
        remove_old_files(layout, old_id)
        finished += 1
    return finished
