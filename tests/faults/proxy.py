"""FaultProxy: a loopback TCP proxy that injects network faults, per connection or per request.

    with FaultProxy(("127.0.0.1", moto_port), protocol="http", seed=1) as proxy:
        s3 = boto3.client("s3", endpoint_url=proxy.url, ...)
        lost = proxy.reset_before_response(match=http_faults.COMPLETE_MULTIPART_UPLOAD, times=1)
        ...
        assert lost.injected == 1 and proxy.stats().bytes_to_upstream > ...

Faults are rules added at any time from any thread (`add()` or the helpers `delay()`, `reset_after_bytes()`,
`reset_before_response()`, `blackhole()`, `flip_byte()`, `refuse()`, `respond()`); each returns a `Fault`
handle with live counters and `remove()`. Every rule has a probability drawn from its own RNG seeded with
(proxy seed, rule id), a `match` (regex on the message head, or a predicate on the `Message`), `times` (at
most this many injections) and `skip` (let this many matching candidates through first).

Unit of decision:
- connection faults (`refuse`, `blackhole(new_only=True)`, `delay(per="connection")`) are decided when a
  connection is accepted, before any byte; they take no `match`.
- `blackhole()` without `match` and without `new_only` also silences connections that are already open.
- every other fault is decided per *message*: with protocol="http" a message is one HTTP request (and its
  response), with "mongo" one wire-protocol message (and its reply), with "raw" the whole connection
  (its head, for `match`, is the first chunk the client sent).

Offsets and byte counts are per message: `reset_after_bytes(n)` in HTTP mode resets once n bytes of a
request (or, direction="down", of its final response) have been forwarded; in raw mode once n bytes of the
connection's stream have. A message shorter than n is not reset.

Notes for scenario writers (checked here, see tests/test_fault_proxy.py):
- moto's server answers `Connection: close`: every S3 request comes on a new connection, so with moto
  connection-level and request-level faults coincide.
- aiohttp 3.14 (under aiobotocore) re-sends an idempotent request (PUT, GET, HEAD, DELETE) once by itself
  after a disconnect, invisible to botocore's retry count: one `reset_before_response` on UploadPart means
  the part reaches S3 twice; use times>=2 (or none) to make the error reach the caller.
- botocore sends `x-amz-checksum-crc32` with a PutObject by default; moto stores it without checking,
  so a flipped body byte is stored and only a checksum-validating GET notices.
- A bug in a rule's `match` callable or in the proxy is kept and raised by `stop()`, not swallowed.
"""

from __future__ import annotations

import asyncio
import enum
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.faults.framing import (
    HttpRequestFramer,
    HttpResponseFramer,
    Message,
    MongoRequestFramer,
    MongoResponseFramer,
    Part,
    Protocol,
    RawRequestFramer,
    RawResponseFramer,
    Segment,
)
from tests.faults.threaded import ThreadedServer, rst

CHUNK = 64 * 1024
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


class Direction(enum.StrEnum):
    UP = "up"  # client → upstream (requests)
    DOWN = "down"  # upstream → client (responses)
    BOTH = "both"

    def covers(self, d: Direction) -> bool:
        return self is Direction.BOTH or self is d


# ---- fault specs: what to do (the rule around them says when) ----------------------------------------------


@dataclass(frozen=True)
class Delay:
    """Sleep `seconds` before forwarding: every chunk, once per message, or once per connection (at accept)."""

    seconds: float
    per: Literal["chunk", "message", "connection"] = "chunk"
    direction: Direction = Direction.UP


@dataclass(frozen=True)
class ResetAfterBytes:
    """Forward `n` bytes of the message in `direction`, then RST the client (upstream gets a FIN on "up").

    `n` may be a range (lo, hi): each decision draws n uniformly in [lo, hi] (a reset at a random point)."""

    n: int | tuple[int, int]
    direction: Direction = Direction.UP


@dataclass(frozen=True)
class ResetBeforeResponse:
    """Forward the whole request; when its final response has fully arrived, RST the client instead of
    delivering a single byte of it (1xx interim responses still pass). The upstream did the work; the
    client never hears. In raw mode the client is reset at the first upstream byte."""


@dataclass(frozen=True)
class Blackhole:
    """Swallow traffic: nothing forwarded, nothing answered, the connection stays open.

    Without `match`: every connection, open ones included (new_only=False) or only connections accepted
    from now on (new_only=True). With `match`: a matching request and everything after it on its connection.
    A blackholed connection stays dead after the rule is removed (its stream is broken)."""

    new_only: bool = False


@dataclass(frozen=True)
class FlipByte:
    """XOR one byte of the message with a random non-zero mask.

    Offset uniformly random in [after, message length) (in_body=False: counted from the first byte of the
    message, HTTP head included) or in [after, body length) (in_body=True: payload bytes only, so HTTP heads
    and chunk framing stay valid). When the length is not known in advance (raw mode, chunked bodies) the
    byte is chosen inside the first chunk that reaches past `after`."""

    after: int = 0
    in_body: bool = True
    direction: Direction = Direction.UP


@dataclass(frozen=True)
class Refuse:
    """Close each new connection at once: RST (rst=True, the client sees ECONNRESET) or FIN (EOF)."""

    rst: bool = True


@dataclass(frozen=True)
class Respond:
    """HTTP only: answer the request with these raw response bytes instead of forwarding it.

    The request (body included) is read and discarded; a client waiting on `Expect: 100-continue` is sent
    `100 Continue` first so it does not stall. A response with `Connection: close` closes the connection."""

    response: bytes


FaultSpec = Delay | ResetAfterBytes | ResetBeforeResponse | Blackhole | FlipByte | Refuse | Respond
Match = bytes | str | re.Pattern[bytes] | Callable[[Message], bool] | None

KIND = {
    Delay: "delay",
    ResetAfterBytes: "reset_after_bytes",
    ResetBeforeResponse: "reset_before_response",
    Blackhole: "blackhole",
    FlipByte: "flip_byte",
    Refuse: "refuse",
    Respond: "respond",
}


class Fault:
    """A rule in a proxy: a spec plus when it applies. Counters are live; read them from any thread."""

    def __init__(self, proxy: FaultProxy, fault_id: int, spec: FaultSpec, probability: float, match: Match,
                 times: int | None, skip: int, seed: int) -> None:
        self.proxy = proxy
        self.id = fault_id
        self.spec = spec
        self.kind = KIND[type(spec)]
        self.probability = probability
        self.times = times
        self.skip = skip
        self.rng = random.Random(f"{seed}/{fault_id}")
        self._match = _compile(match)
        self.match = match
        self.candidates = 0  # matching messages/connections seen while the rule was active
        self.fired = 0  # candidates it was applied to (probability drawn, within times/skip)
        self.injected = 0  # faults actually injected (a reset sent, a byte flipped, a response lost, ...)
        self._reserved = 0  # fired but not yet injected nor released: holds a place under `times`
        self.active = True

    def __repr__(self) -> str:
        return f"Fault(id={self.id}, {self.spec}, p={self.probability}, fired={self.fired}, injected={self.injected})"

    def remove(self) -> None:
        """Stop deciding: no new connection/message gets this fault (ones already planned keep it)."""
        self.proxy.remove(self)

    def wait(self, count: int = 1, timeout: float = 10.0) -> None:
        """Block until this fault has been injected `count` times in total; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while self.injected < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r}: {self.injected} injections, waited for {count}")
            time.sleep(0.005)

    async def wait_async(self, count: int = 1, timeout: float = 10.0) -> None:
        """`wait` for async tests (does not block their event loop)."""
        async with asyncio.timeout(timeout):
            while self.injected < count:
                await asyncio.sleep(0.005)

    def matches(self, msg: Message) -> bool:
        return self._match is None or self._match(msg)

    # The methods below run on the proxy loop, under the proxy lock.

    def _take(self) -> bool:
        if not self.active:
            return False
        self.candidates += 1
        if self.skip > 0:
            self.skip -= 1
            return False
        if self.times is not None and self.injected + self._reserved >= self.times:
            return False
        if self.probability < 1.0 and self.rng.random() >= self.probability:
            return False
        self.fired += 1
        self._reserved += 1
        return True

    def _release(self) -> None:
        self._reserved -= 1


def _compile(match: Match) -> Callable[[Message], bool] | None:
    if match is None:
        return None
    if isinstance(match, str):
        match = match.encode()
    if isinstance(match, bytes):
        match = re.compile(match, re.DOTALL)
    if isinstance(match, re.Pattern):
        pattern = match
        return lambda msg: pattern.search(msg.head) is not None
    return match


# ---- observations ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyStats:
    connections: int  # accepted
    active_connections: int
    bytes_from_client: int  # everything the clients sent, swallowed bytes included
    bytes_to_upstream: int  # what reached the upstream (re-sent bytes show up here)
    bytes_from_upstream: int
    bytes_to_client: int
    messages: int  # requests framed (raw: connections that sent something)
    responses: int  # final responses (or replies) completely framed from upstream
    upstream_connect_failures: int
    faults: dict[str, int]  # injections by kind

    @property
    def bytes_up(self) -> int:
        return self.bytes_to_upstream

    @property
    def bytes_down(self) -> int:
        return self.bytes_to_client


@dataclass
class FaultEvent:
    time: float  # time.monotonic()
    kind: str
    fault_id: int
    conn_id: int
    message_index: int | None
    detail: str


@dataclass
class MessageRecord:
    """One request seen by the proxy (HTTP and mongo modes; raw mode: one per connection)."""

    time: float  # time.monotonic() when its head was framed
    conn_id: int
    index: int
    method: str | None
    target: str | None
    content_length: int | None
    faults: list[str]  # kinds of the faults decided for it
    bytes_up: int = 0  # bytes of it forwarded to the upstream
    status: int | None = None  # HTTP status of its final response
    bytes_down: int = 0  # bytes of its responses delivered to the client
    complete: bool = False  # its final response was fully delivered


class _Closed(Exception):
    """The connection was torn down on purpose (a fault); stop pumping."""


@dataclass
class _Flip:
    fault: Fault
    spec: FlipByte
    target: int | None = None  # offset in the message (or body) once chosen
    done: bool = False


@dataclass
class _Plan:
    """The faults decided for one message."""

    record: MessageRecord | None = None
    reserved: list[Fault] = field(default_factory=list)
    delays: list[tuple[Fault, Delay]] = field(default_factory=list)
    resets: dict[Direction, tuple[Fault, int]] = field(default_factory=dict)
    flips: dict[Direction, _Flip] = field(default_factory=dict)
    lose_response: Fault | None = None
    blackhole: Fault | None = None
    respond: tuple[Fault, Respond] | None = None


_EMPTY = _Plan()


class _Conn:
    def __init__(self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.id = conn_id
        self.client_r = reader
        self.client_w = writer
        self.up_r: asyncio.StreamReader | None = None
        self.up_w: asyncio.StreamWriter | None = None
        self.blackholed = False
        self.seen_global: set[int] = set()
        self.pending: deque[Message] = deque()  # forwarded requests awaiting their final response
        self.plans: list[_Plan] = []
        self.down_task: asyncio.Task[str] | None = None
        self.req_framer: Any = None
        self.resp_framer: Any = None


class FaultProxy(ThreadedServer):
    """TCP proxy 127.0.0.1:<free port> → upstream, with fault rules. See the module docstring."""

    name = "fault-proxy"

    def __init__(self, upstream: tuple[str, int], protocol: Protocol | str = Protocol.RAW, seed: int = 0,
                 connect_timeout: float = 5.0, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.upstream = upstream
        self.protocol = Protocol(protocol)
        self.seed = seed
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._fault_ids = 0
        self._conn_ids = 0
        self._conns: dict[int, _Conn] = {}
        self._reset_stats()

    # ---- configuration (any thread) -------------------------------------------------------------------

    def add(self, spec: FaultSpec, probability: float = 1.0, match: Match = None, times: int | None = None,
            skip: int = 0) -> Fault:
        """Add a fault rule; it applies to connections/messages from now on. Returns its handle."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be in [0, 1]")
        connection_scoped = _connection_scoped(spec, match)
        if match is not None and connection_scoped:
            raise ValueError(f"{KIND[type(spec)]} is decided per connection, before any byte: no match")
        if isinstance(spec, Respond) and self.protocol is not Protocol.HTTP:
            raise ValueError("respond needs protocol='http'")
        if isinstance(spec, FlipByte) and spec.direction is Direction.BOTH:
            raise ValueError("flip_byte direction must be 'up' or 'down'")
        if isinstance(spec, ResetAfterBytes):
            lo, hi = spec.n if isinstance(spec.n, tuple) else (spec.n, spec.n)
            if not 0 <= lo <= hi:
                raise ValueError("n must be >= 0 (a range: 0 <= lo <= hi)")
        with self._lock:
            self._fault_ids += 1
            fault = Fault(self, self._fault_ids, spec, probability, match, times, skip, self.seed)
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            fault.active = False
            if fault in self._faults:
                self._faults.remove(fault)

    def clear(self) -> None:
        """Remove every fault rule (blackholed connections stay dead; see Blackhole)."""
        with self._lock:
            for fault in self._faults:
                fault.active = False
            self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def set_upstream(self, upstream: tuple[str, int]) -> None:
        """Point new connections at another upstream (e.g. a restarted server)."""
        self.upstream = upstream

    # Helpers: one per fault kind. The rule arguments (probability, match, times, skip) are as for add().

    def delay(self, seconds: float, per: Literal["chunk", "message", "connection"] = "chunk",
              direction: Direction | str = Direction.UP, *, probability: float = 1.0, match: Match = None,
              times: int | None = None, skip: int = 0) -> Fault:
        return self.add(Delay(seconds, per, Direction(direction)), probability, match, times, skip)

    def reset_after_bytes(self, n: int | tuple[int, int], direction: Direction | str = Direction.UP, *,
                          probability: float = 1.0, match: Match = None, times: int | None = None,
                          skip: int = 0) -> Fault:
        return self.add(ResetAfterBytes(n, Direction(direction)), probability, match, times, skip)

    def reset_before_response(self, *, probability: float = 1.0, match: Match = None, times: int | None = None,
                              skip: int = 0) -> Fault:
        return self.add(ResetBeforeResponse(), probability, match, times, skip)

    def blackhole(self, new_only: bool = False, *, probability: float = 1.0, match: Match = None,
                  times: int | None = None, skip: int = 0) -> Fault:
        return self.add(Blackhole(new_only), probability, match, times, skip)

    def flip_byte(self, after: int = 0, in_body: bool = True, direction: Direction | str = Direction.UP, *,
                  probability: float = 1.0, match: Match = None, times: int | None = None, skip: int = 0) -> Fault:
        return self.add(FlipByte(after, in_body, Direction(direction)), probability, match, times, skip)

    def refuse(self, rst: bool = True, *, probability: float = 1.0, times: int | None = None,
               skip: int = 0) -> Fault:
        return self.add(Refuse(rst), probability, None, times, skip)

    def respond(self, response: bytes, *, probability: float = 1.0, match: Match = None, times: int | None = None,
                skip: int = 0) -> Fault:
        return self.add(Respond(response), probability, match, times, skip)

    # ---- observations (any thread) ----------------------------------------------------------------------

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(faults=dict(self._fault_counts), active_connections=len(self._conns), **self._counts)

    @property
    def events(self) -> list[FaultEvent]:
        with self._lock:
            return list(self._events)

    @property
    def messages(self) -> list[MessageRecord]:
        with self._lock:
            return list(self._records)

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_stats()

    def _reset_stats(self) -> None:
        self._counts = dict.fromkeys(
            ("connections", "bytes_from_client", "bytes_to_upstream", "bytes_from_upstream", "bytes_to_client",
             "messages", "responses", "upstream_connect_failures"), 0)
        self._fault_counts: dict[str, int] = {}
        self._events: list[FaultEvent] = []
        self._records: list[MessageRecord] = []

    def disconnect_all(self) -> int:
        """RST every open connection now (a network flap). Returns how many were reset."""
        return self.call(self._disconnect_all())

    async def _disconnect_all(self) -> int:
        conns = list(self._conns.values())
        for conn in conns:
            rst(conn.client_w)
            rst(conn.up_w)
        return len(conns)

    # ---- loop side ----------------------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _inject(self, fault: Fault, conn: _Conn, msg: Message | None, detail: str = "",
                plan: _Plan | None = None) -> None:
        with self._lock:
            if plan is not None and fault in plan.reserved:
                plan.reserved.remove(fault)
                fault._release()
            fault.injected += 1
            self._fault_counts[fault.kind] = self._fault_counts.get(fault.kind, 0) + 1
            self._events.append(FaultEvent(time.monotonic(), fault.kind, fault.id, conn.id,
                                           msg.index if msg is not None else None, detail))

    def _release(self, plan: _Plan, keep: Callable[[Fault], bool] = lambda f: False) -> None:
        """Give back reservations of faults that can no longer fire for this message."""
        with self._lock:
            for fault in list(plan.reserved):
                if not keep(fault):
                    plan.reserved.remove(fault)
                    fault._release()

    def _snapshot(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._conn_ids += 1
            conn = _Conn(self._conn_ids, reader, writer)
            self._counts["connections"] += 1
            self._conns[conn.id] = conn
        try:
            await self._serve(conn)
        finally:
            for plan in conn.plans:
                self._release(plan)
            with self._lock:
                self._conns.pop(conn.id, None)
            task = conn.down_task
            if task is not None:
                if not task.done():
                    task.cancel()
                    await asyncio.wait({task})
                if not task.cancelled() and task.exception() is not None:
                    self.internal_errors.append(task.exception())  # type: ignore[arg-type]
            if conn.up_w is not None:
                conn.up_w.transport.abort()

    async def _serve(self, conn: _Conn) -> None:
        if await self._connection_faults(conn):
            return
        conn.req_framer, conn.resp_framer = self._framers(conn)
        if not conn.blackholed:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    conn.up_r, conn.up_w = await asyncio.open_connection(*self.upstream)
            except (OSError, TimeoutError):
                # Upstream down: the client sees a reset, as if the far end refused.
                self._count("upstream_connect_failures")
                rst(conn.client_w)
                return
            conn.down_task = asyncio.create_task(self._pump_down(conn))
        outcome = await self._pump_up(conn)
        if outcome == "eof" and not conn.blackholed and conn.down_task is not None:
            # Client half-closed: let the upstream finish answering.
            await asyncio.wait({conn.down_task})
        elif outcome != "eof":
            rst(conn.client_w)
            rst(conn.up_w)

    async def _connection_faults(self, conn: _Conn) -> bool:
        """Decide connection-scoped faults. True if the connection is finished (refused)."""
        for fault in self._snapshot():
            spec = fault.spec
            if not _connection_scoped(spec, fault.match) and not _global(spec, fault.match):
                continue
            if _global(spec, fault.match):
                conn.seen_global.add(fault.id)
            with self._lock:
                taken = fault._take()
            if not taken:
                continue
            if isinstance(spec, Refuse):
                self._inject(fault, conn, None, "rst" if spec.rst else "fin")
                with self._lock:
                    fault._release()
                if spec.rst:
                    rst(conn.client_w)
                else:
                    conn.client_w.close()
                return True
            if isinstance(spec, Blackhole):
                conn.blackholed = True
                self._inject(fault, conn, None, "new connection")
                with self._lock:
                    fault._release()
            elif isinstance(spec, Delay):
                self._inject(fault, conn, None, f"{spec.seconds}s at accept")
                with self._lock:
                    fault._release()
                await asyncio.sleep(spec.seconds)
        return False

    def _check_global(self, conn: _Conn) -> None:
        """Blackholes of open connections: each connection draws once per rule, at its next byte."""
        if conn.blackholed:
            return
        for fault in self._snapshot():
            if fault.id in conn.seen_global or not _global(fault.spec, fault.match):
                continue
            conn.seen_global.add(fault.id)
            with self._lock:
                taken = fault._take()
            if taken:
                conn.blackholed = True
                self._inject(fault, conn, None, "open connection")
                with self._lock:
                    fault._release()
                return

    def _framers(self, conn: _Conn) -> tuple[Any, Any]:
        def request() -> Message | None:
            return conn.pending[0] if conn.pending else None

        def done() -> None:
            if conn.pending:
                conn.pending.popleft()

        def orphan() -> Message:
            return Message(conn.id, -1, head=b"")

        if self.protocol is Protocol.HTTP:
            return HttpRequestFramer(conn.id), HttpResponseFramer(request, done, orphan)
        if self.protocol is Protocol.MONGO:
            return MongoRequestFramer(conn.id), MongoResponseFramer(request, done, orphan)
        return RawRequestFramer(conn.id), RawResponseFramer(request, orphan)

    # -- client → upstream

    async def _pump_up(self, conn: _Conn) -> str:
        req_framer = conn.req_framer
        try:
            while True:
                data = await conn.client_r.read(CHUNK)
                if data:
                    self._count("bytes_from_client", len(data))
                segments = req_framer.feed(data) if data else req_framer.feed_eof()
                for seg in segments:
                    await self._up_segment(conn, seg)
                if not data:
                    if conn.up_w is not None and not conn.blackholed and conn.up_w.can_write_eof():
                        conn.up_w.write_eof()
                    return "eof"
        except _Closed:
            return "closed"
        except (ConnectionError, OSError):
            return "error"

    def _plan(self, conn: _Conn, msg: Message) -> _Plan:
        plan = _Plan()
        for fault in self._snapshot():
            spec = fault.spec
            if _connection_scoped(spec, fault.match) or _global(spec, fault.match) or not fault.matches(msg):
                continue
            with self._lock:
                if not fault._take():
                    continue
                plan.reserved.append(fault)
            used = True
            if isinstance(spec, Delay):
                plan.delays.append((fault, spec))
            elif isinstance(spec, ResetAfterBytes):
                n = fault.rng.randint(*spec.n) if isinstance(spec.n, tuple) else spec.n
                for d in (Direction.UP, Direction.DOWN):
                    if spec.direction.covers(d) and d not in plan.resets:
                        plan.resets[d] = (fault, n)
            elif isinstance(spec, ResetBeforeResponse) and plan.lose_response is None:
                plan.lose_response = fault
            elif isinstance(spec, Blackhole) and plan.blackhole is None:
                plan.blackhole = fault
            elif isinstance(spec, FlipByte) and spec.direction not in plan.flips:
                plan.flips[spec.direction] = _Flip(fault, spec)
            elif isinstance(spec, Respond) and plan.respond is None:
                plan.respond = (fault, spec)
            else:
                used = False  # an earlier rule of the same kind already applies
            if not used:
                with self._lock:
                    plan.reserved.remove(fault)
                    fault._release()
                    fault.fired -= 1
        return plan

    async def _up_segment(self, conn: _Conn, seg: Segment) -> None:
        msg = seg.msg
        if seg.start and msg.state is None:
            plan = self._plan(conn, msg)
            msg.state = plan
            conn.plans.append(plan)
            plan.record = MessageRecord(time.monotonic(), conn.id, msg.index, msg.method, msg.target,
                                        msg.content_length, [f.kind for f in plan.reserved])
            with self._lock:
                self._counts["messages"] += 1
                self._records.append(plan.record)
            if msg.expects_response and plan.respond is None and plan.blackhole is None and not conn.blackholed:
                conn.pending.append(msg)
        plan: _Plan = msg.state
        self._check_global(conn)
        if conn.blackholed:
            return
        if plan.blackhole is not None:
            conn.blackholed = True
            self._inject(plan.blackhole, conn, msg, msg.start_line, plan)
            return
        if plan.respond is not None:
            await self._respond(conn, seg, plan)
            return
        await self._delays(conn, plan, seg, Direction.UP)
        data = self._flip(conn, plan, seg, Direction.UP)
        reset = plan.resets.get(Direction.UP)
        if reset is not None and seg.offset + len(data) >= reset[1]:
            fault, n = reset
            await self._write_up(conn, plan, data[: n - seg.offset])
            self._inject(fault, conn, msg, f"after {n} request bytes", plan)
            rst(conn.client_w)
            # The upstream gets what was forwarded, then EOF: it sees a truncated request.
            assert conn.up_w is not None
            conn.up_w.close()
            raise _Closed
        await self._write_up(conn, plan, data)
        if seg.end:
            # Faults that act only on the request can no longer fire for this message.
            self._release(plan, keep=lambda f: _acts_down(f.spec))

    async def _write_up(self, conn: _Conn, plan: _Plan, data: bytes) -> None:
        if not data:
            return
        assert conn.up_w is not None
        # Count before the write: once the peer has the bytes, a test may read the counters.
        self._count("bytes_to_upstream", len(data))
        if plan.record is not None:
            plan.record.bytes_up += len(data)
        conn.up_w.write(data)
        await conn.up_w.drain()

    async def _respond(self, conn: _Conn, seg: Segment, plan: _Plan) -> None:
        assert plan.respond is not None
        fault, spec = plan.respond
        if seg.start and seg.msg.expect_continue and not seg.end:
            await self._write_client(conn, plan, CONTINUE_100)
        if not seg.end:
            return
        self._inject(fault, conn, seg.msg, spec.response.split(b"\r\n", 1)[0].decode("latin-1"), plan)
        if plan.record is not None:
            plan.record.status = _status(spec.response)
            plan.record.complete = True
        await self._write_client(conn, plan, spec.response)
        head = spec.response.split(b"\r\n\r\n", 1)[0].lower()
        if b"\r\nconnection: close" in head:
            conn.client_w.close()
            raise _Closed

    # -- upstream → client

    async def _pump_down(self, conn: _Conn) -> str:
        assert conn.up_r is not None
        framer = conn.resp_framer
        try:
            while True:
                data = await conn.up_r.read(CHUNK)
                if data:
                    self._count("bytes_from_upstream", len(data))
                for seg in framer.feed(data) if data else framer.feed_eof():
                    await self._down_segment(conn, seg)
                if not data:
                    if not conn.blackholed and conn.client_w.can_write_eof() and not conn.client_w.is_closing():
                        conn.client_w.write_eof()
                    return "eof"
        except _Closed:
            rst(conn.up_w)
            return "closed"
        except (ConnectionError, OSError):
            rst(conn.client_w)
            return "error"

    async def _down_segment(self, conn: _Conn, seg: Segment) -> None:
        msg = seg.msg
        plan: _Plan = msg.state if isinstance(msg.state, _Plan) else _EMPTY
        self._check_global(conn)
        if conn.blackholed:
            return
        if seg.interim:
            await self._delays(conn, plan, seg, Direction.DOWN)
            await self._write_client(conn, plan, seg.data)
            return
        if plan.lose_response is not None:
            # Raw streams have no response boundary: the first byte back is proof enough of the work done.
            if seg.end or self.protocol is Protocol.RAW:
                self._inject(plan.lose_response, conn, msg, msg.start_line, plan)
                self._count("responses")
                rst(conn.client_w)
                raise _Closed
            return
        await self._delays(conn, plan, seg, Direction.DOWN)
        data = self._flip(conn, plan, seg, Direction.DOWN)
        reset = plan.resets.get(Direction.DOWN)
        if reset is not None and seg.offset + len(data) >= reset[1]:
            fault, n = reset
            await self._write_client(conn, plan, data[: n - seg.offset])
            self._inject(fault, conn, msg, f"after {n} response bytes", plan)
            rst(conn.client_w)
            raise _Closed
        if seg.start and plan.record is not None:
            plan.record.status = seg.status
        if seg.end:
            self._count("responses")
            if plan.record is not None:
                plan.record.complete = True
            self._release(plan)
        await self._write_client(conn, plan, data)

    async def _write_client(self, conn: _Conn, plan: _Plan, data: bytes) -> None:
        if not data:
            return
        self._count("bytes_to_client", len(data))
        if plan.record is not None:
            plan.record.bytes_down += len(data)
        conn.client_w.write(data)
        await conn.client_w.drain()

    # -- shared fault effects

    async def _delays(self, conn: _Conn, plan: _Plan, seg: Segment, direction: Direction) -> None:
        for fault, spec in plan.delays:
            if not spec.direction.covers(direction):
                continue
            if spec.per == "chunk" or (spec.per == "message" and seg.start):
                if fault in plan.reserved:
                    self._inject(fault, conn, seg.msg, f"{spec.seconds}s per {spec.per}", plan)
                await asyncio.sleep(spec.seconds)

    def _flip(self, conn: _Conn, plan: _Plan, seg: Segment, direction: Direction) -> bytes:
        flip = plan.flips.get(direction)
        data = seg.data
        if flip is None or flip.done or seg.interim or not data:
            return data
        spec = flip.spec
        if spec.in_body:
            base, total = seg.body_offset, seg.body_length
            if seg.part is not Part.BODY:
                base = None
        else:
            base, total = seg.offset, seg.length
        if flip.target is None:
            if total is not None:
                if spec.after >= total:
                    flip.done = True  # too short to flip: the rule did not fire
                    self._release(plan, keep=lambda f: f is not flip.fault)
                    return data
                flip.target = flip.fault.rng.randrange(spec.after, total)
            elif base is not None and base + len(data) > spec.after:
                flip.target = flip.fault.rng.randrange(max(spec.after, base), base + len(data))
        if flip.target is None or base is None or not base <= flip.target < base + len(data):
            return data
        i = flip.target - base
        mask = flip.fault.rng.randrange(1, 256)
        out = bytearray(data)
        old = out[i]
        out[i] ^= mask
        flip.done = True
        where = "body" if spec.in_body else "message"
        self._inject(flip.fault, conn, seg.msg, f"{direction} {where} offset {flip.target}: {old:#04x}->{out[i]:#04x}",
                     plan)
        return bytes(out)


def _status(response: bytes) -> int | None:
    parts = response.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _connection_scoped(spec: FaultSpec, match: Match) -> bool:
    return (isinstance(spec, Refuse) or (isinstance(spec, Blackhole) and spec.new_only)
            or (isinstance(spec, Delay) and spec.per == "connection"))


def _global(spec: FaultSpec, match: Match) -> bool:
    """Blackhole of everything, open connections included."""
    return isinstance(spec, Blackhole) and not spec.new_only and match is None


def _acts_down(spec: FaultSpec) -> bool:
    if isinstance(spec, ResetBeforeResponse):
        return True
    if isinstance(spec, Delay | ResetAfterBytes | FlipByte):
        return spec.direction.covers(Direction.DOWN)
    return False
