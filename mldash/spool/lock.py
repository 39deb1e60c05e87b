"""The single-daemon-per-spool lock (an flock on {spool}/daemon.lock).

The kernel drops an flock when its holder dies, so a kill -9'd daemon never leaves a stale lock.
The lock file holds the holder's pid and what it is ("daemon", "gc", "reindex") for `status` output only; the
flock is the truth.
Its mtime says when a daemon last held it: the daemon touches it with every heartbeat and as it stops (taking
the lock alone, as `gc` and `reindex` do, leaves it as it was), so a save waiting for spool space can tell a daemon
being restarted (systemd: RestartSec=10s) from no daemon at all (`seconds_since_held`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from mldash.errors import DaemonBusyError
from mldash.spool.layout import SpoolLayout, open_private

ACQUIRE_ATTEMPTS = 5  # over ~80 ms: outlasts any `is_held` probe, never a daemon


class DaemonLock:
    def __init__(self, layout: SpoolLayout, role: str = "daemon") -> None:
        self.layout = layout
        self.role = role
        self._fd: int | None = None

    def acquire(self) -> DaemonLock:
        new = not self.layout.lock_path.exists()
        fd = open_private(self.layout.lock_path, os.O_RDWR | os.O_CREAT)
        for attempt in range(ACQUIRE_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # `is_held` probes (autostart, status, a save waiting for quota room) hold a shared lock for
                # microseconds: try again briefly before calling the spool busy. A daemon holds it for good.
                if attempt + 1 == ACQUIRE_ATTEMPTS:
                    os.close(fd)
                    holder, role = holder_pid(self.layout), holder_role(self.layout)
                    doing = "is draining" if role == "daemon" else f"(`mldash-syncd {role}`) holds"
                    raise DaemonBusyError(f"another mldash-syncd (pid {holder}) {doing} {self.layout.root}"
                                          ) from None
                time.sleep(0.02)
        before = os.fstat(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.role}\n".encode(), 0)
        # Writing the pid must not look like a daemon's sign of life: `gc` and `reindex` take this lock too.
        # Only `touch` (the daemon's heartbeat) moves the mtime.
        with contextlib.suppress(OSError):  # a lock file just created: no daemon has held it yet (mtime 0)
            os.utime(fd, ns=(0, 0) if new else (before.st_atime_ns, before.st_mtime_ns))
        self._fd = fd
        return self

    def touch(self) -> None:
        """Record "a daemon held this spool just now" (the lock file's mtime; see `seconds_since_held`)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):  # a marker for waiting writers: never worth failing the daemon
                os.utime(self._fd)

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
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(layout.lock_path.read_text().split()[0]) or None
    return None


def holder_role(layout: SpoolLayout) -> str:
    """What holds (or last held) the lock: "daemon", "gc" or "reindex" ("daemon" for a lock file written before
    roles were recorded, which held only a pid)."""
    with contextlib.suppress(OSError):
        words = layout.lock_path.read_text().split()
        return words[1] if len(words) > 1 else "daemon"
    return "daemon"


def seconds_since_touched(layout: SpoolLayout) -> float | None:
    """Seconds since the lock file's mtime (a daemon's start or its last heartbeat); None without a lock file or
    one no daemon has touched."""
    try:
        touched = layout.lock_path.stat().st_mtime
    except FileNotFoundError:
        return None
    return None if touched == 0 else max(0.0, time.time() - touched)


def seconds_since_held(layout: SpoolLayout) -> float | None:
    """Seconds since a daemon last held this spool's lock: 0.0 while one holds it, None if none ever did.

    Between holders it is the age of the daemon's last touch (on taking the lock, each heartbeat, on stopping): a
    daemon killed with -9 touched it at most one heartbeat before its death.
    """
    # A lock file created by `gc` or `reindex` has mtime 0 (see acquire): no daemon has held it yet.
    return 0.0 if is_held(layout) else seconds_since_touched(layout)
