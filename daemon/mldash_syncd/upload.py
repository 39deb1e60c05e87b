"""Moving one spooled entry's bytes into the store, verified — the upload half of the pipeline.

The blob is read exactly once, part by part. Each part is hashed (SHA256 for the part checksum) and
fed to the whole-file SHA256; the whole-file digest must equal the manifest's before the object is
completed (a manifest without sha256 — the deferred checksum mode — has nothing to compare: that one
pass is where its checksum is computed, returned in `Verified`), and the store's own report must equal
what we computed — otherwise nothing is committed.

What the store reports, and so what is compared:
- multipart: the composite SHA256 the store computes at completion from the parts it received (S3,
  MinIO and moto all do) covers every byte. MD5s of the parts (for the ETags) would cost more CPU than
  both SHA256s together (~1.15 s per GiB), so they are only computed when ETag checks are asked for
  explicitly (verify_etag=true); a store that reports no composite gets one more read of the blob for
  the MD5s instead (see `_verify_multipart`);
- single PUT: stores that echo the checksum they were sent instead of validating it (moto, some
  S3-compatibles) are caught by the ETag = MD5 comparison (`Settings.checks_etags`).

Resumable: the upload id, part size and every completed part are recorded in the index as they
happen. After a crash the upload is reconciled with ListParts and only parts the store does not
hold (with the right ETag) are sent again: at most the parts that were in flight.

Memory: the parts in flight, not the part count (up to 10,000). Parts are read and hashed one after
another in part order — only their sends overlap — so each part's digests go straight into the running
composite checksums (`_Composite`) and none is kept. A part's receipt (ETag, size, checksum) is already
recorded in the index as it completes; completion reads the part list back from there. All an upload
keeps per part until then is one byte: whether the store reported that part's checksum.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import mmap
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mldash.config import Settings
from mldash.errors import SpoolCorruptError
from mldash.spool.index import SpoolIndex
from mldash.spool.manifest import Manifest
from mldash.store.base import (
    Buffer,
    CompositeSha256,
    NoSuchUploadError,
    ObjectExistsError,
    PartReceipt,
    Store,
    StoredObject,
    hex_to_b64,
    holding_view,
)
from mldash_syncd.budget import ByteBudget
from mldash_syncd.retry import ChecksumMismatchError, EntryRetryableError, IdClashError, VerificationError

log = logging.getLogger("mldash_syncd.upload")

MIB = 2**20
MAX_PARTS = 10_000
ON_LOOP_LIMIT = 64 * 1024  # single PUTs up to this size are read and hashed on the event loop (~0.1 ms)


def part_size_for(size: int, minimum: int) -> int:
    """max(minimum, size/10,000) rounded up to a whole MiB, so 100 GB+ objects fit in 10,000 parts."""
    return max(minimum, math.ceil(size / MAX_PARTS / MIB) * MIB)


@dataclass(frozen=True)
class Verified:
    """What the store holds for an entry, checked against our own hashes."""

    key: str
    checksum: str | None  # as the store reports it
    sha256_hex: str       # whole-file SHA256 of the bytes read from the spool (= manifest.sha256 when it has one)


@dataclass
class _PartHashes:
    sha256_b64: str
    md5_hex: str


class _Composite:
    """A multipart object's checksums as the store computes them from its parts: the composite SHA256
    (`CompositeSha256`) and, with part MD5s, the ETag ``md5(m1 ‖ … ‖ mN)-N`` (mi: raw part MD5s). Both are
    running hashes over the parts' digests, so parts must be added in part order — and then no part's
    digests need to be kept."""

    def __init__(self, *, md5: bool) -> None:
        self._sha256 = CompositeSha256()
        self._md5 = hashlib.md5() if md5 else None

    @property
    def count(self) -> int:
        return self._sha256.count

    def add(self, hashes: _PartHashes) -> None:
        self._sha256.add(hashes.sha256_b64)
        if self._md5 is not None:
            self._md5.update(bytes.fromhex(hashes.md5_hex))

    @property
    def sha256(self) -> str:
        return self._sha256.value

    @property
    def etag(self) -> str | None:
        """The expected ETag, or None when the parts' MD5s were not computed."""
        return None if self._md5 is None else f"{self._md5.hexdigest()}-{self.count}"


def _hash_part(data: bytes) -> _PartHashes:
    return _PartHashes(_sha256_b64(data), _md5_hex(data))


def _sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


async def _nothing() -> str:
    return ""


def _etag(value: str | None) -> str:
    return (value or "").strip('"').lower()


class Uploader:
    """Uploads entries to one store; shares a part-concurrency budget across all files."""

    def __init__(self, settings: Settings, store: Store, index: SpoolIndex, blobs_dir: Path,
                 budget: ByteBudget, on_bytes: Callable[[int], None] | None = None,
                 committed_elsewhere: Callable[[Manifest, str], Awaitable[str | None]] | None = None) -> None:
        """`committed_elsewhere(manifest, key)`: why the catalog's document under this entry's id is another file's,
        or None (no document, or this entry's own) — asked before an object found at the key is removed."""
        self.settings = settings
        self.committed_elsewhere = committed_elsewhere
        self.store = store
        self.index = index
        self.blobs_dir = blobs_dir
        self.budget = budget
        self.on_bytes = on_bytes or (lambda n: None)
        self.check_etag = settings.checks_etags and getattr(store, "etag_is_md5", False)
        self.md5_parts = self.check_etag and settings.verify_etag is True  # see the module doc
        self._unrecorded_bytes: dict[int, int] = {}

    def take_unrecorded_bytes(self, file_id: int) -> int:
        """Bytes sent for this entry that the index does not count yet (single PUTs leave their count to the
        transaction that records the outcome)."""
        return self._unrecorded_bytes.pop(file_id, 0)

    async def upload(self, manifest: Manifest) -> Verified:
        key = self.store.key(manifest.key())
        blob = self.blobs_dir / str(manifest.id)
        if manifest.inline or manifest.size < self.settings.multipart_threshold:
            return await self._single(manifest, key, blob)
        return await self._multipart(manifest, key, blob)

    # ---- small objects: one PUT ---------------------------------------------------------------
    async def _single(self, manifest: Manifest, key: str, blob: Path) -> Verified:
        on_loop = manifest.inline or manifest.size <= ON_LOOP_LIMIT
        buffer = None
        if on_loop:
            await self.budget.acquire(manifest.size)
        else:  # a buffer from the budget, as for multipart parts (budget.py)
            buffer = await self.budget.take_buffer(manifest.size)
        try:
            if buffer is None:
                # Reading and hashing a few KiB takes microseconds; handing them to threads costs more
                # than it saves, and small files are where the per-file cost is the whole cost.
                data = manifest.payload if manifest.inline else _read_all(blob, manifest)
                hashes = _hash_part(data) if self.check_etag else _PartHashes(_sha256_b64(data), "")
            else:
                data = buffer
                await asyncio.to_thread(_read_blob_into, blob, memoryview(buffer), manifest)
                hashes = await self._hash(buffer, md5=self.check_etag)
            sha_b64 = hashes.sha256_b64
            if manifest.sha256 is not None and sha_b64 != hex_to_b64(manifest.sha256):
                raise SpoolCorruptError(f"spooled bytes of {manifest.id} changed: sha256 "
                                        f"{base64.b64decode(sha_b64).hex()} ≠ manifest {manifest.sha256}")
            # The key is recorded with the outcome (the `uploaded` transition): a single PUT leaves nothing
            # behind for anyone to find by key if we die first — a retry's conditional PUT meets the object.
            existed = False
            try:
                stored = await self.store.put(key, data, sha_b64)
                # Counted in the index with the outcome (take_unrecorded_bytes): one write less per small file.
                self._unrecorded_bytes[manifest.id] = self._unrecorded_bytes.get(manifest.id, 0) + manifest.size
                self.on_bytes(manifest.size)
            except ObjectExistsError:
                # An earlier attempt's PUT landed but its response was lost (or we crashed after it) — or another
                # file with the same id and names got there first (see _discard).
                stored, existed = await self._existing(key, manifest), True
        finally:
            if buffer is None:
                await self.budget.release(manifest.size)
            else:
                await self.budget.give_back(buffer)
        try:
            self._verify(manifest, stored, sha_b64, hashes.md5_hex if self.check_etag else None)
        except VerificationError as exc:
            await self._discard(key, manifest, stored, exc, found=existed)
            raise
        return Verified(key, stored.checksum_sha256, base64.b64decode(sha_b64).hex())

    # ---- large objects: multipart -------------------------------------------------------------
    async def _multipart(self, manifest: Manifest, key: str, blob: Path) -> Verified:
        existing = await self.store.head(key)
        if existing is not None:  # completed before a crash, commit not yet recorded
            try:
                return await asyncio.to_thread(self._verify_existing, manifest, existing, blob)
            except VerificationError as exc:
                await self._discard(key, manifest, existing, exc, found=True)
                raise
        part_size = part_size_for(manifest.size, self.settings.part_size)
        count = max(1, math.ceil(manifest.size / part_size))
        row = self.index.get(manifest.id) or {}
        upload_id, held = row.get("upload_id"), {}
        if upload_id and row.get("part_size") == part_size:
            try:
                held = await self.store.list_parts(key, upload_id)
            except NoSuchUploadError:
                upload_id = None
        else:
            upload_id = None
        if upload_id is None:
            self.index.clear_parts(manifest.id)
            upload_id = await self.store.create_multipart(key)
            # Record it at once: if we die now, gc and the next attempt can find (and reuse or abort) it.
            self.index.update(manifest.id, upload_id=upload_id, part_size=part_size, store_key=key)
            held = {}
        log.info("upload %s: multipart %s, %d parts of %d MiB, %d already in store", manifest.id, upload_id,
                 count, part_size // MIB, len(held))

        # All that is kept per part until completion (see the module doc): whether the store reported its checksum.
        reported = bytearray(count)
        composite = _Composite(md5=self.md5_parts)
        whole = hashlib.sha256()
        fd = os.open(blob, os.O_RDONLY | os.O_CLOEXEC)
        try:
            async with asyncio.TaskGroup() as group:
                for number in range(1, count + 1):
                    offset = (number - 1) * part_size
                    length = min(part_size, manifest.size - offset)
                    # A buffer from the budget bounds memory to the parts in flight. Parts are passed on as the
                    # buffer itself, never as a view of it, so nothing that outlives a send pins it (budget.py).
                    buffer = await self.budget.take_buffer(length)
                    try:
                        # The view is made here, not in the thread: from now until the read is over, the buffer
                        # counts as in use, even if this task is cancelled before the thread starts.
                        await asyncio.to_thread(_read_into, fd, memoryview(buffer), offset, manifest.id)
                        hashes = await self._hash(buffer, whole, md5=self.md5_parts)
                        composite.add(hashes)  # in part order: this loop awaits each part's hashes in turn
                        have = held.pop(number, None)  # a listed part is let go once judged
                        held_already = have is not None and await self._reconcile(manifest, have, buffer, hashes)
                    except BaseException:
                        await self.budget.give_back(buffer)
                        raise
                    if held_already:
                        reported[number - 1] = bool(have.checksum_sha256)
                        await self.budget.give_back(buffer)
                        continue
                    group.create_task(self._send_part(manifest, key, upload_id, number, buffer, hashes, reported))
        finally:
            os.close(fd)

        whole_hex = whole.hexdigest()
        if manifest.sha256 is not None and whole_hex != manifest.sha256:
            await self.store.abort_multipart(key, upload_id)
            self.index.update(manifest.id, upload_id=None)
            raise SpoolCorruptError(f"spooled bytes of {manifest.id} changed: sha256 {whole_hex} ≠ "
                                    f"manifest {manifest.sha256}")
        existed = False
        try:
            # The part list lives only as long as this request: S3 wants every part in its one body.
            stored = await self.store.complete_multipart(
                key, upload_id, self._recorded_parts(manifest, count, part_size, reported))
        except (ObjectExistsError, NoSuchUploadError):
            # Completed by an earlier attempt whose response was lost: judge the object by its checksum.
            stored, existed = await self._existing(key, manifest), True
        self.index.update(manifest.id, upload_id=None)
        try:
            await self._verify_multipart(manifest, stored, composite, blob, part_size)
        except VerificationError as exc:
            await self._discard(key, manifest, stored, exc, found=existed)
            raise
        return Verified(key, stored.checksum_sha256, whole_hex)

    def _recorded_parts(self, manifest: Manifest, count: int, part_size: int, reported: bytearray
                        ) -> list[PartReceipt]:
        """The part list for CompleteMultipartUpload, read back from the index: every part the store holds
        for this upload was recorded there, by `_send_part` or `_reconcile`. The checksum goes with a part
        where the store reported one (and it equalled ours), as when the receipts were kept."""
        parts: list[PartReceipt] = []
        for number, size, etag, sha256_b64 in self.index.iter_parts(manifest.id):
            if number != len(parts) + 1 or size != min(part_size, manifest.size - (number - 1) * part_size):
                break
            parts.append(PartReceipt(number, size, etag, sha256_b64 if reported[number - 1] else None))
            if len(parts) == count:
                return parts
        # Not expected (nothing else writes this entry's parts while it is leased to us): the next attempt
        # reconciles the upload with ListParts again and records what the store holds.
        raise EntryRetryableError(f"{manifest.id}: part {len(parts) + 1} of {count} is not recorded in the index "
                                  "as the store received it; the upload is not completed")

    async def _send_part(self, manifest: Manifest, key: str, upload_id: str, number: int, buffer: mmap.mmap,
                         hashes: _PartHashes, reported: bytearray) -> None:
        try:
            receipt = await self.store.upload_part(key, upload_id, number, buffer, hashes.sha256_b64)
            size = len(buffer)
            self.index.add_bytes_sent(manifest.id, size)
            self.on_bytes(size)
            if receipt.checksum_sha256 and receipt.checksum_sha256 != hashes.sha256_b64:
                raise VerificationError(f"part {number} of {manifest.id}: store checksum {receipt.checksum_sha256} "
                                        f"≠ sent {hashes.sha256_b64}")
            if hashes.md5_hex and _etag(receipt.etag) != hashes.md5_hex:
                raise VerificationError(f"part {number} of {manifest.id}: store received other bytes than sent "
                                        f"(ETag {receipt.etag} ≠ MD5 {hashes.md5_hex})")
            self.index.record_part(manifest.id, number, size, receipt.etag, hashes.sha256_b64)
            reported[number - 1] = bool(receipt.checksum_sha256)
        finally:
            await self.budget.give_back(buffer)

    async def _hash(self, data: Buffer, whole: Any = None, *, md5: bool) -> _PartHashes:
        """The part's SHA256, its MD5 (if asked for) and the whole-file digest's update, each on its own
        thread: hashlib releases the GIL, so they run side by side instead of one after another."""
        # Views made here, on the loop, held until each thread is done (holding_view): a hash thread that starts
        # after its cancelled caller gave the buffer back keeps it from being refilled under it.
        sha, md5_hex, *_ = await asyncio.gather(
            asyncio.to_thread(holding_view(data, _sha256_b64)),
            asyncio.to_thread(holding_view(data, _md5_hex)) if md5 else _nothing(),
            *([asyncio.to_thread(holding_view(data, whole.update))] if whole is not None else []))
        return _PartHashes(sha, md5_hex)

    async def _reconcile(self, manifest: Manifest, have: PartReceipt, data: Buffer, hashes: _PartHashes) -> bool:
        """Whether a part the store already holds (after a crash) can stand; if so, it is recorded in the index
        as completing the upload reads it — a crash may have come between the store's answer and our record."""
        recorded = self.index.part(manifest.id, have.part_number)
        if not await self._store_holds(have, recorded, data, hashes):
            return False
        if recorded is None or (recorded["size"], recorded["etag"], recorded["sha256"]) != (
                have.size, have.etag, hashes.sha256_b64):
            self.index.record_part(manifest.id, have.part_number, have.size, have.etag, hashes.sha256_b64)
        return True

    async def _store_holds(self, have: PartReceipt, recorded: dict[str, Any] | None, data: Buffer,
                           hashes: _PartHashes) -> bool:
        """Whether a part the store already holds (after a crash) is the spooled part we just read.

        By the part checksum the store lists (S3 does); else by the index's record of the part as sent —
        with the SHA256 computed now (the spooled bytes are unchanged) and the ETag listed now (the store
        holds what it acknowledged); else, for a part that was in flight when we stopped, by its ETag where
        that is the MD5 of the bytes received. The composite checksum at completion re-checks every part."""
        if have.size != len(data):
            return False
        if have.checksum_sha256:
            return have.checksum_sha256 == hashes.sha256_b64
        if (recorded is not None and recorded.get("sha256") == hashes.sha256_b64
                and _etag(recorded.get("etag")) == _etag(have.etag)):
            return True
        if self.check_etag:
            return _etag(have.etag) == (hashes.md5_hex or await asyncio.to_thread(holding_view(data, _md5_hex)))
        return False

    # ---- verification -------------------------------------------------------------------------
    async def _discard(self, key: str, manifest: Manifest, stored: StoredObject, error: VerificationError, *,
                       found: bool) -> None:
        """Remove an object at this entry's key that failed verification (damaged in flight, or truncated by a
        store that does not check Content-Length): left in place, every later conditional create would meet it
        and the entry could never be delivered, not even after `retry`.

        Only what is provably a damaged write. An object this attempt created is ours. One the create met
        (`found`) may be another file's: the key holds the entry's id, and ids are unique across hosts only with
        high probability — same id, same names, another daemon. It is removed only when it carries our SHA256
        (the store recorded the checksum we send; only its size or ETag is off), or when the catalog names no
        other file under this id and it is shorter than ours (a write cut short: moto keeps an empty object
        after a reset mid-body). Anything else stays, and this entry is the one that goes elsewhere: a new id
        (IdClashError: the daemon re-saves it)."""
        if found:
            ours = stored.checksum_sha256 is not None and not isinstance(error, ChecksumMismatchError)
            if not ours:
                owner = None if self.committed_elsewhere is None else await self.committed_elsewhere(manifest, key)
                cut_short = stored.size is not None and stored.size < manifest.size
                if owner is not None or not cut_short:
                    why = owner or "not provably a damaged write of ours"
                    raise IdClashError(f"{manifest.id}: the store holds another file's object at {key} ({why}); "
                                       "the object was left alone") from error
        log.warning("upload %s: the object at %s does not hold the spooled bytes; removing it", manifest.id, key)
        await self.store.delete(key)

    async def _existing(self, key: str, manifest: Manifest) -> StoredObject:
        stored = await self.store.head(key)
        if stored is None:
            raise VerificationError(f"{manifest.id}: the store refused a create at {key} but holds no object there")
        return stored

    def _verify(self, manifest: Manifest, stored: StoredObject, sha_b64: str, md5_hex: str | None) -> None:
        # The checksum first: a different one says whose object it is (see _discard), a size alone does not.
        if stored.checksum_sha256 is not None and stored.checksum_sha256 != sha_b64:
            raise ChecksumMismatchError(f"{manifest.id}: store checksum {stored.checksum_sha256} ≠ ours {sha_b64}")
        if stored.size is not None and stored.size != manifest.size:
            raise VerificationError(f"{manifest.id}: store holds {stored.size} bytes, spool has {manifest.size}")
        if md5_hex is not None and stored.etag and _etag(stored.etag) != md5_hex:
            raise VerificationError(f"{manifest.id}: store received other bytes than sent (ETag {stored.etag} ≠ "
                                    f"MD5 {md5_hex})")

    async def _verify_multipart(self, manifest: Manifest, stored: StoredObject, composite: _Composite,
                                blob: Path, part_size: int) -> None:
        etag = composite.etag
        if etag is None and self.check_etag and stored.checksum_sha256 is None and stored.etag:
            # No composite checksum to compare: the ETag is the store's only account of the bytes it holds.
            log.warning("upload %s: the store reports no SHA256 checksum; reading the blob again for the MD5s "
                        "of its ETag", manifest.id)
            etag = await asyncio.to_thread(_md5_etag, blob, part_size)
        self._verify_composite(manifest, stored, composite.sha256, etag)

    def _verify_composite(self, manifest: Manifest, stored: StoredObject, expected: str,
                          expected_etag: str | None) -> None:
        if stored.checksum_sha256 is not None and stored.checksum_sha256 != expected:
            raise ChecksumMismatchError(f"{manifest.id}: store received other bytes than sent (composite checksum "
                                        f"{stored.checksum_sha256} ≠ ours {expected})")
        if stored.size is not None and stored.size != manifest.size:
            raise VerificationError(f"{manifest.id}: store holds {stored.size} bytes, spool has {manifest.size}")
        if expected_etag is not None and stored.etag and _etag(stored.etag) != expected_etag:
            raise VerificationError(f"{manifest.id}: store received other bytes than sent (ETag {stored.etag} "
                                    f"≠ ours {expected_etag})")

    def _verify_existing(self, manifest: Manifest, stored: StoredObject, blob: Path) -> Verified:
        """An object already at our key (a lost response, or a crash before the commit was recorded):
        recompute its checksum from the spooled bytes — one pass — and compare. Runs in a thread."""
        # Multipart objects say so in their composite checksum, or (a store without checksums) in their ETag.
        parts = _part_count(stored.checksum_sha256) or _part_count(_etag(stored.etag))
        if not parts:
            whole_hex, whole_md5 = _whole_digests(blob, md5=self.check_etag)
            _check_spooled(manifest, whole_hex)
            self._verify(manifest, stored, hex_to_b64(whole_hex), whole_md5)
            return Verified(stored.key, stored.checksum_sha256, whole_hex)
        # Part MD5s only where the ETag is compared: verify_etag=true, or no composite to use.
        md5 = self.check_etag and (self.md5_parts or stored.checksum_sha256 is None)
        whole_hex, composite = _digests(blob, part_size_for(manifest.size, self.settings.part_size), md5=md5)
        _check_spooled(manifest, whole_hex)
        if composite.count != parts:  # with a composite checksum, not the one we would have made: a mismatch
            kind = ChecksumMismatchError if stored.checksum_sha256 is not None else VerificationError
            raise kind(f"{manifest.id}: existing object has {parts} parts; ours would have {composite.count}")
        self._verify_composite(manifest, stored, composite.sha256, composite.etag)
        return Verified(stored.key, stored.checksum_sha256, whole_hex)


def _check_spooled(manifest: Manifest, whole_hex: str) -> None:
    if manifest.sha256 is not None and whole_hex != manifest.sha256:
        raise SpoolCorruptError(f"spooled bytes of {manifest.id} changed: sha256 {whole_hex} ≠ manifest "
                                f"{manifest.sha256}")


def _part_count(value: str | None) -> int:
    """N of a multipart checksum or ETag ("…-N"); 0 for a single object."""
    head, _, tail = (value or "").rpartition("-")
    return int(tail) if head and tail.isdigit() else 0


def _md5_etag(path: Path, part_size: int) -> str:
    """The ETag S3 gives a multipart object of the blob's bytes in parts of `part_size` (one read)."""
    joined, count = hashlib.md5(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(part_size):
            joined.update(hashlib.md5(chunk).digest())
            count += 1
    return f"{joined.hexdigest()}-{count}"


def _read_all(path: Path, manifest: Manifest) -> bytes:
    # os-level calls, not Path.read_bytes: no buffered file object for a read that is often 4 KiB.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SpoolCorruptError(f"blob {manifest.id} is missing from the spool") from None
    try:
        chunks, wanted = [], manifest.size + 1  # one byte more than the manifest says: a longer blob shows
        while wanted > 0 and (chunk := os.read(fd, wanted)):
            chunks.append(chunk)
            wanted -= len(chunk)
    finally:
        os.close(fd)
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) != manifest.size:
        raise SpoolCorruptError(f"blob {manifest.id}: {len(data)} bytes, manifest says {manifest.size}")
    return data


def _read_blob_into(path: Path, view: memoryview, manifest: Manifest) -> None:
    """A whole blob into the buffer behind `view` (exactly its size), then release the view (worker thread)."""
    with view:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SpoolCorruptError(f"blob {manifest.id} is missing from the spool") from None
        try:
            _read_into(fd, view, 0, manifest.id)
            if os.pread(fd, 1, manifest.size):  # one byte more than the manifest says: the blob is longer
                raise SpoolCorruptError(f"blob {manifest.id} is longer than its manifest says ({manifest.size} bytes)")
        finally:
            os.close(fd)


def _read_into(fd: int, view: memoryview, offset: int, file_id: int) -> None:
    """Fill the buffer behind `view` with the blob's bytes from `offset`, then release the view (runs in a
    worker thread)."""
    with view:
        got = 0
        while got < len(view):  # preadv may return short reads on huge requests
            with view[got:] as rest:
                count = os.preadv(fd, [rest], offset + got)
            if count == 0:
                raise SpoolCorruptError(f"blob {file_id} is shorter than its manifest says")
            got += count
    _drop_cached(fd, offset, got)


def _drop_cached(fd: int, offset: int, length: int) -> None:
    """Every spooled byte is read once: its page cache is of no further use, and a checkpoint of tens of GB
    would otherwise push the training job's data out of memory. Dropping it here, part by part in a worker
    thread, also takes that work off the end of the drain: unlinking a 1 GiB blob whose pages are cached
    costs ~300 ms on the benchmark machine, ~130 ms without them. Pages still dirty are left (the kernel
    only starts their writeback)."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _digests(path: Path, part_size: int, *, md5: bool) -> tuple[str, _Composite]:
    """Whole-file SHA256 hex and the composite checksums (the ETag too, if asked for) of the blob's bytes in
    parts of `part_size`, in one read."""
    whole, composite = hashlib.sha256(), _Composite(md5=md5)
    with open(path, "rb") as handle:
        while chunk := handle.read(part_size):
            whole.update(chunk)
            composite.add(_PartHashes(_sha256_b64(chunk), _md5_hex(chunk) if md5 else ""))
    return whole.hexdigest(), composite


def _whole_digests(path: Path, *, md5: bool) -> tuple[str, str | None]:
    """Whole-file SHA256 hex and, if asked for, MD5 hex (a single object's ETag), in one read."""
    whole, whole_md5 = hashlib.sha256(), hashlib.md5() if md5 else None
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * MIB):
            whole.update(chunk)
            if whole_md5 is not None:
                whole_md5.update(chunk)
    return whole.hexdigest(), None if whole_md5 is None else whole_md5.hexdigest()
