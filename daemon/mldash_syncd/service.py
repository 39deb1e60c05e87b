"""The daemon: watch the spool, lease entries, upload, verify, commit, evict — until told to stop.

Embeddable: `Daemon(settings).run()` installs no signal handlers (the CLI does), takes its store,
catalog, clock and RNG as arguments, and `run(until_drained=True)` returns once nothing is left to do
(the `run --once` mode, and what tests use). Only one daemon drains a spool (an flock).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mldash import ids
from mldash.catalog import make_catalog
from mldash.catalog.base import Catalog, CatalogError, FileDocument, TransientCatalogError
from mldash.config import Settings
from mldash.errors import SpoolCorruptError
from mldash.spool.index import SpoolIndex, entry_path, manifest_fields
from mldash.spool.layout import SpoolLayout
from mldash.spool.lock import DaemonLock
from mldash.spool.manifest import Manifest
from mldash.spool.recovery import ingest_new, manifest_ids, read_manifest, recover
from mldash.spool.resave import finish_resaves, publish_resaved, remove_old_files
from mldash.spool.states import OUTSTANDING, State
from mldash.store import make_store
from mldash.store.base import Store
from mldash.targets import delivered_elsewhere, fingerprint, sync_targets
from mldash_syncd.budget import ByteBudget
from mldash_syncd.collector import CollectorPause
from mldash_syncd.commit import clash, document_for
from mldash_syncd.evict import compact, evict, evictable, record_evicted, remove_files
from mldash_syncd.follow import NOT_INDEXED, remaining_counts
from mldash_syncd.logs import redact
from mldash_syncd.manifests import ManifestCache
from mldash_syncd.progress import human_bytes
from mldash_syncd.reload import ReloadOutcome, log_outcome, reload_settings
from mldash_syncd.retry import OUTAGE_PROBE_MAX, Backoff, Failure, Gate, IdClashError, classify
from mldash_syncd.sdnotify import Notifier
from mldash_syncd.throughput import RateWindow
from mldash_syncd.upload import Uploader

log = logging.getLogger("mldash_syncd")

RESCAN_INTERVAL = 2.0      # fallback when inotify events are missed or unavailable
INDEX_TROUBLE_PAUSE = 0.5  # seconds between loop passes while the index cannot be written (disk full)
HEARTBEAT_INTERVAL = 2.0
# Uploaded entries go to the catalog in batches: one request (SQLite: one transaction) per batch instead
# of two round trips per file. A batch takes whatever is uploaded and due when it starts, up to this size.
COMMIT_BATCH = 256
# Two batches may be in flight: entries uploaded while one waits on a slow (or unreachable) catalog get their
# own attempt instead of queueing behind it.
MAX_COMMIT_BATCHES = 2
# While uploads run, more uploaded entries follow within milliseconds: a batch waits for this many of them
# or until this long after the previous batch started, whichever comes first (so the catalog sees fewer,
# larger requests). With nothing uploading it starts at once: an idle daemon commits a save immediately.
COMMIT_BATCH_MIN = 32
COMMIT_LINGER = 0.05
INGEST_CHUNK = 256         # new manifests read and indexed per loop pass (see _ingest)
EVICT_INTERVAL = 0.25      # seconds between eviction passes while commits happen: short, so the pass at the end of a
                           # drain (run --once waits for it) has little left; 1.0 left ~25 ms per 1,000 small files
SIDE_TASKS_GRACE = 5.0      # seconds a stopping run gives best-effort clean-ups (_remove_stale)
COMPACT_INTERVAL = 600.0   # seconds between compactions of old evicted index rows


@dataclass
class RunReport:
    committed: int = 0
    failed: int = 0
    quarantined: int = 0
    bytes_sent: int = 0
    # Non-zero counts per state at the end, and NOT_INDEXED: saves no daemon had indexed yet (pending as well).
    remaining: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """True when nothing is left failed or quarantined (the `run --once` exit status)."""
        return not (self.remaining.get("failed") or self.remaining.get("quarantined"))

    @property
    def pending(self) -> int:
        """Entries still to be synced: in an outstanding state, or saved and not indexed yet."""
        return sum(self.remaining.get(s.value, 0) for s in OUTSTANDING) + self.remaining.get(NOT_INDEXED, 0)


def _first_error(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from TaskGroup."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = inner[0] if inner else exc.exceptions[0]
    return exc


class Daemon:
    def __init__(self, settings: Settings, *, store: Store | None = None, catalog: Catalog | None = None,
                 autostarted: bool = False, rng: random.Random | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.settings = settings
        self.layout = SpoolLayout(settings.spool)
        self.store = store or make_store(settings)
        self.catalog = catalog or make_catalog(settings)
        self.autostarted = autostarted
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.rng = rng or random.Random()
        backoff = Backoff(settings.retry_base_delay, settings.retry_max_delay, self.rng)
        self.backoff = backoff
        probe_cap = min(OUTAGE_PROBE_MAX, settings.retry_max_delay)
        self.store_gate = Gate("store", Backoff(settings.retry_base_delay, probe_cap, self.rng))
        self.catalog_gate = Gate("catalog", Backoff(settings.retry_base_delay, probe_cap, self.rng))
        self.on_event = on_event or (lambda kind, data: None)
        self.report = RunReport()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._stop_now = asyncio.Event()  # a second stop request: in-flight work gets no more grace
        self._uploads: dict[int, asyncio.Task] = {}
        # Multipart files share the parts budget: more of them at once than parts in flight would only open
        # uploads that wait for a buffer, and delay every file's commit (each would get a sliver of the parts).
        self._multipart_slots = asyncio.Semaphore(settings.max_concurrent_parts)
        self._commits: dict[int, asyncio.Task] = {}  # entry id → the commit batch it is in
        self._commit_batches: set[asyncio.Task] = set()
        self._stopped_tasks: set[asyncio.Task] = set()  # upload/commit tasks _drain_tasks cancelled
        self._manifests = ManifestCache()  # read by the ingest or upload stage, reused by the next stages
        self._eviction: asyncio.Task | None = None
        self._uploaded_unbatched = 0  # uploads this process recorded since the last commit batch was claimed
        self._last_batch_at = 0.0     # time.monotonic() when it was
        self._startup_gc: asyncio.Task | None = None
        self._catalog_open: asyncio.Task | None = None  # catalog.open(), running alongside the first uploads
        self._side_tasks: set[asyncio.Task] = set()  # best-effort clean-ups (_remove_stale), settled at the end
        self._started = time.time()
        self._targets = sync_targets(settings)  # in the heartbeat (targets.py); a reload does not change them
        self._rate_window = RateWindow()   # bytes of finished parts and files
        self._paced_window = RateWindow()  # bytes the cap let through, sampled at each heartbeat (see throughput)
        self._paced_seen = 0
        self.index: SpoolIndex | None = None
        self._daemon_lock: DaemonLock | None = None
        self._scan_requested = True
        self._backlog: list[int] = []  # new manifests not indexed yet, newest first (see _ingest)
        self._evict_requested = False
        self._last_evict = 0.0  # time.monotonic() of the last eviction pass started
        self._index_trouble = False  # a loop step's index write failed in this pass (see _index_guard)
        self._index_trouble_logged = -1e9
        self.notifier = Notifier()  # systemd readiness/watchdog; a no-op outside systemd
        self._ready_announced = False  # READY=1 sent (a reload then announces itself: RELOADING=1, READY=1)
        self._collector = CollectorPause()  # from start until the first uploads are in flight

    # ---- control ------------------------------------------------------------------------------
    def request_stop(self, reason: str | None = None) -> None:
        """Graceful stop: no new work; in-flight uploads get `stop_grace` seconds to finish, then they are
        interrupted (their completed parts stay recorded for the resume). A second request stops at once.
        `reason`: the daemon stops itself (logged as an error) rather than on a signal."""
        if self._stop.is_set():
            if not self._stop_now.is_set():
                log.warning("second stop request: interrupting in-flight work now (the next start resumes it)")
            self._stop_now.set()
            return
        if reason:
            log.error("stopping: %s; in-flight uploads get up to %gs", reason, self.settings.stop_grace)
        else:
            log.info("stop requested: no new work; in-flight uploads get up to %gs (a second signal stops at once)",
                     self.settings.stop_grace)
        self._stop.set()
        self._wake.set()
        self.notifier.stopping()

    def reload(self, load: Callable[[], Settings]) -> ReloadOutcome | None:
        """Read the configuration again (`load`: as at start) and take up what can change while running
        (reload.py); the outcome, or None when the configuration no longer loads — the daemon then runs on
        unchanged. The CLI calls this on SIGHUP."""
        # Before READY=1 a reload's own READY=1 would end systemd's start-up wait early: no notification then.
        announce = self._ready_announced
        if announce:
            self.notifier.reloading()
        try:
            try:
                reloaded = load()
            except Exception as exc:  # a reload must never stop the daemon, whatever went wrong in it
                log.error("configuration not reloaded: %s; running on as before", redact(str(exc)))
                return None
            outcome = reload_settings(self.settings, reloaded, self.store)
            self.settings = outcome.settings
            log_outcome(outcome)
            self._write_heartbeat()  # `status` shows the cap in effect
            return outcome
        finally:
            if announce:
                self.notifier.ready()

    def _emit(self, kind: str, **data: Any) -> None:
        with contextlib.suppress(Exception):  # a broken progress hook must never stop the daemon
            self.on_event(kind, data)

    # ---- main loop ----------------------------------------------------------------------------
    async def run(self, *, until_drained: bool = False, max_wait: float | None = None) -> RunReport:
        self._collector.begin()
        try:
            return await self._run(until_drained, max_wait)
        finally:
            self._collector.end()

    async def _run(self, until_drained: bool, max_wait: float | None) -> RunReport:
        # Counted from here, not from the loop: opening the store and catalog is part of the wait.
        deadline = None if max_wait is None else time.monotonic() + max_wait
        self.layout.ensure()
        with DaemonLock(self.layout) as self._daemon_lock:
            self._daemon_lock.touch()  # a daemon is here from now on, not only from its first heartbeat
            self.index = SpoolIndex(self.layout, power_safe=self.settings.power_safe)
            try:
                recovered = recover(self.index, self.layout, self.owner, ingest=False)
                if resumed := finish_resaves(self.index, self.layout, fsync=self.settings.power_safe):
                    log.info("finished %d re-saves a crash interrupted", resumed)
                self._backlog = self._list_backlog(self.index.known_ids())
                log.info("started on %s (pid %d): %d new, %d leases released, %d debris removed, %d quarantined",
                         self.layout.root, os.getpid(), len(self._backlog), recovered.released_leases,
                         len(recovered.removed_tmp) + len(recovered.removed_orphan_blobs), len(recovered.quarantined))
                for apart in delivered_elsewhere(self.index, self._targets):  # said, not acknowledged (targets.py)
                    log.warning("%d files were committed to %s by a daemon configured apart: they are there, not "
                                "where this daemon sends (`mldash-syncd status --check`)", apart.files, apart.where)
                async with self.store:
                    # The catalog opens alongside the first uploads, which do not need it: MongoDB's index
                    # creation is a round trip, and up to its OPEN_TIMEOUT when MongoDB is down. Commits wait
                    # for it (_catalog_ready); an error that opening cannot get past stops the daemon.
                    self._catalog_open = asyncio.create_task(self.catalog.open(), name="catalog-open")
                    self._catalog_open.add_done_callback(lambda _: self._wake.set())
                    ended = False  # the loop returned (not an error, not a cancellation of run())
                    try:
                        self.uploader = Uploader(self.settings, self.store, self.index, self.layout.blobs_dir,
                                                 ByteBudget(self.settings.max_concurrent_parts
                                                            * self.settings.part_size),
                                                 on_bytes=self._count_bytes,
                                                 committed_elsewhere=self._committed_elsewhere)
                        # The start-up gc runs alongside the first uploads (its listing is a round trip): only
                        # multipart uploads wait for it (see _upload_one), so it never judges one of this run's.
                        self._startup_gc = asyncio.create_task(self._collect_orphans(), name="startup-gc")
                        self.notifier.ready(f"draining {self.layout.root}")
                        self._ready_announced = True
                        watchdog = asyncio.create_task(self.notifier.run_watchdog(), name="watchdog")
                        try:
                            await self._loop(until_drained, deadline)
                            ended = True
                        finally:
                            watchdog.cancel()
                            await self._finish_startup_gc(deadline)
                            await self._settle_side_tasks()
                    finally:
                        await self._close_catalog(deadline, ended=ended)
                    if not self._catalog_open.cancelled() and (error := self._catalog_open.exception()) is not None:
                        raise error
            finally:
                self._write_heartbeat(stopping=True)
                self.report.remaining = remaining_counts(self.index, self.layout)
                self.index.close()
        if self._stop.is_set():  # the last line of a stopped service says it is gone, and what it leaves
            log.info("stopped: %d committed since start; %d pending in the spool", self.report.committed,
                     self.report.pending)
        return self.report

    async def _loop(self, until_drained: bool, deadline: float | None) -> None:
        watcher = asyncio.create_task(self._watch(), name="watch")
        known = self.index.known_ids()
        last_scan = last_beat = last_compact = 0.0
        idle_since = time.monotonic()
        try:
            while not self._stop.is_set():
                self._wake.clear()
                now_mono = time.monotonic()
                if now_mono - last_scan >= RESCAN_INTERVAL or self._scan_requested:
                    self._scan_requested = False
                    last_scan = now_mono
                    with self._index_guard("ingest"):
                        self._ingest(known)
                with self._index_guard("claim uploads"):
                    self._start_uploads()
                self._collector.end()  # start-up is over: the first uploads are in flight
                with self._index_guard("claim commits"):
                    self._start_commits()
                # Eviction soon after commits (bytes leave the spool promptly), but batched: at most
                # once every EVICT_INTERVAL, since each pass reads every committed row.
                if (now_mono - self._last_evict >= (EVICT_INTERVAL if self._evict_requested else 5.0)
                        and not self._eviction):
                    self._evict_requested = False
                    self._last_evict = now_mono
                    self._start_eviction()
                if now_mono - last_compact >= COMPACT_INTERVAL:
                    last_compact = now_mono
                    with self._index_guard("compact"):
                        # Their manifests left with the eviction: the ids need not be remembered any more either
                        # (a daemon that runs for months would otherwise keep every id it ever saw).
                        known.difference_update(compact(self.index))
                if now_mono - last_beat >= HEARTBEAT_INTERVAL:
                    last_beat = now_mono
                    with self._index_guard("lease renewal"):
                        self._renew_leases()
                        # After the renewal only leases no task of ours holds can have expired: entries whose
                        # task ended without recording its outcome (see _failed) go back to the queue.
                        self._release_expired()
                        self._cap_waits()
                    self._write_heartbeat()
                busy = bool(self._uploads or self._commits) or self._has_work()
                if busy:
                    idle_since = now_mono
                if until_drained and not busy:
                    break
                if deadline is not None and now_mono > deadline:
                    why = [f"{gate.name} unreachable: {gate.last_error}" for gate in (self.store_gate,
                                                                                      self.catalog_gate)
                           if gate.last_error]
                    log.warning("run --once: max wait reached with work left%s", f" ({'; '.join(why)})" if why else "")
                    break
                if self.autostarted and self.settings.idle_exit and now_mono - idle_since > self.settings.idle_exit:
                    log.info("idle for %.0fs: exiting (autostarted)", self.settings.idle_exit)
                    break
                # After an index write failed, do not spin on it: eviction (unlink, then record) frees the space.
                pause = max(self._next_timeout(), INDEX_TROUBLE_PAUSE if self._index_trouble else 0.0)
                if deadline is not None:  # wake at the max wait, not up to a rescan interval after it
                    pause = min(pause, max(0.01, deadline - now_mono))
                await self._sleep(pause)
                self._index_trouble = False
        finally:
            watcher.cancel()
            await self._drain_tasks()
            if self._eviction is not None:  # its unlinks run in a thread, which cannot be cancelled: let it end
                await asyncio.wait([self._eviction])
            with contextlib.suppress(Exception):  # leave the spool tidy: evict what the last commits freed
                self._evict()

    @contextlib.contextmanager
    def _index_guard(self, step: str) -> Iterator[None]:
        """A step of the main loop whose index write fails — its disk is full, typically — is skipped, not
        fatal: each step is one transaction that did not happen, and the loop tries it again after a pause
        (eviction, which unlinks before it records, goes on freeing space meanwhile)."""
        try:
            yield
        except sqlite3.Error as exc:
            self._index_trouble = True
            now = time.monotonic()
            if now - self._index_trouble_logged >= 30.0:
                self._index_trouble_logged = now
                log.warning("index: %s failed (%s); retrying", step, exc)

    def _has_work(self) -> bool:
        return bool(self._backlog) or self.index.has_active()

    def _list_backlog(self, known: set[int]) -> list[int]:
        """Manifests not in the index yet, newest first (the end of the list is the next to ingest)."""
        return sorted(manifest_ids(self.layout) - known, reverse=True)

    def _ingest(self, known: set[int]) -> None:
        """Index the next chunk of new manifests (oldest first). With more left, the loop comes straight back
        after this pass has claimed uploads from the chunk: a spool of 100,000 entries synced after an outage
        starts uploading after reading 256 manifests, not all of them."""
        if not self._backlog:
            self._backlog = self._list_backlog(known)
        chunk = self._backlog[-INGEST_CHUNK:][::-1]
        for file_id in ingest_new(self.index, self.layout, known, self._manifests.offer, candidates=chunk):
            manifest = self._manifests.get(file_id)
            if manifest is None:  # not kept by the cache (a large backlog): the index row has the size too
                row = self.index.get(file_id)
                size = (row["size"] or 0) if row else 0
            else:
                size = manifest.size
            self._emit("queued", id=file_id, size=size)
        if chunk:  # dropped only once indexed: after a failed index write they are tried again
            del self._backlog[-len(chunk):]
        if self._backlog:
            self._scan_requested = True
            self._wake.set()

    def _next_timeout(self) -> float:
        timeout = RESCAN_INTERVAL
        # Only entries we could start now may shorten the sleep: with every upload slot busy, a due queued
        # entry waits for a slot (a finishing task wakes the loop), and polling for it would spin.
        startable = []
        if len(self._uploads) < self.settings.max_concurrent_files:
            startable.append(State.QUEUED)
        # Uploaded entries wait for the catalog's opening (its end wakes the loop), not for a poll.
        catalog_open = self._catalog_open is not None and self._catalog_open.done()
        if len(self._commit_batches) < MAX_COMMIT_BATCHES and catalog_open:
            wait = self._commit_wait(time.monotonic())
            if wait <= 0:
                startable.append(State.UPLOADED)
            elif self._uploaded_unbatched:
                timeout = min(timeout, wait)
        if self._evict_requested and self._eviction is None:
            # Committed bytes leave the spool EVICT_INTERVAL after their commit, not at the next rescan (2 s): a
            # save waiting for quota room is waiting for exactly this.
            timeout = min(timeout, max(0.0, self._last_evict + EVICT_INTERVAL - time.monotonic()))
        due = self.index.next_due(startable)
        if due is not None:
            timeout = min(timeout, max(0.0, due - time.time()))
        for gate in (self.store_gate, self.catalog_gate):
            if gate.is_open:
                timeout = max(timeout, min(RESCAN_INTERVAL, gate.open_until - time.monotonic()))
        return max(0.01, timeout)

    async def _sleep(self, timeout: float) -> None:
        if self._wake.is_set():  # a pass asked for the next one at once: still let this pass's new tasks start
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _watch(self) -> None:
        """Wake the loop on new manifests (inotify through watchfiles); the rescan covers misses."""
        try:
            import watchfiles

            # No stop_event: awatch sets the one it is given when it is cancelled, and ours would turn the end
            # of every run (max wait included) into a stop request whose grace waits for in-flight work.
            # Cancelling the task (see _loop) ends it.
            async for changes in watchfiles.awatch(self.layout.manifests_dir, debounce=20, step=10,
                                                   recursive=False):
                if any(path == str(self.layout.wake_path) for _change, path in changes):
                    # `retry`: someone fixed the cause; an outage's backoff must not keep the entries waiting.
                    self.store_gate.probe_now()
                    self.catalog_gate.probe_now()
                self._scan_requested = True
                self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no inotify (some network filesystems): rely on the periodic rescan
            log.warning("file watching unavailable (%s); rescanning every %.0fs", exc, RESCAN_INTERVAL)

    async def _drain_tasks(self) -> None:
        tasks = [*self._uploads.values(), *self._commits.values()]
        if not tasks:
            return
        # Let tasks created in this pass take their first step: a task cancelled before it ever ran skips its
        # own handlers, the refund of the attempt its claim counted among them.
        await asyncio.sleep(0)
        if self._stop.is_set() and not self._stop_now.is_set() and self.settings.stop_grace > 0:
            ends = time.monotonic() + self.settings.stop_grace
            await self._grace(tasks, self.settings.stop_grace)
            await self._commit_in_grace(ends)
        pending = [task for task in {*tasks, *self._commits.values()} if not task.done()]
        if pending and self._stop.is_set():
            log.warning("stopping: %d uploads or commits interrupted; the next start resumes them", len(pending))
        for task in pending:
            self._stopped_tasks.add(task)
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        # Interrupted entries go back to the queue now (their recorded parts stay for the resume).
        self.index.release_all_leases(self.owner)

    async def _commit_in_grace(self, ends: float) -> None:
        """Commit what finished uploading during the stop's grace period, in what is left of it: a commit is one
        round trip, while an entry left in `uploaded` waits for the next start — on an offline node, days."""
        while not self._stop_now.is_set() and (left := ends - time.monotonic()) > 0:
            with self._index_guard("claim commits"):
                self._start_commits()
            batches = list(self._commit_batches)
            if not batches:
                return
            await self._grace(batches, left)

    async def _grace(self, tasks: list[asyncio.Task], seconds: float) -> None:
        """Wait until `tasks` are done, `seconds` have passed, or a second stop request came."""
        everything = asyncio.ensure_future(asyncio.wait(tasks))  # cancelling it leaves `tasks` alone
        stop_now = asyncio.ensure_future(self._stop_now.wait())
        try:
            await asyncio.wait((everything, stop_now), timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            everything.cancel()
            stop_now.cancel()
            await asyncio.gather(everything, stop_now, return_exceptions=True)

    # ---- scheduling ---------------------------------------------------------------------------
    def _start_uploads(self) -> None:
        free = self.settings.max_concurrent_files - len(self._uploads)
        if free <= 0 or self.store_gate.is_open:
            return
        for row in self.index.claim(self.owner, self.settings.lease_seconds, free, states=(State.QUEUED,)):
            task = asyncio.create_task(self._upload_worker(row), name=f"upload-{row['id']}")
            self._uploads[row["id"]] = task
            task.add_done_callback(self._upload_worker_ended)

    def _upload_worker_ended(self, task: asyncio.Task) -> None:
        held = [i for i, t in self._uploads.items() if t is task]
        for file_id in held:
            del self._uploads[file_id]
        self._task_crashed(task, held)
        self._wake.set()

    def _task_crashed(self, task: asyncio.Task, held: list[int]) -> None:
        """A worker or commit task that ended with an exception: a bug (outcomes are recorded inside the task).
        Said at once, with its traceback — asyncio would only print "exception was never retrieved" when the task
        is collected, minutes later — and its entries' leases are released, not left to expire."""
        if task.cancelled() or (error := task.exception()) is None:
            return
        log.error("%s ended by an error: %s: %s; its entries %s go back to the queue", task.get_name(),
                  type(error).__name__, error, held or "(none)", exc_info=error)
        self._release_now(held)

    def _release_now(self, ids: list[int]) -> None:
        """Expire the leases of `ids` now: the next heartbeat's `_release_expired` hands them out again."""
        with contextlib.suppress(sqlite3.Error):
            for file_id in ids:
                self.index.update(file_id, lease_expires=0.0)

    def _claim_next_upload(self) -> dict[str, Any] | None:
        """The next queued entry for a worker whose upload just ended, if it may start one now."""
        if self._stop.is_set() or self.store_gate.is_open:
            return None
        if len(self._uploads) > self.settings.max_concurrent_files:  # the loop filled every slot meanwhile
            return None
        rows = self.index.claim(self.owner, self.settings.lease_seconds, 1, states=(State.QUEUED,))
        return rows[0] if rows else None

    def _commit_wait(self, now_mono: float) -> float:
        """Seconds until the next commit batch may start (see COMMIT_BATCH_MIN and COMMIT_LINGER)."""
        if not self._uploads or self._uploaded_unbatched >= COMMIT_BATCH_MIN:
            return 0.0
        return max(0.0, self._last_batch_at + COMMIT_LINGER - now_mono)

    def _catalog_ready(self) -> bool:
        """Whether the catalog is open (see _run). If opening it failed, the daemon stops: `run` raises that error
        once in-flight uploads are done — the entries they uploaded wait in `uploaded` for the next start."""
        task = self._catalog_open
        if task is None or not task.done():
            return False
        if task.cancelled() or task.exception() is not None:
            if not self._stop.is_set():
                why = "cancelled" if task.cancelled() else task.exception()
                self.request_stop(f"the catalog cannot be opened: {why}")
            return False
        return True

    async def _close_catalog(self, deadline: float | None, *, ended: bool) -> None:
        """Close the catalog, first settling an opening still pending (see _run). `ended`: the loop returned; only
        then, and unless stopped, the opening may finish within the max wait — a run with nothing to commit still
        reports a catalog it cannot use. An error in the loop, or the caller cancelling run(), cancels it."""
        task = self._catalog_open
        if task is not None and not task.done() and ended and not self._stop.is_set():
            # A stop request (SIGTERM) during this wait ends it too: the loop no longer watches for one.
            stopped = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED,
                                   timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            finally:
                stopped.cancel()
                await asyncio.gather(stopped, return_exceptions=True)
            if not task.done() and not self._stop.is_set():
                log.warning("the catalog %s did not open within the max wait", self.catalog.url)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        if task is not None and not task.cancelled() and (error := task.exception()) is not None and not ended:
            # run raises the loop's own error; this one would otherwise reach no one (asyncio's "never retrieved")
            log.warning("the catalog %s could not be opened either: %s: %s", self.catalog.url,
                        type(error).__name__, error)
        await self.catalog.close()

    def _start_commits(self) -> None:
        if (len(self._commit_batches) >= MAX_COMMIT_BATCHES or self.catalog_gate.is_open
                or not self._catalog_ready()):
            return
        now_mono = time.monotonic()
        if self._commit_wait(now_mono) > 0:
            return
        rows = []
        for row in self.index.claim(self.owner, self.settings.lease_seconds, COMMIT_BATCH, states=(State.UPLOADED,)):
            if row["id"] in self._commits:
                # In a batch of ours in flight: after the wall clock stepped forward its lease looked expired.
                # The claim just renewed it; a second commit would race the first.
                self._refund_attempt(row)
                continue
            rows.append(row)
        if not rows:
            return
        self._uploaded_unbatched, self._last_batch_at = 0, now_mono
        task = asyncio.create_task(self._commit_batch(rows), name=f"commit-{rows[0]['id']}+{len(rows) - 1}")
        ids = [row["id"] for row in rows]
        for file_id in ids:
            self._commits[file_id] = task
        self._commit_batches.add(task)

        def finished(_task: asyncio.Task) -> None:
            self._commit_batches.discard(task)
            for file_id in ids:
                if self._commits.get(file_id) is task:
                    del self._commits[file_id]
            self._task_crashed(task, ids)
            self._wake.set()

        task.add_done_callback(finished)

    def _renew_leases(self) -> None:
        for file_id in [*self._uploads, *self._commits]:
            self.index.renew_lease(file_id, self.owner, self.settings.lease_seconds)

    # ---- one entry ----------------------------------------------------------------------------
    async def _upload_worker(self, row: dict[str, Any] | None) -> None:
        """Upload claimed entries one after another: each outcome is recorded in the same index transaction that
        claims the next queued entry, so an upload slot is refilled without a round through the loop."""
        me = asyncio.current_task()
        while row is not None:
            following = await self._upload_one(row)
            self._uploads.pop(row["id"], None)
            if following is not None and me is not None:
                self._uploads[following["id"]] = me
            row = following

    async def _upload_one(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """Upload one entry and record the outcome; returns the next entry claimed with a success, if any."""
        file_id = row["id"]
        try:
            manifest = self._manifests.get(file_id) or read_manifest(self.layout, file_id)
            multipart = not manifest.inline and manifest.size >= self.settings.multipart_threshold
            if multipart and self._startup_gc is not None:
                await asyncio.shield(self._startup_gc)  # no multipart upload of ours while it lists them
            await self.store_gate.wait()
            async with self._multipart_slots if multipart else contextlib.nullcontext():
                self._emit("uploading", id=file_id, size=manifest.size)
                verified = await self.uploader.upload(manifest)
        except asyncio.CancelledError:
            self._refund_attempt(row)  # a stop request is not the entry's failure
            raise
        except BaseException as exc:
            if self._being_stopped():
                self._refund_attempt(row)
                raise asyncio.CancelledError from exc
            error = _first_error(exc)
            try:
                if self._gives_up(row, error):
                    # Before the entry is marked failed: a failed entry has nothing of ours left in flight.
                    await self._abandon_upload(row)
            finally:
                self._failed(row, error, stage="upload")
            return None
        if self.store_gate.success():
            self._outage_over("store", State.QUEUED)
        # A deferred-checksum manifest has no sha256: the one computed from this read is recorded in the index,
        # where the commit stage (maybe in a later daemon process) finds it.
        computed = {"sha256": verified.sha256_hex} if manifest.sha256 is None else {}
        if row.get("filename") is None:  # quarantined at ingest with an unreadable manifest, since restored
            computed = {**manifest_fields(manifest), "sha256": verified.sha256_hex}
        try:
            with self.index.transaction():
                # attempts count per stage: the commit stage starts afresh
                sent = self.uploader.take_unrecorded_bytes(file_id)
                self.index.transition(file_id, State.UPLOADED, store_key=verified.key,
                                      store_checksum=verified.checksum, uploaded_at=time.time(), next_attempt_at=0,
                                      attempts=0, last_error=None, error_kind=None, drop_parts=True,
                                      add={"bytes_sent": sent} if sent else None, **computed)
                following = self._claim_next_upload()
        except sqlite3.Error as exc:  # e.g. the index's disk is full: verified again once the lease expires
            log.error("upload %s: done, but the index cannot record it (%s)", file_id, exc)
            return None
        self._manifests.put(manifest)
        # DEBUG: the commit's line says it all a moment later (one INFO line per file, not two).
        log.debug("uploaded %s (%s, %d bytes) → %s", file_id, manifest.filename, manifest.size, verified.key)
        self._emit("uploaded", id=file_id, size=manifest.size)
        self._uploaded_unbatched += 1
        # The loop starts a batch when one is due (or, for the first entry waiting, sets its timer for it); a
        # batch in flight wakes the loop when it ends, and the next one takes this entry.
        if len(self._commit_batches) < MAX_COMMIT_BATCHES and (
                self._uploaded_unbatched == 1 or self._commit_wait(time.monotonic()) <= 0):
            self._wake.set()
        return following

    async def _commit_batch(self, rows: list[dict[str, Any]]) -> None:
        """Commit claimed `uploaded` entries with one catalog request. The catalog reports the ids it already
        held; only those are read back, to tell a replay (our own earlier commit) from an id clash."""
        committed_at = time.time()
        docs: dict[int, FileDocument] = {}
        for row in rows:
            try:
                doc = self._document(row, committed_at)
            except Exception as exc:  # a manifest that cannot be read: this entry only
                self._failed(row, exc, stage="commit")
                continue
            if doc is not None:
                docs[row["id"]] = doc
        rows = [row for row in rows if row["id"] in docs]
        if not rows:
            return
        try:
            await self.catalog_gate.wait()
            present = await self.catalog.upsert_many(list(docs.values()))
            clashes = await self._clashes(present, docs)
        except asyncio.CancelledError:
            for row in rows:
                self._refund_attempt(row)
            raise
        except BaseException as exc:
            if self._being_stopped():
                for row in rows:
                    self._refund_attempt(row)
                raise asyncio.CancelledError from exc
            await self._commit_batch_failed(rows, _first_error(exc))
            return
        if self.catalog_gate.success():
            self._outage_over("catalog", State.UPLOADED)
        for row in rows:
            if row["id"] in clashes:
                self._failed(row, IdClashError(clashes[row["id"]]), stage="commit")
        done = [row for row in rows if row["id"] not in clashes]
        try:
            self.index.transition_many([row["id"] for row in done], State.COMMITTED, committed_at=time.time(),
                                       last_error=None, error_kind=None, committed_to=fingerprint(self._targets))
        except sqlite3.Error as exc:  # e.g. the index's disk is full: the upserts are replayed once the leases expire
            log.error("commit of %d entries: done, but the index cannot record it (%s)", len(done), exc)
            return
        self.report.committed += len(done)
        if done and self.settings.keep_committed == 0 and self.settings.evict_after == 0:
            self._evict_requested = True  # (never reset here: a later batch that committed nothing must not cancel it)
        for row in done:
            self._manifests.discard(row["id"])
            log.info("committed %s %s (%s)", row["id"], entry_path(row), human_bytes(row["size"] or 0))
            self._emit("committed", id=row["id"], size=row["size"] or 0)

    def _document(self, row: dict[str, Any], committed_at: float) -> FileDocument | None:
        """The catalog document of an uploaded entry; None (and the entry queued again) when the checksum the
        upload computed in deferred mode was not recorded: its bytes must be read again."""
        file_id = row["id"]
        manifest = self._manifests.get(file_id) or read_manifest(self.layout, file_id)
        checksum = manifest.sha256 or row["sha256"]
        if checksum is None:
            self.index.transition(file_id, State.QUEUED, attempts=0, next_attempt_at=0)
            return None
        return document_for(manifest, store_url=self.settings.store, store_key=row["store_key"],
                            committed_at=committed_at, checksum=checksum)

    async def _committed_elsewhere(self, manifest: Manifest, key: str) -> str | None:
        """For the uploader, before it removes an object with other bytes found at an entry's key: why the catalog's
        document under the entry's id is another file's, or None. Waits for the catalog's opening (it runs
        alongside the first uploads); a catalog that cannot be asked fails the attempt, to be retried — never a
        guess."""
        if self._catalog_open is None:
            raise TransientCatalogError("the catalog is not open yet")
        await asyncio.shield(self._catalog_open)  # its error, if opening failed
        stored = await self.catalog.get(str(manifest.id))
        ours = document_for(manifest, store_url=self.settings.store, store_key=key, committed_at=0.0)
        return None if stored is None else clash(ours, stored)

    async def _clashes(self, present: set[str], docs: dict[int, FileDocument]) -> dict[int, str]:
        """Entries whose id the catalog already held for another file → why they were not recorded."""
        if not present:
            return {}
        stored = await self.catalog.get_many(sorted(present))
        return {file_id: reason for file_id, doc in docs.items()
                if doc.id in present and (reason := clash(doc, stored.get(doc.id))) is not None}

    async def _commit_batch_failed(self, rows: list[dict[str, Any]], exc: BaseException) -> None:
        if classify(exc) is Failure.OUTAGE:
            # One outage, one step of the catalog gate's backoff — not one per entry in the batch.
            delay = self.catalog_gate.failure(f"commit: {type(exc).__name__}: {exc}"[:2000])
            log.warning("commit of %d %s: catalog unavailable, retry in %.1fs: %s", len(rows),
                        "entry" if len(rows) == 1 else "entries", delay, exc)
            for row in rows:
                self._failed(row, exc, stage="commit", outage_delay=delay)
            return
        if len(rows) == 1:
            self._failed(rows[0], exc, stage="commit")
            return
        # Maybe one document is what the catalog refuses: commit each alone, so it cannot fail the others.
        log.warning("commit of %d entries failed (%s: %s); committing them one by one", len(rows),
                    type(exc).__name__, exc)
        for i, row in enumerate(rows):
            try:
                await self._commit_batch([row])
            except asyncio.CancelledError:
                for rest in rows[i + 1:]:
                    self._refund_attempt(rest)
                raise

    def _being_stopped(self) -> bool:
        """Whether the current task is one the stop cancelled. A library can turn that cancellation into another
        error — PyMongo on CPython < 3.12 raises "RuntimeError: Lock is not acquired" when a cancellation meets
        its `asyncio.wait_for` around a Condition — and that error is the stop's, not the entry's. (Not
        `Task.cancelling()`: after a part's timeout inside the aiohttp/aiobotocore stack it was seen to stay
        above 0 — a timeout that cancels the task and leaves by another exception is never uncancelled — and a
        timed-out part then looked like a stop: tests/reliability/test_blackhole.py hung on that.)"""
        return asyncio.current_task() in self._stopped_tasks

    def _refund_attempt(self, row: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self.index.update(row["id"], attempts=max(0, row["attempts"] - 1))

    def _release_expired(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # the index's disk may be full: try again next heartbeat
            if released := self.index.release_expired_leases():
                log.warning("%d entries whose lease expired went back to the queue", released)

    def _cap_waits(self) -> None:
        """No backoff is longer than retry_max_delay: after a step back of the wall clock, waiting entries
        would otherwise wait out the step too (an hour, a day)."""
        with contextlib.suppress(sqlite3.Error):
            if shortened := self.index.cap_waits(time.time() + self.settings.retry_max_delay):
                log.warning("the clock stepped back: %d waiting entries rescheduled", shortened)

    def _failed(self, row: dict[str, Any], exc: BaseException, *, stage: str,
                outage_delay: float | None = None) -> None:
        """Route a failure to its state and make it visible. If even that cannot be written (the index's
        disk is full), the entry keeps its lease, which expires without renewal: `_release_expired` then
        queues it again."""
        try:
            with self.index.transaction():
                moved = self._record_resave(row, exc, stage) if isinstance(exc, IdClashError) else None
                if moved is None:
                    self._route_failure(row, exc, stage=stage, outage_delay=outage_delay)
                if sent := self.uploader.take_unrecorded_bytes(row["id"]):
                    self.index.add_bytes_sent(row["id"], sent)
            if moved is not None:  # recorded: now the new entry's files, and the old one's removed
                self._publish_resave(*moved, stale_key=row.get("store_key") if stage == "commit" else None,
                                     stale_checksum=row.get("store_checksum"))
        except sqlite3.Error as record_error:
            log.error("%s %s failed (%s) and the index cannot record it (%s); retried once its lease expires",
                      stage, row["id"], exc, record_error)
        except Exception:  # a bug of ours: it must not end the worker in silence, the entry leased for minutes
            log.exception("%s %s failed (%s: %s) and recording the failure failed too; it goes back to the queue",
                          stage, row["id"], type(exc).__name__, exc)
            self._release_now([row["id"]])

    # ---- an id another file holds (resave.py) ---------------------------------------------------------
    def _record_resave(self, row: dict[str, Any], exc: IdClashError, stage: str) -> tuple[Manifest, int] | None:
        """In the failure's transaction: the entry becomes `resaved` under a new id (the move recorded before its
        files exist: see resave.py). None when its manifest cannot be read — then it is quarantined as before."""
        file_id = row["id"]
        try:
            manifest = self._manifests.get(file_id) or read_manifest(self.layout, file_id)
        except SpoolCorruptError:
            return None
        new_id = ids.new_id()
        reason = f"{stage}: {exc}"[:2000]
        self.index.transition(file_id, State.RESAVED, resaved_as=new_id, last_error=reason, error_kind="clash")
        self.index.add_event(file_id, "warning", f"re-saved as {new_id}: its id belongs to another file ({reason})")
        self._manifests.discard(file_id)
        log.warning("%s %s: its id belongs to another file (%s); re-saved as %s", stage, file_id, exc, new_id)
        return manifest, new_id

    def _publish_resave(self, manifest: Manifest, new_id: int, *, stale_key: str | None,
                        stale_checksum: str | None) -> None:
        try:
            publish_resaved(self.layout, manifest, new_id, fsync=self.settings.power_safe)
            remove_old_files(self.layout, manifest.id)
        except OSError as exc:  # finished at the next start (finish_resaves)
            log.error("re-saving %s as %s: %s; finished at the next start", manifest.id, new_id, exc)
            return
        self._scan_requested = True
        self._wake.set()
        if stale_key is not None:  # our object under the old id: nobody's once we leave it (see _remove_stale)
            task = asyncio.create_task(self._remove_stale(manifest.id, stale_key, stale_checksum),
                                       name=f"remove-stale-{manifest.id}")
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _settle_side_tasks(self) -> None:
        """Give best-effort clean-ups a moment to end with the run (each call has its own deadline), then cancel."""
        if self._side_tasks:
            await asyncio.wait(list(self._side_tasks), timeout=SIDE_TASKS_GRACE)
        for task in list(self._side_tasks):
            task.cancel()
        if self._side_tasks:
            await asyncio.wait(list(self._side_tasks))

    async def _remove_stale(self, file_id: int, key: str, checksum: str | None) -> None:
        """Remove the object an entry uploaded under its old id — only if it is still the one we verified and the
        catalog does not name it as the other file's (that file may have the same names, hence the same key)."""
        try:
            stored = await self.store.head(key)
            owner = await self.catalog.get(str(file_id))
            if stored is None or checksum is None or stored.checksum_sha256 != checksum or (
                    owner is not None and owner.get("storageKey") == key):
                return
            await self.store.delete(key)
            log.info("removed %s: uploaded under %s before that id turned out to be another file's", key, file_id)
        except Exception as exc:  # best effort: an object left behind costs storage, not correctness
            log.warning("could not remove %s (uploaded under %s, now re-saved): %s", key, file_id, exc)

    def _route_failure(self, row: dict[str, Any], exc: BaseException, *, stage: str,
                       outage_delay: float | None = None) -> None:
        """See retry.py for the policy. `outage_delay`: the gate already took its backoff step for this outage
        (a whole commit batch failed at once)."""
        file_id, attempts = row["id"], row["attempts"]
        kind = classify(exc)
        reason = f"{stage}: {type(exc).__name__}: {exc}"[:2000]
        retry_state = State.QUEUED if stage == "upload" else State.UPLOADED
        now = time.time()
        if kind is Failure.OUTAGE:
            # The catalog's outage when an upload asked it (whose object is at our key?) is the catalog's: closing
            # the store's gate for it would pause every upload and report the store unreachable.
            gate = self.store_gate if stage == "upload" and not isinstance(exc, CatalogError) else self.catalog_gate
            delay = gate.failure(reason) if outage_delay is None else outage_delay
            # An outage is not the entry's fault: give the attempt back.
            self.index.transition(file_id, retry_state, attempts=max(0, attempts - 1), next_attempt_at=now + delay,
                                  last_error=reason, error_kind=kind.value)
            # A whole commit batch that met the outage (outage_delay given) was logged once, as a batch.
            log.log(logging.DEBUG if outage_delay is not None else logging.WARNING,
                    "%s %s: %s unavailable, retry in %.1fs: %s", stage, file_id, gate.name, delay, exc)
            return
        if not self._gives_up(row, exc):  # an entry's own error with attempts left
            delay = self.backoff.delay(attempts)
            self.index.transition(file_id, retry_state, next_attempt_at=now + delay, last_error=reason,
                                  error_kind=kind.value)
            log.warning("%s %s: attempt %d failed, retry in %.1fs: %s", stage, file_id, attempts, delay, exc)
            return
        target = State.QUARANTINED if kind is Failure.CORRUPT else State.FAILED
        self.index.transition(file_id, target, last_error=reason, error_kind=kind.value)
        self.index.add_event(file_id, "error", reason)
        if target is State.QUARANTINED:
            self.report.quarantined += 1
        else:
            self.report.failed += 1
        log.error("%s %s → %s: %s", stage, file_id, target.value, reason)
        self._emit(target.value, id=file_id, reason=reason)

    def _outage_over(self, name: str, waiting: State) -> None:
        """The store or catalog answered after an outage: the entries that wait for it go now, not when their
        backoff, drawn while it was down, runs out."""
        with self._index_guard(f"end the {name} outage's waits"):
            released = self.index.end_outage_waits(waiting.value)
            log.info("%s reachable again%s", name, f": {released} entries waiting for it go now" if released else "")
        self._wake.set()

    def _gives_up(self, row: dict[str, Any], exc: BaseException) -> bool:
        """Whether `_route_failure` will end this entry in failed or quarantined (no retry follows)."""
        kind = classify(exc)
        retried = kind is Failure.OUTAGE or (kind is Failure.ENTRY and row["attempts"] < self.settings.max_attempts)
        return not retried

    async def _abandon_upload(self, row: dict[str, Any]) -> None:
        """Compensation: a multipart upload we give up on is aborted. If the abort fails, the upload id stays
        recorded and gc (or the next attempt after `retry`) aborts or reuses it."""
        current = self.index.get(row["id"]) or {}
        upload_id, key = current.get("upload_id"), current.get("store_key")
        if not (upload_id and key):
            return
        try:
            await self.store.abort_multipart(key, upload_id)
        except Exception as exc:
            log.warning("upload %s: could not abort multipart upload %s (gc will): %s", row["id"], upload_id, exc)
            return
        with contextlib.suppress(sqlite3.Error), self.index.transaction():
            self.index.update(row["id"], upload_id=None)
            self.index.clear_parts(row["id"])

    async def _finish_startup_gc(self, deadline: float | None) -> None:
        """A drain that needed no multipart upload still lets the start-up gc finish — but never past the max
        wait, and not once a stop is requested (a store that accepts connections and never answers would hold
        the exit for the gc's whole deadline). Cancelled, it is retried by the next start or `gc`."""
        gc = self._startup_gc
        if gc is None or gc.done():
            return
        if not self._stop.is_set():
            stop = asyncio.ensure_future(self._stop.wait())
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait((gc, stop), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                await asyncio.gather(stop, return_exceptions=True)
        if not gc.done():
            log.info("start-up gc interrupted (%s); the next start or `mldash-syncd gc` retries it",
                     "stop requested" if self._stop.is_set() else "max wait reached")
            gc.cancel()
        await asyncio.gather(gc, return_exceptions=True)

    async def _collect_orphans(self) -> None:
        """Start-up gc: abort multipart uploads of ours that no entry will finish (see gc.py)."""
        from mldash_syncd.gc import abort_orphan_uploads

        try:
            async with asyncio.timeout(self.settings.request_timeout * 3):
                aborted, _kept = await abort_orphan_uploads(self.store, self.index)
        except Exception as exc:  # the store may be down right now; the next start or `gc` retries
            log.warning("start-up gc skipped: %s", exc)
            return
        if aborted:
            log.info("start-up gc: aborted %d orphaned multipart uploads", len(aborted))

    # ---- bookkeeping --------------------------------------------------------------------------
    def _count_bytes(self, amount: int) -> None:
        self.report.bytes_sent += amount
        self._rate_window.add(amount)
        self._emit("bytes", amount=amount)

    def throughput(self) -> float:
        """Bytes per second over the last 30 s. Under a cap, what the pacer let through (it paces every 64 KiB of
        an S3 body): finished parts alone read 0 for as long as the first part takes — 4 s for 8 MiB at 2 MB/s."""
        limit = getattr(self.store, "rate_limit", None)
        if limit is None or not limit.limited:
            return self._rate_window.rate()
        # A sample at every call (each heartbeat), zeros included: the window then always holds the start of the
        # interval its bytes came in, and a rate is bytes over the time they took.
        granted = limit.granted
        self._paced_window.add(granted - self._paced_seen)
        self._paced_seen = granted
        return self._paced_window.rate()

    def _evict(self) -> None:
        evicted = evict(self.index, self.layout, keep=self.settings.keep_committed, after=self.settings.evict_after)
        if evicted:
            log.debug("evicted %d committed entries", len(evicted))

    def _start_eviction(self) -> None:
        """An eviction pass as a task: the unlinks (two per entry, the bulk of its cost) run in a worker thread
        while the loop goes on uploading; the index is written from the loop, its one user."""
        now = time.time()
        try:
            ids = evictable(self.index, keep=self.settings.keep_committed, after=self.settings.evict_after, now=now)
        except sqlite3.Error as exc:
            log.warning("eviction skipped: %s", exc)
            return
        if not ids:
            return

        async def run() -> None:
            try:
                await asyncio.to_thread(remove_files, self.layout, ids)
                record_evicted(self.index, ids, now=now)
            except (OSError, sqlite3.Error) as exc:  # the next pass tries again
                log.warning("eviction of %d entries incomplete: %s", len(ids), exc)
                return
            log.debug("evicted %d committed entries", len(ids))

        self._eviction = asyncio.create_task(run(), name="evict")
        self._eviction.add_done_callback(self._eviction_done)

    def _eviction_done(self, task: asyncio.Task) -> None:
        self._eviction = None
        self._task_crashed(task, [])  # an error other than the expected ones: said, not left unretrieved
        if self._evict_requested:  # commits landed meanwhile: their pass is due EVICT_INTERVAL after this one
            self._wake.set()

    def _write_heartbeat(self, stopping: bool = False) -> None:
        if self._daemon_lock is not None:  # tells a save waiting for spool space that a daemon is here
            self._daemon_lock.touch()
        if self.index is None:
            return
        try:
            counts = self.index.counts()
        except sqlite3.Error as exc:  # a busy or full index: the next heartbeat tries again; the loop goes on
            log.warning("heartbeat skipped: %s", exc)
            return
        pending = sum(counts[s.value]["count"] for s in OUTSTANDING)
        rate = self.throughput()
        self.notifier.status(f"{pending} pending, {self.report.committed} committed, {rate / 2**20:.1f} MiB/s")
        beat = {"owner": self.owner, "pid": os.getpid(), "startedAt": self._started, "heartbeat": time.time(),
                "stopping": stopping, "bytesSent": self.report.bytes_sent, "committed": self.report.committed,
                "throughput": rate, "storeGate": self.store_gate.last_error or self.store.unanswered(),
                "catalogGate": self.catalog_gate.last_error, "autostarted": self.autostarted,
                "uploadRateCap": self.settings.max_upload_rate, "targets": self._targets}
        with contextlib.suppress(Exception):
            self.index.set_meta("daemon", json.dumps(beat))


def drain(settings: Settings, *, max_wait: float | None = 120.0, **kwargs: Any) -> RunReport:
    """Run a daemon in this process until the spool is drained (tests, scripts, `run --once`)."""
    return asyncio.run(Daemon(settings, **kwargs).run(until_drained=True, max_wait=max_wait))
