"""The lifecycle of a spooled artifact: the states and the only transitions allowed between them.

    queued ──claim──▶ uploading ──bytes verified in store──▶ uploaded ──catalog upsert──▶ committed ──▶ evicted
       ▲                 │  │                                   │
       │   lease expiry  │  └─ permanent error / attempts out ─▶ failed ◀── catalog attempts out
       └─────────────────┘            │ transient: back to queued with next_attempt_at (backoff)
       ▲                              │
       └──── retry (a person) ────────┴──── quarantined (bytes don't match checksum, corrupt manifest)

    queued / uploading / uploaded / quarantined ──id taken by another file──▶ resaved (the same artifact goes on
                                                                            as a new entry: `resaved_as`)
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    QUEUED = "queued"
    """Spooled and waiting for an upload slot (or for `next_attempt_at` after a transient error)."""
    UPLOADING = "uploading"
    """Claimed by a daemon under a lease (owner + expiry); multipart progress is recorded per part."""
    UPLOADED = "uploaded"
    """Bytes are in the store and verified (SHA256 both ways); the catalog commit is pending."""
    COMMITTED = "committed"
    """Catalog document written: the artifact is delivered. Bytes stay until eviction."""
    EVICTED = "evicted"
    """Committed and its spooled bytes removed (keep-last-N / age policy). Terminal."""
    FAILED = "failed"
    """Gave up for now: a permanent error, or transient attempts exhausted. `retry` re-queues it."""
    QUARANTINED = "quarantined"
    """Needs a person: corrupt manifest, missing blob, or bytes that no longer match their checksum."""
    RESAVED = "resaved"
    """Its id turned out to be another file's (ids are unique across hosts only with high probability): the
    artifact was saved again under a new id, the entry's `resaved_as`, and goes on there. Terminal; readers
    follow it to the new entry."""


# Allowed transitions; anything else is a bug and raises.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.UPLOADING, State.UPLOADED, State.FAILED, State.QUARANTINED, State.RESAVED}),
    State.UPLOADING: frozenset({State.QUEUED, State.UPLOADED, State.FAILED, State.QUARANTINED, State.RESAVED}),
    State.UPLOADED: frozenset({State.COMMITTED, State.QUEUED, State.FAILED, State.QUARANTINED, State.RESAVED}),
    State.COMMITTED: frozenset({State.EVICTED}),
    State.EVICTED: frozenset(),
    State.FAILED: frozenset({State.QUEUED, State.QUARANTINED}),
    State.QUARANTINED: frozenset({State.QUEUED, State.RESAVED}),
    State.RESAVED: frozenset(),
}

# States in which the spooled bytes are still needed (eviction and quota must leave them alone).
PENDING = frozenset({State.QUEUED, State.UPLOADING, State.UPLOADED, State.FAILED, State.QUARANTINED})
# States the daemon still has work to do in: what a drain waits for.
OUTSTANDING = frozenset({State.QUEUED, State.UPLOADING, State.UPLOADED})
# States a `retry` acts on.
RETRYABLE = frozenset({State.FAILED, State.QUARANTINED})
TERMINAL = frozenset({State.COMMITTED, State.EVICTED})


class IllegalTransition(RuntimeError):
    def __init__(self, file_id: int, current: State, target: State) -> None:
        super().__init__(f"entry {file_id}: illegal transition {current} → {target}")


def check_transition(file_id: int, current: State, target: State) -> None:
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(file_id, current, target)
