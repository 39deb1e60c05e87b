"""Request-rate helpers: assert a bounded request rate during an error storm."""

from __future__ import annotations

from collections.abc import Iterable


def max_rate(times: Iterable[float], window: float = 1.0) -> int:
    """The largest number of events (timestamps in seconds) that fall within any `window` seconds."""
    ordered = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
