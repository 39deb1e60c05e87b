"""Whether a named temp file in tmp/ still has a live writer — the one question debris clean-up asks.

A writer takes an exclusive `flock` on its temp file right after creating it and keeps the descriptor
open until the file is published (linked) and unlinked; the kernel drops the lock when the process dies,
kill -9 included. The daemon's recovery then asks the lock, not the pid in the name: the pid only means
something in the writer's own PID namespace, so a training job in a container (or on another host that
shares the spool) would look dead to a daemon outside it, and its half-written checkpoint would be
deleted under it. `flock` locks the inode for every process of the kernel, whatever its namespace, and
Linux's NFS client maps it to a byte-range lock the server arbitrates between hosts.

Where a filesystem has no locks (ENOLCK, EOPNOTSUPP…), or the file cannot be opened (another user's), the
answer is "unknown" and the old rule decides: the pid on this host, or an age of STALE_TMP_AGE.
"""

from __future__ import annotations

import enum
import fcntl
import os


class Writer(enum.Enum):
    ALIVE = "alive"      # someone holds the lock: never touch the file
    GONE = "gone"        # nobody holds it (the writer ended, or predates these locks)
    UNKNOWN = "unknown"  # no answer from the lock (see the module docstring)


def hold(fd: int) -> bool:
    """Mark the new temp file behind `fd` as being written, until `fd` is closed. False if a daemon's
    clean-up judged it debris between its creation and this call (it was unlinked): the caller starts
    over with a new file. A filesystem without locks leaves the file to the pid rule (True)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # Only a clean-up's probe can hold a lock on a file this new, and only for microseconds.
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        return True
    return os.fstat(fd).st_nlink > 0


def writer_of(path: str | os.PathLike) -> tuple[Writer, int | None]:
    """Probe the writer's lock on `path`; on GONE also returns an fd that now holds the lock (the caller
    unlinks the file, then closes it), so no writer can be judged gone and then take it back."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return Writer.UNKNOWN, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return Writer.ALIVE, None
    except OSError:
        os.close(fd)
        return Writer.UNKNOWN, None
    return Writer.GONE, fd
