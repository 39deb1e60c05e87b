"""Where things live inside a spool directory — the only module that builds spool paths.

    {spool}/
      SPOOL                    layout marker: "mldash-spool 1"
      tmp/                     client temp files: "{pid}-{id}.{blob|manifest}.part", locked while written
      blobs/{id}               artifact bytes, immutable once linked into place
      manifests/{id}.msgpack   one manifest per artifact; linking it into place is the commit point
      index.sqlite             the daemon's index (WAL); rebuildable from manifests/ at any time
      daemon.lock              flock held by the one mldash-syncd draining this spool

Nothing inside records an absolute path or a host, so a spool can be copied to another machine.
Directories are 0700 and files 0600 whatever the umask: artifacts can be private research.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from mldash.errors import ConfigError, SpoolCorruptError
from mldash.spool.tmp_owner import hold

LAYOUT_VERSION = 1
_MARKER = f"mldash-spool {LAYOUT_VERSION}\n"
# Every name a spool's root holds (see docs/spool-format.md): a new spool may be created among these only.
_SPOOL_NAMES = frozenset({"SPOOL", "tmp", "blobs", "manifests", "index.sqlite", "index.sqlite-wal",
                          "index.sqlite-shm", "index.sqlite-journal", "daemon.lock", "quota.lock", "daemon.log",
                          "daemon.log.1"})
DIR_MODE = 0o700
FILE_MODE = 0o600
MANIFEST_SUFFIX = ".msgpack"


def make_private_dir(path: Path) -> None:
    """mkdir -p with 0700 on every directory we create, regardless of umask."""
    if path.is_dir():
        return
    make_private_dir(path.parent) if not path.parent.exists() else None
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask; chmod is not


def open_private(path: Path | str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL) -> int:
    """os.open with mode 0600 enforced (umask-proof); returns the fd."""
    fd = os.open(path, flags | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def directory_bytes(path: Path) -> int:
    """Sum of the sizes of the files in `path` (not recursive; 0 if it does not exist). Files removed while
    it lists them are skipped: the spool's directories change under a running daemon."""
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(path) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def _is_ascii_number(text: str) -> bool:
    # str.isdigit() alone accepts "²" and "٣", which int() then rejects or reads as another number.
    return text.isascii() and text.isdigit()


def _canonical_id(text: str) -> int | None:
    """A name we could have written for an id: plain ASCII digits, no leading zero, fits in int64.

    Anything else in blobs/ or manifests/ is not an entry: it must neither crash the daemon
    (int("²") raises; 2**64 overflows SQLite) nor alias a real id ("007" would read as 7).
    """
    if not _is_ascii_number(text) or (text[0] == "0" and text != "0") or len(text) > 19:
        return None
    value = int(text)
    return value if value < 2**63 else None


@dataclass(frozen=True)
class SpoolLayout:
    root: Path

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    @property
    def manifests_dir(self) -> Path:
        return self.root / "manifests"

    @property
    def index_path(self) -> Path:
        return self.root / "index.sqlite"

    @property
    def lock_path(self) -> Path:
        return self.root / "daemon.lock"

    @property
    def quota_lock_path(self) -> Path:
        return self.root / "quota.lock"

    @property
    def daemon_log_path(self) -> Path:
        return self.root / "daemon.log"

    @property
    def wake_path(self) -> Path:
        # In manifests/, the one directory a running daemon watches: a write there wakes it (see `wake_daemon`).
        # Not a manifest name, so nothing reads it as an entry.
        return self.manifests_dir / ".wake"

    def wake_daemon(self) -> None:
        """Have a running daemon look at the index now, not at its next rescan (up to 2 s later): after a
        command changed the index behind its back (`retry`). A file write, not a signal: the daemon may run as
        another user or in another PID namespace; whoever may write the index may write this file."""
        fd = os.open(self.wake_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.write(fd, b"%d\n" % time.time_ns())  # a write, so the watcher sees a modification
        finally:
            os.close(fd)

    def blob_path(self, file_id: int) -> Path:
        return self.blobs_dir / str(file_id)

    def manifest_path(self, file_id: int) -> Path:
        return self.manifests_dir / f"{file_id}{MANIFEST_SUFFIX}"

    def tmp_path(self, file_id: int, kind: str) -> Path:
        return self.tmp_dir / f"{os.getpid()}-{file_id}.{kind}.part"

    @staticmethod
    def blob_id(name: str) -> int | None:
        """The id a blob file name stands for, or None for anything we did not name."""
        return _canonical_id(name)

    @staticmethod
    def manifest_id(name: str) -> int | None:
        """The id a manifest file name stands for, or None for anything that is not a manifest."""
        return _canonical_id(name[: -len(MANIFEST_SUFFIX)]) if name.endswith(MANIFEST_SUFFIX) else None

    @staticmethod
    def tmp_owner_pid(name: str) -> int | None:
        head = name.split("-", 1)[0]
        return int(head) if _is_ascii_number(head) and len(head) <= 10 else None

    def ensure(self) -> SpoolLayout:
        """Create the spool directories (0700) and the layout marker; check an existing marker."""
        marker = self.root / "SPOOL"
        if marker.exists():
            self.check_marker()
        else:
            self._check_new_root()
        try:
            for directory in (self.root, self.tmp_dir, self.blobs_dir, self.manifests_dir):
                make_private_dir(directory)
        except (NotADirectoryError, FileNotFoundError) as exc:  # a file on the path, a /proc or /sys path
            culprit = next((p for p in (self.root, *self.root.parents) if p.exists() and not p.is_dir()), None)
            why = (f"{str(culprit)!r} is a file, not a directory" if culprit else
                   f"mkdir {exc.filename!r}: {exc.strerror}")
            raise ConfigError(f"spool {str(self.root)!r} cannot be created: {why}; set the spool setting "
                              "(MLDASH_SPOOL) to a directory path") from None
        while not marker.exists():
            # unique per thread too: a client and an in-process daemon may create the spool at once
            tmp = self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}-SPOOL.part"
            fd = open_private(tmp)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                # Locked like every temp file being written (tmp_owner.py): a daemon's debris clean-up,
                # started by another process that created the spool at the same moment, leaves it alone.
                if not hold(handle.fileno()):
                    continue  # judged debris (unlinked) before the lock: start over
                handle.write(_MARKER)
                handle.flush()
                with contextlib.suppress(FileNotFoundError):  # only if the lock was not available (no flock)
                    os.replace(tmp, marker)
        return self

    def check_marker(self) -> None:
        """Refuse a spool of another layout (a newer mldash's): reading it — let alone cleaning up what looks like
        debris in it — could misreport or destroy what this version does not understand."""
        text = (self.root / "SPOOL").read_text(encoding="utf-8", errors="replace")
        if text != _MARKER:
            raise SpoolCorruptError(
                f"{self.root} holds a spool of layout {text.strip()!r}; this mldash reads {_MARKER.strip()!r}")

    def _check_new_root(self) -> None:
        """A spool is created in a new or empty directory only: MLDASH_SPOOL=$HOME (or a file) is a mistake
        to name, not a directory to fill with tmp/, blobs/ and manifests/."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"spool {str(self.root)!r} exists and is not a directory; set the spool setting "
                              "(MLDASH_SPOOL) to a directory path")
        try:
            # A dedicated filesystem's root has lost+found; NFS and snapshots add hidden names (.nfs…, .snapshot).
            foreign = sorted(name for name in os.listdir(self.root)
                             if name not in _SPOOL_NAMES and name != "lost+found" and not name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return
        if foreign:
            shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
            raise ConfigError(f"spool {str(self.root)!r} is a directory holding other files ({shown}) and no SPOOL "
                              "marker: not an mldash spool; set the spool setting (MLDASH_SPOOL) to a new or empty "
                              "directory")

    def exists(self) -> bool:
        return (self.root / "SPOOL").exists()
