"""The store contract: where artifact bytes go. Implementations: `LocalStore` (file://) and `S3Store` (s3://).

Every implementation runs the one contract-test suite in tests/test_store_contract.py. The
interface is deliberately S3-shaped (single PUT, multipart with per-part checksums, conditional
create) so the daemon's upload pipeline is the same code for every store.

Checksums are base64 SHA256 as S3 reports them: for a single PUT the digest of the whole object;
for a multipart object the *composite* ``base64(sha256(d1 ‖ … ‖ dN)) + "-N"`` where di are the raw
32-byte part digests (see `composite_sha256`). A store must compute the checksum it reports from the
bytes it received, independently of the one we send: that is what makes verification mean something.

Errors: every method raises `StoreError` subclasses only; `transient` says whether retrying may help.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import hashlib
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mldash.errors import MldashError
from mldash.store.pacing import RateLimit

T = TypeVar("T")

# Bytes a store sends or writes. The daemon passes its part buffers (anonymous mmaps) as they are: a store
# must not keep a reference to them, nor a view, after the call returns — they are refilled with the next part.
Buffer = bytes | bytearray | memoryview | mmap.mmap


class StoreError(MldashError):
    """A store operation failed. `transient` = retrying later may succeed."""

    transient = True

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransientStoreError(StoreError):
    """Timeouts, resets, 5xx, throttling, a 200 with an error body: retry with backoff."""

    transient = True


class PermanentStoreError(StoreError):
    """403, missing bucket, bad credentials, invalid request: retrying the same way will not help."""

    transient = False


class ObjectExistsError(StoreError):
    """A conditional create (If-None-Match: *) found the key already there (412), or lost a race (409)."""

    transient = False


class NoSuchUploadError(StoreError):
    """The multipart upload id is unknown to the store (completed, aborted or expired)."""

    transient = False


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    checksum_sha256: str | None  # base64; composite "…-N" for multipart objects; None if the store has none
    etag: str | None = None


@dataclass(frozen=True)
class PartReceipt:
    part_number: int
    size: int
    etag: str
    checksum_sha256: str | None  # as reported by the store for this part (None when it reports none)


@dataclass(frozen=True)
class PendingUpload:
    key: str
    upload_id: str


def holding_view(data: Buffer, fn: Callable[[memoryview], T]) -> Callable[[], T]:
    """`fn(view of data)` for a worker thread, the view exported from now until the thread is done with it.

    Why: the daemon's part buffers are pooled and refilled (mldash_syncd.budget), and a buffer is refilled only
    when no view of it is left. A thread cannot be interrupted: a store call past its deadline, or a hash whose
    caller was cancelled, returns control while its thread goes on. Without a view made before the thread
    starts, a thread stalled before it read would read the next file's bytes — a local store wrote them under
    this key, beside this file's checksum. The view is released as the thread's call ends, before its result
    is delivered, so a buffer given back right after is reused at once.
    """
    view = memoryview(data)

    def call() -> T:
        try:
            return fn(view)
        finally:
            with contextlib.suppress(BufferError):  # a view derived from it still alive: the GC releases it
                view.release()

    return call


def b64_sha256(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class CompositeSha256:
    """S3's composite checksum of a multipart object, ``base64(sha256(d1 ‖ … ‖ dN))-N`` (di: the parts' raw
    SHA256 digests), built part by part: add the parts in part order and none of their digests is kept."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.count = 0

    def add(self, part_digest_b64: str) -> None:
        self._hash.update(base64.b64decode(part_digest_b64))
        self.count += 1

    @property
    def value(self) -> str:
        return f"{base64.b64encode(self._hash.digest()).decode()}-{self.count}"


def composite_sha256(part_digests_b64: list[str]) -> str:
    """S3's composite checksum of a multipart object from its parts' base64 SHA256 digests."""
    composite = CompositeSha256()
    for digest in part_digests_b64:
        composite.add(digest)
    return composite.value


def hex_to_b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


class Store(abc.ABC):
    """Async interface; every call must finish or raise within the deadline given at construction."""

    url: str
    # True when ETags are MD5 digests of the bytes received (S3 without SSE-KMS): the daemon then also
    # compares them with its own MD5s, which catches corruption in flight on stores (moto, some
    # S3-compatibles) that accept a wrong ChecksumSHA256 without validating it.
    etag_is_md5: bool = False
    # The upload bandwidth cap this store paces its uploads by (`max_upload_rate`; `set_rate` changes it while
    # uploads run). None: a store that does not pace.
    rate_limit: RateLimit | None = None

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire clients/sessions. Must be called on the event loop that will use the store."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients/sessions."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    def key(self, relative_key: str) -> str:
        """The full key for a layout key from `mldash.keys` (prepends the store's root prefix, if any)."""

    def unanswered(self) -> str | None:
        """A call waiting long for an answer, in words (a store that accepts connections and never answers), or
        None: what `status` shows before the call's deadline turns it into an error."""
        return None

    @abc.abstractmethod
    async def head(self, key: str) -> StoredObject | None:
        """Size and checksum of an existing object, or None when there is none."""

    @abc.abstractmethod
    async def put(self, key: str, data: bytes, sha256_b64: str) -> StoredObject:
        """Create an object in one request, only if the key is free (raises ObjectExistsError)."""

    @abc.abstractmethod
    async def create_multipart(self, key: str) -> str:
        """Start a multipart upload with SHA256 part checksums; returns the upload id."""

    @abc.abstractmethod
    async def upload_part(self, key: str, upload_id: str, part_number: int, data: Buffer,
                          sha256_b64: str) -> PartReceipt:
        """Upload one part (1-based numbers, all but the last ≥ 5 MiB). Re-uploading a number replaces it.
        `data` is only read during the call (see `Buffer`)."""

    @abc.abstractmethod
    async def list_parts(self, key: str, upload_id: str) -> dict[int, PartReceipt]:
        """The parts the store holds for an upload (all pages). Raises NoSuchUploadError."""

    @abc.abstractmethod
    async def complete_multipart(self, key: str, upload_id: str, parts: list[PartReceipt]) -> StoredObject:
        """Assemble the parts, only if the key is free (ObjectExistsError); NoSuchUploadError if gone."""

    @abc.abstractmethod
    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort an upload and free its parts; an unknown id is not an error."""

    @abc.abstractmethod
    async def list_multipart_uploads(self, prefix: str) -> list[PendingUpload]:
        """Unfinished multipart uploads under a key prefix (all pages)."""

    @abc.abstractmethod
    async def download(self, key: str, dest: Path) -> StoredObject:
        """Write the object to `dest` atomically (temp file + rename); raises StoreError if absent."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove an object; an absent key is not an error. (Used by tests and gc of our own orphans.)"""
