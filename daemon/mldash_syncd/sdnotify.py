"""sd_notify(3) in pure Python: readiness, watchdog and stop messages to systemd.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) to services
with ``Type=notify``; a service reports by sending newline-separated ``KEY=value`` fields in one
datagram. Outside systemd the variable is absent and every call here is a no-op that returns
False, so the daemon calls these unconditionally. Sending never raises: a lost notification must
not take the sync loop down with it (systemd's start/watchdog timeouts catch a silent daemon).

Watchdog: with ``WatchdogSec=`` systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) and kills the
service if no ``WATCHDOG=1`` arrives within that time. `Notifier.run_watchdog` pings at half the
interval from a task on the daemon's own event loop, so the pings stop exactly when the loop is
wedged (a blocking call, an await without a deadline) — which is what the watchdog is for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("mldash_syncd.sdnotify")

# A full receive queue in PID 1 would block sendto(); give up after this long instead.
SEND_TIMEOUT = 2.0


class Notifier:
    """Sends sd_notify messages to the socket named by ``env`` (default: os.environ)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(env)

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WatchdogSec=), or None when no watchdog is set."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; True if it was sent."""
        if self._address is None or not fields:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(message, self._address)
        except OSError as exc:
            log.debug("sd_notify %r not delivered: %s", fields, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up is over (spool recovered, backends configured): `systemctl start` returns now."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """One line shown by `systemctl status` (e.g. "3 pending, 0 failed")."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (e.g. while reindexing a large spool before READY=1)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def reloading(self) -> bool:
        """SIGHUP received: systemd shows "reloading" until the next READY=1 (MONOTONIC_USEC as systemd asks)."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        """SIGTERM received: systemd shows "deactivating" while in-flight parts are checkpointed."""
        return self.notify("STOPPING=1")

    async def run_watchdog(self) -> None:
        """Ping every `watchdog_interval` seconds until cancelled; returns at once without a watchdog."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)


def _socket_address(value: str) -> str | bytes | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()  # abstract namespace
    return None  # unset, or a transport we do not speak (vsock:…): behave as outside systemd


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    # WATCHDOG_PID names the process expected to ping; a child that inherited the variables must not.
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec
