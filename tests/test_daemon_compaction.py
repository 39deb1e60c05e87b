"""Compaction: index rows of entries evicted longer ago than the retention go (the catalog keeps the files);
newer evicted rows and rows in every other state stay. It runs on the daemon's event loop every 10 minutes, so
it selects ids in SQL rather than reading whole rows."""

from __future__ import annotations

import os

from mldash.config import Settings
from mldash.spool import SpoolIndex, SpoolLayout, State
from mldash_syncd.evict import EVICTED_ROW_RETENTION, compact
from tests.fixtures.daemon import enqueue_bytes

NOW = 2_000_000_000.0


def test_only_rows_evicted_before_the_retention_are_dropped(settings: Settings, drain) -> None:
    done = [enqueue_bytes(settings, os.urandom(100), filename=f"d{i}.bin") for i in range(4)]
    assert drain(settings).committed == 4
    waiting = enqueue_bytes(settings, b"q", filename="q.bin")  # queued: never compacted
    index = SpoolIndex(SpoolLayout(settings.spool))
    try:
        from mldash.spool.recovery import ingest_new
        ingest_new(index, index.layout, index.known_ids())
        ages = {done[0].id: EVICTED_ROW_RETENTION + 60, done[1].id: EVICTED_ROW_RETENTION - 60, done[2].id: 10.0}
        for file_id, age in ages.items():
            index.update(file_id, evicted_at=NOW - age)
        index.update(done[3].id, evicted_at=None)  # an old row without the time counts as long ago
        assert {r["id"]: r["state"] for r in index.rows()}[done[0].id] == State.EVICTED

        old = sorted([done[0].id, done[3].id])
        assert sorted(compact(index, now=NOW, dry_run=True)) == old
        assert len(index.rows()) == 5  # a dry run changes nothing
        assert sorted(compact(index, now=NOW)) == old
        assert sorted(r["id"] for r in index.rows()) == sorted([done[1].id, done[2].id, waiting.id])
    finally:
        index.close()


def test_eviction_keeps_the_newest_committed_and_the_recent_ones(tmp_path) -> None:
    """keep_committed counts committed entries only, newest id first; beyond them, an entry goes once it was
    committed at least evict_after seconds ago (a row without the time counts as long ago)."""
    from mldash_syncd.evict import evictable
    from tests.test_spool_lifecycle import _index_with_entries

    index, ids = _index_with_entries(tmp_path, 7)
    try:
        committed_ago = {ids[0]: 500.0, ids[1]: 50.0, ids[2]: None, ids[3]: 500.0, ids[4]: 500.0, ids[5]: 500.0}
        for file_id, ago in committed_ago.items():
            index.transition(file_id, State.UPLOADED)
            index.transition(file_id, State.COMMITTED, committed_at=None if ago is None else NOW - ago)
        index.transition(ids[5], State.EVICTED)  # not committed any more: neither kept nor evicted again
        # ids[6] stays queued. Newest committed: ids[4], ids[3] (kept with keep=2); then ids[2], ids[1], ids[0].
        assert sorted(evictable(index, keep=2, after=100.0, now=NOW)) == [ids[0], ids[2]]
        assert sorted(evictable(index, keep=0, after=100.0, now=NOW)) == [ids[0], ids[2], ids[3], ids[4]]
        assert sorted(evictable(index, keep=0, after=0.0, now=NOW)) == ids[:5]
        assert evictable(index, keep=5, after=0.0, now=NOW) == []
    finally:
        index.close()
