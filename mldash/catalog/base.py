"""The catalog contract: where file metadata goes. Implementations: `SqliteCatalog` and `MongoCatalog`.

One document per file version, keyed by its id; `upsert` with the same document is a no-op, so
replaying a commit after a crash changes nothing. Documents use ML-Dash's camelCase names.
Every implementation runs the one contract-test suite in tests/test_catalog_contract.py.
Errors: `CatalogError` with `transient` (catalog down, timeout) vs permanent (bad credentials…).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mldash.errors import CatalogUnavailableError, MldashError


class CatalogError(MldashError):
    transient = True


class TransientCatalogError(CatalogError, CatalogUnavailableError):
    """The catalog is down, unreachable or timing out: worth trying again later. For a reader, the public
    `mldash.CatalogUnavailableError`."""
    transient = True


class PermanentCatalogError(CatalogError):
    transient = False


@dataclass(frozen=True)
class FileDocument:
    id: str               # the snowflake id, as a decimal string (64-bit ints do not survive JSON/JS)
    namespace: str
    project: str
    experiment: str
    path: str             # the logical folder: "/models/checkpoints" or "/"
    filename: str
    sizeBytes: int
    checksum: str         # SHA256 hex of the bytes
    contentType: str
    storageKey: str
    storageUri: str
    createdAt: float      # Unix seconds, when the save call ran
    committedAt: float    # Unix seconds, when the catalog first recorded it
    description: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FileQuery:
    namespace: str
    project: str
    experiment: str
    path: str | None = None          # exact folder, e.g. "/models"
    tags: tuple[str, ...] = ()       # all of these tags
    filename_glob: str | None = None  # fnmatch-style, e.g. "*.pt"
    limit: int | None = None


class Catalog(abc.ABC):
    url: str

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect and create indexes. Must run on the event loop that will use the catalog."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    async def __aenter__(self) -> Catalog:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def upsert(self, doc: FileDocument) -> None:
        """Insert the document, or do nothing if one with this id exists (first committedAt wins)."""
        await self._insert([doc], f"upsert of {doc.id}")

    async def upsert_many(self, docs: Sequence[FileDocument]) -> set[str]:
        """`upsert` for a batch in one request (SQLite: one transaction; MongoDB: one unordered insert).

        Returns the ids that were already present: their stored document was left alone, as `upsert`
        leaves it (a replay — or another file holding the same id: `get_many` tells which). Every
        other document of the batch is stored when this returns. On an error, any subset of the batch
        may be stored; calling again with the same batch is safe (the stored ones come back as present).
        The same id twice in one batch: the first one is stored, the second reported present.
        """
        if not docs:
            return set()
        return await self._insert(docs, f"upsert of {len(docs)} documents")

    @abc.abstractmethod
    async def _insert(self, docs: Sequence[FileDocument], what: str) -> set[str]:
        """Store every document whose id is new, in one request; the ids already present. `what` names the
        operation in error messages."""

    @abc.abstractmethod
    async def get(self, file_id: str) -> dict[str, Any] | None:
        """The document with this id, or None."""

    @abc.abstractmethod
    async def get_many(self, file_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The documents with these ids, by id, in one request; ids not in the catalog are left out."""

    @abc.abstractmethod
    async def find(self, query: FileQuery) -> list[dict[str, Any]]:
        """Documents of one experiment matching the query, oldest first (by id)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise TransientCatalogError if the catalog cannot be reached within its deadline."""
