"""Scenario 6: MongoDB stopped for a while, and failCommand failpoints — uploads continue, commits land
later, exactly once.

- A SecantusDB server in its own process is stopped (SIGTERM) while a daemon drains; artifacts saved
  meanwhile are still uploaded (they wait as "uploaded", without burning attempts); the server comes
  back on the same port and data directory, and the same daemon run commits everything.
- failCommand failpoints on the daemon's own client (appName "mldash"): an insert refused with a
  transient code (ExceededTimeLimit), the connection dropped mid-insert, an insert that applied but answered with a
  writeConcernError, and the read-back failing (the daemon reads documents back only when the insert found their
  id present: a replay, here of a run that committed and died before recording it). Each makes the daemon (or
  the driver) send the commit again; the catalog must still hold exactly one document per file.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest

from mldash.config import Settings
from mldash.spool import State
from tests.fixtures.daemon import enqueue_bytes
from tests.fixtures.faults import mongo_uri_via
from tests.reliability.conftest import fast
from tests.reliability.helpers import ServiceThread, all_in, entry_rows, wait_for
from tests.reliability.invariants import check_invariants

DONE = ("committed", "evicted")
FAILING_FOR = 3.0


def test_mongodb_stopped_for_a_while(settings: Settings, mongo_server_process) -> None:
    server = mongo_server_process()
    live = fast(settings, catalog=server.uri, mongo_database="outage", request_timeout=1.0)
    first = [enqueue_bytes(live, os.urandom(5000), filename=f"before-{i}") for i in range(4)]
    daemon = ServiceThread(live).start()
    try:
        wait_for(lambda: all_in(live, [e.id for e in first], DONE), what="first commits")
        server.stop()
        during = [enqueue_bytes(live, os.urandom(5000), filename=f"during-{i}") for i in range(6)]
        wait_for(lambda: all_in(live, [e.id for e in during], ("uploaded",)), what="uploads during the outage")
        time.sleep(2.0)  # commits keep failing meanwhile
        rows = entry_rows(live)
        for entry in during:
            assert rows[entry.id]["state"] == State.UPLOADED, "bytes go up while the catalog is down"
            # ≤ 1: a commit attempt may be in flight right now; burnt attempts would have piled up by now.
            assert rows[entry.id]["attempts"] <= 1, "a catalog outage must not burn attempts"
            assert rows[entry.id]["error_kind"] == "outage" and rows[entry.id]["last_error"]
        server.start()
        wait_for(lambda: all_in(live, [e.id for e in during], DONE), what="commits after MongoDB came back")
    finally:
        report = daemon.stop()
    assert report.committed == len(first) + len(during) and report.clean, report
    check_invariants(live, [*first, *during])


@contextlib.contextmanager
def fail_command(admin: pymongo.MongoClient, data: dict[str, Any], mode: Any) -> Iterator[None]:
    """A failCommand failpoint for the daemon's client only (appName "mldash"), switched off afterwards."""
    admin.admin.command("configureFailPoint", "failCommand", mode=mode, data={"appName": "mldash", **data})
    try:
        yield
    finally:
        admin.admin.command("configureFailPoint", "failCommand", mode="off")


FAILURES = {
    # (Not 91 ShutdownInProgress: a "node is shutting down" error makes the driver wait for its next
    # heartbeat, 10 s here; the stopped-server test above covers restarts.)
    "exceeded-time-limit": {"failCommands": ["insert"], "errorCode": 262},
    "connection-closed": {"failCommands": ["insert"], "closeConnection": True},
    "write-concern-error": {"failCommands": ["insert"], "errorLabels": ["RetryableWriteError"],
                            "writeConcernError": {"code": 64, "errmsg": "waiting for replication timed out"}},
    "read-back-fails": {"failCommands": ["find"], "errorCode": 6},
}


def commit_as_a_previous_run(settings: Settings, admin: pymongo.MongoClient, entries: list) -> None:
    """The catalog documents a daemon would write for these entries, written directly: as if an earlier run
    committed them and was killed before its index recorded "committed"."""
    from mldash.catalog.mongo import COLLECTION
    from mldash.store import make_store
    from mldash_syncd.commit import document_for

    store = make_store(settings)
    for entry in entries:
        doc = document_for(entry, store_url=settings.store, store_key=store.key(entry.key()), committed_at=time.time())
        admin[settings.mongo_database][COLLECTION].insert_one({"_id": doc.id, **doc.to_dict()})


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failpoints_commit_exactly_once(mongo_settings: Settings, mongo_uri: str, mongo_admin: pymongo.MongoClient,
                                        fault_proxy, failure: str) -> None:
    # The proxy injects nothing here: it counts the commands the daemon sends.
    counter = fault_proxy(mongo_uri, protocol="mongo")
    direct = fast(mongo_settings, request_timeout=1.0)
    settings = direct.replace(catalog=mongo_uri_via(counter, mongo_uri))
    replay = failure == "read-back-fails"
    daemon = None if replay else ServiceThread(settings).start()
    try:
        with fail_command(mongo_admin, FAILURES[failure], mode="alwaysOn"):
            entries = [enqueue_bytes(settings, os.urandom(3000), filename=f"f{i}", metadata={"i": i})
                       for i in range(5)]
            if replay:  # before the daemon starts, so that every one of its commits is a replay
                commit_as_a_previous_run(direct, mongo_admin, entries)
                daemon = ServiceThread(settings).start()
            time.sleep(FAILING_FOR)  # the driver retries within its timeout, then the daemon later
        wait_for(lambda: all_in(settings, [e.id for e in entries], DONE), what="commits after the failpoint")
    finally:
        report = daemon.stop() if daemon is not None else None
    assert report is not None and report.committed == len(entries) and report.clean, report
    if replay:
        reads = sum(1 for m in counter.messages if m.method == "find")
        assert reads >= 2, f"only {reads} read-backs: the failure never hit"  # failed ones, then one that passed
    else:
        # Commits go in batches (one insert per batch), so more inserts than files means attempts were repeated.
        inserts = sum(1 for m in counter.messages if m.method == "insert")
        assert inserts > len(entries), f"only {inserts} inserts for {len(entries)} files: the failure never hit"
    check_invariants(settings, entries, view=direct)
