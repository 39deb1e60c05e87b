"""The fault-injection tooling's own tests: framers, FaultProxy (raw/http/mongo), dead and erroring servers.

Upstreams: a TCP echo server, a keep-alive HTTP server that records what it received (moto closes every
connection after one response, so it cannot show per-request faults on a shared connection), moto's server
with boto3 and aiobotocore, and SecantusDB with pymongo.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import aiobotocore.session
import boto3
import botocore.exceptions
import pymongo
import pytest
from botocore.config import Config
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.faults import (
    BlackholeServer,
    FaultProxy,
    Protocol,
    Refuse,
    RequestLog,
    S3ErrorServer,
    mongo_command,
)
from tests.faults import http_faults as H
from tests.faults.framing import (
    HttpRequestFramer,
    HttpResponseFramer,
    Message,
    MongoRequestFramer,
    MongoResponseFramer,
    Part,
    Segment,
    mongo_command_name,
)
from tests.faults.threaded import ThreadedServer
from tests.fixtures.faults import address_of, mongo_uri_via

pytestmark = pytest.mark.timeout(60)

# ---- upstreams ---------------------------------------------------------------------------------------------


class EchoServer(ThreadedServer):
    """Echoes every byte back; records what it received per connection, and how many connections ended (what
    a connection received is complete only then: the server's thread may read it after the proxy is done)."""

    name = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.received: list[bytearray] = []
        self.ended = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        self.received.append(buf)
        try:
            while data := await reader.read(65536):
                buf += data
                writer.write(data)
                await writer.drain()
        finally:
            self.ended += 1


@dataclass
class Received:
    method: str
    target: str
    head: bytes
    body: bytes = b""


@dataclass
class HttpUpstream(ThreadedServer):
    """Keep-alive HTTP/1.1 server: answers 200 with the SHA256 hex of the decoded body; records requests.

    Honours Expect: 100-continue. `GET /chunked` answers with a chunked body."""

    requests: list[Received] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        framer = HttpRequestFramer(self.connections)
        current: dict[int, Received] = {}
        while data := await reader.read(65536):
            for seg in framer.feed(data):
                msg = seg.msg
                if seg.start:
                    current[id(msg)] = Received(msg.method or "?", msg.target or "", msg.head)
                    if msg.expect_continue and not seg.end:
                        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                rec = current[id(msg)]
                if seg.part is Part.BODY:
                    rec.body += seg.data
                if seg.end:
                    self.requests.append(rec)
                    if msg.target == "/chunked":
                        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-T: 1\r\n\r\n")
                    else:
                        digest = hashlib.sha256(rec.body).hexdigest().encode()
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(digest), digest))
            await writer.drain()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


@pytest.fixture
def upstream() -> Iterator[HttpUpstream]:
    with HttpUpstream() as server:
        yield server


def _address(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url)
    assert parsed.hostname and parsed.port
    return parsed.hostname, parsed.port


@pytest.fixture
def bucket(s3_bucket: tuple[str, str]) -> str:
    return s3_bucket[1]


@pytest.fixture
def s3_proxy(s3_fault_proxy: FaultProxy, s3_bucket: tuple[str, str]) -> FaultProxy:
    assert s3_fault_proxy.upstream == _address(s3_bucket[0])
    return s3_fault_proxy


@pytest.fixture
def direct_s3(moto_server: str):
    return _s3(moto_server)


def _s3(endpoint: str, timeout: float = 5, retries: int = 0, **config: object):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(connect_timeout=timeout, read_timeout=timeout,
                      retries={"max_attempts": retries, "mode": "standard"}, **config),
    )


def _connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=timeout)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


# ---- framers -----------------------------------------------------------------------------------------------

REQUESTS = (
    b"PUT /b/k?partNumber=1&uploadId=u HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world"
    b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\n"
    b"\r\n"  # a stray empty line between requests is allowed
    b"POST /b/k?uploadId=u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nX-Trailer: t\r\n\r\n"
    b"PUT /b/e HTTP/1.1\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n"
)


def _frame_requests(data: bytes, cuts: list[int]) -> list[Segment]:
    framer = HttpRequestFramer(1)
    segments: list[Segment] = []
    pos = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        segments += framer.feed(data[pos:cut])
        pos = cut
    return segments


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(REQUESTS)), max_size=12))
def test_http_request_framer_any_split(cuts: list[int]) -> None:
    segments = _frame_requests(REQUESTS, cuts)
    assert b"".join(s.data for s in segments) == REQUESTS
    messages: list[Message] = []
    bodies: dict[int, bytes] = {}
    for seg in segments:
        if seg.start:
            messages.append(seg.msg)
            assert seg.part is Part.HEAD and seg.offset == 0
        if seg.part is Part.BODY:
            assert seg.body_offset == len(bodies.get(seg.msg.index, b""))
            bodies[seg.msg.index] = bodies.get(seg.msg.index, b"") + seg.data
    assert [(m.method, m.target) for m in messages] == [
        ("PUT", "/b/k?partNumber=1&uploadId=u"), ("GET", "/b/k"), ("POST", "/b/k?uploadId=u"), ("PUT", "/b/e")]
    assert [m.content_length for m in messages] == [11, 0, None, 0]
    assert messages[2].chunked and messages[3].expect_continue
    assert bodies == {0: b"hello world", 2: b"abcdefg"}
    assert sum(s.end for s in segments) == 4
    # offsets are contiguous within each message
    for m in messages:
        segs = [s for s in segments if s.msg is m]
        assert [s.offset for s in segs] == [sum(len(x.data) for x in segs[:i]) for i in range(len(segs))]


def test_http_response_framer() -> None:
    pending = [Message(1, i, b"", method=m) for i, m in enumerate(["PUT", "HEAD", "GET", "DELETE", "GET"])]
    finished: list[int] = []

    def done() -> None:
        finished.append(pending.pop(0).index)

    framer = HttpResponseFramer(lambda: pending[0] if pending else None, done, lambda: Message(1, -1, b""))
    stream = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
        b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n"  # HEAD: no body whatever the length says
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n"
        b"HTTP/1.1 200 OK\r\n\r\nuntil-close"
    )
    segments = [seg for i in range(len(stream)) for seg in framer.feed(stream[i:i + 1])] + framer.feed_eof()
    assert b"".join(s.data for s in segments) == stream
    assert finished == [0, 1, 2, 3, 4]
    interim = [s for s in segments if s.interim]
    assert len(interim) == 1 and interim[0].status == 100 and interim[0].msg.index == 0
    assert [s.status for s in segments if s.start and not s.interim] == [200, 200, 200, 204, 200]
    body = {i: b"".join(s.data for s in segments if s.msg.index == i and s.part is Part.BODY) for i in range(5)}
    assert body == {0: b"abc", 1: b"", 2: b"hi", 3: b"", 4: b"until-close"}
    assert segments[-1].end and segments[-1].msg.index == 4


def test_http_framer_garbage_passes_through() -> None:
    framer = HttpRequestFramer(1)
    data = b"\x16\x03\x01 not http at all\r\n\r\nmore"
    segs = framer.feed(data) + framer.feed(b"tail")
    assert b"".join(s.data for s in segs) == data + b"tail"
    assert segs[0].start and segs[0].msg.method is None


def _op_msg(doc_name: str, more_to_come: bool = False, pad: int = 0) -> bytes:
    # A minimal OP_MSG: header, flagBits, kind-0 section with {doc_name: "coll", "x": <pad bytes>}.
    elems = b"\x02" + doc_name.encode() + b"\x00" + struct.pack("<i", 5) + b"coll\x00"
    elems += b"\x05x\x00" + struct.pack("<i", pad) + b"\x00" + b"p" * pad
    doc = struct.pack("<i", 4 + len(elems) + 1) + elems + b"\x00"
    body = struct.pack("<I", 2 if more_to_come else 0) + b"\x00" + doc
    return struct.pack("<iiii", 16 + len(body), 1, 0, 2013) + body


def test_mongo_framers() -> None:
    stream = _op_msg("insert", pad=40_000) + _op_msg("update", more_to_come=True) + _op_msg("find")
    framer = MongoRequestFramer(1)
    segs = [seg for i in range(0, len(stream), 777) for seg in framer.feed(stream[i:i + 777])]
    assert b"".join(s.data for s in segs) == stream
    msgs = [s.msg for s in segs if s.start]
    assert [m.method for m in msgs] == ["insert", "update", "find"]
    assert [m.expects_response for m in msgs] == [True, False, True]
    assert msgs[0].length == len(_op_msg("insert", pad=40_000)) and len(msgs[0].head) == 16 * 1024
    assert mongo_command("insert").search(msgs[0].head) and not mongo_command("insert").search(msgs[2].head)
    assert mongo_command_name(b"junk") is None

    pending = [msgs[0], msgs[2]]
    done: list[str | None] = []
    rframer = MongoResponseFramer(lambda: pending[0] if pending else None,
                                  lambda: done.append(pending.pop(0).method), lambda: Message(1, -1, b""))
    replies = _op_msg("ok") + _op_msg("ok")
    rsegs = rframer.feed(replies[:10]) + rframer.feed(replies[10:])
    assert b"".join(s.data for s in rsegs) == replies
    assert done == ["insert", "find"]


# ---- raw TCP proxy -----------------------------------------------------------------------------------------


def test_raw_passthrough_and_counters(echo: EchoServer) -> None:
    with FaultProxy(echo.address) as proxy:
        for _ in range(3):
            with _connect(proxy) as sock:
                sock.sendall(b"x" * 100_000)
                assert _recv_exactly(sock, 100_000) == b"x" * 100_000
        _wait_for(lambda: proxy.stats().active_connections == 0)
        stats = proxy.stats()
    assert stats.connections == 3 and stats.messages == 3
    assert stats.bytes_from_client == stats.bytes_to_upstream == stats.bytes_up == 300_000
    assert stats.bytes_from_upstream == stats.bytes_to_client == stats.bytes_down == 300_000
    assert stats.faults == {}


@pytest.mark.parametrize("n", [0, 1, 5000])
def test_raw_reset_after_bytes_up(echo: EchoServer, n: int) -> None:
    with FaultProxy(echo.address) as proxy:
        fault = proxy.reset_after_bytes(n)
        with _connect(proxy) as sock, pytest.raises(ConnectionResetError):
            sock.sendall(b"y" * 20_000)
            while sock.recv(65536):
                pass
        _wait_for(lambda: fault.injected == 1)
        _wait_for(lambda: echo.ended == 1 and proxy.stats().active_connections == 0)
        assert bytes(echo.received[0]) == b"y" * n  # the upstream got exactly n bytes, then EOF
        assert proxy.stats().bytes_to_upstream == n and proxy.stats().faults == {"reset_after_bytes": 1}


def test_raw_reset_at_random_point_and_wait(echo: EchoServer) -> None:
    with FaultProxy(echo.address, seed=4) as proxy:
        fault = proxy.reset_after_bytes((100, 900))
        for _ in range(5):
            with pytest.raises(ConnectionResetError), _connect(proxy) as sock:
                sock.sendall(b"r" * 1000)
                while sock.recv(65536):
                    pass
        fault.wait(5)
        _wait_for(lambda: echo.ended == 5 and proxy.stats().active_connections == 0)
    sizes = [len(r) for r in echo.received]
    assert all(100 <= n <= 900 for n in sizes) and len(set(sizes)) > 1
    with pytest.raises(TimeoutError):
        fault.wait(6, timeout=0.05)


def test_raw_reset_after_bytes_down_and_short_message(echo: EchoServer) -> None:
    with FaultProxy(echo.address) as proxy:
        fault = proxy.reset_after_bytes(1000, direction="down")
        with _connect(proxy) as sock:  # shorter than n: never reset
            sock.sendall(b"z" * 500)
            assert _recv_exactly(sock, 500) == b"z" * 500
        with _connect(proxy) as sock, pytest.raises(ConnectionResetError):
            sock.sendall(b"z" * 5000)
            got = 0
            while chunk := sock.recv(65536):
                got += len(chunk)
            raise AssertionError(f"EOF after {got} bytes instead of a reset")
        _wait_for(lambda: fault.injected == 1)
        assert fault.fired == 2  # decided for both connections, injected once


def test_refuse_rst_and_fin(echo: EchoServer) -> None:
    with FaultProxy(echo.address) as proxy:
        proxy.refuse()
        with pytest.raises(ConnectionResetError), _connect(proxy) as sock:
            sock.sendall(b"a")
            time.sleep(0.05)
            sock.sendall(b"b")
            sock.recv(10)
        proxy.clear()
        proxy.refuse(rst=False)
        with _connect(proxy) as sock:
            assert sock.recv(10) == b""
        assert proxy.stats().faults == {"refuse": 2}
        assert echo.received == []  # the upstream never saw a connection with data


def test_blackhole_new_only_keeps_open_connections(echo: EchoServer) -> None:
    with FaultProxy(echo.address) as proxy, _connect(proxy) as old:
        old.sendall(b"1")
        assert old.recv(1) == b"1"
        hole = proxy.blackhole(new_only=True)
        with _connect(proxy, timeout=0.3) as new, pytest.raises(TimeoutError):
            new.sendall(b"lost")
            new.recv(10)
        old.sendall(b"2")
        assert old.recv(1) == b"2"
        assert hole.injected == 1
        assert proxy.stats().bytes_to_upstream == 2


def test_blackhole_all_then_recover(echo: EchoServer) -> None:
    with FaultProxy(echo.address) as proxy, _connect(proxy, timeout=0.3) as old:
        old.sendall(b"1")
        assert old.recv(1) == b"1"
        hole = proxy.blackhole()
        old.sendall(b"2")
        with pytest.raises(TimeoutError):
            old.recv(1)
        with _connect(proxy, timeout=0.3) as new, pytest.raises(TimeoutError):
            new.sendall(b"3")
            new.recv(1)
        hole.remove()
        old.sendall(b"4")  # a blackholed connection stays dead ...
        with pytest.raises(TimeoutError):
            old.recv(1)
        with _connect(proxy) as fresh:  # ... new ones work again
            fresh.sendall(b"5")
            assert fresh.recv(1) == b"5"
        assert hole.injected == 2
        assert proxy.stats().bytes_from_client == 5 and proxy.stats().bytes_to_upstream == 2


def test_delay_lower_bounds(echo: EchoServer) -> None:
    with FaultProxy(echo.address) as proxy:
        proxy.delay(0.2, per="connection")
        proxy.delay(0.1, per="chunk", direction="down")
        with _connect(proxy) as sock:
            t0 = time.monotonic()
            sock.sendall(b"ping")
            assert _recv_exactly(sock, 4) == b"ping"
            assert time.monotonic() - t0 >= 0.3
        assert proxy.stats().faults == {"delay": 2}


def test_flip_byte_raw_after_k(echo: EchoServer) -> None:
    data = bytes(range(256)) * 40
    with FaultProxy(echo.address, seed=3) as proxy:
        fault = proxy.flip_byte(after=1000)
        with _connect(proxy) as sock:
            sock.sendall(data)
            back = _recv_exactly(sock, len(data))
    diff = [i for i in range(len(data)) if data[i] != back[i]]
    assert len(diff) == 1 and diff[0] >= 1000
    assert fault.injected == 1 and f"offset {diff[0]}:" in proxy.events[0].detail


def _reset_pattern(echo: EchoServer, seed: int, n: int = 30) -> list[bool]:
    outcome = []
    with FaultProxy(echo.address, seed=seed) as proxy:
        proxy.reset_after_bytes(0, probability=0.5)
        for _ in range(n):
            with _connect(proxy) as sock:
                sock.sendall(b"hi")
                try:
                    outcome.append(_recv_exactly(sock, 2) != b"hi")
                except ConnectionResetError:
                    outcome.append(True)
    return outcome


def test_probability_is_seeded(echo: EchoServer) -> None:
    a, b, c = _reset_pattern(echo, 1), _reset_pattern(echo, 1), _reset_pattern(echo, 2)
    assert a == b  # same seed, same decisions
    assert a != c
    assert 5 <= sum(a) <= 25  # p=0.5 over 30 (fails with probability < 1e-4)


def test_times_and_skip(echo: EchoServer) -> None:
    with FaultProxy(echo.address) as proxy:
        fault = proxy.reset_after_bytes(0, times=2, skip=1)
        results = []
        for _ in range(5):
            with _connect(proxy) as sock:
                sock.sendall(b"hi")
                try:
                    results.append(_recv_exactly(sock, 2) == b"hi")
                except ConnectionResetError:
                    results.append(False)
    assert results == [True, False, False, True, True]
    assert (fault.candidates, fault.fired, fault.injected) == (5, 2, 2)


def test_upstream_down_and_set_upstream(echo: EchoServer) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there now
    with FaultProxy(("127.0.0.1", dead_port)) as proxy:
        with pytest.raises(ConnectionResetError), _connect(proxy) as sock:  # the reset may beat connect()
            sock.sendall(b"x")
            sock.recv(1)
        proxy.set_upstream(echo.address)
        with _connect(proxy) as sock:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        assert proxy.stats().upstream_connect_failures == 1


def test_disconnect_all(echo: EchoServer) -> None:
    with FaultProxy(echo.address) as proxy:
        socks = [_connect(proxy) for _ in range(3)]
        for s in socks:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        assert proxy.disconnect_all() == 3
        for s in socks:
            with pytest.raises(ConnectionResetError):
                s.recv(1)
            s.close()


def test_faults_change_while_traffic_flows(echo: EchoServer) -> None:
    """Rules are added and removed from another thread under load: no crash, counters add up."""
    with FaultProxy(echo.address, seed=5) as proxy:
        stop = threading.Event()

        def toggle() -> None:
            while not stop.is_set():
                f = proxy.reset_after_bytes(10, probability=0.5)
                time.sleep(0.002)
                f.remove()

        t = threading.Thread(target=toggle)
        t.start()
        ok = reset = 0
        try:
            for _ in range(60):
                with _connect(proxy) as sock:
                    try:
                        sock.sendall(b"q" * 100)
                        ok += _recv_exactly(sock, 100) == b"q" * 100
                    except ConnectionResetError:
                        reset += 1
        finally:
            stop.set()
            t.join()
        _wait_for(lambda: proxy.stats().active_connections == 0)
        assert ok + reset == 60
        assert proxy.stats().faults.get("reset_after_bytes", 0) >= reset


# ---- HTTP framing through the proxy (keep-alive upstream) ----------------------------------------------------


_open_http: list[http.client.HTTPConnection] = []


@pytest.fixture(autouse=True)
def _close_http_connections() -> Iterator[None]:
    """Close the test's HTTP connections even when it fails half-way (warnings are errors here)."""
    yield
    while _open_http:
        _open_http.pop().close()


def _http(proxy: FaultProxy) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(*proxy.address, timeout=3)
    _open_http.append(conn)
    return conn


def test_http_keepalive_per_request_match(upstream: HttpUpstream) -> None:
    with FaultProxy(upstream.address, protocol="http") as proxy:
        fault = proxy.reset_after_bytes(10, match=rb"\APUT /only-this ")
        conn = _http(proxy)
        conn.request("PUT", "/first", body=b"a" * 100)
        assert conn.getresponse().read() == hashlib.sha256(b"a" * 100).hexdigest().encode()
        conn.request("GET", "/second")
        conn.getresponse().read()
        with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
            conn.request("PUT", "/only-this", body=b"b" * 100)  # the reset may arrive while sending
            conn.getresponse()
        conn.close()
        _wait_for(lambda: proxy.stats().active_connections == 0)
        records = proxy.messages
    assert upstream.connections == 1  # all three requests shared one connection
    assert [(r.method, r.target, r.faults, r.status) for r in records] == [
        ("PUT", "/first", [], 200), ("GET", "/second", [], 200), ("PUT", "/only-this", ["reset_after_bytes"], None)]
    assert records[2].bytes_up == 10 and fault.injected == 1
    assert [r.target for r in upstream.requests] == ["/first", "/second"]


def test_http_reset_before_response(upstream: HttpUpstream) -> None:
    with FaultProxy(upstream.address, protocol="http") as proxy:
        lost = proxy.reset_before_response(match=b"POST ", times=1)
        conn = _http(proxy)
        body = b"c" * 50_000
        conn.request("POST", "/work", body=body, headers={"Expect": "100-continue"})
        with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
            conn.getresponse()
        conn.close()
        _wait_for(lambda: lost.injected == 1)
        assert upstream.requests[-1].body == body  # the upstream did the work
        conn = _http(proxy)  # times=1: the next one goes through
        conn.request("POST", "/work", body=body)
        assert conn.getresponse().status == 200
        conn.close()
        records = proxy.messages
    assert records[0].bytes_up > len(body) and records[1].bytes_up > len(body)  # whole requests forwarded
    # Only the interim 100 Continue reached the first client.
    assert records[0].bytes_down == len(b"HTTP/1.1 100 Continue\r\n\r\n") and not records[0].complete


@pytest.mark.parametrize("chunked", [False, True])
def test_http_flip_in_body_only(upstream: HttpUpstream, chunked: bool) -> None:
    body = bytes(random.Random(1).randrange(256) for _ in range(30_000))
    with FaultProxy(upstream.address, protocol="http", seed=11) as proxy:
        flip = proxy.flip_byte(in_body=True, match=b"PUT ")
        conn = _http(proxy)
        if chunked:
            conn.request("PUT", "/obj", body=iter([body[:10_000], body[10_000:]]), encode_chunked=True)
        else:
            conn.request("PUT", "/obj", body=body)
        got = conn.getresponse().read()
        conn.request("GET", "/obj")  # the connection and the next request are intact
        conn.getresponse().read()
        conn.close()
    received = upstream.requests[0].body
    assert len(received) == len(body) and got == hashlib.sha256(received).hexdigest().encode()
    assert sum(a != b for a, b in zip(received, body, strict=True)) == 1
    assert flip.injected == 1 and [r.target for r in upstream.requests] == ["/obj", "/obj"]


def test_http_flip_down_and_chunked_response(upstream: HttpUpstream) -> None:
    with FaultProxy(upstream.address, protocol="http", seed=2) as proxy:
        proxy.flip_byte(direction="down", match=b"GET /chunked")
        conn = _http(proxy)
        conn.request("GET", "/chunked")
        got = conn.getresponse().read()
        conn.request("GET", "/chunked-not")
        assert conn.getresponse().status == 200
        conn.close()
    assert len(got) == len(b"hello world") and sum(a != b for a, b in zip(got, b"hello world", strict=True)) == 1


def test_http_respond_canned_error(upstream: HttpUpstream) -> None:
    with FaultProxy(upstream.address, protocol="http") as proxy:
        storm = proxy.respond(H.SLOW_DOWN.response(), match=b"PUT ")
        conn = _http(proxy)
        conn.request("PUT", "/x", body=b"d" * 1000, headers={"Expect": "100-continue"})
        resp = conn.getresponse()
        assert resp.status == 503 and b"<Code>SlowDown</Code>" in resp.read()
        conn.request("GET", "/y")  # keep-alive survives a canned answer
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
        assert storm.injected == 1
        proxy.respond(H.INTERNAL_ERROR.response(close=True), match=b"DELETE ")
        conn.request("DELETE", "/z")
        resp = conn.getresponse()
        assert resp.status == 500 and resp.read()  # ... and then the proxy closed the connection
        conn.request("GET", "/w")  # http.client reconnects
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
        conn.close()
        assert [r.conn_id for r in proxy.messages] == [1, 1, 1, 2]
    assert [r.target for r in upstream.requests] == ["/y", "/w"]


def test_http_delay_per_message_down(upstream: HttpUpstream) -> None:
    with FaultProxy(upstream.address, protocol="http") as proxy:
        proxy.delay(0.3, per="message", direction="down", match=b"GET /slow")
        conn = _http(proxy)
        t0 = time.monotonic()
        conn.request("GET", "/slow")
        conn.getresponse().read()
        assert time.monotonic() - t0 >= 0.3
        conn.close()


def test_internal_errors_are_not_swallowed(echo: EchoServer) -> None:
    proxy = FaultProxy(echo.address).start()
    proxy.delay(0, match=lambda msg: 1 / 0 > 0)  # a bug in a rule (or in the proxy) ...
    with _connect(proxy) as sock:
        sock.sendall(b"x")
        sock.recv(1)
    with pytest.raises(RuntimeError, match="internal error") as err:  # ... fails the test at stop()
        proxy.stop()
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_validation() -> None:
    proxy = FaultProxy(("127.0.0.1", 9))
    with pytest.raises(ValueError):
        proxy.add(Refuse(), match=b"x")
    with pytest.raises(ValueError):
        proxy.reset_after_bytes((5, 2))
    with pytest.raises(ValueError):
        proxy.respond(b"HTTP/1.1 200 OK\r\n\r\n")  # raw protocol
    with pytest.raises(ValueError):
        proxy.reset_after_bytes(1, probability=2)
    with pytest.raises(ValueError):
        proxy.flip_byte(direction="both")


# ---- S3 (moto) through the proxy -----------------------------------------------------------------------------


def test_s3_passthrough(s3_proxy: FaultProxy, bucket: str) -> None:
    s3 = _s3(s3_proxy.url)
    s3.put_object(Bucket=bucket, Key="pass", Body=b"p" * 100_000)
    assert s3.get_object(Bucket=bucket, Key="pass")["Body"].read() == b"p" * 100_000
    stats = s3_proxy.stats()
    assert stats.bytes_to_upstream > 100_000 and stats.bytes_to_client > 100_000 and stats.messages == 2


def test_s3_reset_during_upload_part(s3_proxy: FaultProxy, bucket: str, direct_s3) -> None:
    s3 = _s3(s3_proxy.url)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="mpu-reset")
    fault = s3_proxy.reset_after_bytes(2000, match=H.UPLOAD_PART, times=1)
    part = b"m" * 100_000
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        s3.upload_part(Bucket=bucket, Key="mpu-reset", UploadId=upload["UploadId"], PartNumber=1, Body=part)
    resp = s3.upload_part(Bucket=bucket, Key="mpu-reset", UploadId=upload["UploadId"], PartNumber=1, Body=part)
    parts = direct_s3.list_parts(Bucket=bucket, Key="mpu-reset", UploadId=upload["UploadId"])["Parts"]
    assert [(p["PartNumber"], p["Size"], p["ETag"]) for p in parts] == [(1, len(part), resp["ETag"])]
    records = [r for r in s3_proxy.messages if r.method == "PUT"]
    assert records[0].bytes_up == 2000 and records[1].bytes_up > len(part)  # re-sent bytes, measured
    assert fault.injected == 1
    s3.abort_multipart_upload(Bucket=bucket, Key="mpu-reset", UploadId=upload["UploadId"])


def test_s3_lost_response_put_object(s3_proxy: FaultProxy, bucket: str, direct_s3) -> None:
    s3 = _s3(s3_proxy.url)
    s3_proxy.reset_before_response(match=H.PUT_OBJECT, times=1)
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        s3.put_object(Bucket=bucket, Key="lost", Body=b"L" * 10_000)
    assert direct_s3.get_object(Bucket=bucket, Key="lost")["Body"].read() == b"L" * 10_000


def test_s3_lost_response_complete_multipart(s3_proxy: FaultProxy, bucket: str, direct_s3) -> None:
    s3 = _s3(s3_proxy.url)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="lost-mpu")
    etag = s3.upload_part(Bucket=bucket, Key="lost-mpu", UploadId=upload["UploadId"], PartNumber=1,
                          Body=b"q" * 1000)["ETag"]
    lost = s3_proxy.reset_before_response(match=H.COMPLETE_MULTIPART_UPLOAD, times=1)
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        s3.complete_multipart_upload(Bucket=bucket, Key="lost-mpu", UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    assert lost.injected == 1
    assert direct_s3.get_object(Bucket=bucket, Key="lost-mpu")["Body"].read() == b"q" * 1000


def test_s3_complete_200_with_error_body(s3_proxy: FaultProxy, bucket: str, direct_s3) -> None:
    s3 = _s3(s3_proxy.url)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="err200")
    etag = s3.upload_part(Bucket=bucket, Key="err200", UploadId=upload["UploadId"], PartNumber=1,
                          Body=b"e" * 1000)["ETag"]
    s3_proxy.respond(H.COMPLETE_200_INTERNAL_ERROR.response(), match=H.COMPLETE_MULTIPART_UPLOAD, times=1)
    args = dict(Bucket=bucket, Key="err200", UploadId=upload["UploadId"],
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    with pytest.raises(botocore.exceptions.ClientError) as err:
        s3.complete_multipart_upload(**args)
    assert err.value.response["Error"]["Code"] == "InternalError"
    with pytest.raises(botocore.exceptions.ClientError):
        direct_s3.head_object(Bucket=bucket, Key="err200")  # not completed
    s3.complete_multipart_upload(**args)
    assert direct_s3.get_object(Bucket=bucket, Key="err200")["Body"].read() == b"e" * 1000


def test_s3_flip_in_body_corrupts_stored_object(s3_proxy: FaultProxy, bucket: str, direct_s3) -> None:
    body = bytes(random.Random(2).randrange(256) for _ in range(50_000))
    flip = s3_proxy.flip_byte(in_body=True, match=H.PUT_OBJECT)
    # botocore sends x-amz-checksum-crc32 of the real body; moto stores it with the corrupted bytes unchecked.
    _s3(s3_proxy.url).put_object(Bucket=bucket, Key="flipped", Body=body)
    assert flip.injected == 1
    with pytest.raises(botocore.exceptions.FlexibleChecksumError):  # only a checksum-validating GET notices
        direct_s3.get_object(Bucket=bucket, Key="flipped")["Body"].read()
    raw = _s3(direct_s3.meta.endpoint_url, response_checksum_validation="when_required")
    stored = raw.get_object(Bucket=bucket, Key="flipped")["Body"].read()
    assert len(stored) == len(body) and sum(a != b for a, b in zip(stored, body, strict=True)) == 1


def test_s3_blackhole_times_out(s3_proxy: FaultProxy, bucket: str) -> None:
    s3 = _s3(s3_proxy.url, timeout=1)
    s3_proxy.blackhole()
    t0 = time.monotonic()
    with pytest.raises((botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
        s3.put_object(Bucket=bucket, Key="hole", Body=b"h" * 1000)
    assert time.monotonic() - t0 < 10  # bounded by the client's own timeouts, not hung
    assert s3_proxy.stats().bytes_to_upstream == 0


async def test_aiobotocore_through_proxy(s3_proxy: FaultProxy, bucket: str, direct_s3) -> None:
    session = aiobotocore.session.get_session()
    cfg = Config(connect_timeout=5, read_timeout=5, retries={"max_attempts": 0})
    async with session.create_client("s3", endpoint_url=s3_proxy.url, region_name="us-east-1",
                                     aws_access_key_id="testing", aws_secret_access_key="testing",
                                     config=cfg) as s3:
        async with asyncio.timeout(10):
            await s3.put_object(Bucket=bucket, Key="async", Body=b"A" * 200_000)
        lost = s3_proxy.reset_before_response(match=H.PUT_OBJECT)
        with pytest.raises(Exception) as err:  # aiohttp's ServerDisconnectedError or botocore's wrapper
            async with asyncio.timeout(10):
                await s3.put_object(Bucket=bucket, Key="async-lost", Body=b"B" * 1000)
        assert not isinstance(err.value, TimeoutError)
        # aiohttp 3.14 re-sends an idempotent request (PUT/GET/HEAD/DELETE) once by itself after a disconnect,
        # even with max_attempts=0 and on a fresh connection: one lost response = two PUTs upstream.
        assert lost.injected == 2
    assert direct_s3.get_object(Bucket=bucket, Key="async")["Body"].read() == b"A" * 200_000
    assert direct_s3.get_object(Bucket=bucket, Key="async-lost")["Body"].read() == b"B" * 1000


# ---- dead and erroring endpoints -----------------------------------------------------------------------------


def test_blackhole_server_boto3_times_out(blackhole_server: BlackholeServer) -> None:
    hole = blackhole_server
    s3 = _s3(hole.url, timeout=1)
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        s3.put_object(Bucket="faults", Key="k", Body=b"x" * 1000)
    assert hole.connections == 1 and hole.bytes_received > 0


async def test_blackhole_server_aiobotocore_needs_outer_deadline(blackhole_server: BlackholeServer) -> None:
    """The FIELD-NOTES hang: Expect: 100-continue is never answered; only an outer deadline ends the call."""
    hole = blackhole_server
    session = aiobotocore.session.get_session()
    cfg = Config(connect_timeout=1, read_timeout=1, retries={"max_attempts": 0})
    async with session.create_client("s3", endpoint_url=hole.url, region_name="us-east-1",
                                     aws_access_key_id="testing", aws_secret_access_key="testing",
                                     config=cfg) as s3:
        t0 = time.monotonic()
        with pytest.raises((TimeoutError, botocore.exceptions.ReadTimeoutError)):
            async with asyncio.timeout(1.5):
                await s3.put_object(Bucket="faults", Key="k", Body=b"x" * 1000)
        assert time.monotonic() - t0 < 5


def test_s3_error_server_statuses_and_rate(s3_error_server: Callable[..., S3ErrorServer]) -> None:
    storm = s3_error_server(H.SLOW_DOWN)
    s3 = _s3(storm.url, retries=2)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        s3.put_object(Bucket="faults", Key="k", Body=b"x" * 100_000)
    assert err.value.response["Error"]["Code"] == "SlowDown"
    assert len(storm.requests) == 3  # standard mode retried twice
    assert all(r.method == "PUT" and r.status == 503 for r in storm.requests)
    assert 1 <= storm.max_rate(window=10) <= 3
    storm.set_error(H.ACCESS_DENIED)
    storm.clear()
    with pytest.raises(botocore.exceptions.ClientError) as err:
        s3.get_object(Bucket="faults", Key="k")
    assert err.value.response["Error"]["Code"] == "AccessDenied" and len(storm.requests) == 1
    storm.set_error(H.COMPLETE_200_INTERNAL_ERROR)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        _s3(storm.url).complete_multipart_upload(Bucket="faults", Key="k", UploadId="u",
                                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": "e"}]})
    assert err.value.response["Error"]["Code"] == "InternalError"


def test_max_rate() -> None:
    server = S3ErrorServer(H.SLOW_DOWN)
    server._requests = [RequestLog(t, "GET", "/", 503) for t in (0.0, 0.1, 0.2, 1.5, 1.6, 5.0)]
    assert server.max_rate(1.0) == 3 and server.max_rate(0.05) == 1 and server.max_rate(10) == 6


# ---- MongoDB (SecantusDB) through the proxy ------------------------------------------------------------------


def test_mongo_lost_reply_to_insert(mongo_fault_proxy: FaultProxy, mongo_uri: str, mongo_db_name: str) -> None:
    proxy = mongo_fault_proxy
    assert proxy.protocol is Protocol.MONGO
    client = pymongo.MongoClient(mongo_uri_via(proxy, mongo_uri), serverSelectionTimeoutMS=3000,
                                 socketTimeoutMS=3000, retryWrites=False)
    try:
        coll = client[mongo_db_name].docs
        coll.insert_one({"_id": 1})
        lost = proxy.reset_before_response(match=mongo_command("insert"), times=1)
        with pytest.raises(pymongo.errors.AutoReconnect):
            coll.insert_one({"_id": 2})
        assert lost.injected == 1
        assert sorted(d["_id"] for d in coll.find()) == [1, 2]  # applied, though the client never heard
        assert [r.method for r in proxy.messages].count("insert") == 2
    finally:
        client.close()


def test_fixture_helpers() -> None:
    assert address_of("http://127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert address_of("mongodb://u:p@h1:27017,h2:27018/db?replicaSet=rs") == ("h1", 27017)
    assert address_of(("x", 1)) == ("x", 1)
    proxy = FaultProxy(("h1", 27017))
    proxy.port = 4242
    assert mongo_uri_via(proxy, "mongodb://u:p@h1:27017,h2:27018/db?replicaSet=rs&w=majority") == (
        "mongodb://u:p@127.0.0.1:4242/db?w=majority&directConnection=true")
