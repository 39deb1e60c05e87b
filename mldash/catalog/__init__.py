"""Catalogs (file metadata): the contract in `base`, `SqliteCatalog` (embedded default), `MongoCatalog`.

`make_catalog(settings)` picks the implementation from ``settings.catalog``:
``sqlite:///abs/file`` → `SqliteCatalog`, ``mongodb://…`` / ``mongodb+srv://…`` → `MongoCatalog`.
The catalog is returned unopened: ``await catalog.open()`` (or ``async with``) on the event loop that
will use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from mldash.catalog.base import (
    Catalog,
    CatalogError,
    FileDocument,
    FileQuery,
    PermanentCatalogError,
    TransientCatalogError,
)
from mldash.catalog.sqlite import SqliteCatalog
from mldash.config import Settings
from mldash.errors import ConfigError

if TYPE_CHECKING:
    from mldash.catalog.mongo import MongoCatalog

__all__ = [
    "Catalog",
    "CatalogError",
    "FileDocument",
    "FileQuery",
    "MongoCatalog",
    "PermanentCatalogError",
    "SqliteCatalog",
    "TransientCatalogError",
    "make_catalog",
]


def __getattr__(name: str) -> Any:
    # pymongo is imported only when MongoDB is used: SQLite users (and the client's `ls`) skip it.
    if name == "MongoCatalog":
        from mldash.catalog.mongo import MongoCatalog

        return MongoCatalog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_catalog(settings: Settings, *, for_reads: bool = False, selection_timeout: float | None = None) -> Catalog:
    """The catalog `settings.catalog` names, configured from `settings` (not opened yet).

    `for_reads`: a client that only reads (creates no MongoDB indexes). `selection_timeout`: the longest a MongoDB
    operation may wait for a server to be reachable (default: the URI's serverSelectionTimeoutMS, else
    mongo.SERVER_SELECTION_TIMEOUT; a value given here bounds either).
    """
    url = settings.catalog
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        if parsed.netloc or not parsed.path.startswith("/"):
            raise ConfigError(f"catalog {url!r}: a SQLite catalog must be 'sqlite:///abs/file'")
        return SqliteCatalog(Path(unquote(parsed.path)), request_timeout=settings.request_timeout,
                             power_safe=settings.power_safe)
    from mldash.catalog.mongo import MongoCatalog
    from mldash.redact import redact_uri

    if parsed.scheme in ("mongodb", "mongodb+srv"):
        options = {} if selection_timeout is None else {"selection_timeout": selection_timeout}
        return MongoCatalog(url, database=settings.mongo_database, request_timeout=settings.request_timeout,
                            create_indexes=not for_reads, **options)
    raise ConfigError(f"catalog {redact_uri(url)!r}: accepted catalogs are 'sqlite:///abs/file' and "
                      "'mongodb://…' URIs")
