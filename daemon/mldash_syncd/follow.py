"""`run --once` while another daemon holds the spool: follow that daemon until the spool is drained.

The typical case is the end of a training job: its first save autostarted a daemon, and the job script ends
with `mldash-syncd run --once` to be sure everything is synced before the node is released. Only one daemon
may drain a spool, so this one watches the running daemon's progress through a read-only view of the index
and exits with the status its own drain would have had. If the running daemon exits first (it was stopped,
or it was autostarted and went idle), `run --once` takes the spool over and drains the rest itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mldash.spool.index import SpoolIndex
from mldash.spool.layout import SpoolLayout
from mldash.spool.lock import is_held
from mldash.spool.recovery import unindexed
from mldash.spool.states import OUTSTANDING, TERMINAL

POLL_INTERVAL = 0.5


@dataclass
class Progress:
    pending_files: int  # in an outstanding state, or saved and not yet ingested
    pending_bytes: int
    done_files: int  # committed or evicted: the spool's own history, not only this follow's
    remaining: dict[str, int]  # non-zero counts per state, like RunReport.remaining


@dataclass
class Followed:
    outcome: str  # "drained" | "holder_gone" | "max_wait" | "refused"
    first: Progress | None
    last: Progress | None
    reason: str | None = None  # "refused": why the holder's work is not what the caller asked to check

    @property
    def committed(self) -> int:
        """Entries the followed daemon finished while we watched."""
        return max(0, self.last.done_files - self.first.done_files) if self.first and self.last else 0


NOT_INDEXED = "not indexed"  # the key of saves no daemon has indexed yet in a `remaining` count


def remaining_counts(index: SpoolIndex, layout: SpoolLayout) -> dict[str, int]:
    """Non-zero counts per state, and NOT_INDEXED: what a run that ends now leaves in the spool. Saves not yet
    indexed count too — a `run --once` stopped at its --max-wait before its daemon (or the one it follows) had
    indexed them has not synced them, whatever the index says."""
    counts = {state: c["count"] for state, c in index.counts().items() if c["count"]}
    if saved := unindexed(layout, index.known_ids()).count:
        counts[NOT_INDEXED] = saved
    return counts


def progress(index: SpoolIndex, layout: SpoolLayout, *, count_unindexed: bool = True) -> Progress:
    """`count_unindexed=False`: leave out saves not indexed yet (a drain of our own counts them as it indexes
    them, from its "queued" events)."""
    counts = index.counts()
    pending_files = sum(counts[s.value]["count"] for s in OUTSTANDING)
    pending_bytes = sum(counts[s.value]["bytes"] for s in OUTSTANDING)
    if pending_files == 0 and count_unindexed:
        # Saved, but not yet ingested by the running daemon (it does so within ~0.1 s): pending as well.
        # (Only looked for when nothing indexed is pending: this runs at every poll.)
        saved = unindexed(layout, index.known_ids())
        pending_files, pending_bytes = saved.count, saved.bytes
    left = {state: c["count"] for state, c in counts.items() if c["count"]}
    if count_unindexed and pending_files and not any(left.get(s.value) for s in OUTSTANDING):
        left[NOT_INDEXED] = pending_files  # what the follower reports if this is the last poll
    return Progress(
        pending_files=pending_files,
        pending_bytes=pending_bytes,
        done_files=sum(counts[s.value]["count"] for s in TERMINAL),
        remaining=left,
    )


def follow(layout: SpoolLayout, *, deadline: float | None,
           on_progress: Callable[[Progress, Progress], None] | None = None,
           refuse_if: Callable[[], str | None] | None = None) -> Followed:
    """Poll until nothing is pending, the lock holder is gone, or `deadline` (time.monotonic()) passes.
    `on_progress(first, latest)` after every read. `refuse_if()`, asked at every poll (a holder announces its
    targets only once it has started, which may take a while): a reason ends the follow as "refused"."""
    index: SpoolIndex | None = None
    first: Progress | None = None
    last: Progress | None = None
    try:
        while True:
            if index is None:
                index = SpoolIndex.open_readonly(layout)
            if refuse_if is not None and (reason := refuse_if()) is not None:
                return Followed("refused", first, last, reason)
            if index is not None:
                last = progress(index, layout)
                first = first or last
                if on_progress is not None:
                    on_progress(first, last)
                if last.pending_files == 0:
                    return Followed("drained", first, last)
            # After the read: a holder that drained everything and exited counts as drained, not as gone.
            if not is_held(layout):
                return Followed("holder_gone", first, last)
            if deadline is not None and time.monotonic() >= deadline:
                return Followed("max_wait", first, last)
            time.sleep(POLL_INTERVAL)
    finally:
        if index is not None:
            index.close()
