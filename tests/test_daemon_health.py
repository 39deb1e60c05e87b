"""`mldash-syncd status --check`: the problems that need someone's attention, one line, exit 1 — for a cron job,
a job script's epilogue or a monitoring agent. Each kind of problem is shown on `status_data` output; the CLI
is run for real on spools in each condition."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from mldash.config import Settings
from mldash.errors import MldashError
from mldash.spool import SpoolLayout
from mldash.spool.lock import DaemonLock
from mldash.spool.states import State
from mldash_syncd.health import parse_duration, problems
from tests.fixtures.daemon import enqueue_bytes
from tests.spool_helpers import overwrite_spooled
from tests.test_daemon_process import cli, row, wait_for

NOW = 1_800_000_000.0
HEALTHY: dict = {
    "states": {s.value: {"count": 0, "bytes": 0} for s in State},
    "daemon": {"running": True, "pid": 41, "heartbeat": NOW - 1, "heartbeatPid": 41, "storeProblem": None,
               "catalogProblem": None},
    "pendingFiles": 2, "pendingBytes": 3 * 2**20, "oldestPendingAgeSeconds": 7200.0,
    "disk": {"spoolBytes": 3 * 2**20, "quotaBytes": None, "quotaUsedBytes": None, "filesystemFreeBytes": 50 * 2**30},
}


def with_(**changes) -> dict:
    data = copy.deepcopy(HEALTHY)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = data
        for key in parents:
            target = target[key]
        target[leaf] = value
    return data


def test_a_healthy_spool_has_no_problems() -> None:
    assert problems(HEALTHY, now=NOW) == []
    # A backlog is normal (an offline node, a slow link): its age is a problem only past a limit asked for.
    assert problems(HEALTHY, now=NOW, max_pending_age=3 * 3600) == []
    same = {"store": "s3://ckpts at AWS", "catalog": "mongodb://db/ (database mldash)"}
    assert problems(with_(targets=same, daemon__targets=dict(same)), now=NOW) == []


@pytest.mark.parametrize(("changes", "says"), [
    ({"states__failed__count": 2, "states__quarantined__count": 1},
     "2 failed and 1 quarantined entries: see `mldash-syncd ls --state failed --state quarantined`"),
    ({"daemon__running": False}, "2 files (3.0 MiB) pending and no daemon running: `mldash-syncd run --once`"),
    ({"daemon__heartbeat": NOW - 300}, "the daemon (pid 41) wrote no heartbeat for 5:00: its loop is stuck"),
    ({"daemon__storeProblem": "http://s3.lab:9000: connection refused"},
     "store unreachable: http://s3.lab:9000: connection refused"),
    ({"daemon__catalogProblem": "mongodb://db:27017: no server"}, "catalog unreachable: mongodb://db:27017"),
    ({"disk__quotaBytes": 10 * 2**30, "disk__quotaUsedBytes": 9 * 2**30 + 1},
     "spool quota 9.0 GiB of 10.0 GiB in use"),
    ({"disk__filesystemFreeBytes": 500 * 2**20}, "only 500.0 MiB free on the spool's filesystem"),
    ({"targets": {"store": "s3://ckpts at http://s3.lab:9000", "catalog": "mongodb://db/"},
      "daemon__targets": {"store": "file:///home/a/store", "catalog": "mongodb://db/"}},
     "the running daemon (pid 41) sends to store file:///home/a/store (configured here: s3://ckpts at "
     "http://s3.lab:9000): it was started with another configuration"),
    ({"daemon__heartbeatPid": 7, "daemon__role": "daemon", "daemon__lockTouchedSecondsAgo": 695.0},
     "the daemon (pid 41) took the spool 11:35 ago and has written no heartbeat yet: it is stuck while starting"),
    ({"daemon__running": False, "pendingFiles": 0,
      "deliveredElsewhere": [{"files": 3, "bytes": 3 * 2**20, "lastCommitted": NOW - 600,
                              "where": "store file:///home/a/store (configured here: s3://ckpts at AWS)"}]},
     "3 files (3.0 MiB) were committed to store file:///home/a/store (configured here: s3://ckpts at AWS), the "
     "last 10:00 ago, not reported yet to a `run --once` configured like this: they are there, not where this "
     "configuration sends (`mldash-syncd ls --elsewhere` lists them). `mldash-syncd run --once` reports them "
     "(exit 1) and clears this"),
], ids=["failed", "no-daemon", "stuck", "store", "catalog", "quota", "disk", "elsewhere", "stuck-starting",
        "delivered-elsewhere"])
def test_each_problem_is_named_with_what_to_do(changes: dict, says: str) -> None:
    found = problems(with_(**changes), now=NOW)
    assert len(found) == 1 and says in found[0], found


def test_pending_too_long_only_past_the_limit_asked_for() -> None:
    found = problems(HEALTHY, now=NOW, max_pending_age=3600)
    assert found == ["2 files (3.0 MiB) pending, the oldest for 2:00:00 (more than 1:00:00)"]


def test_an_earlier_daemons_heartbeat_does_not_make_a_starting_one_stuck() -> None:
    # The lock's holder (pid 41) has not written its first heartbeat: the one there is its predecessor's.
    assert problems(with_(daemon__heartbeat=NOW - 3600, daemon__heartbeatPid=7), now=NOW) == []
    # ... for the first ten minutes after it took the spool (a large spool's recovery, a store's clean-up; then it
    # is stuck while starting: see above).
    assert problems(with_(daemon__heartbeat=NOW - 3600, daemon__heartbeatPid=7, daemon__role="daemon",
                          daemon__lockTouchedSecondsAgo=590.0), now=NOW) == []
    # `gc` and `reindex` take the lock without writing heartbeats (nor touching it): no daemon is stuck.
    assert problems(with_(daemon__running=False, daemon__heartbeatPid=7, daemon__role="reindex",
                          daemon__lockTouchedSecondsAgo=9e4, pendingFiles=0), now=NOW) == []


def test_status_names_what_holds_the_spool_and_a_daemon_stuck_while_starting(settings: Settings) -> None:
    enqueue_bytes(settings, b"x" * 100, filename="a.bin")
    layout = SpoolLayout(settings.spool)
    with DaemonLock(layout, role="reindex"):
        shown = cli(settings, "status")
        assert f"daemon   not running: `mldash-syncd reindex` (pid {os.getpid()}) holds the spool" in shown.stdout
        check = cli(settings, "status", "--check")  # pending, and no daemon: the usual problem, nothing stuck
        assert check.returncode == 1 and "pending and no daemon running: `mldash-syncd run --once` syncs them " \
            "(`mldash-syncd reindex` holds the spool for now)" in check.stdout, check.stdout
        busy = cli(settings, "gc")
        assert busy.returncode == 3 and f"another mldash-syncd (pid {os.getpid()}) (`mldash-syncd reindex`) holds" \
            in busy.stderr, busy.stderr
        assert "stuck" not in check.stdout
    # A daemon that took the lock (touching it) twelve minutes ago and never got to its first heartbeat.
    with DaemonLock(layout) as held:
        held.touch()
        long_ago = time.time() - 720
        os.utime(layout.lock_path, (long_ago, long_ago))
        check = cli(settings, "status", "--check")
        assert check.returncode == 1 and (f"the daemon (pid {os.getpid()}) took the spool 12:0" in check.stdout
                                          and "has written no heartbeat yet" in check.stdout), check.stdout
        held.touch()  # it is alive after all (a heartbeat touches the lock too): not stuck
        assert "stuck" not in cli(settings, "status", "--check").stdout


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200),
                                               ("1.5d", 129600), (" 5M ", 300)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "2 weeks", "1h30m"])
def test_a_bad_duration_names_the_value_and_the_forms_accepted(text: str) -> None:
    with pytest.raises(MldashError, match=f"{text!r} is not a duration; use seconds or a number with s, m, h or d"):
        parse_duration(text)


# -- the CLI ---------------------------------------------------------------------------------------------------

def test_status_check_exit_codes_and_lines(settings: Settings, daemon_process) -> None:
    # Saved, no daemon: a problem — nothing will send it.
    entry = enqueue_bytes(settings, b"c" * (2 * 2**20), filename="ckpt.bin")
    waiting = cli(settings, "status", "--check")
    assert waiting.returncode == 1, waiting
    assert waiting.stdout == ("mldash PROBLEM: 1 files (2.0 MiB) pending and no daemon running: `mldash-syncd run "
                              "--once` syncs them\n")

    # A daemon sending it (slowly: 2 MiB at 64 KiB/s take 32 s): the backlog is fine — unless it waits longer
    # than the limit given.
    daemon = daemon_process(settings.replace(max_upload_rate="64KiB/s", stop_grace=0), "run")
    wait_for(lambda: cli(settings, "status", "--check").returncode == 0)
    time.sleep(1.1)
    too_old = cli(settings, "status", "--check", "--max-pending-age", "1s")
    assert too_old.returncode == 1, too_old
    assert too_old.stdout.startswith("mldash PROBLEM: 1 files (2.0 MiB) pending, the oldest for 0:0"), too_old
    assert "(more than 0:01)" in too_old.stdout
    assert daemon.terminate() == 0

    # Drained: OK. Then a corrupted entry quarantined: a problem, also in --json and in plain `status`.
    assert cli(settings, "run", "--once", "--quiet").returncode == 0
    healthy = cli(settings, "status", "--check")
    assert healthy.returncode == 0 and healthy.stdout == "mldash OK: 0 files pending (0 B), daemon not running\n"
    bad = enqueue_bytes(settings, b"bad-bytes", filename="bad.bin")
    overwrite_spooled(SpoolLayout(settings.spool), bad.id, b"BAD-BYTES")
    assert cli(settings, "run", "--once", "--quiet").returncode == 1
    checked = cli(settings, "status", "--check")
    assert checked.returncode == 1 and checked.stdout.startswith("mldash PROBLEM: 0 failed and 1 quarantined"), checked
    as_json = cli(settings, "status", "--check", "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["problems"][0].startswith("0 failed and 1 quar")
    plain = cli(settings, "status")  # without --check: the same problems listed, exit 0 (it is a report)
    assert plain.returncode == 0 and "\nproblems:\n  0 failed and 1 quarantined entries" in plain.stdout
    assert entry.id != bad.id

    refused = cli(settings, "status", "--check", "--max-pending-age", "soon")
    assert refused.returncode == 2 and "'soon' is not a duration" in refused.stderr, refused


@pytest.mark.parametrize(("seconds", "shown"), [(5, "0:05"), (245, "4:05"), (7200, "2:00:00"),
                                                (3 * 86400 + 5, "3d 0:00:05"), (90061, "1d 1:01:01")])
def test_durations_are_shown_with_days_past_a_day(seconds: float, shown: str) -> None:
    from mldash_syncd.progress import human_duration

    assert human_duration(seconds) == shown


def test_a_local_store_that_stops_answering_is_reported_then_drained(settings: Settings, daemon_process) -> None:
    """A store directory on a hung network mount: its file calls block in the kernel. The worker used to wait
    for ever while the daemon renewed its lease and wrote fresh heartbeats — `status --check` said OK. Here the
    store's commit lock, held by the test, blocks the daemon's put the same way (a real blocking flock)."""
    store_root = Path(urlparse(settings.store).path)
    hung = settings.replace(request_timeout=1.0, retry_base_delay=0.05, retry_max_delay=0.5)
    daemon = daemon_process(hung, "run")
    wait_for(lambda: "started on" in daemon.log() and (store_root / ".tmp").is_dir())
    holder = os.open(store_root / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        entry = enqueue_bytes(settings, b"w" * 5000, filename="ckpt.pt")
        check = wait_for(lambda: (c := cli(settings, "status", "--check")).returncode == 1 and c, timeout=30)
        assert check.stdout.startswith("mldash PROBLEM: store unreachable: "), check.stdout
        assert f"put 'files/ns/proj/exp/ckpt/{entry.id}/ckpt.pt' in {store_root}: no answer from the filesystem in " \
               "1.0s (its deadline; a hung network mount" in check.stdout, check.stdout
    finally:
        os.close(holder)  # the mount comes back
    wait_for(lambda: row(settings, entry.id) and row(settings, entry.id)["state"] in ("committed", "evicted"),
             timeout=60)
    stored = store_root / row(settings, entry.id)["store_key"]
    assert stored.read_bytes() == b"w" * 5000
    wait_for(lambda: cli(settings, "status", "--check").returncode == 0, timeout=30)
    assert daemon.terminate() == 0


def test_a_store_that_accepts_connections_and_never_answers_is_reported_before_its_deadline(
        s3_settings: Settings, blackhole_server, daemon_process) -> None:
    """A firewall that drops, a wedged proxy: every call waits for its whole deadline (60 s here) before it
    fails, and `status --check` read OK all that time. Past 10 s without an answer it is a problem now."""
    silent = s3_settings.replace(s3_endpoint_url=blackhole_server.url)
    enqueue_bytes(silent, b"w" * 5000, filename="ckpt.pt")
    daemon = daemon_process(silent, "run")
    wait_for(lambda: "started on" in daemon.log(), timeout=60)
    check = wait_for(lambda: (c := cli(silent, "status", "--check")).returncode == 1 and c, timeout=40)
    assert check.stdout.startswith(f"mldash PROBLEM: store unreachable: {silent.store}: no answer to "), check.stdout
    assert "no answer to " in check.stdout and "(waiting up to its deadline)" in check.stdout, check.stdout
    daemon.kill()
