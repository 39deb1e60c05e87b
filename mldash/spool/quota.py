"""Spool byte quota: admission of new entries, serialised between writer processes by an flock.

The quota bounds the bytes of *admitted* blobs (blobs/). A writer first writes its temp file, then
takes the quota lock only to check room and link the entry into place — a few syscalls — so eight
training ranks never queue behind each other's serialization. While a temp file is being written
it is not counted: the spool can transiently exceed the quota by the artifacts being written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from mldash.spool.layout import SpoolLayout, open_private


def spooled_bytes(layout: SpoolLayout) -> int:
    total = 0
    with os.scandir(layout.blobs_dir) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):  # evicted while we scan
                total += entry.stat(follow_symlinks=False).st_size
    return total


@contextlib.contextmanager
def quota_lock(layout: SpoolLayout) -> Iterator[None]:
    fd = open_private(layout.quota_lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the fd releases the flock
