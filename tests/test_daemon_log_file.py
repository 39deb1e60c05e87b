"""An autostarted daemon's log, {spool}/daemon.log, is capped: every daemon a save starts appends to it, one line
per committed file, for as long as the spool lives. Past the cap it becomes daemon.log.1 and a new file takes over
the daemon's stdout and stderr."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mldash import Experiment, autostart
from mldash.config import Settings
from mldash.spool.layout import SpoolLayout
from mldash_syncd.logfile import CAP, CappedFileHandler, CappedLogFile


def test_the_log_rotates_past_its_cap_and_keeps_one_old_file(tmp_path: Path) -> None:
    path = tmp_path / "daemon.log"
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    err = os.dup(out)
    stream = os.fdopen(err, "w", buffering=1)
    handler = CappedFileHandler(CappedLogFile(path, cap=4000, fds=(out, err)), stream)
    logger = logging.getLogger("test.capped")
    logger.handlers[:], logger.propagate = [handler], False
    try:
        for i in range(500):  # ~25 kB through a 4 kB cap: several rotations
            logger.warning("line %04d %s", i, "x" * 40)
    finally:
        stream.close()
        os.close(out)
    current, old = path.read_text().splitlines(), (tmp_path / "daemon.log.1").read_text().splitlines()
    assert path.stat().st_size < 4000 + 100 and 4000 <= (tmp_path / "daemon.log.1").stat().st_size < 4000 + 100
    assert current[0].startswith("log continued from daemon.log.1")
    numbers = [int(line.split()[1]) for line in old + current[1:] if line.startswith("line ")]
    assert numbers == list(range(numbers[0], 500))  # the newest lines, in order, none lost between the two files
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daemon.log", "daemon.log.1"]


def test_an_autostarted_daemon_rotates_daemon_log(settings: Settings) -> None:
    """The real thing: a save autostarts `mldash_syncd run --autostarted` writing to a daemon.log already at its
    cap (earlier daemons' lines): the daemon moves it to daemon.log.1 and logs into a new daemon.log."""
    layout = SpoolLayout(settings.spool).ensure()
    earlier = b"2026-01-01 00:00:00 INFO mldash_syncd: an earlier daemon's line\n" * (CAP // 64 + 1)
    layout.daemon_log_path.write_bytes(earlier)
    live = settings.replace(autostart=True, idle_exit=0.5)
    autostart._reset_for_tests()
    try:
        exp = Experiment(prefix="alice/project/auto", settings=live)
        saved = exp.files("a").save_blob(b"autostarted", "a.bin")
        child = autostart._states[Path(live.spool)].child
        assert child is not None
        assert exp.flush(timeout=60)[saved["id"]] in ("committed", "evicted")
        assert child.wait(timeout=60) == 0
    finally:
        autostart._reset_for_tests()
    rotated = layout.root / "daemon.log.1"
    assert rotated.read_bytes().startswith(earlier)
    current = layout.daemon_log_path.read_text()
    assert "log continued from daemon.log.1" in current and f"committed {saved['id']}" in current, current
    assert layout.daemon_log_path.stat().st_size < 100_000
