"""Scenario 8: a spooled byte flipped after enqueue, and a byte flipped in flight — detected, never
committed, and never left as wrong bytes in the store.

What the policy (daemon/mldash_syncd/retry.py, upload.py) says, and what is asserted:
- spooled bytes that no longer match the manifest's SHA256 are CORRUPT: the entry is quarantined at the
  first attempt, with the reason; nothing is uploaded (a multipart upload is aborted); once a person
  restores the bytes, `retry` delivers them;
- a byte flipped on the way to the store is caught — moto, like some S3-compatibles, does not validate
  the SHA256 we send — for a single PUT by the ETag (MD5 of what the store received), for a multipart
  object by the composite SHA256 the store computes from the parts it received (or, with
  verify_etag=true, by each part's ETag at once; a store that reports no composite gets its ETag
  checked against MD5s from a second read): a VerificationError, an ENTRY error that costs one attempt;
  the damaged part is sent again / the damaged object removed and created again, and the right bytes are
  committed;
- if every attempt is damaged (a persistently corrupting path), the entry ends `failed` after
  max_attempts with the reason, and the store holds no wrong bytes.
In every case the invariant checker reads every stored object back and compares its SHA256.
"""

from __future__ import annotations

import dataclasses
import os
import re
from urllib.parse import parse_qs

import pytest

from mldash.config import Settings
from mldash.spool import SpoolIndex, SpoolLayout, State
from mldash.store import make_store
from mldash.store.base import PartReceipt, StoredObject
from mldash_syncd import drain
from tests.faults import FaultProxy
from tests.faults import http_faults as H
from tests.faults.wrapped import Wrapped
from tests.fixtures.daemon import enqueue_bytes
from tests.reliability.conftest import MIB
from tests.reliability.helpers import entry_rows
from tests.reliability.invariants import check_invariants
from tests.spool_helpers import overwrite_spooled, read_spooled

NO_COMPOSITE = "the store reports no SHA256 checksum"


def flip_spooled_byte(settings: Settings, file_id: int, offset: int) -> bytes:
    """Flip one byte of an entry's spooled bytes in place — its blob or its inline payload (bit rot, or a
    writer that ignored the snapshot); returns the original bytes."""
    layout = SpoolLayout(settings.spool)
    original = read_spooled(layout, file_id)
    flipped = bytearray(original)
    flipped[offset] ^= 0x5A
    overwrite_spooled(layout, file_id, bytes(flipped))
    return original


@pytest.mark.parametrize("size", [1000, 200_000, 11 * MIB], ids=["inline", "single", "multipart"])
def test_spooled_byte_flipped_is_quarantined_then_retry_after_repair(
        s3_via_proxy: tuple[Settings, Settings, FaultProxy], size: int) -> None:
    settings, direct, _proxy = s3_via_proxy
    bad = enqueue_bytes(settings, os.urandom(size), filename="bad.bin")
    good = [enqueue_bytes(settings, os.urandom(size), filename=f"good-{i}.bin") for i in range(2)]
    original = flip_spooled_byte(settings, bad.id, size - 7)  # in the last part: the others may already be sent

    report = drain(settings, max_wait=60)

    row = entry_rows(settings)[bad.id]
    assert row["state"] == State.QUARANTINED and row["attempts"] == 1, row
    assert "sha256" in row["last_error"], row["last_error"]
    assert report.committed == 2 and not report.clean
    check_invariants(settings, [*good, bad], view=direct, allow={State.QUARANTINED})  # no object, no upload left

    overwrite_spooled(SpoolLayout(settings.spool), bad.id, original)  # a person restores the bytes
    index = SpoolIndex(SpoolLayout(settings.spool))
    assert index.retry([bad.id]) == [bad.id]
    index.close()
    assert drain(settings, max_wait=60).committed == 1
    check_invariants(settings, [*good, bad], view=direct)


@pytest.mark.parametrize(("operation", "verify_etag"), [("PutObject", None), ("UploadPart", None),
                                                       ("UploadPart", True)],
                         ids=["PutObject", "UploadPart-composite", "UploadPart-part-etags"])
def test_byte_flipped_in_flight_once_is_sent_again(s3_via_proxy: tuple[Settings, Settings, FaultProxy],
                                                   operation: str, verify_etag: bool | None,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    settings, direct, proxy = s3_via_proxy
    settings = settings.replace(verify_etag=verify_etag)
    match = H.PUT_OBJECT if operation == "PutObject" else H.UPLOAD_PART
    flip = proxy.flip_byte(match=match, times=1)
    size = 50_000 if operation == "PutObject" else 12 * MIB
    entry = enqueue_bytes(settings, os.urandom(size), filename="target.bin")
    others = [enqueue_bytes(settings, os.urandom(3000 + i), filename=f"other-{i}.bin") for i in range(3)]
    if operation == "UploadPart":  # make the single PUTs go first so the flip lands on a part
        proxy.clear()
        flip = proxy.flip_byte(match=match, times=1, skip=1)

    report = drain(settings, max_wait=60)

    assert flip.injected == 1
    assert report.committed == 4 and report.clean, report
    check_invariants(settings, [entry, *others], view=direct)  # reads every object back: the right bytes
    # The damaged request was sent again (whichever layer noticed: our ETag/checksum check, or the store
    # refusing the request) — the same object, or the same part number of it, went through the proxy twice.
    def piece(target: str) -> tuple[str, str | None]:
        path, _, query = target.partition("?")
        return path, parse_qs(query).get("partNumber", [None])[0]

    flipped = [m for m in proxy.messages if any("flip" in kind for kind in m.faults)]
    assert len(flipped) == 1, [m.faults for m in proxy.messages if m.faults]
    again = [m for m in proxy.messages if m is not flipped[0] and m.method == "PUT" and m.target
             and piece(m.target) == piece(flipped[0].target)]
    assert again, f"the flipped byte was not detected: {piece(flipped[0].target)} was never sent again"
    assert NO_COMPOSITE not in caplog.text  # moto reports the composite (on HEAD): no second read was needed


class _StoreWithoutChecksums(Wrapped):
    """An S3-compatible store that keeps no checksums (as some do): reports none, like a real one would."""

    async def head(self, key: str) -> StoredObject | None:
        stored = await self._inner.head(key)
        return stored and dataclasses.replace(stored, checksum_sha256=None)

    async def complete_multipart(self, key: str, upload_id: str, parts: list[PartReceipt]) -> StoredObject:
        return dataclasses.replace(await self._inner.complete_multipart(key, upload_id, parts), checksum_sha256=None)


def test_store_without_composite_checksum_is_checked_by_its_etag(
        s3_via_proxy: tuple[Settings, Settings, FaultProxy], caplog: pytest.LogCaptureFixture) -> None:
    """No composite to compare: the daemon reads the blob once more for the parts' MD5s and compares the
    object's ETag — the flipped part is caught, the object removed and created again."""
    settings, direct, proxy = s3_via_proxy
    flip = proxy.flip_byte(match=H.UPLOAD_PART, times=1)
    entry = enqueue_bytes(settings, os.urandom(12 * MIB), filename="target.bin")

    report = drain(settings, store=_StoreWithoutChecksums(make_store(settings)), max_wait=60)

    assert NO_COMPOSITE in caplog.text
    assert flip.injected == 1
    assert report.committed == 1 and report.clean, report
    check_invariants(settings, [entry], view=direct)
    completes = [m for m in proxy.messages if m.method == "POST" and "uploadId=" in (m.target or "")]
    assert len(completes) == 2, "the damaged object was not detected and created again"


def test_every_attempt_damaged_ends_failed_without_wrong_bytes(s3_via_proxy: tuple[Settings, Settings,
                                                                                     FaultProxy]) -> None:
    settings, direct, proxy = s3_via_proxy
    settings = settings.replace(max_attempts=3)
    victim_small = enqueue_bytes(settings, os.urandom(40_000), filename="doomed.bin", prefix="cursed")
    victim_big = enqueue_bytes(settings, os.urandom(6 * MIB), filename="doomed-big.bin", prefix="cursed")
    others = [enqueue_bytes(settings, os.urandom(2000 + i), filename=f"fine-{i}.bin") for i in range(3)]
    cursed = re.compile(rb"\APUT [^ ]*/cursed/")
    flip = proxy.flip_byte(match=cursed)

    report = drain(settings, max_wait=60)

    assert flip.injected >= 2 * 3
    rows = entry_rows(settings)
    for victim in (victim_small, victim_big):
        row = rows[victim.id]
        assert row["state"] == State.FAILED and row["attempts"] == 3, row
        assert "other bytes than sent" in row["last_error"], row["last_error"]
    assert report.committed == 3
    check_invariants(settings, [victim_small, victim_big, *others], view=direct, allow={State.FAILED})
