"""The single-daemon-per-spool lock (an flock on {spool}/daemon.lock).

The kernel drops an flock when its holder dies, so a kill -9'd daemon never leaves a stale lock.
The lock file holds the holder's pid for `status` output only; the flock is the truth.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from mldash.errors import DaemonBusyError
from mldash.spool.layout import SpoolLayout, open_private


class DaemonLock:
    def __init__(self, layout: SpoolLayout) -> None:
        self.layout = layout
        self._fd: int | None = None

    def acquire(self) -> DaemonLock:
        fd = open_private(self.layout.lock_path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = holder_pid(self.layout)
            raise DaemonBusyError(f"another mldash-syncd (pid {holder}) is draining {self.layout.root}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DaemonLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_held(layout: SpoolLayout) -> bool:
    """True while some process holds the daemon lock of this spool."""
    if not layout.lock_path.exists():
        return False
    fd = os.open(layout.lock_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def holder_pid(layout: SpoolLayout) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(layout.lock_path.read_text().strip() or 0) or None
    return None
