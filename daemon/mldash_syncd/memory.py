"""Keeping the daemon's memory bounded by what is in flight.

Multipart parts live in reused buffers of their own (budget.py). A single-PUT object between the on-loop
limit and the multipart threshold is still read into a `bytes` of its size; glibc serves allocations that
size from its heap once its adaptive mmap threshold has grown, and then keeps the freed memory: measured
here, peak RSS reached ~100 MiB above idle for a 32 MiB budget. Pinning the mmap threshold at 1 MiB makes
every such buffer its own mapping, returned to the kernel the moment the object is sent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("mldash_syncd")

_M_MMAP_THRESHOLD = -3  # from <malloc.h>
_THRESHOLD = 1 << 20


def return_part_buffers_to_os() -> bool:
    """Pin glibc's mmap threshold; a no-op (False) on other C libraries."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):
        log.debug("mallopt unavailable: part buffers may stay in the heap after use")
        return False
