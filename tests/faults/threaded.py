"""A loopback asyncio TCP server running on its own event loop in its own thread.

Tests of any flavour (sync, or async on pytest-asyncio's loop) can start, reconfigure and stop it, and
a test that blocks its own loop (a sync boto3 call) does not block the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

T = TypeVar("T")


def rst(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN: the peer sees ECONNRESET."""
    if writer is None or writer.transport.is_closing():
        if writer is not None:
            writer.transport.abort()
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ThreadedServer:
    """Base class: subclasses implement `async handle(reader, writer)` for each accepted connection."""

    name = "server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._bind = (host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.host = host
        self.port = 0
        # Bugs in a handler must not hide as a dropped connection: they are kept and raised by stop().
        self.internal_errors: list[BaseException] = []

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-loop", daemon=True)
        self._thread.start()
        self.call(self._open())
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        try:
            self.call(self._close(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
        if self.internal_errors:
            raise RuntimeError(f"{self.name}: {len(self.internal_errors)} internal error(s)") \
                from self.internal_errors[0]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run a coroutine on the server's loop from any other thread and return its result."""
        if self._loop is None:
            coro.close()
            raise RuntimeError(f"{self.name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- loop side ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            # Connections accepted during shutdown may not be in _tasks yet: finish every task still here. First
            # one iteration, so that their tasks take a first step: a task cancelled before it ever ran skips
            # _accept's `finally`, which is what closes the connection — its socket would leak to the garbage
            # collector and warn inside whichever test runs then (seen as "unclosed transport", "loop is closed").
            self._loop.run_until_complete(asyncio.sleep(0))
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            # A transport closed or aborted by those last tasks closes its socket in a callback scheduled for the
            # next iteration, which a closed loop never runs: the socket then leaks until the garbage collector
            # finds it, and warns ("unclosed transport", "loop is closed") inside whichever test runs then.
            for _ in range(3):
                self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self._bind)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        clean = False
        try:
            await self.handle(reader, writer)
            clean = True
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels us. Returning normally matters on 3.11: asyncio's stream callback calls
            # task.exception() on the finished task, which raises (and logs) for a cancelled one.
            pass
        except Exception as exc:
            self.internal_errors.append(exc)
        finally:
            self._tasks.discard(task)
            # A clean end flushes and sends FIN; anything else (errors, cancellation at stop) drops at once.
            if clean:
                writer.close()
            else:
                writer.transport.abort()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
