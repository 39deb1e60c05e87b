"""Autostart: a save starts a detached `mldash-syncd` for its spool when none is draining it.

So the embedded default needs no setup: the first save of a fresh machine starts a daemon that keeps
uploading after the training process exits, and exits by itself once idle (`idle_exit`). Disabled with
MLDASH_AUTOSTART=0 (clusters that run the daemon as a service, or no daemon at all: entries stay queued).

Rules:
- never block a save and never raise: any failure is a logged warning and the entry simply stays queued;
- cheap on the hot path: the daemon's flock is probed at most every few seconds per spool (~20 µs);
- a daemon that exits (idle) is started again by a later save; one that keeps dying right after its start
  is retried with exponential backoff, and its output is in {spool}/daemon.log;
- the child gets this process's *effective* settings as MLDASH_* variables (they may come from code, not
  the environment), a PYTHONPATH that finds this very mldash, its own session (a Ctrl-C of the training
  job does not reach it), cwd = the spool, stdin from /dev/null, and no inherited file descriptors.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mldash.config import FIELDS, Settings
from mldash.spool.layout import SpoolLayout, open_private
from mldash.spool.lock import is_held

log = logging.getLogger("mldash")

PROBE_INTERVAL = 5.0      # seconds between lock probes while a daemon is known to hold the spool
STARTING_GRACE = 30.0     # a child of ours that is alive but has not taken the lock yet: don't start another
EXIT_USAGE = 2            # mldash-syncd's exit status for bad configuration or usage (mldash_syncd.cli)
USAGE_EXITS_TO_GIVE_UP = 3  # a passing cause (a locked catalog file at start) gets the ordinary retries first
MAX_BACKOFF = 300.0


@dataclass
class _SpoolState:
    next_probe: float = 0.0
    child: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_failures: int = 0
    usage_exits: int = 0  # exits with status 2 (configuration) in a row: after USAGE_EXITS_TO_GIVE_UP, stop trying


_states: dict[Path, _SpoolState] = {}
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker, say) gets a fresh lock (the parent's may be held by another thread)
    and forgets the parent's children, which it cannot wait for."""
    global _lock
    _lock = threading.Lock()
    _states.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def settings_env(settings: Settings) -> dict[str, str]:
    """MLDASH_* variables reproducing `settings` exactly in a child process ("" = unset → default)."""
    env = {}
    for field in FIELDS:
        value: Any = getattr(settings, field.name)
        if value is None:
            text = ""
        elif isinstance(value, bool):
            text = "1" if value else "0"
        else:
            text = str(value)
        env[field.env] = text
    return env


def _pythonpath() -> str:
    """Directories that make `mldash` and `mldash_syncd` importable in the child as they are here."""
    paths = [str(Path(__file__).resolve().parent.parent)]
    spec = importlib.util.find_spec("mldash_syncd")
    if spec is not None and spec.origin:
        paths.append(str(Path(spec.origin).resolve().parent.parent))
    else:  # a source checkout: daemon/mldash_syncd next to mldash/
        candidate = Path(__file__).resolve().parent.parent / "daemon"
        if (candidate / "mldash_syncd").is_dir():
            paths.append(str(candidate))
    existing = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(dict.fromkeys([*paths, *filter(None, existing.split(os.pathsep))]))


def spawn_daemon(settings: Settings, layout: SpoolLayout) -> subprocess.Popen[bytes]:
    """Start `python -m mldash_syncd run --autostarted` for this spool, detached, logging to daemon.log."""
    env = {**os.environ, **settings_env(settings), "MLDASH_SPOOL": str(layout.root), "PYTHONPATH": _pythonpath()}
    log_fd = open_private(layout.daemon_log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "mldash_syncd", "run", "--autostarted"],
            env=env, cwd=str(layout.root), stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            start_new_session=True, close_fds=True)
    finally:
        os.close(log_fd)


def ensure_daemon(settings: Settings, layout: SpoolLayout, *, now: float | None = None) -> bool:
    """Start a daemon for `layout` if autostart is on and none holds the spool; True if one was started.

    Never raises (a failure is logged as a warning).
    """
    if not settings.autostart:
        return False
    try:
        with _lock:
            return _ensure(settings, layout, time.monotonic() if now is None else now)
    except Exception as exc:  # autostart is a convenience: it must never fail a save
        log.warning("mldash: could not start mldash-syncd for %s (%s: %s); files stay queued until a daemon runs",
                    layout.root, type(exc).__name__, exc)
        return False


def _ensure(settings: Settings, layout: SpoolLayout, now: float) -> bool:
    state = _states.setdefault(layout.root, _SpoolState())
    if now < state.next_probe:
        return False
    if is_held(layout):
        state.next_probe = now + PROBE_INTERVAL
        state.quick_failures = state.usage_exits = 0
        return False
    child = state.child
    if child is not None:
        code = child.poll()  # also reaps it, so no zombie is left behind
        if code is None and now - state.started_at < STARTING_GRACE:
            state.next_probe = now + 0.2  # still starting up: check again soon
            return False
        if code is not None and code != EXIT_USAGE:
            state.usage_exits = 0  # "in a row": any other exit (an idle one, a crash) starts the count again
        if code == EXIT_USAGE:
            state.usage_exits += 1
            if state.usage_exits >= USAGE_EXITS_TO_GIVE_UP:
                # Bad configuration (an unreachable path, a bad URI) each time: starting it again cannot help, as
                # for systemd's RestartPreventExitStatus=2. Say why, once; a later process (fixed settings) retries.
                log.warning("mldash: the autostarted mldash-syncd refused its configuration %d times: %s — files "
                            "stay queued until the setting is fixed and a daemon runs (%s)", state.usage_exits,
                            last_log_line(layout) or f"exit {code}", layout.daemon_log_path)
                state.child = None
                state.next_probe = float("inf")
                return False
        if code is not None and now - state.started_at < 10.0 and code != 0:
            state.quick_failures += 1
            backoff = min(2.0 ** state.quick_failures, MAX_BACKOFF)
            log.warning("mldash: the autostarted mldash-syncd exited with code %s right after starting; retrying in "
                        "%.0fs (%s; see %s)", code, backoff, last_log_line(layout) or "no output",
                        layout.daemon_log_path)
            state.child = None
            state.next_probe = now + backoff
            return False
    if importlib.util.find_spec("mldash_syncd") is None and not (
            Path(__file__).resolve().parent.parent / "daemon" / "mldash_syncd").is_dir():
        log.warning("mldash: mldash-syncd is not installed, so no daemon can be started for %s; files stay queued",
                    layout.root)
        state.next_probe = now + MAX_BACKOFF
        return False
    state.child = spawn_daemon(settings, layout)
    state.started_at = now
    state.next_probe = now + 0.2
    log.info("mldash: started mldash-syncd (pid %s) for %s", state.child.pid, layout.root)
    return True


def gave_up(layout: SpoolLayout) -> bool:
    """Whether autostart stopped starting daemons for this spool in this process (see USAGE_EXITS_TO_GIVE_UP)."""
    with _lock:
        state = _states.get(layout.root)
        return state is not None and state.next_probe == float("inf")


def ensure_while_waiting(settings: Settings, layout: SpoolLayout) -> bool:
    """For a save waiting for spool space: start a daemon if none drains the spool; False once autostart gave up
    (waiting for room no daemon will make would only stall the training loop)."""
    ensure_daemon(settings, layout)
    return not gave_up(layout)


def last_log_line(layout: SpoolLayout) -> str | None:
    """The last non-empty line of the autostarted daemons' log (daemon.log): why the last one stopped."""
    try:
        with open(layout.daemon_log_path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            log_file.seek(max(0, log_file.tell() - 4096))
            lines = [line.strip() for line in log_file.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1][:500] if lines else None


def _reset_for_tests() -> None:
    with _lock:
        _states.clear()
