"""Autostart: the first save starts a detached mldash-syncd for its spool unless MLDASH_AUTOSTART=0.

`test_autostarted_daemon_drains_and_exits_when_idle` needs the real daemon (`python -m mldash_syncd run
--autostarted`, which exits after `idle_exit` idle seconds); the others drive `mldash.autostart` directly.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mldash import Experiment, autostart
from mldash.config import Settings
from mldash.spool.layout import SpoolLayout
from mldash.spool.lock import DaemonLock, is_held
from tests.client_helpers import store_bytes


@pytest.fixture(autouse=True)
def fresh_autostart_state() -> Iterator[None]:
    autostart._reset_for_tests()
    yield
    for state in list(autostart._states.values()):  # never leave a child of ours running (or unreaped)
        if state.child is not None and state.child.poll() is None:
            state.child.kill()
        if state.child is not None:
            state.child.wait(timeout=30)
    autostart._reset_for_tests()


def test_settings_env_reproduces_the_settings_in_a_child(settings):
    custom = settings.replace(spool_quota=12_345_678, autostart=True, idle_exit=2.5, experiment="a/b/c")
    env = autostart.settings_env(custom)
    assert env["MLDASH_AUTOSTART"] == "1" and env["MLDASH_S3_ENDPOINT_URL"] == ""
    assert Settings.load(env=env) == custom


def test_autostarted_daemon_drains_and_exits_when_idle(settings):
    """Needs the lead's daemon: `mldash_syncd run --autostarted` honouring idle_exit."""
    live = settings.replace(autostart=True, idle_exit=1.0)
    exp = Experiment(prefix="alice/project/auto", settings=live)
    result = exp.files("a").save_blob(b"autostarted", "a.bin")
    state = autostart._states[Path(live.spool)]
    assert state.child is not None, "the first save did not start a daemon"
    statuses = exp.flush(timeout=60)
    assert statuses[result["id"]] in ("committed", "evicted")
    assert store_bytes(live, result) == b"autostarted"
    assert state.child.wait(timeout=60) == 0  # idle for idle_exit seconds: it exits by itself
    assert not is_held(SpoolLayout(live.spool))
    log = SpoolLayout(live.spool).daemon_log_path
    assert log.exists() and os.stat(log).st_mode & 0o777 == 0o600


def test_no_daemon_when_autostart_is_off(settings, monkeypatch):
    started = []
    monkeypatch.setattr(autostart, "spawn_daemon", lambda *a: started.append(a))
    exp = Experiment(prefix="alice/project/off", settings=settings)  # the fixture sets autostart=False
    exp.files.save_blob(b"x", "a.bin")
    assert started == [] and autostart._states == {}
    assert not SpoolLayout(settings.spool).lock_path.exists()


def test_no_second_daemon_while_one_holds_the_spool(settings, monkeypatch):
    started = []
    monkeypatch.setattr(autostart, "spawn_daemon", lambda *a: started.append(a))
    live = settings.replace(autostart=True)
    layout = SpoolLayout(live.spool).ensure()
    with DaemonLock(layout):
        exp = Experiment(prefix="alice/project/held", settings=live)
        exp.files.save_blob(b"x", "a.bin")
        exp.files.save_blob(b"y", "b.bin")
    assert started == []


def test_a_failing_start_never_fails_the_save(settings, monkeypatch, caplog):
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(subprocess, "Popen", broken)
    exp = Experiment(prefix="alice/project/broken", settings=settings.replace(autostart=True))
    with caplog.at_level(logging.WARNING, logger="mldash"):
        result = exp.files.save_blob(b"x", "a.bin")
    assert result["status"] == "queued"
    assert "could not start mldash-syncd" in caplog.text and "stay queued" in caplog.text


def test_a_daemon_that_dies_at_start_is_retried_with_backoff(settings, monkeypatch, caplog):
    spawned: list[subprocess.Popen[bytes]] = []

    def dies(*args: object) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        spawned.append(child)
        return child

    monkeypatch.setattr(autostart, "spawn_daemon", dies)
    live = settings.replace(autostart=True)
    layout = SpoolLayout(live.spool).ensure()
    assert autostart.ensure_daemon(live, layout, now=100.0) is True
    spawned[0].wait(timeout=30)
    with caplog.at_level(logging.WARNING, logger="mldash"):
        assert autostart.ensure_daemon(live, layout, now=101.0) is False  # exited 3: back off 2 s
    assert "exited with code 3" in caplog.text
    assert autostart.ensure_daemon(live, layout, now=102.0) is False
    assert autostart.ensure_daemon(live, layout, now=103.5) is True
    spawned[1].wait(timeout=30)
    assert len(spawned) == 2


def test_a_daemon_that_exits_when_idle_is_started_again_by_a_later_save(settings, monkeypatch):
    spawned: list[subprocess.Popen[bytes]] = []

    def idles_out(*args: object) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        spawned.append(child)
        return child

    monkeypatch.setattr(autostart, "spawn_daemon", idles_out)
    live = settings.replace(autostart=True)
    layout = SpoolLayout(live.spool).ensure()
    assert autostart.ensure_daemon(live, layout, now=0.0) is True
    spawned[0].wait(timeout=30)
    assert autostart.ensure_daemon(live, layout, now=600.0) is True  # exit code 0 long ago: start a new one
    spawned[1].wait(timeout=30)


def test_starting_child_is_not_doubled(settings, monkeypatch):
    spawned: list[subprocess.Popen[bytes]] = []

    def slow_start(*args: object) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        spawned.append(child)
        return child

    monkeypatch.setattr(autostart, "spawn_daemon", slow_start)
    live = settings.replace(autostart=True)
    layout = SpoolLayout(live.spool).ensure()
    try:
        assert autostart.ensure_daemon(live, layout, now=0.0) is True
        assert autostart.ensure_daemon(live, layout, now=1.0) is False  # alive, lock not taken yet: wait
        assert len(spawned) == 1
    finally:
        for child in spawned:
            child.kill()
            child.wait(timeout=30)


def test_waiting_restarts_a_daemon_that_is_gone(settings, monkeypatch):
    spawned: list[subprocess.Popen[bytes]] = []

    def fake(*args: object) -> subprocess.Popen[bytes]:
        spawned.append(subprocess.Popen([sys.executable, "-c", "pass"]))
        return spawned[-1]

    monkeypatch.setattr(autostart, "spawn_daemon", fake)
    exp = Experiment(prefix="alice/project/wait", settings=settings)  # autostart off while saving
    exp.files.save_blob(b"x", "a.bin")
    assert spawned == []
    exp.settings = settings.replace(autostart=True)
    with pytest.raises(TimeoutError):
        exp.flush(timeout=0.01)
    assert len(spawned) == 1  # flush asked for a daemon (the fake one never drains, hence the timeout)


def test_a_save_waiting_for_spool_quota_starts_the_daemon_that_makes_room(settings):
    """The quota is full of saves no daemon drains (its daemon died, or autostart was off when they were made):
    the next save's wait starts one, whose eviction makes room, and the save goes through. Before, the wait
    never asked for a daemon: every save over quota failed after save_timeout, and the spool stayed full."""
    quota = settings.replace(spool_quota="1MiB", save_timeout=120)
    filler = Experiment(prefix="alice/project/quota", settings=quota)  # autostart off (the fixture's)
    for n in range(3):
        filler.files.save_blob(os.urandom(300_000), f"{n}.bin")
    layout = SpoolLayout(quota.spool)
    assert not layout.lock_path.exists() and autostart._states == {}

    live = quota.replace(autostart=True, idle_exit=2.0)
    exp = Experiment(prefix="alice/project/quota", settings=live)
    data = os.urandom(300_000)
    result = exp.files("later").save_blob(data, "fourth.bin")  # over quota: waits for the daemon it starts
    state = autostart._states[Path(live.spool)]
    assert state.child is not None, "the waiting save did not start a daemon"
    assert exp.flush(timeout=60)[result["id"]] in ("committed", "evicted")
    assert store_bytes(live, result) == data


def test_a_daemon_that_refuses_its_configuration_is_not_restarted_for_ever(settings, caplog, monkeypatch):
    """The autostarted daemon exits 2 on a setting only it can check (a catalog it cannot open): the client used
    to restart it with backoff forever, and flush() blamed autostart ("leave MLDASH_AUTOSTART on") while the
    reason sat in daemon.log. After USAGE_EXITS_TO_GIVE_UP such exits it stops; a save over quota then fails at
    once instead of waiting save_timeout for a daemon that will not come."""
    from mldash.errors import SpoolFullError, WaitTimeoutError

    live = settings.replace(autostart=True, catalog="sqlite:///proc/no-such-dir/catalog.sqlite",
                            spool_quota="1MiB", save_timeout=600)
    exp = Experiment(prefix="alice/project/badconf", settings=live)
    layout = SpoolLayout(live.spool)
    with caplog.at_level("WARNING", logger="mldash"):
        exp.files.save_blob(b"x" * 600_000, "a.bin")
        state = autostart._states[Path(live.spool)]
        for attempt in range(autostart.USAGE_EXITS_TO_GIVE_UP):
            assert state.child is not None and state.child.wait(timeout=60) == 2
            state.next_probe = 0.0  # skip the backoff
            autostart.ensure_daemon(live, layout)  # reaps the exit; below the limit, schedules a retry
            if attempt + 1 < autostart.USAGE_EXITS_TO_GIVE_UP:
                assert state.child is None and not autostart.gave_up(layout)
                state.next_probe = 0.0
                autostart.ensure_daemon(live, layout)  # the retry: a new child
        with pytest.raises(WaitTimeoutError) as info:
            exp.flush(timeout=1)
        started = time.monotonic()
        with pytest.raises(SpoolFullError) as full:
            exp.files.save_blob(b"y" * 600_000, "b.bin")  # over quota, and nothing will drain it
        assert time.monotonic() - started < 60
    message = str(info.value)
    assert "the last one autostarted said" in message and "/proc/no-such-dir/catalog.sqlite" in message, message
    assert "autostart gave up" in str(full.value), str(full.value)
    refused = [r.getMessage() for r in caplog.records if "refused its configuration" in r.getMessage()]
    assert len(refused) == 1 and "/proc/no-such-dir/catalog.sqlite" in refused[0], refused
    assert state.child is None and autostart.gave_up(layout)


def test_configuration_exits_count_only_in_a_row(settings, monkeypatch):
    """Exits with status 2 spread over a long run (each followed by a daemon that ran and exited otherwise) must
    not add up to giving up."""
    codes = iter([2, 0, 2, 0, 2, 0])
    spawned: list[subprocess.Popen[bytes]] = []

    def fake(*_args: object) -> subprocess.Popen[bytes]:
        spawned.append(subprocess.Popen([sys.executable, "-c", f"raise SystemExit({next(codes)})"]))
        return spawned[-1]

    monkeypatch.setattr(autostart, "spawn_daemon", fake)
    live = settings.replace(autostart=True)
    layout = SpoolLayout(live.spool).ensure()
    def look_again() -> autostart._SpoolState:
        state = autostart._states.get(Path(live.spool))
        if state is not None:
            state.next_probe = 0.0  # skip any backoff
        autostart.ensure_daemon(live, layout)
        return autostart._states[Path(live.spool)]

    for _ in range(6):
        state = look_again()  # reaps the previous child (counting its exit), or starts the next one
        if state.child is None:
            state = look_again()
        state.child.wait(timeout=30)
    state = look_again()  # reaps the last (exit 0)
    assert not autostart.gave_up(layout) and state.usage_exits == 0 and len(spawned) == 6
