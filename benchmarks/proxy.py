"""A byte-counting TCP proxy on 127.0.0.1, run on its own thread: how many bytes did the client send?

Used by the resume scenario: the daemon talks to moto through it, so every byte of every request (bodies
and headers) is counted, whatever the daemon itself believes it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class CountingProxy:
    def __init__(self, upstream_port: int, chunk: int = 256 * 1024) -> None:
        self.upstream_port = upstream_port
        self.chunk = chunk
        self.port = 0
        self._lock = threading.Lock()
        self._up = 0
        self._down = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bytes_up(self) -> int:
        """Bytes the clients sent towards the server since the last `reset()`."""
        with self._lock:
            return self._up

    def bytes_down(self) -> int:
        with self._lock:
            return self._down

    def reset(self) -> tuple[int, int]:
        with self._lock:
            counts = (self._up, self._down)
            self._up = self._down = 0
            return counts

    def start(self) -> CountingProxy:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="counting-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("counting proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, server_writer, up=True),
                             self._pipe(server_reader, client_writer, up=False), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        try:
            while data := await reader.read(self.chunk):
                with self._lock:
                    if up:
                        self._up += len(data)
                    else:
                        self._down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
