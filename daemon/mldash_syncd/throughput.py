"""`RateWindow`: the daemon's upload rate over the last 30 s, as `status` shows it.

Bytes are counted when a part or file has been sent, so each sample stands for a transfer that took place
*before* its time stamp. The rate is therefore measured from the first sample in the window to now, over the
bytes that came after it: counting the first sample's bytes too (without the time they took) over-read short
runs — a 100 MB upload at a 10 MB/s cap showed 13.8 MB/s. Under a cap the daemon samples what the pacer let
through at each heartbeat instead (Daemon.throughput): finished parts read 0 for as long as the first one takes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW = 30.0      # seconds of history
MIN_SPAN = 1.0     # a shorter span is read as this long: two samples a millisecond apart say nothing of a rate


class RateWindow:
    def __init__(self, window: float = WINDOW, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, nbytes: int) -> None:
        now = self._clock()
        self._samples.append((now, nbytes))
        while self._samples[0][0] < now - self.window:
            self._samples.popleft()

    def rate(self) -> float:
        """Bytes per second over the window; 0.0 with nothing sent in it."""
        now = self._clock()
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()
        if not self._samples:
            return 0.0
        first_at, first = self._samples[0]
        total = sum(n for _, n in self._samples)
        # With one sample there is no interval to measure: its bytes over at least MIN_SPAN, as an estimate.
        counted = total if len(self._samples) == 1 else total - first
        return counted / max(MIN_SPAN, now - first_at)
