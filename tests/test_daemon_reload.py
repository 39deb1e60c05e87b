"""Reloading a running daemon's configuration (SIGHUP, `systemctl reload`): the upload cap and the log level
change at once, other changed settings are named as needing a restart, a configuration that no longer loads
is refused whole — and the daemon runs on in every case."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

import pytest

from mldash.config import Settings
from mldash.errors import ConfigError
from mldash.spool import SpoolIndex, SpoolLayout
from mldash.store import make_store
from mldash.store.pacing import RateLimit
from mldash_syncd import Daemon
from mldash_syncd.reload import reload_settings
from tests.fixtures.daemon import enqueue_bytes
from tests.test_daemon_process import wait_for

MiB = 2**20


# -- the token bucket changes its rate while senders wait ----------------------------------------------------

async def test_lifting_the_cap_frees_a_waiting_sender_at_once() -> None:
    limit = RateLimit(1 * MiB)
    await limit.take(limit.burst)
    waiting = asyncio.create_task(limit.take(100 * MiB))  # 100 s at the old rate
    await asyncio.sleep(0.05)
    assert not waiting.done()
    limit.set_rate(None)
    async with asyncio.timeout(10):
        waited = await waiting
    assert waited < 10 and not limit.limited
    assert await limit.take(10**12) == 0.0  # no cap: nothing waits


async def test_a_higher_cap_shortens_the_wait_a_lower_one_lengthens_it() -> None:
    faster = RateLimit(1 * MiB)
    await faster.take(faster.burst)
    waiting = asyncio.create_task(faster.take(50 * MiB))  # 50 s at 1 MiB/s
    await asyncio.sleep(0.05)
    faster.set_rate(1024 * MiB)  # what is left of the 50 MiB turn: ~50 ms at the new rate
    async with asyncio.timeout(10):
        await waiting

    slower = RateLimit(64 * MiB)
    await slower.take(slower.burst)
    waiting = asyncio.create_task(slower.take(64 * MiB))  # 1 s at 64 MiB/s
    await asyncio.sleep(0.01)
    slower.set_rate(1 * MiB)  # the rest of the turn now takes about a minute
    await asyncio.sleep(2.0)
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_cap_set_on_an_uncapped_limit_applies_to_the_next_sends() -> None:
    limit = RateLimit(None)
    assert await limit.take(10**12) == 0.0
    limit.set_rate(1 * MiB)
    assert await limit.take(limit.burst) == 0.0  # a fresh cap starts with its burst of credit
    waiting = asyncio.create_task(limit.take(1 * MiB))
    await asyncio.sleep(0.5)
    assert not waiting.done()  # ~1 s at 1 MiB/s
    waiting.cancel()
    with pytest.raises(ValueError, match="positive"):
        limit.set_rate(0)


# -- what a reload takes up ------------------------------------------------------------------------------------

def test_live_settings_apply_and_the_others_are_named_as_needing_a_restart(settings: Settings) -> None:
    running = settings.replace(max_upload_rate="1MiB/s")
    store = make_store(running)
    reloaded = running.replace(max_upload_rate="unlimited", log_level="DEBUG", part_size="16MiB",
                               catalog="mongodb://mldash:s3cret-pass@db.example/mldash")
    root = logging.getLogger()
    level = root.level
    try:
        outcome = reload_settings(running, reloaded, store)
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(level)
    assert store.rate_limit is not None and store.rate_limit.rate is None
    assert outcome.settings.max_upload_rate is None and outcome.settings.log_level == "DEBUG"
    # Kept at their running values, so what `status` shows is what is in effect.
    assert outcome.settings.part_size == running.part_size and outcome.settings.catalog == running.catalog
    assert outcome.applied == ["max_upload_rate 1.0 MiB/s → unlimited", "log_level 'INFO' → 'DEBUG'"]
    assert outcome.need_restart[1] == "part_size 8.0 MiB → 16.0 MiB"
    assert outcome.need_restart[0].startswith("catalog 'sqlite://") and "'mongodb://mldash:***@db.example/mldash'" in \
        outcome.need_restart[0]
    assert "s3cret-pass" not in " ".join(outcome.need_restart)
    assert reload_settings(running, running, store).applied == []

    class Unpaced:  # a store that does not pace (none of ours): the cap cannot change live, and says why
        url, rate_limit = "test://unpaced", None

    outcome = reload_settings(running, reloaded.replace(log_level="INFO"), Unpaced())  # type: ignore[arg-type]
    assert outcome.applied == [] and outcome.settings.max_upload_rate == MiB
    assert outcome.need_restart[2] == "max_upload_rate 1.0 MiB/s → unlimited (the store test://unpaced does not pace " \
                                      "its uploads)"


def test_a_configuration_that_no_longer_loads_is_refused_whole(settings: Settings, caplog) -> None:
    daemon = Daemon(settings.replace(max_upload_rate="2MiB/s"))

    def broken() -> Settings:
        raise ConfigError("max_upload_rate = 'fast' (from config.toml): 'fast' is not a rate")

    with caplog.at_level(logging.ERROR, logger="mldash_syncd"):
        assert daemon.reload(broken) is None
    assert "configuration not reloaded: max_upload_rate = 'fast'" in caplog.text and "running on" in caplog.text
    assert daemon.settings.max_upload_rate == 2 * MiB and daemon.store.rate_limit.rate == 2 * MiB


# -- the service: SIGHUP -----------------------------------------------------------------------------------------

def _config_file(settings: Settings) -> Path:
    """The TOML file a daemon started with `settings_env(settings)` reads (XDG_CONFIG_HOME, see fixtures)."""
    path = Path(settings.spool).parent / "xdg-config" / "mldash" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _cap_shown(settings: Settings) -> int | None:
    """The cap in the running daemon's heartbeat (what `status` shows; read directly, since `status` reads the
    same configuration file, which this test breaks on purpose)."""
    index = SpoolIndex.open_readonly(SpoolLayout(settings.spool))
    try:
        beat = index.get_meta("daemon") if index is not None else None
    finally:
        if index is not None:
            index.close()
    return json.loads(beat).get("uploadRateCap", "no cap field") if beat else "no heartbeat"


def test_sighup_lifts_the_cap_of_a_running_daemon(settings: Settings, daemon_process) -> None:
    config = _config_file(settings)
    config.write_text('max_upload_rate = "1MB/s"\n')
    daemon = daemon_process(settings, "run")
    wait_for(lambda: _cap_shown(settings) == 10**6)
    entry = enqueue_bytes(settings, b"x" * (40 * MiB), filename="big.bin")  # ≥ 40 s at the cap
    wait_for(lambda: f"upload {entry.id}: multipart" in daemon.log(), timeout=30)  # in flight, at the cap

    # A broken file first: refused with its error, the daemon runs on at the cap it had.
    config.write_text('max_upload_rate = "fast"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration not reloaded" in daemon.log(), timeout=30)
    assert "'fast' is not a rate" in daemon.log() and daemon.proc.poll() is None
    assert _cap_shown(settings) == 10**6 and f"committed {entry.id}" not in daemon.log()

    # A setting only a restart takes up is named; the cap is lifted at once, the upload in flight included.
    config.write_text('max_upload_rate = "unlimited"\nspool_quota = "10GiB"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "take effect only after a restart" in daemon.log(), timeout=30)  # logged after the applied
    assert "configuration reloaded: max_upload_rate 976.6 KiB/s → unlimited" in daemon.log()
    assert "(running on as before): spool_quota None → 10.0 GiB" in daemon.log()
    wait_for(lambda: _cap_shown(settings) is None, timeout=30)
    # 40 MiB at the old cap take over 40 s: committed within 30 s, the upload went on without it.
    wait_for(lambda: f"committed {entry.id}" in daemon.log(), timeout=30)
    assert daemon.proc.poll() is None
    assert daemon.terminate() == 0
