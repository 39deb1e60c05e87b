"""Stores: where artifact bytes go. `make_store(settings)` picks one from the `store` URL.

- ``file:///abs/dir``          → `LocalStore` (embedded default; the same key layout in a directory)
- ``s3://bucket[/root-prefix]`` → `S3Store` (S3 or any S3-compatible endpoint)

`S3Store` is imported lazily: aioboto3 is slow to import and the training-side client never needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from mldash.config import Settings
from mldash.errors import ConfigError
from mldash.store.base import (
    NoSuchUploadError,
    ObjectExistsError,
    PartReceipt,
    PendingUpload,
    PermanentStoreError,
    Store,
    StoredObject,
    StoreError,
    TransientStoreError,
    b64_sha256,
    composite_sha256,
    hex_to_b64,
)
from mldash.store.local import LocalStore

if TYPE_CHECKING:
    from mldash.store.s3 import S3Store

__all__ = [
    "LocalStore",
    "NoSuchUploadError",
    "ObjectExistsError",
    "PartReceipt",
    "PendingUpload",
    "PermanentStoreError",
    "S3Store",
    "Store",
    "StoreError",
    "StoredObject",
    "TransientStoreError",
    "b64_sha256",
    "composite_sha256",
    "hex_to_b64",
    "make_store",
]


def make_store(settings: Settings, *, read_only: bool = False) -> Store:
    """The store named by `settings.store` (not opened yet: `await store.open()` on the daemon's loop).
    `read_only`: opening it changes nothing (a local store neither creates its folders nor sweeps its debris;
    opening an S3 store never writes)."""
    parsed = urlparse(settings.store)
    if parsed.scheme == "file":
        return LocalStore(unquote(parsed.path), fsync=settings.power_safe, read_only=read_only,
                          max_upload_rate=settings.max_upload_rate, request_timeout=settings.request_timeout)
    if parsed.scheme == "s3":
        from mldash.store.s3 import S3Store

        return S3Store(
            parsed.netloc,
            unquote(parsed.path).strip("/"),
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            request_timeout=settings.request_timeout,
            # Enough pooled connections for everything the daemon runs at once (plus heads/lists), so no
            # request spends its deadline waiting for a connection.
            max_connections=settings.max_concurrent_parts + settings.max_concurrent_files + 4,
            max_upload_rate=settings.max_upload_rate,
        )
    raise ConfigError(f"store {settings.store!r}: accepted stores are 'file:///abs/dir' and 's3://bucket[/prefix]'")


def __getattr__(name: str) -> Any:
    if name == "S3Store":
        from mldash.store.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
