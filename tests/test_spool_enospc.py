"""A full spool: a real ENOSPC on a small tmpfs, and the byte quota.

Either way a save blocks up to save_timeout, then raises SpoolFullError with a message that says
what is full and which setting to change; nothing partial is left (no temp file, no blob without
manifest, no truncated manifest); earlier entries are intact; freeing space makes saves work again.
Over quota it waits only while a daemon may drain the spool (one holds its lock, held it in the last
DAEMON_RESTART_GRACE seconds, or autostart starts one); otherwise it fails at once.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from mldash.errors import SpoolFullError
from mldash.spool.enqueue import DAEMON_RESTART_GRACE, Enqueuer
from mldash.spool.layout import SpoolLayout
from mldash.spool.lock import DaemonLock, seconds_since_held
from mldash.spool.manifest import Manifest
from mldash.spool.recovery import manifest_ids
from tests.spool_helpers import Ack, assert_spool_integrity, make_settings, put

PAGE = 4096




def _acks(manifests: list[Manifest]) -> dict[int, Ack]:
    return {m.id: Ack(m.id, m.size, m.sha256) for m in manifests}


def _nothing_partial(layout: SpoolLayout, acked: dict[int, Ack]) -> None:
    assert os.listdir(layout.tmp_dir) == [], "a failed save left a temp file"
    assert manifest_ids(layout) == set(acked), "a failed save left a manifest (or lost one)"
    assert_spool_integrity(layout, acknowledged=acked)  # also: no blob without manifest


def _evict(layout: SpoolLayout, manifests: list[Manifest]) -> None:
    """The daemon's eviction order: the manifest first, then the bytes."""
    for manifest in manifests:
        layout.manifest_path(manifest.id).unlink()
        layout.blob_path(manifest.id).unlink(missing_ok=True)  # inline entries have no blob


def _free_pages(path: Path) -> int:
    stats = os.statvfs(path)
    assert stats.f_frsize == PAGE
    return stats.f_bavail


def test_full_disk_raises_cleanly_and_recovers(small_fs: Path) -> None:
    enqueuer = Enqueuer(make_settings(small_fs / "spool", save_timeout=0.3))
    layout = enqueuer.layout
    saved: list[Manifest] = []
    with pytest.raises(SpoolFullError) as info:
        for number in range(100):
            saved.append(put(enqueuer, os.urandom(2**20 + number), f"{number}.bin"))
    message = str(info.value)
    assert "is full" in message and "No space left on device" in message, message
    assert "save_timeout" in message and "nothing was written" in message and f"'{len(saved)}.bin'" in message
    assert 10 < len(saved) < 20
    _nothing_partial(layout, _acks(saved))

    _evict(layout, saved[:3])
    more = put(enqueuer, os.urandom(2**20), "after-eviction.bin")
    _nothing_partial(layout, _acks([*saved[3:], more]))


@pytest.mark.parametrize(("manifest_pages", "spare_pages"), [(1, 0), (3, 1)],
                         ids=["manifest-does-not-start", "manifest-written-short"])
def test_disk_fills_exactly_at_the_manifest(small_fs: Path, manifest_pages: int, spare_pages: int) -> None:
    """The blob fits, the manifest does not: the blob must be taken back, never a short manifest committed.

    With one spare page, write(2) of a 3-page manifest writes one page and returns short.
    """
    enqueuer = Enqueuer(make_settings(small_fs / "spool", save_timeout=0.2))
    layout = enqueuer.layout
    first = put(enqueuer, os.urandom(5000), "first.bin")
    blob_pages = 64
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (_free_pages(small_fs) - blob_pages - spare_pages) * PAGE)
    assert _free_pages(small_fs) == blob_pages + spare_pages
    metadata = {"notes": "n" * (manifest_pages - 1) * PAGE}  # a manifest of about `manifest_pages` pages
    data = os.urandom(blob_pages * PAGE)

    with pytest.raises(SpoolFullError, match="is full"):
        put(enqueuer, data, "exact.bin", metadata=metadata)
    _nothing_partial(layout, _acks([first]))
    assert _free_pages(small_fs) == blob_pages + spare_pages, "space of the failed save was not given back"

    filler.unlink()
    entry = put(enqueuer, data, "exact.bin", metadata=metadata)
    assert entry.metadata == metadata
    _nothing_partial(layout, _acks([first, entry]))


def test_quota_blocks_then_raises_and_writes_nothing(tmp_path: Path) -> None:
    enqueuer = Enqueuer(make_settings(tmp_path / "spool", spool_quota="1MiB", save_timeout=0.3))
    saved = [put(enqueuer, os.urandom(300_000), f"{n}.bin") for n in range(3)]
    with DaemonLock(enqueuer.layout), pytest.raises(SpoolFullError) as info:  # a daemon that drains nothing
        put(enqueuer, os.urandom(300_000), "fourth.bin")
    assert str(info.value) == ("spool quota full: 900000 of 1048576 bytes in use, 'fourth.bin' needs 300000; "
                               "waited 0.3s (setting save_timeout) for the daemon to drain; nothing was written")
    assert (info.value.requested, info.value.used, info.value.quota) == (300_000, 900_000, 2**20)
    _nothing_partial(enqueuer.layout, _acks(saved))


def test_draining_unblocks_a_waiting_save(tmp_path: Path) -> None:
    enqueuer = Enqueuer(make_settings(tmp_path / "spool", spool_quota="1MiB", save_timeout=60))
    layout = enqueuer.layout
    saved = [put(enqueuer, os.urandom(300_000), f"{n}.bin") for n in range(3)]
    data = os.urandom(300_000)
    outcome: dict[str, object] = {}
    done = threading.Event()

    def blocked_save() -> None:
        try:
            outcome["manifest"] = put(enqueuer, data, "waits.bin")
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            done.set()

    daemon = DaemonLock(layout).acquire()  # the daemon whose eviction makes room below
    saver = threading.Thread(target=blocked_save)
    saver.start()
    # The save is waiting for room once its temp file is complete and it has not returned.
    deadline = time.monotonic() + 30
    while not any(p.stat().st_size == len(data) for p in layout.tmp_dir.iterdir() if p.name.endswith("blob.part")):
        assert time.monotonic() < deadline and not done.is_set(), f"the save did not block: {outcome}"
        time.sleep(0.01)
    time.sleep(0.1)
    assert not done.is_set(), f"a save over quota returned: {outcome}"

    drain = threading.Thread(target=_evict, args=(layout, saved[:2]))  # as the daemon evicts committed entries
    drain.start()
    drain.join()
    assert done.wait(30), "draining did not unblock the waiting save"
    saver.join()
    daemon.release()
    assert "error" not in outcome, outcome
    entry = outcome["manifest"]
    assert isinstance(entry, Manifest)
    _nothing_partial(layout, _acks([saved[2], entry]))


def _over_quota(tmp_path: Path, **overrides: object) -> tuple[Enqueuer, list[Manifest]]:
    enqueuer = Enqueuer(make_settings(tmp_path / "spool", spool_quota="1MiB", **overrides))
    return enqueuer, [put(enqueuer, os.urandom(300_000), f"{n}.bin") for n in range(3)]


def test_quota_full_without_a_daemon_fails_at_once(tmp_path: Path) -> None:
    """Autostart off and no daemon ever ran: nothing will make room, so the save must not stall save_timeout."""
    enqueuer, saved = _over_quota(tmp_path, save_timeout=90)
    started = time.monotonic()
    with pytest.raises(SpoolFullError) as info:
        put(enqueuer, os.urandom(300_000), "fourth.bin")
    assert time.monotonic() - started < 60, "the save waited for a daemon that does not exist"
    assert str(info.value) == (
        f"spool quota full: 900000 of 1048576 bytes in use, 'fourth.bin' needs 300000, and no daemon is draining "
        f"{enqueuer.layout.root} (none has held it in the last 30s; autostart is off): start one (`mldash-syncd run`, "
        "or its systemd unit) or raise spool_quota; nothing was written")
    assert (info.value.requested, info.value.used, info.value.quota) == (300_000, 900_000, 2**20)
    _nothing_partial(enqueuer.layout, _acks(saved))


def test_quota_full_waits_for_a_daemon_that_is_being_restarted(tmp_path: Path) -> None:
    """A daemon let go of the spool moments ago (systemd restarts it): wait for it, up to save_timeout."""
    enqueuer, saved = _over_quota(tmp_path, save_timeout=0.3)
    lock = DaemonLock(enqueuer.layout).acquire()  # `gc` or `reindex` taking the lock is no sign of a daemon ...
    lock.release()
    assert seconds_since_held(enqueuer.layout) is None  # (a lock file they created: never held by a daemon)
    lock = DaemonLock(enqueuer.layout).acquire()
    lock.touch()  # ... a daemon's heartbeat is (its last one, as it stops)
    lock.release()
    assert seconds_since_held(enqueuer.layout) < DAEMON_RESTART_GRACE
    with pytest.raises(SpoolFullError, match=r"waited 0.3s \(setting save_timeout\) for the daemon to drain"):
        put(enqueuer, os.urandom(300_000), "fourth.bin")

    # The same spool once its daemon has been gone for longer than the grace: at once, naming the spool.
    stale = time.time() - DAEMON_RESTART_GRACE - 5
    os.utime(enqueuer.layout.lock_path, (stale, stale))
    assert seconds_since_held(enqueuer.layout) > DAEMON_RESTART_GRACE
    enqueuer.settings = enqueuer.settings.replace(save_timeout=90)
    started = time.monotonic()
    with pytest.raises(SpoolFullError, match="no daemon is draining"):
        put(enqueuer, os.urandom(300_000), "fourth.bin")
    assert time.monotonic() - started < 60
    _nothing_partial(enqueuer.layout, _acks(saved))


def test_quota_wait_calls_on_wait_and_fails_once_the_daemon_is_gone(tmp_path: Path) -> None:
    """`on_wait` runs between tries (the client's autostart hook); a daemon that dies while a save waits — and is
    not back within the grace — ends the wait early instead of at save_timeout."""
    enqueuer, saved = _over_quota(tmp_path, save_timeout=90)
    daemon = DaemonLock(enqueuer.layout).acquire()
    calls: list[float] = []

    def on_wait() -> None:
        calls.append(time.monotonic())
        if len(calls) == 3:  # the daemon dies, and its last sign of life is long past
            daemon.release()
            stale = time.time() - DAEMON_RESTART_GRACE - 5
            os.utime(enqueuer.layout.lock_path, (stale, stale))

    enqueuer.on_wait = on_wait
    with pytest.raises(SpoolFullError, match="no daemon is draining"):
        put(enqueuer, os.urandom(300_000), "fourth.bin")
    assert len(calls) == 3, calls
    _nothing_partial(enqueuer.layout, _acks(saved))
