"""sd_notify helper against a real AF_UNIX datagram socket, as PID 1 would listen on it."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mldash_syncd.sdnotify import Notifier


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    # A short directory of our own: AF_UNIX paths are limited to 107 bytes, tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = os.path.join(directory, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(5.0)
        try:
            yield path, sock
        finally:
            sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_status_watchdog_stopping_arrive_as_datagrams(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("recovered 3 entries")
    assert received(sock) == ["READY=1", "STATUS=recovered 3 entries"]
    assert notifier.status("2 pending")
    assert received(sock) == ["STATUS=2 pending"]
    assert notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1"]
    assert notifier.extend_timeout(90)
    assert received(sock) == ["EXTEND_TIMEOUT_USEC=90000000"]
    assert notifier.stopping()
    assert received(sock) == ["STOPPING=1"]


def test_abstract_namespace_socket() -> None:
    name = f"mldash-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5.0)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert received(sock) == ["READY=1"]


def test_outside_systemd_everything_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready()
    assert not notifier.stopping()
    asyncio.run(asyncio.wait_for(notifier.run_watchdog(), 1.0))  # returns at once


def test_unsupported_transport_is_treated_as_absent() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_a_vanished_socket_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid_only(listener: tuple[str, socket.socket]) -> None:
    path, _ = listener
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    mine = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 15.0
    # An inherited WATCHDOG_PID of another process (we are its child): not ours to ping.
    assert Notifier({**mine, "WATCHDOG_PID": str(os.getppid())}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "junk"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None  # no socket, no watchdog


async def test_run_watchdog_pings_until_cancelled(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    sock.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    task = asyncio.create_task(notifier.run_watchdog())
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(10):
            for _ in range(3):
                assert (await loop.sock_recv(sock, 4096)) == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_a_reload_is_announced_to_systemd_only_after_readiness(listener: tuple[str, socket.socket],
                                                                 settings) -> None:
    """RELOADING=1 (with MONOTONIC_USEC, as systemd asks) and READY=1 frame a reload of a daemon that is
    ready; during start-up a reload says nothing, since its READY=1 would end systemd's start-up wait early."""
    import time

    from mldash_syncd import Daemon

    path, sock = listener
    daemon = Daemon(settings)
    daemon.notifier = Notifier({"NOTIFY_SOCKET": path})
    sock.settimeout(0.2)
    daemon.reload(lambda: settings)  # still starting: nothing sent
    with pytest.raises(TimeoutError):
        sock.recv(4096)
    sock.settimeout(5.0)
    daemon._ready_announced = True  # as run() sets it with its READY=1
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.reload(lambda: settings)
    reloading = received(sock)
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert before <= int(reloading[1].split("=")[1]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert received(sock) == ["READY=1"]
