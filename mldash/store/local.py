"""`LocalStore`: the embedded default store, a directory with the same key layout as S3.

    {root}/
      <key>                          the objects, exactly the key layout (files/{ns}/{project}/…)
      .meta/<key>                    JSON sidecar per object: size, checksum (base64 SHA256, composite for
                                     multipart), etag — the store's own record, like S3's object metadata
      .uploads/{upload_id}/          one pending multipart upload: upload.json (key, initiated) and
                                     part-{n} files (a 48-byte header with size and SHA256, then the bytes)
      .tmp/                          files being written; linked into place, never renamed over anything
      .lock                          flock serialising commits (sidecar + link) and deletes

Why it is built like this:
- It emulates S3 closely (conditional create, multipart with per-part SHA256 computed *here* from the
  bytes received, composite checksum, the 5 MiB minimum part, InvalidPart/InvalidPartOrder), so the
  daemon runs one pipeline for every store and local tests catch what S3 would refuse.
- Never overwriting: an object appears by `os.link(temp, final)`, which fails if the key exists.
- A commit holds `.lock` while it writes the sidecar, then links the object. A crash in between leaves a
  stale sidecar and no object (harmless: the next commit of that key rewrites it); an object is never
  visible without its sidecar. Readers take no lock.
- Keys are validated and resolved to stay under the root (defence in depth: `mldash.keys` validates too);
  the first component may not start with "." so no key can reach the store's own dot-directories.
- Blocking file I/O runs in `asyncio.to_thread`, so big files do not stall the daemon's event loop.
- Every call has a deadline, like an S3 call's (`request_timeout`, plus `seconds_per_mib` per MiB it moves):
  a directory on a hung NFS mount, or a disk that stops answering, blocks a thread in the kernel for ever.
  Without a deadline the daemon went on renewing the entry's lease and writing its heartbeat, and nothing said
  a worker was stuck. Past its deadline a call raises TransientStoreError, so the store gate reports the store
  unreachable (`status`, `status --check`) and backs off. The thread itself cannot be interrupted: if the
  call completes later, what it did is what a retry meets (an object with our checksum is ours; a part file is
  replaced whole; a temp file is debris).
- With ``fsync=True`` (``durability = "power"``) files and directories are fsynced before a call returns.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from mldash.errors import TRANSIENT_OS_ERRNOS
from mldash.keys import MAX_KEY_BYTES
from mldash.spool.layout import fsync_dir, make_private_dir, open_private
from mldash.store.base import (
    Buffer,
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
    holding_view,
)
from mldash.store.pacing import RateLimit, pace

T = TypeVar("T")
log = logging.getLogger("mldash.store")

MIN_PART_SIZE = 5 * 2**20  # S3's minimum for every part but the last
MAX_PART_NUMBER = 10_000
_COPY_CHUNK = 8 * 2**20

# Part file header: magic, payload size, raw SHA256 of the payload. One file holds bytes and digest, so a
# re-uploaded part replaces both in one rename.
_PART_MAGIC = b"MLDPART1"
_PART_HEADER = struct.Struct(">8sQ32s")
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_DEBRIS_AGE = 3600.0  # seconds without a write before a temp file or half-created upload is debris
# Deadline allowance per part file for calls whose work grows with the part count (list, abort): an open, read
# and close of a header on NFS is a few round trips.
_SECONDS_PER_PART_FILE = 0.01


class LocalStore(Store):
    def __init__(self, root: Path | str, *, fsync: bool = False, read_only: bool = False,
                 max_upload_rate: int | None = None, request_timeout: float = 60.0,
                 seconds_per_mib: float = 0.5) -> None:
        """`read_only`: `open` neither creates the store's folders nor sweeps its debris (`gc --dry-run` only
        lists the uploads in progress; a missing folder lists none). `max_upload_rate` (bytes per second):
        each put or part waits for its share of the cap before it is written (pacing.py). A call gets
        `request_timeout` seconds, plus `seconds_per_mib` per MiB it writes (see the module doc); a download,
        whose size is known only once it runs, gets none."""
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()
        self.fsync = fsync
        self.read_only = read_only
        self._tmp = self.root / ".tmp"
        self._uploads = self.root / ".uploads"
        self._meta = self.root / ".meta"
        self._ready = False
        self.request_timeout = request_timeout
        self.seconds_per_mib = seconds_per_mib
        self.rate_limit = RateLimit(max_upload_rate or None)  # always there: a reload may set a cap

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- the contract ---------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run("open", "", self._open_layout)
        if self.read_only:
            return
        try:
            # Its cost grows with the debris (a retired upload of 10,000 parts): a deadline for the whole sweep
            # would fail the start of a daemon whose store is merely untidy, so one that runs out only says so.
            await self._run("clean up", "", self._clean_up)
        except TransientStoreError as exc:
            if exc.code != "Timeout":
                raise
            log.warning("store %s: removing what crashed calls left behind takes longer than %gs; it goes on in "
                        "the background", self.url, self.request_timeout)

    def key(self, relative_key: str) -> str:
        return relative_key  # a file:// store has no root prefix: its root is the directory

    async def head(self, key: str) -> StoredObject | None:
        return await self._run("head", key, self._head, key)

    async def put(self, key: str, data: bytes, sha256_b64: str) -> StoredObject:
        await pace(self.rate_limit, len(data))
        return await self._run("put", key, holding_view(data, lambda view: self._put(key, view, sha256_b64)),
                               nbytes=len(data))

    async def create_multipart(self, key: str) -> str:
        return await self._run("create_multipart", key, self._create_multipart, key)

    async def upload_part(self, key: str, upload_id: str, part_number: int, data: Buffer,
                          sha256_b64: str) -> PartReceipt:
        await pace(self.rate_limit, memoryview(data).nbytes)
        return await self._run("upload_part", key,
                               holding_view(data, lambda view: self._upload_part(key, upload_id, part_number, view,
                                                                             sha256_b64)),
                               nbytes=memoryview(data).nbytes)

    async def list_parts(self, key: str, upload_id: str) -> dict[int, PartReceipt]:
        return await self._run("list_parts", key, self._list_parts, key, upload_id, per_part_files=True)

    async def complete_multipart(self, key: str, upload_id: str, parts: list[PartReceipt]) -> StoredObject:
        # The parts are copied together and the result hashed: the whole object's bytes, twice.
        return await self._run("complete_multipart", key, self._complete, key, upload_id, list(parts),
                               nbytes=2 * sum(part.size for part in parts))

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self._run("abort_multipart", key, self._abort, key, upload_id, per_part_files=True)

    async def list_multipart_uploads(self, prefix: str) -> list[PendingUpload]:
        return await self._run("list_multipart_uploads", prefix, self._list_uploads, prefix, per_part_files=True)

    async def download(self, key: str, dest: Path) -> StoredObject:
        return await self._run("download", key, self._download, key, Path(dest), deadline=False)

    async def delete(self, key: str) -> None:
        await self._run("delete", key, self._delete, key)

    # -- plumbing -------------------------------------------------------------------------------

    async def _run(self, op: str, key: str, fn: Callable[..., T], *args: Any, nbytes: int = 0,
                   per_part_files: bool = False, deadline: bool = True) -> T:
        """`fn(*args)` in a worker thread, within its deadline (module doc): `request_timeout`, plus time for the
        bytes it moves, plus — for calls that open or remove one file per part (`per_part_files`) — time for
        the most parts an upload can have."""
        seconds = self.request_timeout + nbytes / 2**20 * self.seconds_per_mib
        if per_part_files:
            seconds += MAX_PART_NUMBER * _SECONDS_PER_PART_FILE
        timeout = asyncio.timeout(seconds if deadline else None)
        try:
            async with timeout:
                return await asyncio.to_thread(fn, *args)
        except TimeoutError as exc:
            if not timeout.expired():  # the call's own ETIMEDOUT (an OSError), not our deadline
                raise store_error_from_os_error(exc, f"{op} {key!r} in {self.root}") from exc
            raise TransientStoreError(f"{op} {key!r} in {self.root}: no answer from the filesystem in {seconds:.1f}s "
                                      "(its deadline; a hung network mount or a failing disk?)", code="Timeout"
                                      ) from None
        except StoreError:
            raise
        except OSError as exc:
            raise store_error_from_os_error(exc, f"{op} {key!r} in {self.root}") from exc

    def _ensure_layout(self) -> None:
        if self._ready:
            return
        for directory in (self.root, self._tmp, self._uploads, self._meta):
            make_private_dir(directory)
        self._ready = True

    def _sweep(self) -> None:
        """Remove what crashed calls left behind: retired uploads, half-created ones, old temp files.

        Age limits keep us off files another process (a second daemon on the same store) is writing now.
        """
        now = time.time()
        for entry in os.scandir(self._uploads):
            with suppress(FileNotFoundError):
                if entry.name.startswith(".dead-") or (
                        entry.name.startswith(".new-") and now - entry.stat().st_mtime > _DEBRIS_AGE):
                    shutil.rmtree(entry.path, ignore_errors=True)
        for entry in os.scandir(self._tmp):
            with suppress(FileNotFoundError):
                if now - entry.stat().st_mtime > _DEBRIS_AGE:
                    os.unlink(entry.path)

    def _open_layout(self) -> None:
        if self.read_only:
            return
        try:
            self._ensure_layout()
        except OSError as exc:
            raise self._open_error(exc, "create the directory") from exc

    def _clean_up(self) -> None:
        try:
            self._sweep()
        except OSError as exc:
            raise self._open_error(exc, "clean up") from exc

    def _open_error(self, exc: OSError, doing: str) -> StoreError:
        """Opening touches no key: the message names the store, the directory that failed and the setting to
        change (a store that cannot be opened is a configuration problem, unless the disk is full)."""
        message = f"store {self.url}: cannot {doing} {exc.filename or self.root}: {exc.strerror or exc}"
        if exc.errno not in TRANSIENT_OS_ERRNOS:  # a full disk is no reason to move the store
            message += "; set the store setting (MLDASH_STORE) to a directory this user can create and write"
        return _store_error(exc, message)

    def _make_dirs(self, directory: Path) -> None:
        """mkdir -p (0700); with fsync, also make each new directory entry durable in its parent."""
        missing = []
        while not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for new in reversed(missing):
            make_private_dir(new)
            if self.fsync:
                fsync_dir(new.parent)

    def _path(self, key: str) -> Path:
        """The object path of a key, refusing anything that could leave the root or hit our dot-dirs."""
        if not isinstance(key, str) or not key:
            raise PermanentStoreError(f"invalid key {key!r}", code="InvalidObjectName")
        try:
            encoded = key.encode("utf-8")
        except UnicodeEncodeError:
            raise PermanentStoreError(f"invalid key {key!r}: not valid UTF-8", code="InvalidObjectName") from None
        if len(encoded) > MAX_KEY_BYTES:
            raise PermanentStoreError(f"key {key[:60]!r}… is longer than {MAX_KEY_BYTES} bytes", code="KeyTooLongError")
        parts = key.split("/")
        if ("\x00" in key or parts[0].startswith(".")
                or any(part in ("", ".", "..") for part in parts)):
            raise PermanentStoreError(f"invalid key {key!r}: empty, '.', '..' or reserved component",
                                      code="InvalidObjectName")
        path = self.root.joinpath(*parts)
        resolved_root = self.root.resolve()
        if not path.resolve().is_relative_to(resolved_root) or path.resolve() == resolved_root:
            raise PermanentStoreError(f"key {key!r} resolves outside the store root", code="InvalidObjectName")
        return path

    def _meta_path(self, key: str) -> Path:
        # The sidecar tree mirrors the object tree exactly (no suffix), so it has the same file/directory
        # shape as the objects and two live keys can never collide there.
        return self._meta.joinpath(*key.split("/"))

    def _upload_dir(self, key: str, upload_id: str) -> Path:
        """The directory of a live upload for this key; NoSuchUploadError otherwise (as S3 does)."""
        if not isinstance(upload_id, str) or not _UPLOAD_ID.fullmatch(upload_id):
            raise NoSuchUploadError(f"no multipart upload {upload_id!r}", code="NoSuchUpload")
        directory = self._uploads / upload_id
        try:
            info = json.loads((directory / "upload.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            raise NoSuchUploadError(f"no multipart upload {upload_id!r} for {key!r}", code="NoSuchUpload") from None
        except ValueError as exc:  # a torn upload.json cannot happen (written then renamed); treat as corrupt
            raise PermanentStoreError(f"upload {upload_id!r}: unreadable upload.json: {exc}",
                                      code="InternalError") from exc
        if info.get("key") != key:
            raise NoSuchUploadError(f"upload {upload_id!r} is not for key {key!r}", code="NoSuchUpload")
        return directory

    def _write_new(self, path: Path, chunks: Iterator[bytes | memoryview] | list[bytes | memoryview]) -> None:
        fd = open_private(path)
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _temp(self, kind: str) -> Path:
        self._ensure_layout()
        return self._tmp / f"{kind}-{uuid.uuid4().hex}"

    @contextmanager
    def _commit_lock(self) -> Iterator[None]:
        fd = open_private(self.root / ".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _write_sidecar(self, key: str, record: dict[str, Any]) -> None:
        meta_path = self._meta_path(key)
        self._make_dirs(meta_path.parent)
        tmp = self._temp("meta")
        self._write_new(tmp, [json.dumps(record).encode()])
        os.replace(tmp, meta_path)
        if self.fsync:
            fsync_dir(meta_path.parent)

    def _commit(self, tmp: Path, key: str, record: dict[str, Any], *, before_link: Callable[[], None] | None = None
                ) -> None:
        """Make `tmp` the object `key` if the key is free: sidecar first, then the link (see module doc)."""
        path = self._path(key)
        with self._commit_lock():
            if path.exists():
                raise ObjectExistsError(f"{key!r} already exists", code="PreconditionFailed")
            if before_link is not None:
                before_link()
            self._make_dirs(path.parent)
            self._write_sidecar(key, record)
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ObjectExistsError(f"{key!r} already exists", code="PreconditionFailed") from None
            if self.fsync:
                fsync_dir(path.parent)

    def _read_sidecar(self, key: str, size: int) -> dict[str, Any] | None:
        try:
            record = json.loads(self._meta_path(key).read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("size") == size else None

    # -- single objects -------------------------------------------------------------------------

    def _head(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            size = path.stat().st_size
            if not path.is_file():
                return None
            record = self._read_sidecar(key, size)
            if record is None:
                # Only reachable if someone edited the tree by hand: report what the bytes say.
                record = {"sha256": _file_b64_sha256(path), "etag": None}
        except (FileNotFoundError, NotADirectoryError):
            return None
        return StoredObject(key=key, size=size, checksum_sha256=record["sha256"], etag=record.get("etag"))

    def _put(self, key: str, data: Buffer, sha256_b64: str) -> StoredObject:
        path = self._path(key)
        computed = b64_sha256(data)
        if computed != sha256_b64:
            raise TransientStoreError(
                f"put {key!r}: the bytes received hash to {computed}, not {sha256_b64} (corrupted on the way)",
                code="BadDigest")
        if path.exists():
            raise ObjectExistsError(f"{key!r} already exists", code="PreconditionFailed")
        tmp = self._temp("put")
        try:
            self._write_new(tmp, [data])
            record = {"size": len(data), "sha256": computed, "etag": _etag(computed)}
            self._commit(tmp, key, record)
        finally:
            tmp.unlink(missing_ok=True)
        return StoredObject(key=key, size=len(data), checksum_sha256=computed, etag=record["etag"])

    def _download(self, key: str, dest: Path) -> StoredObject:
        path = self._path(key)
        try:
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise PermanentStoreError(f"download {key!r}: no such object", code="NoSuchKey") from None
        try:
            size = os.fstat(src).st_size
            record = self._read_sidecar(key, size) or {"sha256": _file_b64_sha256(path), "etag": None}
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
            dst = open_private(tmp)
            try:
                _copy_range(src, dst, 0, size)
                if self.fsync:
                    os.fsync(dst)
                os.close(dst)
                dst = -1
                os.replace(tmp, dest)
            except BaseException:
                if dst >= 0:
                    os.close(dst)
                tmp.unlink(missing_ok=True)
                raise
        finally:
            os.close(src)
        return StoredObject(key=key, size=size, checksum_sha256=record["sha256"], etag=record.get("etag"))

    def _delete(self, key: str) -> None:
        path = self._path(key)
        self._ensure_layout()
        with self._commit_lock():
            with suppress(FileNotFoundError, NotADirectoryError):
                path.unlink()
            with suppress(FileNotFoundError, NotADirectoryError):
                self._meta_path(key).unlink()
            # S3 has no directories: drop the ones this delete emptied, so the tree mirrors the keys.
            for tree_root, leaf in ((self.root, path.parent), (self._meta, self._meta_path(key).parent)):
                while leaf != tree_root and leaf.is_relative_to(tree_root):
                    try:
                        leaf.rmdir()
                    except OSError:
                        break
                    leaf = leaf.parent

    # -- multipart ------------------------------------------------------------------------------

    def _create_multipart(self, key: str) -> str:
        self._path(key)
        self._ensure_layout()
        upload_id = uuid.uuid4().hex
        staging = self._uploads / f".new-{upload_id}"
        make_private_dir(staging)
        self._write_new(staging / "upload.json", [json.dumps({"key": key, "initiated": time.time()}).encode()])
        os.rename(staging, self._uploads / upload_id)  # appears complete or not at all
        if self.fsync:
            fsync_dir(self._uploads)
        return upload_id

    def _upload_part(self, key: str, upload_id: str, part_number: int, data: Buffer,
                     sha256_b64: str) -> PartReceipt:
        if not isinstance(part_number, int) or not 1 <= part_number <= MAX_PART_NUMBER:
            raise PermanentStoreError(f"part number {part_number!r} is not in 1..{MAX_PART_NUMBER}",
                                      code="InvalidArgument")
        directory = self._upload_dir(key, upload_id)
        view = memoryview(data).cast("B")
        digest = hashlib.sha256(view).digest()  # computed from what we received, never taken from the caller
        computed = _b64(digest)
        if computed != sha256_b64:
            raise TransientStoreError(
                f"upload_part {key!r} #{part_number}: the bytes received hash to {computed}, not {sha256_b64}",
                code="BadDigest")
        tmp = directory / f".part-{part_number}.{uuid.uuid4().hex}"
        try:
            self._write_new(tmp, [_PART_HEADER.pack(_PART_MAGIC, view.nbytes, digest), view])
        except FileNotFoundError:
            raise NoSuchUploadError(f"upload {upload_id!r} was aborted or completed", code="NoSuchUpload") from None
        try:
            os.replace(tmp, directory / f"part-{part_number}")  # a re-upload replaces bytes and digest at once
        except FileNotFoundError:
            raise NoSuchUploadError(f"upload {upload_id!r} was aborted or completed", code="NoSuchUpload") from None
        return PartReceipt(part_number=part_number, size=view.nbytes, etag=_etag(computed), checksum_sha256=computed)

    def _list_parts(self, key: str, upload_id: str) -> dict[int, PartReceipt]:
        directory = self._upload_dir(key, upload_id)
        parts: dict[int, PartReceipt] = {}
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            raise NoSuchUploadError(f"upload {upload_id!r} was aborted or completed", code="NoSuchUpload") from None
        for name in names:
            number = name[len("part-"):] if name.startswith("part-") else ""
            if not number.isdigit():
                continue
            with suppress(FileNotFoundError):
                size, digest = _read_part_header(directory / name)
                checksum = _b64(digest)
                parts[int(number)] = PartReceipt(part_number=int(number), size=size, etag=_etag(checksum),
                                                 checksum_sha256=checksum)
        return dict(sorted(parts.items()))

    def _complete(self, key: str, upload_id: str, parts: list[PartReceipt]) -> StoredObject:
        path = self._path(key)
        directory = self._upload_dir(key, upload_id)
        if not parts:
            raise PermanentStoreError(f"complete {key!r}: no parts given", code="MalformedXML")
        numbers = [p.part_number for p in parts]
        if numbers != sorted(set(numbers)):
            raise PermanentStoreError(f"complete {key!r}: part numbers {numbers} are not strictly ascending",
                                      code="InvalidPartOrder")
        stored = self._list_parts(key, upload_id)
        for index, receipt in enumerate(parts):
            have = stored.get(receipt.part_number)
            if have is None or have.etag != receipt.etag or (
                    receipt.checksum_sha256 is not None and receipt.checksum_sha256 != have.checksum_sha256):
                raise PermanentStoreError(
                    f"complete {key!r}: part {receipt.part_number} is missing or its etag/checksum differs",
                    code="InvalidPart")
            if index < len(parts) - 1 and have.size < MIN_PART_SIZE:
                raise PermanentStoreError(
                    f"complete {key!r}: part {receipt.part_number} is {have.size} bytes; all but the last part "
                    f"must be ≥ {MIN_PART_SIZE}", code="EntityTooSmall")
        if path.exists():
            raise ObjectExistsError(f"{key!r} already exists", code="PreconditionFailed")

        tmp = self._temp("complete")
        digests: list[str] = []
        size = 0
        try:
            dst = open_private(tmp)
            try:
                for receipt in parts:
                    part_path = directory / f"part-{receipt.part_number}"
                    try:
                        src = os.open(part_path, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        raise NoSuchUploadError(f"upload {upload_id!r} vanished while completing",
                                                code="NoSuchUpload") from None
                    try:
                        part_size, digest = _read_part_header_fd(src, part_path)
                        # The part we checked above may have been re-uploaded since: trust only this file.
                        if _etag(_b64(digest)) != receipt.etag:
                            raise PermanentStoreError(f"complete {key!r}: part {receipt.part_number} changed",
                                                      code="InvalidPart")
                        _copy_range(src, dst, _PART_HEADER.size, part_size)
                    finally:
                        os.close(src)
                    digests.append(_b64(digest))
                    size += part_size
                if self.fsync:
                    os.fsync(dst)
            finally:
                os.close(dst)
            checksum = composite_sha256(digests)
            record = {"size": size, "sha256": checksum, "etag": _etag(checksum)}

            def upload_still_live() -> None:  # under the commit lock: an abort may have won meanwhile
                if not (directory / "upload.json").exists():
                    raise NoSuchUploadError(f"upload {upload_id!r} was aborted", code="NoSuchUpload")

            self._commit(tmp, key, record, before_link=upload_still_live)
        finally:
            tmp.unlink(missing_ok=True)
        self._retire(directory)
        return StoredObject(key=key, size=size, checksum_sha256=checksum, etag=record["etag"])

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            directory = self._upload_dir(key, upload_id)
        except NoSuchUploadError:
            return
        self._retire(directory)

    def _retire(self, directory: Path) -> None:
        """Remove an upload: rename first (atomic: it is gone for every other call), then delete."""
        dead = directory.with_name(f".dead-{directory.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(directory, dead)
        except FileNotFoundError:
            return
        shutil.rmtree(dead, ignore_errors=True)

    def _list_uploads(self, prefix: str) -> list[PendingUpload]:
        try:
            names = os.listdir(self._uploads)
        except FileNotFoundError:
            return []
        pending: list[PendingUpload] = []
        for name in names:
            if not _UPLOAD_ID.fullmatch(name):
                continue
            try:
                info = json.loads((self._uploads / name / "upload.json").read_text(encoding="utf-8"))
            except (FileNotFoundError, NotADirectoryError, ValueError):
                continue
            key = info.get("key")
            if isinstance(key, str) and key.startswith(prefix):
                pending.append(PendingUpload(key=key, upload_id=name))
        return sorted(pending, key=lambda p: (p.key, p.upload_id))


# -- helpers ----------------------------------------------------------------------------------------

def store_error_from_os_error(exc: OSError, context: str) -> StoreError:
    """A local file error as a StoreError: transient if it may pass by itself (full disk), else permanent."""
    return _store_error(exc, f"{context}: {exc}")


def _store_error(exc: OSError, message: str) -> StoreError:
    kind = TransientStoreError if exc.errno in TRANSIENT_OS_ERRNOS else PermanentStoreError
    return kind(message, code=errno.errorcode.get(exc.errno or 0, "OSError"))


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _etag(checksum_b64: str) -> str:
    """An opaque etag derived from the checksum (S3's is an MD5; we do not spend CPU on a second hash)."""
    head, _, count = checksum_b64.partition("-")
    return '"' + base64.b64decode(head).hex() + (f"-{count}" if count else "") + '"'


def _file_b64_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_COPY_CHUNK):
            hasher.update(chunk)
    return _b64(hasher.digest())


def _read_part_header(path: Path) -> tuple[int, bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_part_header_fd(fd, path)
    finally:
        os.close(fd)


def _read_part_header_fd(fd: int, path: Path) -> tuple[int, bytes]:
    raw = os.pread(fd, _PART_HEADER.size, 0)
    if len(raw) != _PART_HEADER.size:
        raise PermanentStoreError(f"part file {path} is truncated", code="InternalError")
    magic, size, digest = _PART_HEADER.unpack(raw)
    if magic != _PART_MAGIC or os.fstat(fd).st_size != _PART_HEADER.size + size:
        raise PermanentStoreError(f"part file {path} is corrupt", code="InternalError")
    return size, digest


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Append `count` bytes of `src` from `offset` to `dst`, in the kernel when it can (bounded memory)."""
    try:
        while count > 0:
            copied = os.copy_file_range(src, dst, min(count, 2**30), offset)
            if copied == 0:
                raise PermanentStoreError("source file shrank while copying", code="InternalError")
            offset += copied
            count -= copied
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while count > 0:  # portable fallback
        chunk = os.pread(src, min(count, _COPY_CHUNK), offset)
        if not chunk:
            raise PermanentStoreError("source file shrank while copying", code="InternalError")
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]
        offset += len(chunk)
        count -= len(chunk)
