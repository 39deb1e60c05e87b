"""The entry lifecycle as a hypothesis state machine over the real SpoolIndex (SQLite) and spool files.

Rules drive what the client and the daemon do — enqueue (Enqueuer), ingest, claim (queued for
upload, uploaded for the catalog commit), lease renewal and expiry under an injected clock, a
daemon crash (release_all_leases, or a full restart through recovery.recover), upload complete,
commit, transient failure (back to queued with next_attempt_at), permanent failure, quarantine,
retry, eviction — plus attempts at every illegal transition. A plain-Python model predicts the
outcome of each; after every step the invariants are checked against the index itself:

- only legal transitions (states.TRANSITIONS) between two consecutive observations;
- no entry lost: every ingested id is in the index exactly once, in the state the model predicts;
- a committed entry never goes back (committed → evicted only);
- a live lease only on an in-flight entry (uploading, or uploaded being committed); every
  uploading entry holds a lease;
- counts() agrees with the rows (count and bytes per state); attempts count every claim.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mldash.spool.enqueue import Enqueuer
from mldash.spool.index import SpoolIndex
from mldash.spool.layout import SpoolLayout
from mldash.spool.recovery import ingest_new, read_manifest, recover
from mldash.spool.states import TRANSITIONS, IllegalTransition, State
from tests.spool_helpers import make_settings, put

LEASE = 30.0
OWNER = "daemon-1"
IN_FLIGHT = frozenset({State.UPLOADING, State.UPLOADED})
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@dataclass
class Expected:
    state: State
    size: int
    next_attempt_at: float = 0.0
    lease_expires: float | None = None
    attempts: int = 0


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # tmpfs when there is one: this test is about logic, and SQLite's checkpoint fsyncs on a
        # shared VM disk would otherwise dominate its runtime.
        self.dir = Path(tempfile.mkdtemp(prefix="mldash-lifecycle-", dir=FAST_TMP))
        self.layout = SpoolLayout(self.dir / "spool").ensure()
        # inline_max=0: every entry has a blob, which this model evicts and checks (inline entries have none)
        self.enqueuer = Enqueuer(make_settings(self.layout.root, inline_max=0), self.layout)
        self.index = SpoolIndex(self.layout)
        self.now = 1_000_000.0  # the injected clock of every lease and backoff decision
        self.sizes: dict[int, int] = {}              # enqueued (manifest committed) → size
        self.model: dict[int, Expected] = {}         # ingested entries
        self.known: set[int] = set()
        self.ever_committed: set[int] = set()
        self.observed: dict[int, State] = {}         # index states at the previous check
        self.counter = 0

    def teardown(self) -> None:
        self.index.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- helpers --------------------------------------------------------------------------------
    def _in(self, *states: State) -> list[int]:
        return sorted(i for i, e in self.model.items() if e.state in states)

    def _ingested(self, fresh: list[int]) -> None:
        assert set(fresh) == set(self.sizes) - set(self.model), "ingest missed or invented entries"
        for file_id in fresh:
            self.model[file_id] = Expected(State.QUEUED, self.sizes[file_id])

    def _moved(self, file_id: int, state: State, **changes: object) -> None:
        entry = self.model[file_id]
        entry.state = state
        entry.lease_expires = None  # transition() releases the lease by default
        for name, value in changes.items():
            setattr(entry, name, value)

    # ---- client ---------------------------------------------------------------------------------
    @rule(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=3))
    def enqueue(self, sizes: list[int]) -> None:
        for size in sizes:
            self.counter += 1
            manifest = put(self.enqueuer, os.urandom(size), f"f{self.counter}.bin")
            self.sizes[manifest.id] = size

    # ---- daemon ---------------------------------------------------------------------------------
    @rule()
    def ingest(self) -> None:
        self._ingested(ingest_new(self.index, self.layout, self.known))

    @rule(seconds=st.floats(0, 2 * LEASE))
    def advance_clock(self, seconds: float) -> None:
        self.now += seconds

    @rule(limit=st.integers(1, 4), state=st.sampled_from([State.QUEUED, State.UPLOADED]))
    def claim(self, limit: int, state: State) -> None:
        due = sorted((e.next_attempt_at, i) for i, e in self.model.items()
                     if e.state == state and e.next_attempt_at <= self.now
                     and (e.lease_expires is None or e.lease_expires < self.now))
        expected = [i for _, i in due[:limit]]
        rows = self.index.claim(OWNER, LEASE, limit, now=self.now, states=(state,))
        assert [row["id"] for row in rows] == expected
        for file_id in expected:
            entry = self.model[file_id]
            entry.state = State.UPLOADING if state == State.QUEUED else state
            entry.lease_expires = self.now + LEASE
            entry.attempts += 1

    @precondition(lambda self: self._in(State.UPLOADING))
    @rule(data=st.data())
    def renew_lease(self, data: st.DataObject) -> None:
        file_id = data.draw(st.sampled_from(self._in(State.UPLOADING)))
        assert self.index.renew_lease(file_id, OWNER, LEASE, now=self.now)
        self.model[file_id].lease_expires = self.now + LEASE

    @rule()
    def expire_leases(self) -> None:
        requeued = 0
        for entry in self.model.values():
            if entry.lease_expires is not None and entry.lease_expires < self.now:
                if entry.state == State.UPLOADING:
                    entry.state = State.QUEUED
                    requeued += 1
                entry.lease_expires = None
        assert self.index.release_expired_leases(now=self.now) == requeued

    @rule(restart=st.booleans())
    def daemon_crash(self, restart: bool) -> None:
        """The daemon dies mid-flight; the next one (holding the spool lock) releases every lease."""
        requeued = len(self._in(State.UPLOADING))
        for entry in self.model.values():
            if entry.state == State.UPLOADING:
                entry.state = State.QUEUED
            entry.lease_expires = None
        if restart:  # a new process: fresh connection, full start-up recovery (which also ingests)
            self.index.close()
            self.index = SpoolIndex(self.layout)
            before = set(self.model)
            report = recover(self.index, self.layout, OWNER)
            assert report.released_leases == requeued and not report.quarantined
            self._ingested(sorted(set(self.sizes) - before) if report.ingested else [])
            assert report.ingested == len(set(self.sizes) - before)
            self.known = set(self.model)
        else:
            assert self.index.release_all_leases(OWNER) == requeued

    @precondition(lambda self: self._in(State.UPLOADING))
    @rule(data=st.data())
    def upload_verified(self, data: st.DataObject) -> None:
        file_id = data.draw(st.sampled_from(self._in(State.UPLOADING)))
        self.index.transition(file_id, State.UPLOADED, uploaded_at=self.now)
        self._moved(file_id, State.UPLOADED)

    @precondition(lambda self: self._in(State.UPLOADED))
    @rule(data=st.data())
    def catalog_committed(self, data: st.DataObject) -> None:
        file_id = data.draw(st.sampled_from(self._in(State.UPLOADED)))
        self.index.transition(file_id, State.COMMITTED, committed_at=self.now)
        self._moved(file_id, State.COMMITTED)
        self.ever_committed.add(file_id)

    @precondition(lambda self: self._in(State.UPLOADING, State.UPLOADED))
    @rule(data=st.data(), backoff=st.floats(0, 3 * LEASE))
    def transient_failure(self, data: st.DataObject, backoff: float) -> None:
        file_id = data.draw(st.sampled_from(self._in(State.UPLOADING, State.UPLOADED)))
        self.index.transition(file_id, State.QUEUED, next_attempt_at=self.now + backoff,
                              last_error="503 Slow Down", error_kind="transient")
        self._moved(file_id, State.QUEUED, next_attempt_at=self.now + backoff)

    @precondition(lambda self: self._in(State.QUEUED, State.UPLOADING, State.UPLOADED))
    @rule(data=st.data())
    def permanent_failure(self, data: st.DataObject) -> None:
        file_id = data.draw(st.sampled_from(self._in(State.QUEUED, State.UPLOADING, State.UPLOADED)))
        self.index.transition(file_id, State.FAILED, last_error="403 AccessDenied", error_kind="permanent")
        self._moved(file_id, State.FAILED)

    @precondition(lambda self: self._in(State.QUEUED, State.UPLOADING, State.UPLOADED, State.FAILED))
    @rule(data=st.data())
    def quarantine(self, data: st.DataObject) -> None:
        file_id = data.draw(st.sampled_from(self._in(State.QUEUED, State.UPLOADING, State.UPLOADED, State.FAILED)))
        self.index.transition(file_id, State.QUARANTINED, last_error="sha256 mismatch", error_kind="corrupt")
        self._moved(file_id, State.QUARANTINED)

    @rule(data=st.data(), everything=st.booleans())
    def retry(self, data: st.DataObject, everything: bool) -> None:
        ids = None if everything else data.draw(st.lists(st.sampled_from(sorted(self.model) or [0]), max_size=4))
        chosen = set(self.model) if ids is None else set(ids)
        # Failed and quarantined entries, and queued ones waiting out a backoff (a person says "try now").
        expected = sorted(i for i in chosen if i in self.model and (
            self.model[i].state in (State.FAILED, State.QUARANTINED)
            or (self.model[i].state == State.QUEUED and self.model[i].next_attempt_at > self.now)))
        assert sorted(self.index.retry(ids, now=self.now)) == expected
        for file_id in expected:
            self._moved(file_id, State.QUEUED, next_attempt_at=0.0, attempts=0)

    @precondition(lambda self: self._in(State.COMMITTED))
    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        file_id = data.draw(st.sampled_from(self._in(State.COMMITTED)))
        self.index.transition(file_id, State.EVICTED, evicted_at=self.now)
        self.layout.blob_path(file_id).unlink()
        self._moved(file_id, State.EVICTED)

    @precondition(lambda self: self._in(State.EVICTED))
    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        """Rows of long-evicted entries leave the index (their manifests went with the eviction)."""
        gone = data.draw(st.lists(st.sampled_from(self._in(State.EVICTED)), min_size=1, unique=True))
        for file_id in gone:
            self.layout.manifest_path(file_id).unlink()
        self.index.delete(gone)
        self._forgotten(gone)

    @precondition(lambda self: self._in(State.FAILED, State.QUARANTINED))
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        """A person gives up on failed or quarantined entries: their files, then their rows, go."""
        gone = data.draw(st.lists(st.sampled_from(self._in(State.FAILED, State.QUARANTINED)), min_size=1,
                                  unique=True))
        for file_id in gone:
            self.layout.manifest_path(file_id).unlink()
            self.layout.blob_path(file_id).unlink()
        self.index.forget(self.index.given_up(gone), "discarded")
        self._forgotten(gone)

    def _forgotten(self, ids: list[int]) -> None:
        for file_id in ids:
            for known in (self.model, self.sizes, self.observed):
                known.pop(file_id, None)
            self.ever_committed.discard(file_id)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def illegal_transition_is_refused(self, data: st.DataObject) -> None:
        file_id = data.draw(st.sampled_from(sorted(self.model)))
        current = self.model[file_id].state
        target = data.draw(st.sampled_from([s for s in State if s != current and s not in TRANSITIONS[current]]))
        try:
            self.index.transition(file_id, target)
        except IllegalTransition:
            pass
        else:
            raise AssertionError(f"{current} → {target} was accepted")

    # ---- invariants -----------------------------------------------------------------------------
    @invariant()
    def index_matches_model(self) -> None:
        rows = self.index.rows()
        ids = [row["id"] for row in rows]
        assert len(ids) == len(set(ids))
        assert set(ids) == set(self.model), "an entry was lost or invented"
        for row in rows:
            expected = self.model[row["id"]]
            assert State(row["state"]) == expected.state, f"{row['id']}: {row['state']} vs model {expected.state}"
            assert row["lease_expires"] == expected.lease_expires
            assert row["next_attempt_at"] == expected.next_attempt_at
            assert row["attempts"] == expected.attempts
            assert row["size"] == expected.size

    @invariant()
    def only_legal_transitions(self) -> None:
        current = {row["id"]: State(row["state"]) for row in self.index.rows()}
        for file_id, before in self.observed.items():
            after = current[file_id]
            assert after == before or after in TRANSITIONS[before], f"{file_id}: illegal {before} → {after}"
        self.observed = current

    @invariant()
    def committed_never_goes_back(self) -> None:
        states = self.index.states_of(self.ever_committed)
        assert all(state in (State.COMMITTED, State.EVICTED) for state in states.values())
        assert set(states) == self.ever_committed

    @invariant()
    def leases_only_in_flight(self) -> None:
        for row in self.index.rows():
            state, expires = State(row["state"]), row["lease_expires"]
            if expires is not None or row["lease_owner"] is not None:
                assert state in IN_FLIGHT or expires < self.now, f"{row['id']}: live lease while {state}"
            if state == State.UPLOADING:
                assert expires is not None and row["lease_owner"] == OWNER, f"{row['id']}: uploading without lease"

    @invariant()
    def counts_are_consistent(self) -> None:
        counts = self.index.counts()
        for state in State:
            members = [e for e in self.model.values() if e.state == state]
            assert counts[state.value] == {"count": len(members), "bytes": sum(e.size for e in members)}
        pending_blobs = {i for i, e in self.model.items() if e.state != State.EVICTED}
        assert pending_blobs <= {int(name) for name in os.listdir(self.layout.blobs_dir)}


Lifecycle.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None, database=None,
                                       suppress_health_check=[HealthCheck.too_slow])
test_lifecycle = Lifecycle.TestCase


# ---- transition_many: one statement, still all or nothing --------------------------------------------------
def _index_with_entries(tmp_path: Path, count: int) -> tuple[SpoolIndex, list[int]]:
    layout = SpoolLayout(tmp_path / "spool").ensure()
    enqueuer = Enqueuer(make_settings(layout.root, inline_max=0), layout)
    for i in range(count):
        put(enqueuer, b"x" * (i + 1), filename=f"f{i}.bin")
    index = SpoolIndex(layout)
    ids = ingest_new(index, layout, set())
    return index, sorted(ids)


def test_transition_many_with_one_illegal_move_moves_none(tmp_path: Path) -> None:
    index, ids = _index_with_entries(tmp_path, 3)
    try:
        index.claim(OWNER, LEASE, 2)  # the first two are uploading, the last one stays queued
        index.transition(ids[0], State.UPLOADED)
        # ids[0] uploaded → committed is legal, ids[2] queued → committed is not: neither moves
        try:
            index.transition_many([ids[0], ids[2]], State.COMMITTED)
        except IllegalTransition as exc:
            assert str(ids[2]) in str(exc)
        else:
            raise AssertionError("queued → committed was accepted")
        assert index.states_of(ids) == {ids[0]: State.UPLOADED, ids[1]: State.UPLOADING, ids[2]: State.QUEUED}
        # inside an enclosing transaction the refusal aborts that transaction too: nothing of it is kept
        try:
            with index.transaction():
                index.transition(ids[1], State.UPLOADED)
                index.transition_many([ids[0], 999_999], State.COMMITTED)
        except KeyError as exc:
            assert exc.args == (999_999,)
        else:
            raise AssertionError("an unknown id was accepted")
        assert index.states_of(ids) == {ids[0]: State.UPLOADED, ids[1]: State.UPLOADING, ids[2]: State.QUEUED}
        index.transition_many(ids[:2], State.UPLOADED)  # uploaded → uploaded is a stay, allowed
        assert set(index.states_of(ids[:2]).values()) == {State.UPLOADED}
    finally:
        index.close()


def test_transition_adds_to_counters_and_claim_counts_each_attempt(tmp_path: Path) -> None:
    index, ids = _index_with_entries(tmp_path, 3)
    try:
        claimed = index.claim(OWNER, LEASE, 3)
        assert [row["attempts"] for row in claimed] == [1, 1, 1]
        index.add_bytes_sent(ids[0], 5)
        index.transition(ids[0], State.QUEUED, add={"bytes_sent": 7})
        index.transition(ids[1], State.UPLOADED, add={"bytes_sent": 3}, store_key="k")
        rows = {row["id"]: row for row in index.rows()}
        assert rows[ids[0]]["bytes_sent"] == 12 and rows[ids[0]]["state"] == "queued"
        assert rows[ids[1]]["bytes_sent"] == 3 and rows[ids[1]]["store_key"] == "k"
        assert rows[ids[2]]["bytes_sent"] == 0 and rows[ids[2]]["state"] == "uploading"
        index.transition(ids[1], State.COMMITTED)
        again = index.claim(OWNER, LEASE, 3, states=(State.QUEUED, State.COMMITTED))
        assert {row["id"]: (row["state"], row["attempts"]) for row in again} == {
            ids[0]: ("uploading", 2), ids[1]: ("committed", 2)}  # one UPDATE per target state
        rows = {row["id"]: row for row in index.rows()}
        assert [(rows[i]["state"], rows[i]["attempts"], rows[i]["lease_owner"]) for i in ids] == [
            ("uploading", 2, OWNER), ("committed", 2, OWNER), ("uploading", 1, OWNER)]
    finally:
        index.close()


def test_an_index_from_before_the_state_counts_gets_them_filled_from_its_rows(tmp_path: Path) -> None:
    # An index outlives daemon versions (a spool waits on an offline node for weeks): one written before the
    # per-state counts were kept must count its rows once, then keep counting through the triggers; a read-only
    # reader of it before any writer of this version opened it counts the rows itself.
    index, ids = _index_with_entries(tmp_path, 4)
    index.transition(ids[0], State.FAILED, last_error="x")
    index.conn.executescript("DROP TRIGGER entries_count_insert; DROP TRIGGER entries_count_update;"
                             " DROP TRIGGER entries_count_delete; DROP TABLE state_counts;")
    index.close()
    expected = {"queued": {"count": 3, "bytes": 2 + 3 + 4}, "failed": {"count": 1, "bytes": 1}}
    reader = SpoolIndex.open_readonly(SpoolLayout(tmp_path / "spool"))
    assert {k: v for k, v in reader.counts().items() if v["count"]} == expected
    reader.close()
    index = SpoolIndex(SpoolLayout(tmp_path / "spool"))
    assert index.conn.execute("SELECT COUNT(*) FROM state_counts").fetchone()[0] == 2  # filled, not recounted
    assert {k: v for k, v in index.counts().items() if v["count"]} == expected
    index.transition(ids[1], State.UPLOADING)
    index.forget(index.given_up([ids[0]]), "discarded")
    manifest = read_manifest(index.layout, ids[2])
    assert index.ingest([manifest]) == 0  # already there: not counted (nor are the triggers' writes)
    assert {k: v for k, v in index.counts().items() if v["count"]} == {"queued": {"count": 2, "bytes": 7},
                                                                        "uploading": {"count": 1, "bytes": 2}}
    index.close()


def test_ingest_counts_the_new_rows(tmp_path: Path) -> None:
    layout = SpoolLayout(tmp_path / "spool").ensure()
    enqueuer = Enqueuer(make_settings(layout.root, inline_max=0), layout)
    manifests = [put(enqueuer, b"x" * (i + 1), filename=f"f{i}.bin") for i in range(3)]
    index = SpoolIndex(layout)
    try:
        assert index.ingest(manifests[:2]) == 2
        assert index.ingest(manifests) == 1  # two of them were there already
    finally:
        index.close()
