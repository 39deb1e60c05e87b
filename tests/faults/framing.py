"""Message framers for the fault proxy: split a byte stream into messages so faults apply per request.

A framer is fed the bytes of one direction of one TCP connection and returns `Segment`s: pieces of the
input, in order, each tagged with the message it belongs to and its offset in that message. Concatenating
the `data` of all segments gives back the input exactly (framers never change bytes; the proxy does).

Three protocols:
- raw: the whole connection is one message (head = the first chunk read); no response framing.
- http: HTTP/1.1 requests (head + Content-Length or chunked body) and responses (1xx interim responses,
  Content-Length, chunked, no-body statuses, HEAD requests, read-until-close). Botocore sends chunked
  uploads only over TLS (aws-chunked trailers) or for bodies of unknown length, but both are handled.
- mongo: MongoDB wire messages (int32 little-endian length prefix); OP_MSG `moreToCome` means no reply.

Responses are matched to requests in order (HTTP/1.1 without pipelining, MongoDB request/reply), so a
response segment carries the *request's* Message: faults decided when the request was seen apply to it.
If a framer cannot parse its stream it switches to passthrough: the rest of the stream is one raw message.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_HEAD = 64 * 1024  # a longer HTTP head than this is not HTTP we want to parse: pass it through
MONGO_HEAD = 16 * 1024  # bytes of a MongoDB message exposed to `match` (commands are small; inserts not)
_OP_MSG = 2013
_MORE_TO_COME = 0x2


class Protocol(enum.StrEnum):
    """How the proxy frames the streams it forwards."""

    RAW = "raw"
    HTTP = "http"
    MONGO = "mongo"


class Part(enum.StrEnum):
    HEAD = "head"  # HTTP start line + headers; raw: the first chunk; mongo: the first MONGO_HEAD bytes
    BODY = "body"  # payload bytes (for chunked HTTP only the chunk data, not the size lines)
    META = "meta"  # chunk-size lines, chunk CRLFs, trailers: framing bytes that are not payload


@dataclass(eq=False)
class Message:
    """One request (client→upstream). `state` is the proxy's per-message fault plan."""

    conn_id: int
    index: int  # 0-based position of this request on its connection
    head: bytes
    method: str | None = None  # HTTP method, or the MongoDB command name when it could be read
    target: str | None = None  # HTTP request target (path + query)
    content_length: int | None = None  # body bytes if known in advance (HTTP Content-Length)
    chunked: bool = False
    expect_continue: bool = False  # HTTP `Expect: 100-continue`
    expects_response: bool = True  # False for MongoDB OP_MSG with moreToCome
    length: int | None = None  # total bytes of the message (head + body) if known in advance
    state: Any = None

    @property
    def start_line(self) -> str:
        """The HTTP request line, else the MongoDB command name, else ""."""
        if self.target is not None:
            return self.head.split(b"\r\n", 1)[0].decode("latin-1")
        return self.method or ""


@dataclass
class Segment:
    """A piece of one direction's stream. For responses `msg` is the request the response answers."""

    msg: Message
    data: bytes
    part: Part
    offset: int  # offset of data[0] in this message (request) or in this response
    body_offset: int | None = None  # offset of data[0] in the body payload, for Part.BODY
    start: bool = False  # first segment of the message / response
    end: bool = False  # last segment of the message / response
    interim: bool = False  # part of an HTTP 1xx interim response (e.g. 100 Continue)
    status: int | None = None  # HTTP status of the response this segment belongs to
    length: int | None = None  # total bytes of this message / response if known in advance
    body_length: int | None = None  # payload bytes of this message / response if known in advance


class FramingError(ValueError):
    pass


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise FramingError(f"bad header line {line[:80]!r}")
        key = name.decode("latin-1").lower()
        val = value.strip().decode("latin-1")
        # Repeated headers: join like RFC 9110 says; Content-Length duplicates must agree (checked below).
        headers[key] = f"{headers[key]}, {val}" if key in headers else val
    return headers


def _body_framing(headers: dict[str, str]) -> tuple[bool, int | None]:
    """(chunked, content_length) per RFC 9112 §6.3: chunked wins over Content-Length."""
    te = headers.get("transfer-encoding", "")
    if te:
        codings = [c.strip().lower() for c in te.split(",") if c.strip()]
        if codings and codings[-1] == "chunked":
            return True, None
        raise FramingError(f"unsupported transfer-encoding {te!r}")
    cl = headers.get("content-length")
    if cl is None:
        return False, None
    values = {v.strip() for v in cl.split(",")}
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise FramingError(f"bad content-length {cl!r}")
    return False, int(values.pop())


class _Framer:
    """Shared passthrough handling: after a parse error everything is one raw message."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._passthrough: Message | None = None
        self._pt_offset = 0

    def feed(self, data: bytes) -> list[Segment]:
        """Frame `data`; on a parse error, everything from here on is passed through as one raw message."""
        if self._passthrough is not None:
            return self._passthrough_feed(data)
        self._buf += data
        out: list[Segment] = []
        try:
            while self._step(out):
                pass
        except FramingError:
            out.extend(self._to_passthrough(self._failed_message()))
        return out

    def _step(self, out: list[Segment]) -> bool:
        raise NotImplementedError

    def _failed_message(self) -> Message:
        """The message a parse error turns into passthrough."""
        raise NotImplementedError

    def _to_passthrough(self, msg: Message) -> list[Segment]:
        self._passthrough = msg
        data = bytes(self._buf)
        self._buf.clear()
        return self._passthrough_feed(data, start=True)

    def _passthrough_feed(self, data: bytes, start: bool = False) -> list[Segment]:
        assert self._passthrough is not None
        if not data and not start:
            return []
        seg = Segment(self._passthrough, data, Part.BODY, self._pt_offset, body_offset=self._pt_offset, start=start)
        self._pt_offset += len(data)
        return [seg]


class RawRequestFramer(_Framer):
    """The whole client→upstream stream is one message; its head is the first chunk."""

    def __init__(self, conn_id: int) -> None:
        super().__init__()
        self._conn_id = conn_id
        self.message: Message | None = None

    def feed(self, data: bytes) -> list[Segment]:
        if self._passthrough is None:
            self.message = Message(self._conn_id, 0, head=bytes(data))
            self._passthrough = self.message
            return self._passthrough_feed(data, start=True)
        return self._passthrough_feed(data)

    def feed_eof(self) -> list[Segment]:
        if self._passthrough is None:
            return []
        return [Segment(self._passthrough, b"", Part.BODY, self._pt_offset, self._pt_offset, end=True)]


class RawResponseFramer(_Framer):
    """Everything upstream→client belongs to the connection's single message (if the client spoke first)."""

    def __init__(self, request: Callable[[], Message | None], orphan: Callable[[], Message]) -> None:
        super().__init__()
        self._request = request
        self._orphan = orphan

    def feed(self, data: bytes) -> list[Segment]:
        if self._passthrough is None:
            self._passthrough = self._request() or self._orphan()
            return self._passthrough_feed(data, start=True)
        return self._passthrough_feed(data)

    def feed_eof(self) -> list[Segment]:
        if self._passthrough is None:
            return []
        return [Segment(self._passthrough, b"", Part.BODY, self._pt_offset, self._pt_offset, end=True)]


class _ChunkedBody:
    """Incremental parser of a chunked body (RFC 9112 §7.1), producing BODY and META segments."""

    def __init__(self) -> None:
        self.state = "size"  # size | data | crlf | trailer | done
        self.remaining = 0
        self.body_offset = 0

    def step(self, buf: bytearray) -> tuple[bytes, Part] | None:
        """Consume one piece from buf; None if more input is needed."""
        if self.state == "size" or self.state == "trailer":
            i = buf.find(b"\r\n")
            if i < 0:
                if len(buf) > MAX_HEAD:
                    raise FramingError("chunk-size line too long")
                return None
            line = bytes(buf[: i + 2])
            del buf[: i + 2]
            if self.state == "trailer":
                if line == b"\r\n":
                    self.state = "done"
                return line, Part.META
            size_text = line[:-2].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise FramingError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                self.state = "trailer"
            else:
                self.state, self.remaining = "data", size
            return line, Part.META
        if self.state == "data":
            if not buf:
                return None
            n = min(self.remaining, len(buf))
            data = bytes(buf[:n])
            del buf[:n]
            self.remaining -= n
            if self.remaining == 0:
                self.state = "crlf"
            return data, Part.BODY
        if self.state == "crlf":
            if len(buf) < 2:
                return None
            if buf[:2] != b"\r\n":
                raise FramingError("chunk data not followed by CRLF")
            del buf[:2]
            self.state = "size"
            return b"\r\n", Part.META
        raise AssertionError(self.state)


class _HttpBodyReader:
    """Frames one HTTP message body after its head; shared by the request and response framers."""

    def __init__(self, chunked: bool, length: int | None, until_close: bool = False) -> None:
        self.chunked = _ChunkedBody() if chunked else None
        self.remaining = length or 0
        self.until_close = until_close
        self.body_offset = 0

    @property
    def done(self) -> bool:
        if self.chunked is not None:
            return self.chunked.state == "done"
        return not self.until_close and self.remaining == 0

    def step(self, buf: bytearray) -> tuple[bytes, Part, int | None] | None:
        if self.chunked is not None:
            piece = self.chunked.step(buf)
            if piece is None:
                return None
            data, part = piece
            if part is Part.BODY:
                off = self.body_offset
                self.body_offset += len(data)
                return data, part, off
            return data, part, None
        if not buf:
            return None
        n = len(buf) if self.until_close else min(self.remaining, len(buf))
        data = bytes(buf[:n])
        del buf[:n]
        if not self.until_close:
            self.remaining -= n
        off = self.body_offset
        self.body_offset += n
        return data, Part.BODY, off


class HttpRequestFramer(_Framer):
    """Splits a client→server HTTP/1.1 stream into requests."""

    def __init__(self, conn_id: int) -> None:
        super().__init__()
        self._conn_id = conn_id
        self._index = 0
        self._msg: Message | None = None
        self._body: _HttpBodyReader | None = None
        self._offset = 0

    def _failed_message(self) -> Message:
        return Message(self._conn_id, self._index, head=bytes(self._buf[:MAX_HEAD]))

    def feed_eof(self) -> list[Segment]:
        if self._passthrough is not None:
            return [Segment(self._passthrough, b"", Part.BODY, self._pt_offset, self._pt_offset, end=True)]
        return []

    def _step(self, out: list[Segment]) -> bool:
        if self._msg is None:
            return self._step_head(out)
        assert self._body is not None
        piece = self._body.step(self._buf)
        if piece is None:
            return False
        data, part, body_off = piece
        seg = Segment(self._msg, data, part, self._offset, body_offset=body_off, length=self._msg.length,
                      body_length=self._msg.content_length)
        self._offset += len(data)
        if self._body.done:
            seg.end = True
            self._msg, self._body = None, None
        out.append(seg)
        return True

    def _step_head(self, out: list[Segment]) -> bool:
        # Empty lines before a request are allowed (RFC 9112 §2.2): keep them in its head, parse past them.
        skip = 0
        while self._buf.startswith(b"\r\n", skip):
            skip += 2
        i = self._buf.find(b"\r\n\r\n", skip)
        if i < 0:
            if len(self._buf) > MAX_HEAD:
                raise FramingError("request head too long")
            return False
        head = bytes(self._buf[: i + 4])
        lines = head[skip:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise FramingError(f"bad request line {lines[0][:80]!r}")
        headers = _parse_headers(lines[1:])
        chunked, length = _body_framing(headers)
        del self._buf[: i + 4]
        msg = Message(
            self._conn_id,
            self._index,
            head=head,
            method=parts[0].decode("latin-1"),
            target=parts[1].decode("latin-1"),
            content_length=0 if (length is None and not chunked) else length,
            chunked=chunked,
            expect_continue=headers.get("expect", "").lower() == "100-continue",
        )
        msg.length = None if chunked else len(head) + (msg.content_length or 0)
        self._index += 1
        seg = Segment(msg, head, Part.HEAD, 0, start=True, length=msg.length, body_length=msg.content_length)
        self._offset = len(head)
        if chunked or msg.content_length:
            self._msg, self._body = msg, _HttpBodyReader(chunked, msg.content_length)
        else:
            seg.end = True
        out.append(seg)
        return True


class HttpResponseFramer(_Framer):
    """Splits a server→client HTTP/1.1 stream into responses, each tagged with the request it answers.

    `request()` returns the oldest request still waiting for its final response (None if there is none);
    `done()` is called when that final response has been fully framed, `orphan()` makes a stand-in request
    for an unsolicited response.
    """

    def __init__(self, request: Callable[[], Message | None], done: Callable[[], None],
                 orphan: Callable[[], Message]) -> None:
        super().__init__()
        self._request = request
        self._done = done
        self._orphan = orphan
        self._cur: Message | None = None
        self._orphaned = False
        self._body: _HttpBodyReader | None = None
        self._status: int | None = None
        self._length: int | None = None
        self._body_length: int | None = None
        self._offset = 0

    def _failed_message(self) -> Message:
        return self._request() or self._orphan()

    def feed_eof(self) -> list[Segment]:
        if self._passthrough is not None:
            return [Segment(self._passthrough, b"", Part.BODY, self._pt_offset, self._pt_offset, end=True)]
        if self._body is not None and self._body.until_close and self._cur is not None:
            seg = Segment(self._cur, b"", Part.BODY, self._offset, self._body.body_offset, end=True,
                          status=self._status)
            self._finish()
            return [seg]
        return []

    def _finish(self) -> None:
        if not self._orphaned:
            self._done()
        self._cur, self._body, self._orphaned = None, None, False

    def _step(self, out: list[Segment]) -> bool:
        if self._body is None:
            return self._step_head(out)
        assert self._cur is not None
        piece = self._body.step(self._buf)
        if piece is None:
            return False
        data, part, body_off = piece
        seg = Segment(self._cur, data, part, self._offset, body_offset=body_off, status=self._status,
                      length=self._length, body_length=self._body_length)
        self._offset += len(data)
        if self._body.done:
            seg.end = True
            self._finish()
        out.append(seg)
        return True

    def _step_head(self, out: list[Segment]) -> bool:
        i = self._buf.find(b"\r\n\r\n")
        if i < 0:
            if len(self._buf) > MAX_HEAD:
                raise FramingError("response head too long")
            return False
        head = bytes(self._buf[: i + 4])
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise FramingError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        headers = _parse_headers(lines[1:])
        req = self._request()
        if req is None:
            req, self._orphaned = self._orphan(), True
        del self._buf[: i + 4]
        if status == 101:
            # Protocol switch: whatever follows is not HTTP.
            out.append(Segment(req, head, Part.HEAD, 0, start=True, end=True, interim=True, status=status))
            if not self._orphaned:
                self._done()
            self._passthrough = req
            self._pt_offset = 0
            if self._buf:
                out.extend(self._passthrough_feed(bytes(self._buf)))
                self._buf.clear()
            return False
        if 100 <= status < 200:
            out.append(Segment(req, head, Part.HEAD, 0, start=True, end=True, interim=True, status=status,
                               length=len(head), body_length=0))
            self._orphaned = False
            return True
        if req.method == "HEAD" or status in (204, 304):
            chunked, length, until_close = False, 0, False
        else:
            chunked, length = _body_framing(headers)
            until_close = not chunked and length is None
        self._cur, self._status, self._offset = req, status, len(head)
        self._body_length = None if (chunked or until_close) else length
        self._length = None if self._body_length is None else len(head) + self._body_length
        seg = Segment(req, head, Part.HEAD, 0, start=True, status=status, length=self._length,
                      body_length=self._body_length)
        out.append(seg)
        if chunked or until_close or length:
            self._body = _HttpBodyReader(chunked, length, until_close)
        else:
            seg.end = True
            self._finish()
        return True


class MongoRequestFramer(_Framer):
    """Splits a MongoDB client stream into wire messages (header: int32 length, id, responseTo, opCode)."""

    def __init__(self, conn_id: int) -> None:
        super().__init__()
        self._conn_id = conn_id
        self._index = 0
        self._msg: Message | None = None
        self._remaining = 0
        self._offset = 0

    def _failed_message(self) -> Message:
        return Message(self._conn_id, self._index, head=bytes(self._buf[:64]))

    def feed_eof(self) -> list[Segment]:
        if self._passthrough is not None:
            return [Segment(self._passthrough, b"", Part.BODY, self._pt_offset, self._pt_offset, end=True)]
        return []

    def _step(self, out: list[Segment]) -> bool:
        if self._msg is None:
            if len(self._buf) < 16:
                return False
            length, _rid, _to, opcode = struct.unpack_from("<iiii", self._buf)
            if length < 16 or length > 64 * 1024 * 1024:
                raise FramingError(f"bad message length {length}")
            want = min(length, MONGO_HEAD)
            if len(self._buf) < want:
                return False
            head = bytes(self._buf[:want])
            del self._buf[:want]
            msg = Message(self._conn_id, self._index, head=head, length=length, content_length=length - 16)
            msg.method = mongo_command_name(head)
            if opcode == _OP_MSG and len(head) >= 20:
                msg.expects_response = not (struct.unpack_from("<I", head, 16)[0] & _MORE_TO_COME)
            self._index += 1
            seg = Segment(msg, head, Part.HEAD, 0, start=True, end=want == length, length=length,
                          body_length=length - 16)
            if want < length:
                self._msg, self._remaining, self._offset = msg, length - want, want
            out.append(seg)
            return True
        if not self._buf:
            return False
        n = min(self._remaining, len(self._buf))
        data = bytes(self._buf[:n])
        del self._buf[:n]
        seg = Segment(self._msg, data, Part.BODY, self._offset, body_offset=self._offset - 16,
                      length=self._msg.length, body_length=self._msg.content_length)
        self._offset += n
        self._remaining -= n
        if self._remaining == 0:
            seg.end = True
            self._msg = None
        out.append(seg)
        return True


class MongoResponseFramer(_Framer):
    """Splits MongoDB replies; a reply with moreToCome (exhaust cursor) keeps its request waiting."""

    def __init__(self, request: Callable[[], Message | None], done: Callable[[], None],
                 orphan: Callable[[], Message]) -> None:
        super().__init__()
        self._request = request
        self._done = done
        self._orphan = orphan
        self._cur: Message | None = None
        self._last = True
        self._orphaned = False
        self._length = 0
        self._remaining = 0
        self._offset = 0

    def _failed_message(self) -> Message:
        return self._request() or self._orphan()

    def feed_eof(self) -> list[Segment]:
        if self._passthrough is not None:
            return [Segment(self._passthrough, b"", Part.BODY, self._pt_offset, self._pt_offset, end=True)]
        return []

    def _finish(self) -> None:
        if self._last and not self._orphaned:
            self._done()
        self._cur = None

    def _step(self, out: list[Segment]) -> bool:
        if self._cur is None:
            if len(self._buf) < 20:
                return False
            length, _rid, _to, opcode = struct.unpack_from("<iiii", self._buf)
            if length < 16 or length > 64 * 1024 * 1024:
                raise FramingError(f"bad message length {length}")
            self._last = not (opcode == _OP_MSG and struct.unpack_from("<I", self._buf, 16)[0] & _MORE_TO_COME)
            req = self._request()
            self._orphaned = req is None
            self._cur = req or self._orphan()
            self._length, self._remaining, self._offset = length, length, 0
            start = True
        else:
            start = False
        if not self._buf:
            return False
        n = min(self._remaining, len(self._buf))
        data = bytes(self._buf[:n])
        del self._buf[:n]
        seg = Segment(self._cur, data, Part.BODY, self._offset, body_offset=self._offset, start=start,
                      length=self._length, body_length=self._length)
        self._offset += n
        self._remaining -= n
        if self._remaining == 0:
            seg.end = True
            self._finish()
        out.append(seg)
        return True


def mongo_command_name(head: bytes) -> str | None:
    """The command name of an OP_MSG (the first key of its body document), if it can be read."""
    if len(head) < 27 or struct.unpack_from("<i", head, 12)[0] != _OP_MSG or head[20] != 0:
        return None
    end = head.find(b"\x00", 26)
    if end < 0:
        return None
    try:
        return head[26:end].decode()
    except UnicodeDecodeError:
        return None


def mongo_command(name: str) -> re.Pattern[bytes]:
    """A `match` pattern for OP_MSG commands named `name` (e.g. "insert", "update", "findAndModify")."""
    return re.compile(rb"\A.{12}\xdd\x07\x00\x00.{4}\x00.{4}." + re.escape(name.encode()) + rb"\x00", re.DOTALL)

