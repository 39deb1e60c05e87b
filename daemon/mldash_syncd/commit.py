"""The catalog half of the pipeline: a verified upload becomes one catalog document."""

from __future__ import annotations

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
