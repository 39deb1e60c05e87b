"""The daemon as a real process: kill -9 mid-multipart resumes, SIGTERM stops cleanly, portable spools."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mldash.config import Settings
from mldash.spool import SpoolIndex, SpoolLayout, State
from mldash.spool.lock import holder_pid
from mldash_syncd.progress import ProgressBar
from tests.backend_helpers import catalog_docs, pending_uploads, read_object
from tests.fixtures.daemon import enqueue_bytes, settings_env
from tests.spool_helpers import overwrite_spooled

MIB = 2**20


def multipart_settings(s3_settings: Settings) -> Settings:
    return s3_settings.replace(part_size=5 * MIB, multipart_threshold=5 * MIB, max_concurrent_parts=2,
                               retry_base_delay=0.05, retry_max_delay=0.5, request_timeout=10.0)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def recorded_parts(settings: Settings, file_id: int) -> int:
    index = SpoolIndex.open_readonly(SpoolLayout(settings.spool))
    if index is None:
        return 0
    try:
        return len(index.parts(file_id))
    except Exception:
        return 0
    finally:
        index.close()


def row(settings: Settings, file_id: int) -> dict:
    index = SpoolIndex(SpoolLayout(settings.spool))
    try:
        return index.get(file_id)
    finally:
        index.close()


def cli(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mldash_syncd", *args], env=settings_env(settings),
                          capture_output=True, text=True, timeout=timeout)


def spool_files(layout: SpoolLayout) -> dict[str, tuple[int, int]]:
    """Every file of the spool with its size and mtime: what a command that only looks must leave as it was."""
    return {str(p.relative_to(layout.root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in layout.root.rglob("*") if p.is_file()}


def test_kill9_mid_multipart_resumes_without_resending_stored_parts(s3_settings: Settings, daemon_process) -> None:
    settings = multipart_settings(s3_settings)
    data = os.urandom(60 * MIB)
    entry = enqueue_bytes(settings, data, filename="big.bin")
    parts_total = 12

    daemon = daemon_process(settings, "run")
    done_before_kill = wait_for(lambda: (n := recorded_parts(settings, entry.id)) >= parts_total // 2 and n)
    daemon.kill()
    assert done_before_kill < parts_total, "killed too late to test a resume"
    sent_before = row(settings, entry.id)["bytes_sent"]

    result = cli(settings, "run", "--once", "--quiet")
    assert result.returncode == 0, result.stderr

    after = row(settings, entry.id)
    assert after["state"] in (State.COMMITTED, State.EVICTED)
    resent = after["bytes_sent"] - sent_before
    # Only parts not yet in S3 are sent again: at most the rest plus the parts that were in flight.
    assert resent <= (parts_total - done_before_kill) * 5 * MIB, (resent, done_before_kill)
    assert read_object(settings, entry.key()) == data
    assert [d["id"] for d in catalog_docs(settings)] == [str(entry.id)]
    assert pending_uploads(settings) == []


def test_sigterm_mid_upload_stops_cleanly_and_resumes(s3_settings: Settings, daemon_process) -> None:
    settings = multipart_settings(s3_settings)
    data = os.urandom(60 * MIB)
    entry = enqueue_bytes(settings, data, filename="big.bin")

    daemon = daemon_process(settings, "run")
    wait_for(lambda: recorded_parts(settings, entry.id) >= 2)
    started = time.monotonic()
    code = daemon.terminate(timeout=60)
    assert code == 0, daemon.log()
    assert time.monotonic() - started < 45, "graceful stop must fit the unit's TimeoutStopSec"
    state = row(settings, entry.id)["state"]
    assert state != State.UPLOADING, "a stopped daemon leaves no entry leased"

    result = cli(settings, "run", "--once", "--quiet")
    assert result.returncode == 0, result.stderr
    assert read_object(settings, entry.key()) == data
    assert len(catalog_docs(settings)) == 1


def test_sigterm_commits_what_finished_uploading_in_the_grace_period(settings: Settings, daemon_process) -> None:
    """An upload that ends within stop_grace is committed before the daemon exits (one round trip), not left in
    `uploaded` for the next start; one that does not is interrupted, and the log says so."""
    capped = settings.replace(max_upload_rate="4MiB/s")  # 12 MiB: ~3 s, well inside the default 20 s grace
    entry = enqueue_bytes(capped, os.urandom(12 * MIB), filename="finishes.bin")
    daemon = daemon_process(capped, "run")
    wait_for(lambda: row(capped, entry.id) and row(capped, entry.id)["state"] == State.UPLOADING)
    assert daemon.terminate(timeout=60) == 0, daemon.log()
    assert [d["id"] for d in catalog_docs(capped)] == [str(entry.id)], daemon.log()
    assert "interrupted" not in daemon.log()
    assert daemon.log().rstrip().endswith("stopped: 1 committed since start; 0 pending in the spool")

    slow = settings.replace(max_upload_rate="64KiB/s", stop_grace=1.0)  # 2 MiB: 32 s, cut short at 1 s
    cut = enqueue_bytes(slow, os.urandom(2 * MIB), filename="cut.bin")
    daemon = daemon_process(slow, "run")
    wait_for(lambda: row(slow, cut.id) and row(slow, cut.id)["state"] == State.UPLOADING)
    assert daemon.terminate(timeout=60) == 0, daemon.log()
    assert "stopping: 1 uploads or commits interrupted; the next start resumes them" in daemon.log()
    assert row(slow, cut.id)["state"] == State.QUEUED
    assert daemon.log().rstrip().endswith("stopped: 0 committed since start; 1 pending in the spool")


def test_copied_spool_syncs_on_another_host_after_reindex(settings: Settings, tmp_path) -> None:
    """Offline node → copy the spool → `reindex && run --once` elsewhere."""
    entries = {enqueue_bytes(settings, os.urandom(n), filename=f"f{n}").id: n for n in (10, 5000, 70000)}
    moved = settings.replace(spool=tmp_path / "elsewhere" / "spool")
    shutil.copytree(settings.spool, moved.spool)
    shutil.rmtree(settings.spool)
    for path in SpoolLayout(moved.spool).root.rglob("*"):  # nothing in the spool names the old location
        if path.is_file():
            assert str(settings.spool).encode() not in path.read_bytes(), path

    assert cli(moved, "reindex").returncode == 0
    result = cli(moved, "run", "--once")
    assert result.returncode == 0, result.stderr
    assert "committed 3 files" in result.stderr
    assert sorted(int(d["id"]) for d in catalog_docs(moved)) == sorted(entries)


def test_a_copy_made_without_tmp_as_the_offline_guide_says_reindexes_and_syncs(settings: Settings, tmp_path) -> None:
    """operations.md copies with `rsync -a --exclude tmp/` (or manifests, then blobs): `reindex` used to die on the
    missing tmp/ (FileNotFoundError, exit 1), so `reindex && run --once` synced nothing."""
    saved = [enqueue_bytes(settings, os.urandom(n), filename=f"f{n}").id for n in (10, 70000)]
    moved = settings.replace(spool=tmp_path / "inbox" / "node17")
    shutil.copytree(settings.spool, moved.spool, ignore=shutil.ignore_patterns("tmp"))
    layout = SpoolLayout(moved.spool)
    assert not layout.tmp_dir.exists()
    dry = cli(moved, "gc", "--dry-run")
    assert dry.returncode == 0 and not layout.tmp_dir.exists(), dry.stderr  # a look changes nothing
    reindexed = cli(moved, "reindex")
    assert reindexed.returncode == 0 and "reindexed" in reindexed.stdout, reindexed.stderr
    assert layout.tmp_dir.is_dir()
    assert cli(moved, "run", "--once", "--quiet").returncode == 0
    assert sorted(int(d["id"]) for d in catalog_docs(moved)) == sorted(saved)
    shutil.rmtree(layout.tmp_dir)
    assert cli(moved, "gc").returncode == 0 and layout.tmp_dir.is_dir()


def test_cli_status_ls_retry(settings: Settings) -> None:
    good = enqueue_bytes(settings, b"good", filename="good.bin")
    bad = enqueue_bytes(settings, b"bad-bytes", filename="bad.bin")
    overwrite_spooled(SpoolLayout(settings.spool), bad.id, b"BAD-BYTES")

    once = cli(settings, "run", "--once", "--quiet")
    assert once.returncode == 1  # something left quarantined
    assert "a retry helps only once they are restored" in once.stderr, once.stderr  # not a bare "retry --all"

    status = cli(settings, "status", "--json")
    data = json.loads(status.stdout)
    assert data["states"]["quarantined"]["count"] == 1
    # Nothing is pending (the quarantined entry is counted apart): no "oldest pending" age to show.
    assert data["pendingFiles"] == 0 and data["oldestPendingAgeSeconds"] is None, data
    assert data["states"]["evicted"]["count"] + data["states"]["committed"]["count"] == 1
    assert any(str(bad.id) == e["id"] for e in data["recentErrors"])
    # The quarantined entry's bytes stay spooled; the good one was evicted (no quota set).
    assert data["disk"]["spoolBytes"] >= len(b"bad-bytes") and data["disk"]["quotaBytes"] is None
    assert data["disk"]["filesystemFreeBytes"] == pytest.approx(shutil.disk_usage(settings.spool).free, rel=0.1)
    human = cli(settings, "status").stdout
    assert "quarantined" in human and "recent errors" in human and "free on its filesystem" in human

    listed = cli(settings, "ls", "--state", "quarantined").stdout
    assert str(bad.id) in listed and str(good.id) not in listed and "sha256" in listed

    assert cli(settings, "retry").returncode == 2  # neither ids nor --all: a clear usage error
    unknown = cli(settings, "retry", "123", str(good.id))  # a typo'd id is named, not passed over in silence
    assert unknown.returncode == 2 and "no such entry in this spool's index: 123" in unknown.stderr, unknown.stderr
    assert f"not failed, quarantined or waiting to retry (left alone): {good.id} (" in unknown.stderr, unknown.stderr
    overwrite_spooled(SpoolLayout(settings.spool), bad.id, b"bad-bytes")
    retried = cli(settings, "retry", str(bad.id))
    assert "re-queued 1" in retried.stdout
    assert cli(settings, "run", "--once", "--quiet").returncode == 0
    assert hashlib.sha256(b"bad-bytes").hexdigest() in {d["checksum"] for d in catalog_docs(settings)}
    # Synced now: its quarantine is history, no longer a "recent error" to look at.
    assert json.loads(cli(settings, "status", "--json").stdout)["recentErrors"] == []


def test_retry_wakes_a_running_daemon_at_once(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """`retry` used to wait for the running daemon's next rescan (2 s, or longer when idle with nothing due); it
    now writes manifests/.wake, which the daemon watches. The rescan is stretched to 60 s here, so only the wake
    can get the entry committed within the test's 20 s."""
    from mldash_syncd import service
    from tests.reliability.helpers import ServiceThread

    monkeypatch.setattr(service, "RESCAN_INTERVAL", 60.0)
    failed = enqueue_bytes(settings, b"failed once", filename="f.bin")
    layout = SpoolLayout(settings.spool)
    index = SpoolIndex(layout)
    from mldash.spool.recovery import ingest_new
    assert ingest_new(index, layout, set()) == [failed.id]
    index.transition(failed.id, State.FAILED, last_error="403 AccessDenied (fixed since)", error_kind="permanent")
    index.close()

    daemon = ServiceThread(settings).start()
    try:
        wait_for(lambda: layout.lock_path.exists() and (time.sleep(0.5) or True))  # started, then idle
        assert row(settings, failed.id)["state"] == "failed"  # a daemon start does not retry failed entries
        retried = cli(settings, "retry", str(failed.id))
        assert "re-queued 1" in retried.stdout and layout.wake_path.exists()
        wait_for(lambda: row(settings, failed.id)["state"] in ("committed", "evicted"), timeout=20.0)
    finally:
        daemon.stop()
    assert not layout.manifest_path(failed.id).exists() or row(settings, failed.id)["state"] == "committed"
    assert cli(settings, "ls", "--state", "not-indexed").stdout.count("\n") == 1  # .wake is not an entry


def test_retry_after_an_outage_goes_now_not_at_the_end_of_the_backoff(settings: Settings) -> None:
    """The store was down; the daemon's store gate backs off (up to minutes). Once it is back, `retry --all` used
    to re-queue the waiting entries and have them wait for the gate's next probe anyway."""
    from tests.reliability.helpers import ServiceThread

    layout = SpoolLayout(settings.spool)
    service = ServiceThread(settings).start()
    try:
        wait_for(lambda: layout.lock_path.exists() and (time.sleep(0.5) or True))  # started, then idle
        gate = service.daemon.store_gate
        gate.failures, gate.last_error = 9, "upload: connection refused"
        gate.open_until = gate.clock() + 600  # an outage's backoff, well past this test
        entry = enqueue_bytes(settings, b"weights", filename="w.bin")
        wait_for(lambda: row(settings, entry.id) is not None)  # indexed, held by the gate
        index = SpoolIndex(layout)
        index.update(entry.id, next_attempt_at=time.time() + 600, last_error="upload: connection refused")
        index.close()
        retried = cli(settings, "retry", "--all")
        assert "re-queued 1 entries" in retried.stdout, retried
        wait_for(lambda: row(settings, entry.id)["state"] in ("committed", "evicted"), timeout=20.0)
    finally:
        service.stop()


def test_a_blob_missing_from_a_copied_spool_is_named_and_delivered_once_put_back(settings: Settings,
                                                                                  tmp_path) -> None:
    """A spool copied while the job wrote: a manifest without its blob. `ls` used to show "0 B (unreadable
    manifest)" for it — even after it was fixed and committed — and the hint spoke of changed bytes."""
    layout = SpoolLayout(settings.spool)
    data = os.urandom(100_000)
    entry = enqueue_bytes(settings, data, filename="model.bin", prefix="ckpt")
    kept = tmp_path / "blob"
    shutil.move(layout.blob_path(entry.id), kept)
    once = cli(settings, "run", "--once", "--quiet")
    assert once.returncode == 1 and "its blob is missing" in once.stderr, once.stderr
    listed = cli(settings, "ls", "--state", "quarantined").stdout
    assert "ns/proj/exp/ckpt/model.bin" in listed and "97.7 KiB" in listed and "unreadable" not in listed, listed
    assert f"blob {entry.id} is missing from blobs/ (its manifest is there)" in listed
    assert f"`mldash-syncd retry {entry.id}`" in listed

    shutil.move(kept, layout.blob_path(entry.id))  # copied again
    assert cli(settings, "retry", str(entry.id)).returncode == 0
    assert cli(settings, "run", "--once", "--quiet").returncode == 0
    listed = cli(settings, "ls").stdout
    assert "ns/proj/exp/ckpt/model.bin" in listed and "evicted" in listed, listed
    assert hashlib.sha256(data).hexdigest() in {d["checksum"] for d in catalog_docs(settings)}


def test_an_entry_quarantined_for_an_unreadable_manifest_gets_its_path_once_restored(settings: Settings,
                                                                                    tmp_path) -> None:
    layout = SpoolLayout(settings.spool)
    entry = enqueue_bytes(settings, os.urandom(1000), filename="late.bin", prefix="ckpt")
    good = layout.manifest_path(entry.id).read_bytes()
    layout.manifest_path(entry.id).write_bytes(b"\x00garbage")
    assert cli(settings, "run", "--once", "--quiet").returncode == 1
    assert "(unreadable manifest)" in cli(settings, "ls").stdout
    layout.manifest_path(entry.id).write_bytes(good)  # restored
    assert cli(settings, "retry", str(entry.id)).returncode == 0
    assert cli(settings, "run", "--once", "--quiet").returncode == 0
    listed = cli(settings, "ls").stdout
    assert "ns/proj/exp/ckpt/late.bin" in listed and "unreadable" not in listed, listed

    broken = enqueue_bytes(settings, os.urandom(10), filename="gone.bin")
    layout.manifest_path(broken.id).write_bytes(b"\x00garbage")
    assert cli(settings, "run", "--once", "--quiet").returncode == 1
    discarded = cli(settings, "discard", str(broken.id))
    assert f"discarded {broken.id} (unreadable manifest; quarantined: " in discarded.stdout, discarded.stdout


def test_discard_gives_up_on_a_quarantined_entry_so_run_once_can_succeed_again(settings: Settings,
                                                                              daemon_process) -> None:
    """A spooled artifact corrupted beyond repair: saved again, the broken copy is discarded — its files and
    index row go, the event stays — and `run --once` exits 0 again. Only failed/quarantined entries go."""
    layout = SpoolLayout(settings.spool)
    bad = enqueue_bytes(settings, b"bad-bytes", filename="bad.bin")
    overwrite_spooled(layout, bad.id, b"BAD-BYTES")
    assert cli(settings, "run", "--once", "--quiet").returncode == 1
    once = cli(settings, "run", "--once", "--quiet")
    assert once.returncode == 1 and "`mldash-syncd discard ID`" in once.stderr, once.stderr
    again = enqueue_bytes(settings, b"bad-bytes", filename="bad.bin")  # saved again
    holder = daemon_process(settings, "run")  # works beside a running daemon
    wait_for(lambda: again.id in {int(d["id"]) for d in catalog_docs(settings)})

    assert cli(settings, "discard").returncode == 2  # neither ids nor --all
    refused = cli(settings, "discard", str(again.id), "123")
    assert refused.returncode == 2 and "no such entry in this spool's index: 123" in refused.stderr, refused
    assert f"only those can be discarded): {again.id} (" in refused.stderr and "discarded 0 entries" in refused.stdout

    discarded = cli(settings, "discard", str(bad.id))
    assert discarded.returncode == 0, discarded
    assert f"discarded {bad.id} (ns/proj/exp/ckpt/bad.bin; quarantined: " in discarded.stdout
    assert not layout.manifest_path(bad.id).exists() and not layout.blob_path(bad.id).exists()
    assert row(settings, bad.id) is None
    assert holder.terminate() == 0
    assert cli(settings, "run", "--once", "--quiet").returncode == 0  # nothing left failed or quarantined
    assert [d["id"] for d in catalog_docs(settings)] == [str(again.id)]
    status = json.loads(cli(settings, "status", "--json").stdout)
    assert status["states"]["quarantined"]["count"] == 0 and status["problems"] == []


def test_status_shows_the_heartbeat_and_what_a_killed_daemon_cut_short(settings: Settings, daemon_process) -> None:
    slow = settings.replace(max_upload_rate="64KiB/s")  # 2 MiB: half a minute in `uploading`
    entry = enqueue_bytes(slow, os.urandom(2 * MIB), filename="cut.bin")
    daemon = daemon_process(slow, "run")
    wait_for(lambda: row(slow, entry.id) and row(slow, entry.id)["state"] == State.UPLOADING)
    wait_for(lambda: "; last heartbeat 0:0" in cli(slow, "status").stdout)
    shown = cli(slow, "status").stdout
    assert f"daemon   running (pid {daemon.proc.pid}; last heartbeat 0:0" in shown, shown
    daemon.kill()
    shown = cli(slow, "status").stdout
    assert "daemon   not running" in shown
    assert "(1 was cut short in upload or commit when the last daemon ended: the next start resumes them" in shown


def test_status_and_ls_count_saves_no_daemon_has_indexed(settings: Settings) -> None:
    """An offline node whose daemon never ran (autostart off): `status` must not say nothing is pending while
    every checkpoint waits in the spool."""
    import json

    from mldash.ids import id_timestamp_ms

    blob = enqueue_bytes(settings, os.urandom(100_000), filename="ckpt.pt")  # a blob in blobs/
    inline = enqueue_bytes(settings, b'{"loss": 0.5}', filename="metrics.json")  # bytes inside its manifest
    assert not SpoolLayout(settings.spool).index_path.exists()

    def status() -> dict:
        result = cli(settings, "status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    data = status()
    assert data["notIndexed"] == {"count": 2, "bytes": 100_000 + len(b'{"loss": 0.5}')}
    assert (data["pendingFiles"], data["pendingBytes"]) == (2, 100_000 + len(b'{"loss": 0.5}'))
    oldest = min(blob.id, inline.id)
    assert data["oldestPendingAgeSeconds"] == pytest.approx(time.time() - id_timestamp_ms(oldest) / 1000, abs=30)
    human = cli(settings, "status").stdout
    assert "not indexed        2" in human and "pending  2 files" in human and "run --once" in human
    listed = cli(settings, "ls")
    assert "2 saved entries are not indexed yet" in listed.stderr and "--state not-indexed" in listed.stderr
    listed = cli(settings, "ls", "--state", "not-indexed")  # an offline node's saves, by path and size
    assert listed.returncode == 0 and "not indexed yet" not in listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert set(lines) == {str(blob.id), str(inline.id)}
    assert "not indexed" in lines[str(blob.id)] and lines[str(blob.id)].endswith("/ckpt.pt")
    assert lines[str(inline.id)].endswith("/metrics.json")

    # Once a daemon indexed some (here: one, by an index built from the first manifest alone), the rest still count.
    layout = SpoolLayout(settings.spool)
    index = SpoolIndex(layout)
    from mldash.spool.recovery import ingest_new
    assert ingest_new(index, layout, set(), candidates=[blob.id]) == [blob.id]
    index.close()
    data = status()
    assert data["states"]["queued"]["count"] == 1 and data["notIndexed"]["count"] == 1
    both = json.loads(cli(settings, "ls", "--json", "--state", "queued", "--state", "not-indexed").stdout)
    assert [(r["id"], r["state"]) for r in both] == sorted([(str(blob.id), "queued"), (str(inline.id), "not indexed")])
    assert {r["filename"] for r in both} == {"ckpt.pt", "metrics.json"} and set(both[0]) == set(both[1])
    only = json.loads(cli(settings, "ls", "--json", "--state", "not-indexed", "--experiment", "a/b/c").stdout)
    assert only == []  # another experiment's
    mine = json.loads(cli(settings, "ls", "--json", "--state", "not-indexed", "--experiment", "ns/proj/exp").stdout)
    assert [r["id"] for r in mine] == [str(inline.id)]
    assert (data["pendingFiles"], data["pendingBytes"]) == (2, 100_000 + len(b'{"loss": 0.5}'))

    assert cli(settings, "run", "--once", "--quiet").returncode == 0
    data = status()
    assert data["notIndexed"] == {"count": 0, "bytes": 0} and data["pendingFiles"] == 0
    assert data["oldestPendingAgeSeconds"] is None
    assert "no daemon is running" not in cli(settings, "status").stdout
    assert "not indexed yet" not in cli(settings, "ls").stderr


def test_follow_progress_counts_saves_the_daemon_has_not_indexed(settings: Settings) -> None:
    from mldash_syncd.follow import progress

    saved = [enqueue_bytes(settings, os.urandom(n), filename=f"{n}.bin") for n in (10, 200_000)]
    layout = SpoolLayout(settings.spool)
    index = SpoolIndex(layout)  # as a daemon that has not ingested them yet
    try:
        seen = progress(index, layout)
    finally:
        index.close()
    assert (seen.pending_files, seen.pending_bytes) == (2, sum(m.size for m in saved))


def test_run_once_progress_bar_counts_each_file_once(settings: Settings) -> None:
    """Saves made after an earlier drain (an index exists, nothing in it pending): the bar's totals used to
    count them from the manifests and again from the daemon's "queued" events ("2/4 files" when done)."""
    enqueue_bytes(settings, b"first", filename="a.bin")
    assert cli(settings, "run", "--once", "--quiet").returncode == 0
    for name in ("b.bin", "c.bin"):
        enqueue_bytes(settings, b"later", filename=name)
    result = cli(settings, "run", "--once")
    assert result.returncode == 0, result.stderr
    bars = [line for line in result.stderr.replace("\r", "\n").splitlines() if " files  " in line]
    assert bars and "2/2 files  10 B/10 B" in bars[-1], bars


def test_queued_events_carry_every_size_with_a_large_backlog(settings: Settings) -> None:
    """More saves than the daemon's manifest cache holds (2,048; 64 here, to need fewer files): the "queued"
    events of the rest carried size 0, and `run --once`'s bar showed a byte total far short of what was pending
    ("0 B/99.8 KiB" with 3.0 MiB)."""
    from mldash_syncd import Daemon
    from mldash_syncd.manifests import ManifestCache

    count = 300
    for i in range(count):
        enqueue_bytes(settings, b"0123456789", filename=f"m{i}.json")
    sizes: dict[int, int] = {}

    def on_event(kind: str, data: dict) -> None:
        if kind == "queued":
            sizes[data["id"]] = data["size"]

    # One upload at a time: the daemon indexes the backlog far ahead of its uploads, past the cache's room.
    daemon = Daemon(settings.replace(max_concurrent_files=1), on_event=on_event)
    daemon._manifests = ManifestCache(limit=64)
    report = asyncio.run(daemon.run(until_drained=True, max_wait=120))
    assert report.committed == count
    assert len(sizes) == count and set(sizes.values()) == {10}, sorted(set(sizes.values()))


def test_progress_bar_counts_resumed_files_whole_and_estimates_per_file_when_files_are_small() -> None:
    import io

    bar = ProgressBar(0, 0, stream=io.StringIO())
    bar.event("queued", {"id": 1, "size": 100 * MIB})
    bar.event("bytes", {"amount": 40 * MIB})  # a resumed upload: 60 MiB of parts were already in the store
    bar.event("committed", {"id": 1, "size": 100 * MIB})
    assert "1/1 files  100.0 MiB/100.0 MiB" in bar.line()

    small = ProgressBar(0, 0, stream=io.StringIO())
    for i in range(100):
        small.event("queued", {"id": i, "size": 1000})
    for i in range(10):
        small.event("bytes", {"amount": 1000})
        small.event("committed", {"id": i, "size": 1000})
    small.started -= 10.0  # 10 files in 10 s: 90 left take ~90 s, whatever the byte rate says
    assert small.line().endswith("ETA 1:30"), small.line()


def test_run_once_progress_bar_on_a_spool_never_indexed(settings: Settings) -> None:
    """A copied spool before any daemon: the bar's byte total stayed 0 B (the "queued" events carried no size),
    and a quarantined entry was shown as failed."""
    enqueue_bytes(settings, b"good!", filename="good.bin")
    bad = enqueue_bytes(settings, b"bad-bytes", filename="bad.bin")
    overwrite_spooled(SpoolLayout(settings.spool), bad.id, b"BAD-BYTES")
    result = cli(settings, "run", "--once")
    assert result.returncode == 1, result.stderr
    bars = [line for line in result.stderr.replace("\r", "\n").splitlines() if " files  " in line]
    assert bars and "1/2 files" in bars[-1] and "/14 B" in bars[-1], bars
    assert "1 quarantined" in bars[-1] and "failed" not in bars[-1], bars


def test_run_once_max_wait_bounds_the_run_while_the_catalog_is_down(settings: Settings) -> None:
    """`--max-wait` counts from the start and ends the run then: opening a catalog that is down used to take
    the whole request timeout (60 s) before the wait even began, and the end of the run turned into a stop
    request whose grace (here 600 s) waited for the commit hanging on the dead catalog."""
    from tests.fixtures.mongo import free_port

    down = settings.replace(catalog=f"mongodb://127.0.0.1:{free_port()}/mldash", request_timeout=60.0,
                            stop_grace=600.0)
    for name in ("a.bin", "b.bin"):
        enqueue_bytes(down, b"bytes", filename=name)
    started = time.monotonic()
    result = cli(down, "run", "--once", "--max-wait", "8", "--quiet", timeout=100)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr  # still pending at --max-wait
    assert "in spool: 2 uploaded" in result.stderr  # the uploads went on while the catalog was down
    assert took < 45, f"run --once --max-wait 8 took {took:.0f}s"


def test_cli_while_a_daemon_is_creating_the_index(settings: Settings) -> None:
    """A save autostarts a daemon and the user types `status` or `run --once` at once: the index file exists,
    its schema only in part. Seen as "no index yet", not a traceback."""
    import json
    import sqlite3

    entry = enqueue_bytes(settings, b"step 1", filename="ckpt.bin")
    layout = SpoolLayout(settings.spool)
    SpoolIndex(layout).close()
    conn = sqlite3.connect(layout.index_path)
    conn.execute("DROP TABLE meta")  # as if the daemon were between its schema's tables and its last row
    conn.commit()
    conn.close()

    status = cli(settings, "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["pendingFiles"] == 1 and data["notIndexed"] == {"count": 1, "bytes": entry.size}
    listed = cli(settings, "ls")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    drained = cli(settings, "run", "--once")
    assert drained.returncode == 0 and "committed 1 files" in drained.stderr, drained.stderr
    assert [int(d["id"]) for d in catalog_docs(settings)] == [entry.id]


def test_second_daemon_on_same_spool_refuses(settings: Settings, daemon_process) -> None:
    daemon_process(settings, "run")
    wait_for(lambda: (SpoolLayout(settings.spool).lock_path.exists()
                      and cli(settings, "status", "--json").stdout.count('"running": true')))
    second = cli(settings, "run")
    assert second.returncode == 3 and "another mldash-syncd" in second.stderr
    gc = cli(settings, "gc")
    assert gc.returncode == 3 and "another mldash-syncd" in gc.stderr and "stop it first" in gc.stderr


def test_gc_dry_run_looks_while_a_daemon_runs(settings: Settings, daemon_process) -> None:
    """`gc --dry-run` changes nothing, so it may look at a spool a daemon holds: it names the multipart uploads
    it would abort (here one left under the key of an entry already committed); `gc` itself still needs the
    spool, and aborts the same upload once the daemon is gone."""
    import asyncio

    from mldash.store import make_store

    entry = enqueue_bytes(settings, b"committed", filename="done.bin")
    holder = daemon_process(settings, "run")
    wait_for(lambda: [d["id"] for d in catalog_docs(settings)] == [str(entry.id)])

    async def leave_an_upload() -> str:
        async with make_store(settings) as store:
            return await store.create_multipart(store.key(entry.key()))
    upload_id = asyncio.run(leave_an_upload())

    dry = cli(settings, "gc", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would abort 1 orphaned multipart uploads" in dry.stdout and upload_id in dry.stdout, dry.stdout
    assert "would remove 0 temp files" in dry.stdout and "another process holds this spool" in dry.stdout
    assert [u["UploadId"] for u in pending_uploads(settings)] == [upload_id]
    assert cli(settings, "gc").returncode == 3

    assert holder.terminate() == 0
    collected = cli(settings, "gc")
    assert collected.returncode == 0 and "aborted 1 orphaned multipart uploads" in collected.stdout, collected.stdout
    assert pending_uploads(settings) == []


@pytest.mark.parametrize("held", [False, True], ids=["free", "held"])
def test_gc_dry_run_writes_nothing_into_the_spool(settings: Settings, held: bool) -> None:
    """A dry run on a spool no daemon has indexed yet — free, or held by a process that is starting (lock taken,
    index not created yet): it reports the debris it would remove and creates, changes or removes no file of the
    spool (before, it opened the index for writing: index.sqlite and its schema appeared under the holder)."""
    enqueue_bytes(settings, b"x" * 100, filename="a.bin")
    layout = SpoolLayout(settings.spool)
    debris = layout.tmp_dir / "a-dead-writer.999999.tmp"
    debris.write_bytes(b"debris")
    os.utime(debris, (0, 0))

    before = spool_files(layout)
    assert not layout.index_path.exists()
    holder = None
    if held:
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sys, time\n"
            "from pathlib import Path\n"
            "from mldash.spool.layout import SpoolLayout\n"
            "from mldash.spool.lock import DaemonLock\n"
            "with DaemonLock(SpoolLayout(Path(sys.argv[1]))):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n"), str(layout.root)], stdout=subprocess.PIPE, text=True,
            env=settings_env(settings))
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = spool_files(layout)  # the holder's lock file
    try:
        dry = cli(settings, "gc", "--dry-run")
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
            holder.stdout.close()
    assert dry.returncode == 0, dry.stderr
    assert spool_files(layout) == before, "the dry run wrote into the spool"
    assert "would remove 1 temp files" in dry.stdout and "no index yet" in dry.stdout, dry.stdout
    assert ("another process holds this spool" in dry.stdout) is held
    assert ("has not created it" if held else "no daemon has run on it") in dry.stdout, dry.stdout

    if not held:
        collected = cli(settings, "gc")
        assert collected.returncode == 0 and "removed 1 temp files" in collected.stdout, collected.stdout
        assert not debris.exists()


def test_gc_dry_run_creates_no_sqlite_side_files_in_the_spool(settings: Settings, drain) -> None:
    """The usual case for a gc: a daemon ran and stopped cleanly (SQLite removed index.sqlite-wal/-shm). The dry
    run opens the index read-only — and SQLite creates index.sqlite-wal and index.sqlite-shm to read a WAL
    database, and leaves them: the dry run does write into the spool (the test beside it covers only a spool
    without an index)."""
    enqueue_bytes(settings, b"x" * 100, filename="a.bin")
    assert drain(settings, max_wait=30).committed == 1
    layout = SpoolLayout(settings.spool)
    assert layout.index_path.exists()
    assert not Path(str(layout.index_path) + "-wal").exists()
    before = spool_files(layout)

    dry = cli(settings, "gc", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would abort 0 orphaned multipart uploads" in dry.stdout, dry.stdout
    assert "no index yet" not in dry.stdout
    assert spool_files(layout) == before, "the dry run wrote into the spool"


def test_gc_dry_run_removes_nothing_from_the_local_store(settings: Settings, drain) -> None:
    """`gc --dry-run changes nothing` (operations.md): but it opens the local store as the daemon does, and
    LocalStore.open sweeps its debris (retired `.dead-*` uploads, temp files older than an hour)."""
    enqueue_bytes(settings, b"x" * 100, filename="a.bin")
    assert drain(settings, max_wait=30).committed == 1
    store_root = Path(settings.store.removeprefix("file://"))
    retired = store_root / ".uploads" / ".dead-0123456789abcdef"
    retired.mkdir(parents=True)
    (retired / "part-1").write_bytes(b"p")
    old_tmp = store_root / ".tmp" / "old.tmp"
    old_tmp.write_bytes(b"t")
    os.utime(old_tmp, (0, 0))

    dry = cli(settings, "gc", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert retired.exists() and old_tmp.exists(), "the dry run removed files from the store"


def test_gc_counts_an_upload_in_progress_as_live_while_a_daemon_runs(settings: Settings) -> None:
    """A daemon uploading an entry may have started its multipart upload and not yet recorded the id: with a
    daemon on the spool (only a dry run looks then), that upload is live, not an orphan."""
    from mldash.spool.recovery import recover
    from mldash.store.base import PendingUpload
    from mldash_syncd.gc import is_orphan

    entry = enqueue_bytes(settings, b"in flight", filename="big.bin")
    layout = SpoolLayout(settings.spool)
    index = SpoolIndex(layout)
    try:
        recover(index, layout, "test:1")
        assert [row["id"] for row in index.claim("test:1", 60.0, 1)] == [entry.id]  # now uploading, no id yet
        upload = PendingUpload(key=entry.key(), upload_id="started-a-moment-ago")
        assert is_orphan(upload, index, daemon_running=True) is False
        assert is_orphan(upload, index) is True  # with the spool to itself, gc knows nobody is uploading it
        # Same id, other names: another host's file (ids are unique across hosts only with high probability) —
        # its upload is not ours to abort. gc used to judge by the id in the key alone.
        theirs = PendingUpload(key="root/" + entry.key().replace("/big.bin", "/other.bin"), upload_id="theirs")
        assert is_orphan(theirs, index) is False
        assert is_orphan(PendingUpload(key="root/" + entry.key(), upload_id="ours"), index) is True
    finally:
        index.close()


def test_a_killed_daemon_leaves_a_recent_sign_of_life_for_waiting_saves(settings: Settings, daemon_process) -> None:
    """A save over quota waits for a daemon only if one held the spool in the last DAEMON_RESTART_GRACE seconds
    (a service being restarted). The daemon marks the lock file with each heartbeat, so even after kill -9 the
    mark is at most a heartbeat old."""
    from mldash.spool.enqueue import DAEMON_RESTART_GRACE
    from mldash.spool.lock import seconds_since_held

    layout = SpoolLayout(settings.spool)
    holder = daemon_process(settings, "run")
    wait_for(lambda: seconds_since_held(layout) == 0.0)
    stale = time.time() - 1000
    os.utime(layout.lock_path, (stale, stale))  # the mark as an old daemon left it: only heartbeats renew it
    wait_for(lambda: layout.lock_path.stat().st_mtime > time.time() - 10, timeout=30)
    holder.kill()
    since = seconds_since_held(layout)
    assert since is not None and since < DAEMON_RESTART_GRACE / 2, since


def test_a_starting_daemon_is_a_sign_of_life_before_its_first_heartbeat(settings: Settings, daemon_process) -> None:
    """Taking the lock keeps the lock file's old mark (gc and reindex take it too); the daemon marks it itself as
    soon as it holds it — not only at its first heartbeat, which comes after opening the store and catalog (here
    3 s: a MongoDB that is down). A daemon killed before that heartbeat must still look like one restarting."""
    from mldash.spool.lock import seconds_since_held
    from tests.fixtures.mongo import free_port

    layout = SpoolLayout(settings.spool).ensure()
    layout.lock_path.write_text("")
    old = time.time() - 3600
    os.utime(layout.lock_path, (old, old))  # the previous daemon's mark, an hour old
    down = settings.replace(catalog=f"mongodb://127.0.0.1:{free_port()}/")
    holder = daemon_process(down, "run")
    wait_for(lambda: seconds_since_held(layout) == 0.0)
    holder.kill()  # within the 3 s the catalog's open waits: before any heartbeat
    since = seconds_since_held(layout)
    assert since is not None and since < 60, since


def _uploaded_with_the_catalog_down(settings: Settings, mongo_server_process, daemon_process):
    """A service daemon whose catalog is down: it uploads two entries, then waits to commit them."""
    server = mongo_server_process()
    live = settings.replace(catalog=server.uri, mongo_database="mldash_follow", retry_base_delay=0.05,
                            retry_max_delay=0.5, request_timeout=1.0)
    server.stop()
    entries = [enqueue_bytes(live, os.urandom(n), filename=f"f{n}") for n in (100, 5000)]
    holder = daemon_process(live, "run")
    wait_for(lambda: all(row(live, e.id) and row(live, e.id)["state"] == State.UPLOADED for e in entries))
    return live, server, entries, holder


def _run_once(settings: Settings, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mldash_syncd", "run", "--once", *args],
                            env=settings_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_INJECTED = {
    # What a start meets, injected into a real `mldash-syncd run` process → its exit status and what it says.
    # systemd restarts the service on 1 and not on 2 (RestartPreventExitStatus=2): a problem that may pass must
    # exit 1, one that restarting cannot fix must exit 2 and say what does.
    "catalog-full": ("import sqlite3, mldash.catalog.sqlite as c\n"
                     "def full(self, *a, **k): raise sqlite3.OperationalError('database or disk is full')\n"
                     "c.SqliteCatalog._open_sync = full\n",
                     1, "the catalog is not available: "),
    "dead-fuse-mount": ("import errno, mldash.store.local as local\n"
                        "def gone(path): raise OSError(errno.ENOTCONN, 'Transport endpoint is not connected', "
                        "str(path))\n"
                        "local.make_private_dir = gone\n",
                        1, "the store is not available: "),
    "unreadable-index": ("import os, sys\n"
                         "spool = os.environ['MLDASH_SPOOL']\n"
                         "open(os.path.join(spool, 'index.sqlite'), 'wb').write(os.urandom(8192))\n",
                         2, "the spool's index cannot be read (file is not a database); `mldash-syncd reindex` "
                            "rebuilds it"),
}


@pytest.mark.parametrize("case", sorted(_INJECTED))
def test_a_start_that_fails_exits_with_what_systemd_should_do(settings: Settings, case: str) -> None:
    enqueue_bytes(settings, b"weights", filename="ckpt.pt")
    inject, code, says = _INJECTED[case]
    script = inject + "import sys\nfrom mldash_syncd.cli import main\nsys.exit(main(['run']))\n"
    done = subprocess.run([sys.executable, "-c", script], env=settings_env(settings), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == code and says in done.stderr, (done.returncode, done.stderr)


def test_an_unforeseen_error_does_not_wait_at_exit_for_a_blocked_thread(settings: Settings) -> None:
    """A bug of ours while a thread is blocked in a hung mount: the traceback, exit 1 — not a process that
    waits for the thread at exit for ever (the service's restart, a job's `run --once`, would hang)."""
    script = ("import asyncio, sys, threading\n"
              "import mldash_syncd.cli as cli\n"
              "def broken(args):\n"
              "    async def go():\n"
              "        asyncio.get_running_loop().run_in_executor(None, threading.Event().wait)\n"
              "        raise RuntimeError('a bug')\n"
              "    return cli.run_loop(go())\n"
              "cli.cmd_run = broken\n"
              "parser = cli.build_parser\n"
              "def patched():\n"
              "    p = parser()\n"
              "    p.set_defaults(func=broken)\n"
              "    for action in p._subparsers._group_actions:\n"
              "        for sub in action.choices.values():\n"
              "            sub.set_defaults(func=broken)\n"
              "    return p\n"
              "cli.build_parser = patched\n"
              "sys.exit(cli.main(['run']))\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env=settings_env(settings), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "RuntimeError: a bug" in done.stderr, done.stderr
    assert time.monotonic() - started < 30


def test_retry_ends_the_backoff_of_an_entry_waiting_after_a_transient_error(settings: Settings) -> None:
    """A store was down; its entries wait out their backoff (up to retry_max_delay, 5 min by default). Once the
    cause is fixed, `retry ID` (or --all) makes them due now, attempts reset; entries in flight are left alone."""
    from mldash.spool.recovery import ingest_new

    waiting, busy = (enqueue_bytes(settings, os.urandom(100), filename=f"{n}.bin") for n in ("w", "b"))
    index = SpoolIndex(SpoolLayout(settings.spool))
    try:
        ingest_new(index, index.layout, set())
        index.update(waiting.id, attempts=7, next_attempt_at=time.time() + 300, last_error="503 SlowDown")
        index.transition(busy.id, State.UPLOADING)
    finally:
        index.close()
    retried = cli(settings, "retry", str(waiting.id), str(busy.id))
    assert retried.returncode == 0 and "re-queued 1 entries" in retried.stdout, retried
    assert f"not failed, quarantined or waiting to retry (left alone): {busy.id} (uploading)" in retried.stderr
    now = row(settings, waiting.id)
    assert (now["state"], now["attempts"], now["next_attempt_at"]) == ("queued", 0, 0), now
    shown = cli(settings, "show", str(waiting.id)).stdout
    assert "re-queued by retry (was waiting to retry: 503 SlowDown)" in shown, shown
    again = cli(settings, "retry", "--all")  # due already: nothing to do
    assert again.returncode == 0 and "re-queued 0 entries" in again.stdout


def test_run_once_will_not_vouch_for_a_daemon_that_sends_elsewhere(settings: Settings, tmp_path,
                                                                    daemon_process) -> None:
    """The job saved with the default (local) store and autostarted a daemon with it; the job script's closing
    `run --once`, configured for another store, used to follow that daemon and exit 0 with nothing where it
    looks. It now refuses (exit 2, naming both), `status` flags it, and once that daemon is gone `status --check`
    still flags what it committed elsewhere, and the drain that takes over says so and exits 1, not 0."""
    saved = enqueue_bytes(settings, os.urandom(1000), filename="ckpt.pt")
    holder = daemon_process(settings, "run")
    wait_for(lambda: "started on" in holder.log())
    wait_for(lambda: row(settings, saved.id) is not None and row(settings, saved.id)["state"] in ("committed",
                                                                                              "evicted"))
    same = cli(settings, "run", "--once", "--quiet")  # the holder had committed everything: say so, not "0 files"
    assert same.returncode == 0 and "nothing left to sync: the daemon holding the spool had committed everything" \
        in same.stderr, same.stderr
    epilogue = settings.replace(store=(tmp_path / "the-store-the-script-means").as_uri())
    once = cli(epilogue, "run", "--once", "--quiet")
    assert once.returncode == 2, once.stderr
    assert f"but it sends to store {settings.store} (configured here: {epilogue.store})" in once.stderr, once.stderr
    assert f"kill {holder.proc.pid}" in once.stderr and holder.proc.poll() is None
    check = cli(epilogue, "status", "--check")
    assert check.returncode == 1 and f"the running daemon (pid {holder.proc.pid}) sends to store" in check.stdout
    assert cli(settings, "status", "--check").returncode == 0  # the daemon's own configuration: all well

    assert holder.terminate() == 0
    elsewhere = (f"1 files (1000 B) were committed to store {settings.store} (configured here: {epilogue.store}), "
                 "the last 0:0")
    gone = cli(epilogue, "status", "--check")  # no daemon any more: what it committed elsewhere is still a problem
    assert gone.returncode == 1 and elsewhere in gone.stdout, gone.stdout
    assert "not reported yet to a `run --once` configured like this: they are there, not where this " \
        "configuration sends" in gone.stdout, gone.stdout
    assert cli(settings, "status", "--check").returncode == 0  # for its own configuration: all well
    # The misconfigured daemon starts again (the next job's autostart, a service restart) and commits nothing:
    # what its earlier run committed elsewhere is not forgotten.
    assert cli(settings, "run", "--once", "--quiet").returncode == 0
    again = cli(epilogue, "status", "--check")
    assert again.returncode == 1 and elsewhere in again.stdout, again.stdout
    # A daemon configured like the script (the service restarting, the next job's autostart) that merely runs
    # says so in its log and clears nothing: nobody has seen the alarm yet.
    service = daemon_process(epilogue, "run")
    wait_for(lambda: "1 files were committed to store" in service.log())
    assert service.terminate() == 0
    still = cli(epilogue, "status", "--check")
    assert still.returncode == 1 and elsewhere in still.stdout, still.stdout

    later = enqueue_bytes(settings, os.urandom(1000), filename="late.pt")
    taken_over = cli(epilogue, "run", "--once", "--quiet")
    assert taken_over.returncode == 1, taken_over.stderr  # everything is committed, but not all of it here
    assert elsewhere in taken_over.stderr and "they are there, not where this run sends" in taken_over.stderr, \
        taken_over.stderr
    listed = cli(epilogue, "ls", "--elsewhere")  # which files: the one the other daemon committed, not `later`
    assert str(saved.id) in listed.stdout and str(later.id) not in listed.stdout, listed.stdout
    assert row(epilogue, later.id)["state"] in ("committed", "evicted")
    shown = cli(epilogue, "show", str(saved.id)).stdout  # where that one went: not the store configured here
    assert f"stored at   {settings.store}/files/" in shown, shown
    assert (f"sent to     store {settings.store}; catalog " in shown and "not where this configuration sends: "
            f"store {settings.store} (configured here: {epilogue.store})" in shown), shown
    assert f"stored at   {epilogue.store}/files/" in cli(epilogue, "show", str(later.id)).stdout
    # Reported to this configuration's `run --once`: the earlier daemon's commits are history now.
    again = cli(epilogue, "run", "--once", "--quiet")
    assert again.returncode == 0 and "were committed to" not in again.stderr, again.stderr
    assert cli(epilogue, "status", "--check").returncode == 0


def test_files_committed_elsewhere_are_still_reported_after_the_offline_guides_reindex(settings: Settings,
                                                                                        tmp_path) -> None:
    """An offline node's daemon committed to its default local store; the spool is copied to a host configured
    for another store, which reindexes it (docs/operations.md). The rebuilt index used to forget the evicted
    entries and where they went: `run --once` exited 0 with nothing where the host sends."""
    node = settings
    saved = enqueue_bytes(node, os.urandom(1000), filename="ckpt.pt")
    assert cli(node, "run", "--once", "--quiet").returncode == 0  # committed to the node's store, evicted
    copy = tmp_path / "copied-spool"
    shutil.copytree(node.spool, copy)
    host = node.replace(spool=copy, store=(tmp_path / "host-store").as_uri())
    reindexed = cli(host, "reindex")
    assert reindexed.returncode == 0 and "; the history of 1 evicted entries kept" in reindexed.stdout, reindexed
    assert row(host, saved.id)["state"] == "evicted" and row(host, saved.id)["committed_to"]
    listed = json.loads(cli(host, "ls", "--elsewhere", "--json").stdout)
    assert [r["id"] for r in listed] == [str(saved.id)] and listed[0]["committed_to"]["store"] == node.store
    check = cli(host, "status", "--check")
    assert check.returncode == 1 and f"1 files (1000 B) were committed to store {node.store}" in check.stdout
    once = cli(host, "run", "--once", "--quiet")
    assert once.returncode == 1 and f"were committed to store {node.store}" in once.stderr, once.stderr
    assert cli(host, "run", "--once", "--quiet").returncode == 0  # reported once

    # An index that is not a database any more (often why one reindexes): rebuilt from the manifests all the same.
    (copy / "index.sqlite").write_bytes(os.urandom(8192))
    later = enqueue_bytes(host, b"more", filename="later.pt")
    rebuilt = cli(host, "reindex")
    assert rebuilt.returncode == 0 and "cannot be read" in rebuilt.stderr, rebuilt.stderr
    assert row(host, later.id)["state"] == "queued"


def test_run_once_refuses_a_daemon_that_sends_elsewhere_even_when_it_starts_slowly(settings: Settings,
                                                                                    tmp_path) -> None:
    """A holder writes its targets with its first heartbeat, after recovery and the store's opening: one slower
    than the follower's first look (5 s) used to be followed, and vouched for (exit 0). The follow now asks at
    every poll."""
    from mldash_syncd.cli import HEARTBEAT_WAIT

    enqueue_bytes(settings, os.urandom(1000), filename="ckpt.pt")
    slow_start = ("import sys, time, runpy\n"
                  "import mldash_syncd.service as service\n"
                  "recover = service.recover\n"
                  f"service.recover = lambda *a, **k: (time.sleep({HEARTBEAT_WAIT + 3}), recover(*a, **k))[1]\n"
                  "sys.argv = ['mldash-syncd', 'run']\n"
                  "runpy.run_module('mldash_syncd', run_name='__main__')\n")
    holder = subprocess.Popen([sys.executable, "-c", slow_start], env=settings_env(settings),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: holder_pid(SpoolLayout(settings.spool)) == holder.pid)
        epilogue = settings.replace(store=(tmp_path / "the-store-the-script-means").as_uri())
        once = cli(epilogue, "run", "--once", "--quiet")
        assert once.returncode == 2, once.stderr
        assert f"but it sends to store {settings.store} (configured here: {epilogue.store})" in once.stderr
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_run_once_follows_the_daemon_holding_the_spool_until_drained(
        settings: Settings, mongo_server_process, daemon_process) -> None:
    """The end of a training job: the daemon its saves autostarted still holds the spool; `run --once` must
    wait for the spool to drain and say how it ended, not exit at once."""
    live, server, entries, holder = _uploaded_with_the_catalog_down(settings, mongo_server_process, daemon_process)
    once = _run_once(live)
    time.sleep(2.0)
    assert once.poll() is None, "run --once returned while entries were still waiting for the catalog"

    server.start()
    _, stderr = once.communicate(timeout=60)

    assert once.returncode == 0, stderr
    assert "following it" in stderr and "the other daemon committed 2 files; in spool: " in stderr
    assert sorted(int(d["id"]) for d in catalog_docs(live)) == sorted(e.id for e in entries)
    assert holder.proc.poll() is None, "the followed daemon keeps running"


def test_run_once_takes_over_when_the_followed_daemon_exits(
        settings: Settings, mongo_server_process, daemon_process) -> None:
    live, server, entries, holder = _uploaded_with_the_catalog_down(settings, mongo_server_process, daemon_process)
    once = _run_once(live, "--quiet")
    time.sleep(1.0)
    assert holder.terminate() == 0
    server.start()
    _, stderr = once.communicate(timeout=60)

    assert once.returncode == 0, stderr
    assert "draining the rest here" in stderr and "committed 2 files (" in stderr
    assert sorted(int(d["id"]) for d in catalog_docs(live)) == sorted(e.id for e in entries)


def test_run_once_following_gives_up_at_max_wait(settings: Settings, mongo_server_process, daemon_process) -> None:
    live, _server, _entries, holder = _uploaded_with_the_catalog_down(settings, mongo_server_process,
                                                                      daemon_process)
    once = _run_once(live, "--quiet", "--max-wait", "1.5")
    _, stderr = once.communicate(timeout=60)

    assert once.returncode == 1, stderr  # pending at --max-wait
    assert "in spool: 2 uploaded" in stderr
    assert holder.proc.poll() is None


def test_run_once_at_max_wait_counts_saves_the_followed_daemon_has_not_indexed(
        settings: Settings, daemon_process) -> None:
    """The daemon holding the spool has not indexed the job's last saves when --max-wait ends the follow (it
    is frozen here; slow or wedged is the same): they are not synced, so exit 1 — exit 0 is the signal that the
    spool may be deleted."""
    holder = daemon_process(settings, "run")
    wait_for(lambda: "started on" in holder.log())
    holder.proc.send_signal(signal.SIGSTOP)
    try:
        saved = [enqueue_bytes(settings, os.urandom(100), filename=f"late{i}.bin") for i in range(3)]
        once = _run_once(settings, "--quiet", "--max-wait", "1.5")
        _, stderr = once.communicate(timeout=60)
    finally:
        holder.proc.send_signal(signal.SIGCONT)
    assert once.returncode == 1, stderr
    assert "in spool: 3 not indexed" in stderr, stderr
    assert len(saved) == 3


def test_ctrl_c_while_following_exits_130_without_a_traceback(
        settings: Settings, mongo_server_process, daemon_process) -> None:
    live, _server, _entries, holder = _uploaded_with_the_catalog_down(settings, mongo_server_process,
                                                                      daemon_process)
    once = _run_once(live)
    stderr_lines = []
    for line in once.stderr:  # the follow has begun once it says so
        stderr_lines.append(line)
        if "following it" in line:
            break
    once.send_signal(signal.SIGINT)
    _, rest = once.communicate(timeout=60)

    assert once.returncode == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest, rest
    assert holder.proc.poll() is None, "the followed daemon is not affected"


@pytest.mark.parametrize("command", ["run", "status", "ls", "show", "retry", "discard", "reindex", "gc"])
def test_every_subcommand_has_help(command: str) -> None:
    result = subprocess.run([sys.executable, "-m", "mldash_syncd", command, "--help"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and "usage: mldash-syncd" in result.stdout and len(result.stdout) > 150


def test_spool_option_before_or_after_the_command_and_version(settings: Settings, tmp_path) -> None:
    """README: every command takes --spool DIR — after the command too; one after it wins over one before."""
    enqueue_bytes(settings, b"x", filename="x.bin")
    other = settings.replace(spool=str(tmp_path / "elsewhere"))
    for args in (("status", "--spool", settings.spool), ("--spool", settings.spool, "status"),
                 ("--spool", str(tmp_path / "nowhere"), "status", "--spool", settings.spool)):
        shown = cli(other, *args)
        assert shown.returncode == 0 and f"spool    {settings.spool}" in shown.stdout, (args, shown)
    version = cli(settings, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"mldash-syncd {__import__('mldash').__version__}"


def test_a_catalog_uri_pymongo_would_refuse_or_ignore_stops_every_command(settings: Settings) -> None:
    """`authMechanism=BOGUS` used to pass `status` and only fail (or, for an unknown option, only warn) once the
    daemon ran: every command now refuses it as a configuration error (exit 2, systemd stops restarting), naming
    the option and where it came from, never the password. A training client is not slowed by the check."""
    enqueue_bytes(settings, b"x", filename="x.bin")
    env = settings_env(settings)
    for option, named in (("authMechanism=BOGUS", "authmechanism must be in"),
                          ("retryWrite=true", "unknown option 'retryWrite'; did you mean 'retrywrites'?")):
        env["MLDASH_CATALOG"] = f"mongodb://alice:sekret@127.0.0.1:1/?{option}"
        for command in (("status",), ("run", "--once", "--quiet")):
            result = subprocess.run([sys.executable, "-m", "mldash_syncd", *command], env=env, capture_output=True,
                                    text=True, timeout=60)
            assert result.returncode == 2, (command, result.stderr)
            assert "catalog (environment variable MLDASH_CATALOG)" in result.stderr and named in result.stderr
            assert "sekret" not in result.stderr + result.stdout
    code = ("import sys; from mldash.config import Settings; s = Settings.load(); "
            "print(s.catalog.startswith('mongodb://'), 'pymongo' in sys.modules)")
    client = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert client.stdout.split() == ["True", "False"], client.stderr


def test_run_once_refuses_a_directory_that_is_not_a_spool(settings: Settings, tmp_path) -> None:
    """A typo in --spool (or a copy that failed) used to become an empty spool reported as synced (exit 0), and
    the offline guide frees the node's spool after exit 0."""
    missing = settings.replace(spool=tmp_path / "spool-node042")
    result = cli(missing, "run", "--once", "--quiet")
    assert result.returncode == 2 and f"no spool at {tmp_path / 'spool-node042'}: nothing to drain" in result.stderr
    assert not (tmp_path / "spool-node042").exists()

    inbox = tmp_path / "inbox"  # the parent of the copied spool: an easy mistake
    (inbox / "node042").mkdir(parents=True)
    result = cli(settings.replace(spool=inbox), "run", "--once", "--quiet")
    assert result.returncode == 2 and "no spool at" in result.stderr
    assert os.listdir(inbox) == ["node042"]


@pytest.mark.parametrize("command", [("status",), ("status", "--check"), ("ls",), ("retry", "--all"), ("reindex",),
                                     ("gc",), ("gc", "--dry-run"), ("run", "--once")], ids=" ".join)
def test_every_command_refuses_a_spool_of_another_layout(settings: Settings, drain, command: tuple[str, ...]) -> None:
    """A spool written by a newer mldash (another layout marker): every command refuses it and leaves it as it
    is — reindex would drop its index and clean up "debris" it does not understand, status would misreport it."""
    enqueue_bytes(settings, b"synced", filename="a.bin")
    drain(settings)
    enqueue_bytes(settings, b"pending", filename="b.bin")
    layout = SpoolLayout(settings.spool)
    (layout.root / "SPOOL").write_text("mldash-spool 2\n")
    before = spool_files(layout)

    refused = cli(settings, *command)
    assert refused.returncode == 2, refused
    assert "holds a spool of layout 'mldash-spool 2'; this mldash reads 'mldash-spool 1'" in refused.stderr, refused
    assert spool_files(layout) == before


def test_run_max_wait_is_checked(settings: Settings) -> None:
    enqueue_bytes(settings, b"x")
    result = cli(settings, "run", "--max-wait", "2")
    assert result.returncode == 2 and "--max-wait goes with --once" in result.stderr
    result = cli(settings, "run", "--once", "--max-wait", "-5")
    assert result.returncode == 2 and "--max-wait '-5' is not a duration; use seconds or a number with s, m, h " \
        "or d (e.g. 900, 30m, 2h, 1d)" in result.stderr, result.stderr
    assert cli(settings, "run", "--once", "--quiet", "--max-wait", "1m").returncode == 0  # as --max-pending-age


def test_a_read_only_spool_is_a_usage_error_not_a_traceback(settings: Settings, small_fs) -> None:
    """Commands that write the spool say so and exit 2 (systemd does not restart on 2); status and ls work."""
    spool = settings.replace(spool=small_fs / "spool")
    enqueue_bytes(spool, b"x")
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        for args in (("run", "--once", "--quiet"), ("reindex",), ("gc",), ("retry", "--all")):
            result = cli(spool, *args)
            assert result.returncode == 2, (args, result.stderr)
            assert "Traceback" not in result.stderr and "Read-only file system" in result.stderr, (args, result.stderr)
            assert "status and ls work read-only" in result.stderr
        status = cli(spool, "status")
        assert status.returncode == 0 and "not indexed" in status.stdout, status.stderr
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)


def test_a_spool_path_that_cannot_be_a_directory_is_a_usage_error(settings: Settings, tmp_path) -> None:
    """`run` (the service) creates its spool: a path through a file, or under /proc, is a configuration error —
    exit 2, which stops systemd's restarts — naming the path and what is wrong with it, not a traceback."""
    (tmp_path / "afile").write_text("x")
    for spool, says in ((tmp_path / "afile" / "spool", f"'{tmp_path / 'afile'}' is a file, not a directory"),
                        (Path("/proc/mldash-nope/spool"), "mkdir '/proc/mldash-nope': No such file or directory")):
        result = cli(settings.replace(spool=str(spool)), "run")
        assert result.returncode == 2, result
        assert f"spool '{spool}' cannot be created: {says}; set the spool setting (MLDASH_SPOOL)" in result.stderr
        assert "Traceback" not in result.stderr


def test_output_piped_into_head_ends_quietly(settings: Settings) -> None:
    """`mldash-syncd ls | head` printed a BrokenPipeError traceback once head had exited."""
    for i in range(2000):  # more than a pipe buffer (64 KiB) of `ls` lines
        enqueue_bytes(settings, b"x", filename=f"f{i:04d}.bin")
    assert cli(settings, "reindex").returncode == 0
    result = subprocess.run(f"{sys.executable} -m mldash_syncd ls | head -1", shell=True,
                            env=settings_env(settings), capture_output=True, text=True, timeout=60)
    assert result.stdout.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
