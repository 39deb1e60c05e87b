"""Dead and hostile endpoints: a server that never answers, and one that answers every request with an error.

    with BlackholeServer() as hole:           # S3 or MongoDB endpoint that accepts and never answers
        client = boto3.client("s3", endpoint_url=hole.url, config=Config(read_timeout=1, ...))

    with S3ErrorServer(http_faults.SLOW_DOWN) as storm:
        ...
        assert storm.max_rate(window=1.0) <= 20
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from tests.faults.framing import HttpRequestFramer
from tests.faults.http_faults import S3Error, next_request_id
from tests.faults.proxy import CONTINUE_100
from tests.faults.rates import max_rate
from tests.faults.threaded import ThreadedServer


class BlackholeServer(ThreadedServer):
    """Accepts connections, reads and discards everything, never writes a byte, never closes first."""

    name = "blackhole"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self._lock = threading.Lock()
        self.connections = 0
        self.bytes_received = 0
        self.connection_times: list[float] = []  # time.monotonic() of each accept

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
            self.connection_times.append(time.monotonic())
        while data := await reader.read(64 * 1024):
            with self._lock:
                self.bytes_received += len(data)


@dataclass(frozen=True)
class RequestLog:
    time: float  # time.monotonic() when the request head arrived
    method: str
    target: str
    status: int  # what was answered


class S3ErrorServer(ThreadedServer):
    """Answers every HTTP request with `error` (status + S3 XML error body), reading each request fully first.

    Keep-alive works (requests are framed by Content-Length/chunked); `Expect: 100-continue` gets its
    `100 Continue` so clients send their body. `set_error()` switches the answer at runtime."""

    name = "s3-error-server"

    def __init__(self, error: S3Error, host: str = "127.0.0.1", port: int = 0, close: bool = False) -> None:
        super().__init__(host, port)
        self._lock = threading.Lock()
        self._error = error
        self._close_after = close
        self._requests: list[RequestLog] = []
        self._conn_ids = 0

    def set_error(self, error: S3Error, close: bool | None = None) -> None:
        with self._lock:
            self._error = error
            if close is not None:
                self._close_after = close

    @property
    def requests(self) -> list[RequestLog]:
        with self._lock:
            return list(self._requests)

    @property
    def request_times(self) -> list[float]:
        return [r.time for r in self.requests]

    def max_rate(self, window: float = 1.0) -> int:
        """The largest number of requests that arrived within any `window` seconds."""
        return max_rate(self.request_times, window)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._conn_ids += 1
            framer = HttpRequestFramer(self._conn_ids)
        while data := await reader.read(64 * 1024):
            for seg in framer.feed(data):
                msg = seg.msg
                if msg.method is None:  # not HTTP: nothing sensible to answer
                    return
                if seg.start:
                    with self._lock:
                        error, close = self._error, self._close_after
                        self._requests.append(RequestLog(time.monotonic(), msg.method, msg.target or "",
                                                         error.status))
                    msg.state = (error, close)
                    if msg.expect_continue and not seg.end:
                        writer.write(CONTINUE_100)
                        await writer.drain()
                if seg.end:
                    error, close = msg.state
                    writer.write(error.response(next_request_id(), close=close))
                    await writer.drain()
                    if close:
                        return
