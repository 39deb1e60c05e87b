"""Publishing a new spool file atomically: it appears under its final name complete, or not at all.

The file is written without a name (``O_TMPFILE`` in ``tmp/``) and given its final name with one
``linkat`` through ``/proc/self/fd``. Compared with a named temp file (create, write, link, unlink):

- no directory lock is held while the inode is allocated. Allocation can be slow — ext4 without a journal
  skips every inode freed in the last 5–300 s, ~1 ms per create on this kind of machine — and a create by
  name holds ``tmp/``'s i_rwsem for all of it, so writers of one spool queued behind each other (the 8-writer
  save_json tail; docs/benchmarks.md);
- one directory operation fewer (no unlink), and a writer killed at any point leaves nothing behind: the
  kernel frees an unnamed inode with its last descriptor.

``linkat`` fails on an existing name (``FileExistsError``), so nothing is ever overwritten. Where
``O_TMPFILE`` or ``/proc`` is unavailable (another OS, an old kernel, a filesystem without it) the same
function falls back to a named temp file in ``tmp/``, locked while it is written (see tmp_owner).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

from mldash.spool.hashing import write_all
from mldash.spool.layout import FILE_MODE, open_private
from mldash.spool.tmp_owner import hold

_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_PROC_FD = "/proc/self/fd"
# errnos meaning "this kernel or filesystem has no O_TMPFILE" (EISDIR: kernels older than 3.11 read it as
# O_DIRECTORY); anything else (ENOSPC, EACCES…) is a real error and propagates.
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS)


_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


def _load_linkat() -> ctypes._CFuncPtr | None:
    # os.link() calls link(2) unless given a dir fd, and link(2) does not follow the /proc/self/fd/N magic
    # link (EXDEV); linkat(2) with AT_SYMLINK_FOLLOW does, without the privilege AT_EMPTY_PATH needs.
    try:
        linkat = ctypes.CDLL(None, use_errno=True).linkat
    except (OSError, AttributeError):
        return None
    linkat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
    linkat.restype = ctypes.c_int
    return linkat


_linkat = _load_linkat() if _O_TMPFILE else None


class _Support:
    unnamed = _linkat is not None and os.path.isdir(_PROC_FD)


def unnamed_files_supported() -> bool:
    """Whether new spool files are written unnamed (else through a named temp file)."""
    return _Support.unnamed


def publish_bytes(data: bytes, final: Path, tmp_dir: Path, named_tmp: Callable[[], Path], *, fsync: bool) -> None:
    """Create `final` holding exactly `data`, mode 0600; FileExistsError if `final` exists.

    `named_tmp`: gives the temp name to use where unnamed files are not available (only built then).
    `fsync`: the file's data is on disk before its name appears (the caller fsyncs the directory afterwards
    if it needs the name to be).
    """
    if _Support.unnamed:
        fd = _open_unnamed(tmp_dir)
        if fd is not None:
            try:
                _fill(fd, data, fsync=fsync)
                _link_fd(fd, final)
                return
            finally:
                os.close(fd)
    tmp = named_tmp()
    fd = open_private(tmp)
    while not hold(fd):  # a daemon's clean-up unlinked it between our create and our lock: create it again
        os.close(fd)
        fd = open_private(tmp)
    try:
        _fill(fd, data, fsync=fsync)
        os.link(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.close(fd)  # only now: its lock marks the temp file as being written until it is gone


def _open_unnamed(directory: Path) -> int | None:
    try:
        fd = os.open(directory, _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        if exc.errno not in _NO_TMPFILE:
            raise
        _Support.unnamed = False  # decided once per process: every later file takes the named path at once
        return None
    return fd


def _link_fd(fd: int, final: Path) -> None:
    assert _linkat is not None
    source, target = f"{_PROC_FD}/{fd}".encode(), os.fsencode(final)
    if _linkat(_AT_FDCWD, source, _AT_FDCWD, target, _AT_SYMLINK_FOLLOW) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fsdecode(target))  # FileExistsError for EEXIST


def _fill(fd: int, data: bytes, *, fsync: bool) -> None:
    os.fchmod(fd, FILE_MODE)  # the umask filters the creation mode; fchmod does not
    write_all(fd, memoryview(data))  # os.write may be short (a filling disk)
    if fsync:
        os.fsync(fd)
