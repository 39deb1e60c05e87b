"""The cap on an autostarted daemon's log file, `{spool}/daemon.log`.

Autostart (mldash/autostart.py) points the daemon's stdout and stderr at that file, appending: every daemon a
save starts over the spool's life adds to it, one line per committed file. A job that saves a small file
every step writes ~100 bytes a step for as long as the spool lives — the slow disk fill users of other tools
know from their caches. Nothing else rotates it (no logrotate on a compute node's scratch disk), so the daemon
does: once the file passes `CAP` bytes it becomes `daemon.log.1` (replacing the one before) and a new
`daemon.log` takes over the daemon's stdout and stderr — at most twice the cap on disk.

A daemon run by systemd or from a terminal logs to the journal or the terminal: nothing to cap there.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from mldash.spool.layout import open_private

CAP = 8 << 20  # bytes: ~80,000 lines, weeks of one-line-per-file commits for a busy job


def rotated_path(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class CappedLogFile:
    """Rotates `path` once it passes `cap` bytes, re-pointing the file descriptors `fds` at the new file."""

    def __init__(self, path: Path, cap: int = CAP, fds: tuple[int, ...] = (1, 2)) -> None:
        self.path, self.cap, self.fds = path, cap, fds

    @classmethod
    def for_stderr(cls, path: Path) -> CappedLogFile | None:
        """One for this process if its stderr is `path` (an autostarted daemon's), else None."""
        try:
            ours, there = os.fstat(2), os.stat(path)
        except OSError:
            return None
        return cls(path) if (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino) else None

    def check(self) -> bool:
        """Rotate if the file the descriptors write to has passed the cap; True if it rotated."""
        try:
            if os.fstat(self.fds[-1]).st_size < self.cap:
                return False
            for stream in (sys.stdout, sys.stderr):  # what Python buffered goes to the old file, in order
                if stream is not None:
                    stream.flush()
            os.replace(self.path, rotated_path(self.path))
            fd = open_private(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        except OSError as exc:  # a full disk, a read-only spool: keep logging where we are
            logging.getLogger("mldash_syncd").debug("daemon.log not rotated: %s", exc)
            return False
        try:
            for target in self.fds:
                os.dup2(fd, target)
        finally:
            os.close(fd)
        return True


class CappedFileHandler(logging.StreamHandler):
    """A StreamHandler on stderr that checks the cap after each record (an fstat: ~1 µs beside the write)."""

    def __init__(self, capped: CappedLogFile, stream=None) -> None:
        super().__init__(stream or sys.stderr)
        self.capped = capped

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if self.capped.check():
            super().emit(logging.makeLogRecord({
                "name": "mldash_syncd", "levelno": logging.INFO, "levelname": "INFO",
                "msg": "log continued from %s (rotated at %d MiB)",
                "args": (rotated_path(self.capped.path).name, self.capped.cap >> 20)}))
