"""Manifests the upload stage read, kept for the commit stage of the same daemon process.

Manifests never change once in place (the client renames a finished one into the spool; only eviction,
after the commit, removes it), so a copy read for the upload is still the manifest at commit time: the
commit does not need to read and decode the file again. The same holds between the ingest (which reads
and checks every new manifest) and the upload. Bounded: with the catalog down, uploaded entries pile up;
beyond `limit` the oldest copies are dropped and the commit reads those from disk. The ingest only fills
free room (`offer`): it must not push out the copies the next commits need.
"""

from __future__ import annotations

from collections import OrderedDict

from mldash.spool.manifest import Manifest

DEFAULT_LIMIT = 2048  # ~1–2 KiB each (more with large metadata): a few MiB at most


class ManifestCache:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._items: OrderedDict[int, Manifest] = OrderedDict()

    def put(self, manifest: Manifest) -> None:
        self._items[manifest.id] = manifest
        self._items.move_to_end(manifest.id)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def offer(self, manifest: Manifest) -> None:
        """`put`, but only into free room."""
        if len(self._items) < self.limit:
            self._items[manifest.id] = manifest

    def get(self, file_id: int) -> Manifest | None:
        return self._items.get(file_id)

    def discard(self, file_id: int) -> None:
        self._items.pop(file_id, None)

    def __len__(self) -> int:
        return len(self._items)
