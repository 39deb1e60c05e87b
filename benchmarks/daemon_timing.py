"""Running the daemon in this process until the spool is drained, timed from start to the last commit.

The clock starts before `Daemon(...)` is built and stops when `run(until_drained=True)` returns, so a sample
includes everything a freshly started `mldash-syncd run --once` does: recovery (ingesting the manifests into
the index), opening the store and catalog, the start-up gc, every upload with its verification, every
catalog commit and eviction. The progress hook also records when the first upload started and the last
commit landed, to separate the start-up cost from the steady drain.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mldash.config import Settings


def drain_timed(settings: Settings, *, expect: int, max_wait: float = 900.0) -> dict[str, Any]:
    from mldash_syncd import Daemon

    marks: dict[str, float] = {}

    def on_event(kind: str, _data: dict[str, Any]) -> None:
        now = time.perf_counter()
        if kind == "uploading":
            marks.setdefault("first_upload", now)
        elif kind == "committed":
            marks["last_commit"] = now
        elif kind in ("failed", "quarantined"):
            marks.setdefault("failure", now)

    started = time.perf_counter()
    daemon = Daemon(settings, on_event=on_event)
    report = asyncio.run(daemon.run(until_drained=True, max_wait=max_wait))
    finished = time.perf_counter()
    if report.committed != expect or not report.clean:
        raise RuntimeError(f"the daemon committed {report.committed} of {expect} entries: {report}")
    return {
        "seconds": finished - started,
        "startup_s": marks.get("first_upload", finished) - started,
        "steady_s": marks.get("last_commit", finished) - marks.get("first_upload", started),
        "bytes_sent": report.bytes_sent,
    }
