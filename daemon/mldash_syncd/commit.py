"""The catalog half of the pipeline: a verified upload becomes one catalog document."""

from __future__ import annotations

from typing import Any

from mldash.catalog.base import FileDocument
from mldash.keys import storage_uri
from mldash.spool.manifest import Manifest


def document_for(manifest: Manifest, *, store_url: str, store_key: str, committed_at: float,
                 checksum: str | None = None) -> FileDocument:
    """`checksum`: the SHA256 hex the daemon computed, for a manifest saved without one (deferred mode)."""
    checksum = manifest.sha256 or checksum
    if checksum is None:
        raise ValueError(f"entry {manifest.id}: no SHA256 known; a catalog document never goes without one")
    return FileDocument(
        id=str(manifest.id),
        namespace=manifest.namespace,
        project=manifest.project,
        experiment=manifest.experiment,
        path=manifest.path,
        filename=manifest.filename,
        sizeBytes=manifest.size,
        checksum=checksum,
        contentType=manifest.content_type,
        storageKey=store_key,
        storageUri=storage_uri(store_url, store_key),
        createdAt=manifest.created_at,
        committedAt=committed_at,
        description=manifest.description,
        tags=list(manifest.tags),
        metadata=dict(manifest.metadata),
    )


def clash(doc: FileDocument, stored: dict[str, Any] | None) -> str | None:
    """Why `stored` — what the catalog holds under `doc.id` after an upsert found that id present — is not
    this file's document, or None when it is (a replay of our own commit). Ids are unique only with
    overwhelming probability across hosts: the upsert's "already there" must never hide that this file
    is not the one recorded."""
    if stored is not None and stored["checksum"] == doc.checksum and stored["storageKey"] == doc.storageKey:
        return None
    return (f"catalog id {doc.id} already belongs to another file "
            f"({stored and stored.get('storageKey')}); this entry was not recorded")
