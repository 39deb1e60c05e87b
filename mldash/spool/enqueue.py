"""Atomic enqueue — the client's only write path into the spool (it never touches SQLite).

A small save (≤ the inline_max setting, written from memory, no quota set) is *inline*: its bytes go into the
manifest itself (format 2), written unnamed and linked to ``manifests/{id}.msgpack`` — one new file, one
link, which is the commit point (see mldash.spool.newfile). A kill -9 before the link leaves nothing.

Every other save, in order of operations, each step safe to be interrupted by kill -9:

1. write bytes to ``tmp/{pid}-{id}.blob.part`` (0600), hashing them on the way (up to the checksum
   setting's limit: past it the manifest's sha256 is None and the daemon hashes);
2. (quota) take the quota lock, wait for room — only while a daemon drains the spool (see `Enqueuer`);
3. ``link`` the temp file to ``blobs/{id}`` — link, not rename, because it fails on an existing
   name instead of overwriting: an id collision is detected, never silent (a fresh id is drawn);
4. write the manifest (unnamed, or to ``tmp/`` where that is not available), then ``link`` it to
   ``manifests/{id}.msgpack``: **the commit point.** Before it the entry does not exist; after it the
   daemon will find it (inotify or scan);
5. remove the temp names.

A crash before 4 leaves only debris (temp files whose pid is gone, a blob without manifest) that
the daemon removes at start-up; it never leaves a manifest without its complete blob.
With durability "power", file data and both directories are fsynced before the commit point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mldash.config import Settings
from mldash.errors import FileTooLargeError, SpoolFullError
from mldash.ids import new_id
from mldash.spool.hashing import HashingSink
from mldash.spool.inline import InlineSink
from mldash.spool.layout import SpoolLayout, fsync_dir, open_private
from mldash.spool.lock import seconds_since_held
from mldash.spool.manifest import FORMAT_VERSION, INLINE_FORMAT_VERSION, Manifest
from mldash.spool.newfile import publish_bytes
from mldash.spool.quota import quota_lock
from mldash.spool.tmp_owner import hold

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_ID_ATTEMPTS = 5
# A save over quota waits for a daemon to make room only if one holds the spool or held it this recently: a
# service being restarted (systemd RestartSec=10s, then its start-up) is back well within it.
DAEMON_RESTART_GRACE = 30.0
_HOST = socket.gethostname()
# Kinds whose writer copies a file (copy_into: copy_file_range from the source into the spool file); their
# bytes are not in memory, so they always take the blob path.
_FILE_COPY_KINDS = frozenset({"upload", "video"})


@dataclass(frozen=True)
class EntrySpec:
    """Everything about a new artifact except its bytes; names must already be validated."""

    namespace: str
    project: str
    experiment: str
    prefix: str
    filename: str
    content_type: str
    kind: str
    description: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


Writer = Callable[[HashingSink | InlineSink], None]


class Enqueuer:
    """Writes entries into one spool for one process. Cheap to create; holds no open files.

    A save that finds no room (quota, full disk) waits up to `save_timeout` for the daemon's eviction to make
    some, calling `on_wait` between tries (the client starts a daemon there when autostart is on; it returns False
    once autostart has given up). Over quota, with no daemon holding the spool now or in the last
    DAEMON_RESTART_GRACE seconds and none to be autostarted, it fails at once: nothing else ever removes blobs, so
    waiting would only stall the training loop.
    """

    def __init__(self, settings: Settings, layout: SpoolLayout | None = None, *,
                 on_wait: Callable[[], bool | None] | None = None) -> None:
        self.settings = settings
        self.layout = (layout or SpoolLayout(settings.spool)).ensure()
        self.on_wait = on_wait

    def enqueue(self, spec: EntrySpec, write: Writer, *, expected_size: int | None = None,
                size_hint: int | None = None) -> Manifest:
        """Spool one artifact; returns its manifest once it is durable (see module doc).

        `size_hint` is an estimate where the exact size is unknown: an artifact estimated above the sync
        checksum limit is not hashed at all (its hashing would be abandoned at the limit anyway, after costing
        the save limit/2 GB/s); the daemon computes its checksum.

        `write` may be called more than once: after ENOSPC the partial temp file is deleted (to free
        the space) and the whole entry is written again, so `write` must produce the same bytes on
        every call (serialize from the object, or re-open the source file; not a half-read stream).
        """
        limit = self.settings.max_file_size
        if expected_size is not None and expected_size > limit:
            raise FileTooLargeError(f"{spec.filename!r} is {expected_size} bytes; the maximum is {limit} bytes "
                                    "(setting max_file_size)")
        quota = self.settings.spool_quota
        if quota is not None and expected_size is not None and expected_size > quota:
            raise SpoolFullError(f"{spec.filename!r} ({expected_size} bytes) can never fit the spool quota of "
                                 f"{quota} bytes (setting spool_quota)", requested=expected_size, used=0, quota=quota)
        deadline = time.monotonic() + self.settings.save_timeout
        # Inline only without a quota: the quota counts blobs/, and a manifest's bytes would escape it.
        # Every file created costs an inode allocation, which on ext4 without a journal scans past recently
        # deleted inodes (~1 ms per create on the benchmark machine): one file per small save, not two.
        inline_max = self.settings.inline_max  # 0: never inline, not even an empty save
        inline = (quota is None and inline_max > 0 and expected_size is not None and expected_size <= inline_max
                  and spec.kind not in _FILE_COPY_KINDS)
        delay = 0.05
        while True:
            try:
                if inline:
                    manifest = self._attempt_inline(spec, write)
                    if manifest is not None:
                        return manifest
                    inline = False  # wrote more than announced: the blob path writes it again
                return self._attempt(spec, write, deadline, self._hash_limit(expected_size or size_hint))
            except OSError as exc:
                if exc.errno not in _SPACE_ERRNOS:
                    raise
                if self.on_wait is not None:
                    self.on_wait()
                if time.monotonic() + delay > deadline:
                    raise SpoolFullError(
                        f"the spool filesystem at {self.layout.root} is full ({os.strerror(exc.errno)}); waited "
                        f"{self.settings.save_timeout:g}s (setting save_timeout) for {spec.filename!r}; "
                        "nothing was written", requested=expected_size or 0, used=0, quota=quota) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _hash_limit(self, size: int | None) -> int | None:
        limit = self.settings.hash_limit
        return 0 if limit is not None and size is not None and size > limit else limit

    def _attempt(self, spec: EntrySpec, write: Writer, deadline: float, hash_limit: int | None) -> Manifest:
        file_id, tmp_blob, fd = self._new_tmp_blob()
        try:
            sink = HashingSink(fd, hash_limit=hash_limit)
            try:
                write(sink)
                digest = sink.hexdigest()  # waits for the hash trailing the writes (it reads this fd)
                if self.settings.power_safe:
                    os.fsync(fd)
            finally:
                sink.close_hasher()
            self._check_size(spec, sink.size)
            manifest = _manifest(spec, file_id, sink.size, digest)
            quota = self.settings.spool_quota
            for _ in range(_ID_ATTEMPTS):
                try:
                    if quota is None:
                        return self._publish(manifest, tmp_blob)
                    return self._publish_within_quota(manifest, tmp_blob, quota, deadline)
                except FileExistsError:
                    # Another process drew the same id (see mldash.ids): link() refused to overwrite
                    # its entry; ours has not been published, so take a fresh id and publish again.
                    manifest = dataclasses.replace(manifest, id=new_id())
            raise FileExistsError(f"spool {self.layout.root}: {_ID_ATTEMPTS} id collisions in a row for "
                                  f"{spec.filename!r}; is the clock or mldash.ids broken?")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_blob)
            os.close(fd)  # only now: its lock marks the temp file as being written until it is gone

    def _new_tmp_blob(self) -> tuple[int, Path, int]:
        """A new named temp file for a blob, locked as being written (see tmp_owner): (id, path, fd)."""
        for _ in range(_ID_ATTEMPTS):
            file_id = new_id()
            path = self.layout.tmp_path(file_id, "blob")
            fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)  # read back by HashingSink.copy_file
            if hold(fd):
                return file_id, path, fd
            os.close(fd)  # a daemon's clean-up removed it between our create and our lock: take another
        raise OSError(errno.EAGAIN, f"spool {self.layout.root}: temp files removed as soon as created "
                                    f"{_ID_ATTEMPTS} times in a row; is another program cleaning tmp/?")

    def _attempt_inline(self, spec: EntrySpec, write: Writer) -> Manifest | None:
        """Spool a small save as one manifest holding its bytes; None if `write` produced more than inline_max."""
        sink = InlineSink(hash_limit=self.settings.hash_limit)
        write(sink)
        if sink.size > self.settings.inline_max:
            return None
        self._check_size(spec, sink.size)
        manifest = _manifest(spec, new_id(), sink.size, sink.hexdigest(), payload=sink.getvalue())
        for _ in range(_ID_ATTEMPTS):
            try:
                self._write_manifest(manifest)
                if self.settings.power_safe:
                    fsync_dir(self.layout.manifests_dir)
                return manifest
            except FileExistsError:  # an id collision (see _attempt): nothing was published, draw again
                manifest = dataclasses.replace(manifest, id=new_id())
        raise FileExistsError(f"spool {self.layout.root}: {_ID_ATTEMPTS} id collisions in a row for "
                              f"{spec.filename!r}; is the clock or mldash.ids broken?")

    def _check_size(self, spec: EntrySpec, size: int) -> None:
        if size > self.settings.max_file_size:
            raise FileTooLargeError(f"{spec.filename!r} serialized to {size} bytes; the maximum is "
                                    f"{self.settings.max_file_size} bytes (setting max_file_size)")

    def _write_manifest(self, manifest: Manifest) -> None:
        """Link the encoded manifest to manifests/{id}.msgpack — the commit point; FileExistsError if taken."""
        publish_bytes(manifest.encode(), self.layout.manifest_path(manifest.id), self.layout.tmp_dir,
                      lambda: self.layout.tmp_path(manifest.id, "manifest"), fsync=self.settings.power_safe)

    def _publish_within_quota(self, manifest: Manifest, tmp_blob: os.PathLike, quota: int,
                              deadline: float) -> Manifest:
        delay = 0.02
        while True:
            with quota_lock(self.layout) as ledger:
                used = ledger.used()
                if used + manifest.size > quota and ledger.from_record:
                    used = ledger.used(fresh=True)  # the ledger may overstate: never refuse on its word alone
                if used + manifest.size <= quota:
                    ledger.linking()
                    published = self._publish(manifest, tmp_blob)
                    ledger.linked(manifest.size)
                    return published
            if not self._daemon_may_drain():
                autostart = ("autostart is off" if not self.settings.autostart else
                             f"autostart gave up: the daemon refused its configuration, see "
                             f"{self.layout.daemon_log_path}")
                raise SpoolFullError(
                    f"spool quota full: {used} of {quota} bytes in use, {manifest.filename!r} needs "
                    f"{manifest.size}, and no daemon is draining {self.layout.root} (none has held it in the last "
                    f"{DAEMON_RESTART_GRACE:g}s; {autostart}): start one (`mldash-syncd run`, or its systemd "
                    "unit) or raise spool_quota; nothing was written",
                    requested=manifest.size, used=used, quota=quota)
            if time.monotonic() + delay > deadline:
                raise SpoolFullError(
                    f"spool quota full: {used} of {quota} bytes in use, {manifest.filename!r} needs "
                    f"{manifest.size}; waited {self.settings.save_timeout:g}s (setting save_timeout) for the "
                    "daemon to drain; nothing was written", requested=manifest.size, used=used, quota=quota)
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _daemon_may_drain(self) -> bool:
        """Whether waiting can make room: a daemon drains the spool, is being restarted, or autostart starts one
        (`on_wait` returning False says autostart gave up on this spool)."""
        hopeful = self.on_wait() if self.on_wait is not None else None
        if hopeful is False:  # autostart gave up (its daemons refused their settings): only a daemon there now counts
            return seconds_since_held(self.layout) == 0.0
        if self.settings.autostart:
            return True
        since = seconds_since_held(self.layout)
        return since is not None and since <= DAEMON_RESTART_GRACE

    def _publish(self, manifest: Manifest, tmp_blob: os.PathLike) -> Manifest:
        blob = self.layout.blob_path(manifest.id)
        os.link(tmp_blob, blob)  # FileExistsError on an id collision: never overwrites (caller redraws)
        committed = False
        try:
            if self.settings.power_safe:
                fsync_dir(self.layout.blobs_dir)
            self._write_manifest(manifest)  # the commit point
            committed = True
        finally:
            if not committed:  # leave no orphan blob behind
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(blob)
        if self.settings.power_safe:
            fsync_dir(self.layout.manifests_dir)
        return manifest


def _manifest(spec: EntrySpec, file_id: int, size: int, sha256: str | None, *,
              payload: bytes | None = None) -> Manifest:
    return Manifest(
        id=file_id, namespace=spec.namespace, project=spec.project, experiment=spec.experiment,
        prefix=spec.prefix, filename=spec.filename, size=size, sha256=sha256,
        content_type=spec.content_type, created_at=time.time(), kind=spec.kind,
        description=spec.description, tags=list(spec.tags), metadata=dict(spec.metadata),
        host=_HOST, pid=os.getpid(), format=FORMAT_VERSION if payload is None else INLINE_FORMAT_VERSION,
        payload=payload,
    )
