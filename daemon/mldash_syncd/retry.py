"""The retry policy — the one place that decides what happens after an error.

Three kinds of failure, and what each costs an entry:

* ``OUTAGE`` — the dependency (store or catalog) is unreachable, timing out, throttling (503
  SlowDown, 429) or failing server-side (5xx). Nothing is wrong with the entry, so it does **not**
  consume an attempt; instead the dependency's `Gate` closes with exponential backoff and full
  jitter, and every worker waits on it. A network outage therefore neither burns attempts nor
  hot-loops, and request rate during a storm is bounded by concurrency / backoff.
* ``ENTRY`` — transient but specific to this entry (BadDigest, the store received other bytes than
  we sent, a lost race). Consumes an attempt; after ``max_attempts`` the entry is ``failed``.
* ``PERMANENT`` — retrying the same way cannot help (403, missing bucket, bad credentials, invalid
  request): ``failed`` after one attempt, with the reason; `mldash-syncd retry` re-queues it.
* ``CORRUPT`` — the spooled bytes or manifest are wrong: ``quarantined`` (a person must look).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import random
import sqlite3
import time
from dataclasses import dataclass

from mldash.catalog.base import CatalogError
from mldash.errors import SpoolCorruptError
from mldash.store.base import StoreError


class Failure(enum.StrEnum):
    OUTAGE = "outage"
    ENTRY = "entry"
    PERMANENT = "permanent"
    CORRUPT = "corrupt"


class EntryRetryableError(Exception):
    """A transient problem specific to one entry (e.g. the store holds other bytes than we sent)."""


class VerificationError(EntryRetryableError):
    """The store's checksum/ETag does not match what we computed from the spooled bytes."""


class ChecksumMismatchError(VerificationError):
    """The SHA256 (or composite) the store records for the object differs from ours — not only its size or ETag."""


class IdClashError(Exception):
    """Another file holds this entry's id: its catalog document, or its object at this entry's key. Ids are unique
    only with high probability across hosts (mldash/ids.py). Never overwritten or removed: quarantined, with the
    other file named."""


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, SpoolCorruptError | IdClashError):
        return Failure.CORRUPT
    if isinstance(exc, EntryRetryableError):
        return Failure.ENTRY
    if isinstance(exc, StoreError | CatalogError):
        if not exc.transient:
            return Failure.PERMANENT
        if isinstance(exc, StoreError) and exc.code in ("BadDigest", "InvalidPart"):
            return Failure.ENTRY
        return Failure.OUTAGE
    if isinstance(exc, TimeoutError | ConnectionError):
        return Failure.OUTAGE
    if _local_disk_full(exc):
        # The spool's own disk (the index lives there) is full: nothing wrong with the entry, and the
        # eviction of committed entries or the user frees space. Wait like for an outage.
        return Failure.OUTAGE
    return Failure.PERMANENT  # an unexpected bug: stop retrying it, keep the reason visible


def _local_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)  # SQLITE_FULL


# The longest a daemon waits between probes of a store or catalog that is down (the gate's backoff cap, below
# retry_max_delay if that is lower). Once the dependency answers again, every entry that waited for it goes at
# once, so uploads resume within this after an outage ends — half of it on average. One probe per 15 s costs a
# store nothing; the 60 s cap before meant 26-29 s to resume after outages of 40-90 s.
OUTAGE_PROBE_MAX = 15.0


MAX_EXPONENT = 64


@dataclass
class Backoff:
    """Exponential backoff with full jitter: a random delay in [0, min(cap, base·2^n)]."""

    base: float
    cap: float
    rng: random.Random

    def delay(self, attempt: int) -> float:
        # The exponent is bounded: a gate counts every failed request of an outage (64 uploads in flight fail
        # 64 times per probe), and 2**1024 does not fit a float — past ~1,000 failures, minutes into an outage,
        # this raised OverflowError in every upload worker. 2**MAX_EXPONENT times any base is past any cap.
        return self.rng.uniform(0, min(self.cap, self.base * 2.0 ** min(MAX_EXPONENT, max(0, attempt - 1))))


class Gate:
    """Per-dependency circuit: consecutive outage failures push the next allowed request later."""

    def __init__(self, name: str, backoff: Backoff, clock=time.monotonic) -> None:
        self.name = name
        self.backoff = backoff
        self.clock = clock
        self.failures = 0
        self.open_until = 0.0
        self.last_error: str | None = None

    @property
    def is_open(self) -> bool:
        return self.clock() < self.open_until

    def failure(self, reason: str) -> float:
        self.failures += 1
        self.last_error = reason
        # at least a small floor, so a storm of instant failures can never spin
        delay = max(self.backoff.delay(self.failures), min(0.05, self.backoff.cap))
        self.open_until = max(self.open_until, self.clock() + delay)
        return delay

    def probe_now(self) -> None:
        """A person says the dependency is back (`retry`): the next request goes now, not at the end of the
        backoff; a failure then carries on the backoff where it was."""
        self.open_until = min(self.open_until, self.clock())

    def success(self) -> bool:
        """The dependency answered; True when that ends an outage (it had failed since its last success)."""
        recovered = self.failures > 0
        self.failures = 0
        self.last_error = None
        return recovered

    async def wait(self) -> None:
        while (remaining := self.open_until - self.clock()) > 0:
            await asyncio.sleep(remaining)
