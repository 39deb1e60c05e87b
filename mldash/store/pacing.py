"""`RateLimit`: the daemon's upload bandwidth cap (`max_upload_rate`), shared by every upload it runs.

Why: on a cluster node the daemon shares the network with the training job itself (data loading from shared
storage, gradient all-reduce between nodes). A backlog of checkpoints drained at line rate can slow the very
training it serves; a cap keeps the uploads to what the node can spare.

How: a token bucket that may go into debt. A sender takes tokens for the bytes it is about to send and, if
the bucket is in debt, sleeps until the debt would be paid at the configured rate. Concurrent senders line
up by the debt they find, so the whole daemon stays at the rate whatever the number of uploads in flight.
The bucket holds at most `burst` bytes of credit (a tenth of a second at the rate, at least one 64 KiB slice),
so a pause does not turn into a burst at line rate afterwards.

S3 bodies are paced slice by slice as they are written to the socket (s3_body.py), so the uplink sees a
smooth stream; a local store is paced per part or file, before it is written (its writes run in a thread).

Time spent waiting here is our own choice, not the store's slowness: `pace` pushes the current call's
deadline (`CallDeadline`, set by the store around each request) back by the time waited, so a capped upload
is never timed out for being capped.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable

SLICE = 64 << 10  # the smallest unit paced: one socket write of an S3 body (s3_body.py)


class RateLimit:
    """At most `rate` bytes per second across every caller of `take` (one event loop); `rate` None: no cap.

    The rate can change while uploads run (`set_rate`, on a configuration reload): senders waiting on the old
    rate wake and wait out what is left of their turn at the new one, so lifting a cap frees them at once."""

    def __init__(self, rate: int | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._waiting: set[asyncio.Future[bool]] = set()  # senders waiting for their turn (woken by set_rate)
        self.rate: int | None = None
        # Bytes let through under a cap, ever: the wire rate of paced uploads as it happens (the daemon's `status`
        # rate), where counting finished parts would read 0 for the whole first part at a low cap.
        self.granted = 0
        self.set_rate(rate)

    def __repr__(self) -> str:
        return f"RateLimit({self.rate} B/s)" if self.rate else "RateLimit(unlimited)"

    @property
    def limited(self) -> bool:
        return self.rate is not None

    def set_rate(self, rate: int | None) -> None:
        """Change the cap (None: none). Credit earned so far is kept up to the new burst; debt carries over."""
        if rate is not None and rate <= 0:
            raise ValueError(f"rate {rate!r}: must be a positive number of bytes per second, or None for no cap")
        now = self._clock()
        if self.rate is None:
            self._tokens = float(max(SLICE, (rate or 0) // 10))  # a fresh cap starts with a full burst
        else:
            self._tokens += (now - self._updated) * self.rate
        self._updated = now
        self.rate = rate
        if rate is not None:
            self.burst = max(SLICE, rate // 10)
            self._tokens = min(float(self.burst), self._tokens)
        for waiter in self._waiting:  # wake every waiter: its turn is re-measured at the new rate
            if not waiter.done():
                waiter.set_result(True)

    async def take(self, nbytes: int) -> float:
        """Wait until `nbytes` may be sent; the seconds waited. Cancelled while waiting, the bytes are given
        back (they were not sent)."""
        if self.rate is None:
            return 0.0
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        self._tokens -= nbytes
        if self._tokens >= 0:
            return 0.0
        owed = -self._tokens  # bytes to be paid at the rate before this sender's turn comes
        loop, waited = asyncio.get_running_loop(), 0.0
        try:
            while owed > 0 and self.rate is not None:
                rate, since = self.rate, self._clock()
                turn = loop.create_future()
                timer = loop.call_later(owed / rate, _settle, turn, False)
                self._waiting.add(turn)
                try:
                    rate_changed = await turn
                finally:
                    timer.cancel()
                    self._waiting.discard(turn)
                took = self._clock() - since if rate_changed else owed / rate
                owed, waited = owed - took * rate, waited + took
        except asyncio.CancelledError:
            if self.rate is not None:
                self._tokens += nbytes
            raise
        return waited


def _settle(turn: asyncio.Future[bool], rate_changed: bool) -> None:
    if not turn.done():
        turn.set_result(rate_changed)


class CallDeadline:
    """The deadline of one store request, which pacing may push back (see module doc)."""

    def __init__(self, timeout: asyncio.Timeout, on_defer: Callable[[float], None] | None = None) -> None:
        self._timeout = timeout
        self._on_defer = on_defer

    def defer(self, seconds: float) -> None:
        when = self._timeout.when()
        if when is not None:
            self._timeout.reschedule(when + seconds)
        if self._on_defer is not None:
            self._on_defer(seconds)


# Set by the store around each request; aiohttp writes a body in a task of its own, which inherits it.
current_deadline: contextvars.ContextVar[CallDeadline | None] = contextvars.ContextVar("mldash_call_deadline",
                                                                                     default=None)


async def pace(limit: RateLimit | None, nbytes: int) -> None:
    """Take `nbytes` from `limit` (None: no cap), pushing the current request's deadline back by the wait."""
    if limit is None or limit.rate is None or nbytes <= 0:
        return
    waited = await limit.take(nbytes)
    limit.granted += nbytes
    deadline = current_deadline.get()
    if waited and deadline is not None:
        deadline.defer(waited)
