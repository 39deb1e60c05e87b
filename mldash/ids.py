"""Snowflake-style 64-bit ids: unique across processes and hosts without coordination.

Layout (most significant first), 63 bits so ids stay positive in every signed 64-bit store
(SQLite INTEGER, BSON int64):

    41 bits  milliseconds since EPOCH_MS (good for ~69 years)
    10 bits  node: a hash of (host, pid, a random salt) drawn once per process
    12 bits  sequence within the millisecond

Why not host+pid alone: pids repeat across hosts and containers. Why not random alone: ids must
be monotonically increasing per process. The node field is drawn from a CSPRNG-salted hash per
process (and redrawn after fork), so two processes collide only when they share a millisecond
AND a 10-bit node value AND a sequence number; within one process the (ms, seq) pair never
repeats because the clock is forced forward. Cross-process uniqueness at the spool level is
additionally enforced by the spool itself: an entry is created with O_EXCL, so a collision is
detected and a fresh id drawn, never an overwrite.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import threading
import time

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
NODE_BITS = 10
SEQUENCE_BITS = 12
_MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1


def _draw_node() -> int:
    material = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(16)}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:4], "big") & ((1 << NODE_BITS) - 1)


class SnowflakeGenerator:
    """Thread-safe, monotonically increasing id generator for one process."""

    def __init__(self, node: int | None = None) -> None:
        self._lock = threading.Lock()
        self._node = _draw_node() if node is None else node
        self._last_ms = -1
        self._sequence = 0
        self._pid = os.getpid()

    def next_id(self) -> int:
        with self._lock:
            if os.getpid() != self._pid:  # forked: a child must not share its parent's node
                self._pid, self._node, self._last_ms, self._sequence = os.getpid(), _draw_node(), -1, 0
            now_ms = max(int(time.time() * 1000) - EPOCH_MS, self._last_ms)  # clock never goes back
            if now_ms == self._last_ms:
                self._sequence = (self._sequence + 1) & _MAX_SEQUENCE
                if self._sequence == 0:  # 4096 ids in one ms: borrow the next millisecond
                    now_ms += 1
            else:
                self._sequence = 0
            self._last_ms = now_ms
            return (now_ms << (NODE_BITS + SEQUENCE_BITS)) | (self._node << SEQUENCE_BITS) | self._sequence


def id_timestamp_ms(file_id: int) -> int:
    """The Unix time in milliseconds encoded in an id."""
    return (file_id >> (NODE_BITS + SEQUENCE_BITS)) + EPOCH_MS


_default = SnowflakeGenerator()


def new_id() -> int:
    """A new id from this process's generator."""
    return _default.next_id()
