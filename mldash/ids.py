"""Snowflake-style 64-bit ids without coordination: unique between the live processes of a host,
across hosts with high probability, strictly increasing within a process.

Layout (most significant first), 63 bits so ids stay positive in every signed 64-bit store
(SQLite INTEGER, BSON int64):

    41 bits  milliseconds since EPOCH_MS (good for ~69 years)
    10 bits  node: (a hash of host and boot) + pid, drawn once per process and again after fork
    12 bits  sequence within the millisecond, starting at a random value below 2048

Why the pid in the node: processes alive at the same time on one host have distinct pids, and the
ranks of one job are started together with nearby pids, so they get distinct nodes and their ids
cannot collide however fast they draw. (A purely random 10-bit node gives 8 ranks a shared node
with probability 2.7%, and two processes sharing a node and a millisecond draw the same ids from
sequence 0 on: 3,121 duplicates in 2 × 50k ids when forced.) Why the host hash: pids repeat across
hosts and containers; the hash spreads hosts over the node space. Why the random sequence start:
two processes on different hosts that share a node (probability 1/1024 per pair) then also need
the same start value (1/2048) in the same millisecond to collide.
Within one process the (ms, seq) pair never repeats because the clock is forced forward, so ids
are strictly increasing. No 63-bit id is unique across hosts without coordination; the spool
enforces uniqueness locally (an entry is linked with link(2), which refuses an existing name, and
the writer then draws a fresh id), and the catalog must refuse an id already used by another file.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import threading
import time
from pathlib import Path

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
NODE_BITS = 10
SEQUENCE_BITS = 12
_MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
_SEQUENCE_START = 1 << (SEQUENCE_BITS - 1)  # a fresh millisecond starts below this: room to count up


def _host_hash() -> int:
    """The same for every process of one host boot; different (spread at random) between hosts."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    material = f"{socket.gethostname()}:{boot}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:4], "big")


def _draw_node() -> int:
    return (_host_hash() + os.getpid()) & ((1 << NODE_BITS) - 1)


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
                self._sequence += 1
                if self._sequence > _MAX_SEQUENCE:  # sequence exhausted in this ms: borrow the next one
                    now_ms += 1
                    self._sequence = secrets.randbelow(_SEQUENCE_START)
            else:
                self._sequence = secrets.randbelow(_SEQUENCE_START)
            self._last_ms = now_ms
            return (now_ms << (NODE_BITS + SEQUENCE_BITS)) | (self._node << SEQUENCE_BITS) | self._sequence


def id_timestamp_ms(file_id: int) -> int:
    """The Unix time in milliseconds encoded in an id."""
    return (file_id >> (NODE_BITS + SEQUENCE_BITS)) + EPOCH_MS


_default = SnowflakeGenerator()


def new_id() -> int:
    """A new id from this process's generator."""
    return _default.next_id()
