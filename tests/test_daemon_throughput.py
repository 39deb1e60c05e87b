"""`status`'s rate (the daemon's RateWindow): bytes are counted once a part is sent, so the first sample in the
window must not count as if it took no time — a 100 MB upload capped at 10 MB/s used to show 13.8 MB/s."""

from __future__ import annotations

import pytest

from mldash_syncd.throughput import RateWindow

PART = 8 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sent_at_rate(window: RateWindow, clock: Clock, rate: float, parts: int, size: int = PART) -> None:
    for _ in range(parts):
        clock.now += size / rate  # the part takes its time, then is counted
        window.add(size)


def test_a_short_capped_upload_reads_as_the_cap() -> None:
    clock = Clock()
    window = RateWindow(clock=clock)
    sent_at_rate(window, clock, 10e6, parts=12)  # ~100 MB at 10 MB/s
    assert window.rate() == pytest.approx(10e6, rel=0.01)


def test_the_window_slides_and_an_idle_daemon_reads_zero() -> None:
    clock = Clock()
    window = RateWindow(window=30.0, clock=clock)
    sent_at_rate(window, clock, 50e6, parts=200)  # 34 s at 50 MB/s, then 5 s at 10 MB/s: the window holds both
    sent_at_rate(window, clock, 10e6, parts=6)
    assert 10e6 < window.rate() < 50e6
    sent_at_rate(window, clock, 10e6, parts=60)  # 50 s at 10 MB/s: only that is left in the window
    assert window.rate() == pytest.approx(10e6, rel=0.01)
    clock.now += 31
    assert window.rate() == 0.0


def test_one_sample_counts_over_at_least_a_second() -> None:
    clock = Clock()
    window = RateWindow(clock=clock)
    assert window.rate() == 0.0
    window.add(4096)
    assert window.rate() == 4096.0
    clock.now += 4
    assert window.rate() == 1024.0
    window.add(4096)
    clock.now += 0.001  # the second sample counts over the time since the first
    assert window.rate() == pytest.approx(4096 / 4.001)
