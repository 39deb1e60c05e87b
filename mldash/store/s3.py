"""`S3Store`: the store on S3 or any S3-compatible endpoint, through one aioboto3 client.

Decisions, each for a reason:
- Deadlines: every await on the network runs inside `asyncio.timeout`. botocore's own timeouts are not
  enough: with aiobotocore 2.25 + aiohttp 3.14 a PUT to a server that accepts and never answers hung
  > 60 s despite read_timeout, waiting for "100 Continue". Bodies scale their deadline with their size
  (`request_timeout + MiB × seconds_per_mib`); a download bounds the wait for every chunk.
- No "Expect: 100-continue": botocore's `add_expect_header` handler is unregistered on our client.
- Small PUTs (≤ 64 KiB) skip botocore's per-request pipeline: signed by botocore's SigV4 signer and sent on
  the client's HTTP session, they cost ~0.65 ms of CPU instead of ~1.3 ms (`mldash/store/s3_direct.py`).
  Everything else, and any small PUT that meets a redirect or a region error, goes through botocore.
- Redirects: botocore follows S3's region redirects, once per request; no redirect is followed by `Location`,
  and one the client cannot follow fails at once, permanently unless S3 says it is temporary
  (`mldash/store/s3_redirects.py`).
- Retries: botocore makes at most ONE retry (`total_max_attempts=2`, standard mode), inside our deadline.
  It absorbs the common one-off blips (a pooled keep-alive connection the server closed, a single 5xx)
  without spending one of the daemon's attempts and its backoff (a direct PUT does the same, by botocore's
  own tables of what to retry); every other retry decision is the
  daemon's, driven by the classification in s3_errors.py. (A retried conditional write whose first attempt did
  land comes back as ObjectExistsError: the daemon heads the key and compares checksums, as it must
  after any of its own retries.)
- Checksums: we send `ChecksumSHA256` ourselves (the daemon hashed the bytes while reading them), so
  botocore computes nothing more (`request_checksum_calculation="when_required"`). Downloads ask for the
  checksum (`ChecksumMode="ENABLED"`): botocore then verifies single-part objects as they stream.
- Payload signing off (`UNSIGNED-PAYLOAD`), on plain HTTP too. SigV4 would otherwise hash every body once
  more (SHA256, ~0.5 s of CPU per GiB, on the event-loop thread) only to put the digest in a signed header.
  Every body we send carries `x-amz-checksum-sha256`, which is itself a signed header and which S3 checks
  against the bytes received, so a body altered on the way is refused either way: this is what boto3 does
  over HTTPS whenever a checksum header is present. (Stores that do not check it — moto, some
  S3-compatibles — are covered by the daemon's ETag comparison, see `etag_is_md5`.)
- One client per store, created in `open()` and kept, so connections are pooled; the pool is sized by
  `max_connections` (the daemon passes its concurrency) because a request waiting for a free connection
  would be eating its own deadline.
- Credentials come from the standard AWS chain. Nothing here logs request headers, and we never enable
  botocore's DEBUG logger (it prints the Authorization header); error messages carry the S3 error code
  and message only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiobotocore.config import AioConfig
from botocore.handlers import add_expect_header

from mldash.keys import MAX_KEY_BYTES
from mldash.spool.layout import open_private
from mldash.store.base import (
    Buffer,
    NoSuchUploadError,
    PartReceipt,
    PendingUpload,
    PermanentStoreError,
    Store,
    StoredObject,
    StoreError,
    TransientStoreError,
)
from mldash.store.local import store_error_from_os_error
from mldash.store.pacing import CallDeadline, RateLimit, current_deadline, pace
from mldash.store.s3_body import SendBuffer
from mldash.store.s3_direct import DIRECT_PUT_LIMIT, DirectPut, HandBack, is_retried
from mldash.store.s3_errors import S3Target, classify_error, describe_credentials
from mldash.store.s3_redirects import NoRedirectSession, stop_region_lookup_recursion

T = TypeVar("T")
log = logging.getLogger("mldash.store")

_MiB = 2**20
SLOW_CALL_WARNING = 10.0  # seconds without an answer before a call is reported as slow (once per 30 s)
_DOWNLOAD_CHUNK = _MiB


def resolve_endpoints_once_per_bucket(client: Any) -> set[str]:
    """Stop botocore from resolving the endpoint anew for every object key; returns the inputs dropped.

    botocore evaluates S3's endpoint ruleset for each request, and the object key is one of its inputs (a
    "context parameter" of PutObject, UploadPart, ...), so its cache of results never hits: ~0.11 ms of CPU
    per request, a tenth of what the daemon spends on a small file. The ruleset never reads the key — this
    checks that, in the ruleset this botocore ships, for every optional input without a built-in value — so
    resolving without the inputs no rule reads gives the same endpoint, and the cache then hits. Where the
    internals are not as expected, nothing is changed (requests are only slower)."""
    resolver = getattr(client, "_ruleset_resolver", None)
    definitions = getattr(resolver, "_param_definitions", None)
    loader = getattr(client, "_loader", None)
    if not isinstance(definitions, dict) or loader is None:
        return set()
    try:
        ruleset = loader.load_service_model("s3", "endpoint-rule-set-1", client.meta.service_model.api_version)
        unread = unread_endpoint_params(ruleset, definitions)
    except Exception:  # an optimisation only: any surprise leaves botocore as it is
        return set()
    if unread:
        resolver._param_definitions = {name: d for name, d in definitions.items() if name not in unread}
    return unread


def unread_endpoint_params(ruleset: dict[str, Any], definitions: dict[str, Any]) -> set[str]:
    """Optional inputs without a built-in value that no rule of `ruleset` reads, by reference or in a template."""
    text = json.dumps(ruleset["rules"])
    return {name for name, spec in definitions.items()
            if not getattr(spec, "required", True) and getattr(spec, "builtin", "unknown") is None
            and f'"ref": "{name}"' not in text and "{" + name not in text}


class S3Store(Store):
    # S3 (without SSE-KMS/SSE-C), MinIO and moto return the MD5 of the bytes received as a part's or a
    # single PUT's ETag. The daemon may compare it (settings.verify_etag: off for SSE-KMS buckets).
    etag_is_md5 = True

    def __init__(self, bucket: str, root: str = "", *, endpoint_url: str | None = None, region: str | None = None,
                 request_timeout: float = 60.0, seconds_per_mib: float = 0.5, max_connections: int = 16,
                 max_upload_rate: int | None = None) -> None:
        """`request_timeout` bounds every call; a body of N MiB gets `N × seconds_per_mib` more (time spent
        waiting for the `max_upload_rate` cap, bytes per second, is added on top: pacing.py)."""
        self.bucket = bucket
        self.root = root.strip("/")
        self.url = f"s3://{bucket}/{self.root}" if self.root else f"s3://{bucket}"
        self.endpoint_url = endpoint_url
        self.region = region
        self.request_timeout = request_timeout
        self.seconds_per_mib = seconds_per_mib
        self.max_connections = max_connections
        self.rate_limit = RateLimit(max_upload_rate or None)  # always there: a reload may set a cap
        self._client: Any = None
        self._direct: DirectPut | None = None  # small PUTs without botocore's pipeline (s3_direct.py), if usable
        self._exit: contextlib.AsyncExitStack | None = None
        self.target = S3Target(bucket, endpoint_url)  # what configuration errors name: botocore's answers once open
        self._slow_warned_at = -1e9  # time.monotonic() of the last "no answer" warning (see _call)
        self._unanswered: dict[object, tuple[float, str, str]] = {}  # call → (since, operation, key): see unanswered

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self.endpoint_url!r})"

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        import aioboto3  # imported here: it is slow to import and only the daemon needs it
        from aiobotocore.session import get_session

        core_session = get_session()
        self.target = _with_credential_files(self.target, core_session)
        config = AioConfig(
            connect_timeout=min(10.0, self.request_timeout),
            read_timeout=self.request_timeout,
            retries={"mode": "standard", "total_max_attempts": 2},
            max_pool_connections=self.max_connections,
            http_session_cls=NoRedirectSession,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # Custom endpoints (MinIO, Ceph, moto) widely support only path-style addressing.
            s3={"payload_signing_enabled": False,
                **({"addressing_style": "path"} if self.endpoint_url else {})},
        )
        exit_stack = contextlib.AsyncExitStack()
        try:
            # Reads the profile AWS_PROFILE names: ProfileNotFound if no file has it.
            session = aioboto3.Session(botocore_session=core_session)
            client = await exit_stack.enter_async_context(session.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region or session.region_name or "us-east-1",
                config=config))
        except Exception as exc:
            await exit_stack.aclose()
            raise classify_error(exc, operation="open", key="", target=self.target) from exc
        client.meta.events.unregister("before-call.s3", add_expect_header)
        client.meta.events.register_first("needs-retry.s3.HeadBucket", stop_region_lookup_recursion)
        self.target = await _resolved_target(self.target, core_session, client)
        resolve_endpoints_once_per_bucket(client)
        self._client, self._exit = client, exit_stack
        try:
            async with asyncio.timeout(self.request_timeout):
                self._direct = await DirectPut.learn(client, core_session, self.bucket)
        except Exception as exc:  # an optimisation only: botocore sends every request, as it can
            log.info("store %s: small PUTs go through botocore (%s: %s)", self.url, type(exc).__name__, exc)
            self._direct = None

    async def close(self) -> None:
        exit_stack, self._client, self._exit, self._direct = self._exit, None, None, None
        if exit_stack is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.request_timeout):
                    await exit_stack.aclose()

    def key(self, relative_key: str) -> str:
        return f"{self.root}/{relative_key}" if self.root else relative_key

    # -- plumbing -------------------------------------------------------------------------------

    def _deadline(self, nbytes: int = 0) -> float:
        return self.request_timeout + nbytes / _MiB * self.seconds_per_mib

    async def _call(self, operation: str, key: str, deadline: float,
                    fn: Callable[..., Awaitable[T]], **kwargs: Any) -> T:
        # A store that accepts connections and never answers is silent for the whole deadline (60 s by default):
        # say so after SLOW_CALL_WARNING seconds, once per such stretch, so `run --once` and the journal are not
        # left wondering.
        # A body's transfer time is allowed for as in the deadline (deadline - request_timeout: its size share).
        loop = asyncio.get_running_loop()
        after = SLOW_CALL_WARNING + max(0.0, deadline - self.request_timeout)
        call = object()  # this call's mark in `_unanswered`
        slow = [loop.call_later(after, self._warn_slow, call, operation, key, after, deadline)]

        def paced(seconds: float) -> None:  # time waiting for the upload rate cap is not the store's (pacing.py)
            when = slow[0].when() + seconds
            slow[0].cancel()
            slow[0] = loop.call_at(when, self._warn_slow, call, operation, key, after, deadline)

        token = None
        try:
            async with asyncio.timeout(deadline) as timeout:
                # Set whether or not a cap is on now: a reload can set one while this request runs.
                token = current_deadline.set(CallDeadline(timeout, paced))
                return await fn(**kwargs)
        except Exception as exc:
            raise classify_error(exc, operation=operation, key=key, target=self.target) from exc
        finally:
            slow[0].cancel()
            self._unanswered.pop(call, None)
            if token is not None:
                current_deadline.reset(token)

    def unanswered(self) -> str | None:
        """The oldest call still waiting for an answer past SLOW_CALL_WARNING, in words, or None. Why: a store
        that accepts connections and never answers fails a call only at its deadline (60 s by default, more for a
        large body); until then the daemon's status would read as healthy."""
        if not self._unanswered:
            return None
        since, operation, key = min(self._unanswered.values())
        return (f"{self.url}: no answer to {operation} {key[-80:]!r} for {time.monotonic() - since:.0f}s "
                "(waiting up to its deadline)")

    def _warn_slow(self, call: object, operation: str, key: str, after: float, deadline: float) -> None:
        now = time.monotonic()
        self._unanswered.setdefault(call, (now - after, operation, key))
        if now - self._slow_warned_at < SLOW_CALL_WARNING * 3:
            return
        self._slow_warned_at = now
        log.warning("store %s: no answer to %s %r for %gs; waiting up to %gs (its deadline) before retrying",
                    self.url, operation, key[-80:], after, deadline)

    def _check_key(self, operation: str, key: str) -> None:
        # Real S3 refuses keys over 1024 bytes; moto and others accept them, so refuse them ourselves.
        if not key or len(key.encode("utf-8")) > MAX_KEY_BYTES:
            raise PermanentStoreError(f"{operation} {key[:60]!r}: keys must be 1..{MAX_KEY_BYTES} bytes",
                                      code="KeyTooLongError")

    # -- single objects -------------------------------------------------------------------------

    async def head(self, key: str) -> StoredObject | None:
        try:
            response = await self._call("head", key, self._deadline(), self._client_op("head_object"),
                                        Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except StoreError as exc:
            if exc.code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        etag = response.get("ETag")
        return StoredObject(key=key, size=int(response["ContentLength"]),
                            checksum_sha256=_qualified_checksum(response.get("ChecksumSHA256"), etag), etag=etag)

    async def put(self, key: str, data: bytes, sha256_b64: str) -> StoredObject:
        self._check_key("put", key)
        direct = self._direct
        size = len(data)
        if direct is not None and size <= DIRECT_PUT_LIMIT:
            headers = await self._call("put", key, self._deadline(size), self._put_direct,
                                       direct=direct, object_key=key, body=bytes(data), sha256_b64=sha256_b64)
            if headers is not None:
                return StoredObject(key=key, size=size, checksum_sha256=headers.get("x-amz-checksum-sha256"),
                                    etag=headers.get("etag"))
        with SendBuffer(data, rate_limit=self.rate_limit) as body:
            size = len(body)
            response = await self._call("put", key, self._deadline(size), self._client_op("put_object"),
                                        Bucket=self.bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256",
                                        ChecksumSHA256=sha256_b64, IfNoneMatch="*")
        return StoredObject(key=key, size=size, checksum_sha256=response.get("ChecksumSHA256"),
                            etag=response.get("ETag"))

    async def _put_direct(self, direct: DirectPut, object_key: str, body: bytes, sha256_b64: str) -> Any:
        """The response headers of a direct PUT, or None when botocore must send it (see s3_direct.py).
        botocore's standard mode with total_max_attempts=2, as for every other call: one more attempt after its
        first backoff step (full jitter, up to 1 s) for what it would retry. A redirect or region error at either
        attempt is botocore's to handle, this PUT's and every later one's."""
        for attempt in (1, 2):
            if attempt == 2:
                await asyncio.sleep(random.random())
            try:
                await pace(self.rate_limit, len(body))
                return await direct.put(object_key, body, sha256_b64)
            except HandBack as exc:
                log.info("store %s: %s answering a PUT; sending every PUT through botocore from now on",
                         self.url, exc)
                self._direct = None
                return None
            except Exception as exc:
                if attempt == 2 or not is_retried(exc):
                    raise
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def download(self, key: str, dest: Path) -> StoredObject:
        dest = Path(dest)
        response = await self._call("download", key, self._deadline(), self._client_op("get_object"),
                                    Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        stream = response["Body"]
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        fd = -1
        try:
            fd = await asyncio.to_thread(open_private, tmp)
            size = 0
            while True:
                # Each chunk has its own deadline: a big object may take long, a stalled one may not.
                chunk = await self._call("download", key, self._deadline(), stream.read, amt=_DOWNLOAD_CHUNK)
                if not chunk:
                    break
                await asyncio.to_thread(_write_all, fd, chunk)
                size += len(chunk)
            os.close(fd)
            fd = -1
            await asyncio.to_thread(os.replace, tmp, dest)
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):  # our side: the destination's disk or directory
                raise store_error_from_os_error(exc, f"download {key!r} to {dest}") from exc
            raise
        finally:
            stream.close()  # returns or drops the connection; a no-op after a full read
        etag = response.get("ETag")
        return StoredObject(key=key, size=size, checksum_sha256=_qualified_checksum(response.get("ChecksumSHA256"),
                                                                                    etag), etag=etag)

    async def delete(self, key: str) -> None:
        await self._call("delete", key, self._deadline(), self._client_op("delete_object"),
                         Bucket=self.bucket, Key=key)

    # -- multipart ------------------------------------------------------------------------------

    async def create_multipart(self, key: str) -> str:
        self._check_key("create_multipart", key)
        response = await self._call("create_multipart", key, self._deadline(),
                                    self._client_op("create_multipart_upload"),
                                    Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256")
        return str(response["UploadId"])

    async def upload_part(self, key: str, upload_id: str, part_number: int, data: Buffer,
                          sha256_b64: str) -> PartReceipt:
        with SendBuffer(data, rate_limit=self.rate_limit) as body:
            size = len(body)
            response = await self._call("upload_part", key, self._deadline(size), self._client_op("upload_part"),
                                        Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=part_number,
                                        Body=body, ChecksumAlgorithm="SHA256", ChecksumSHA256=sha256_b64)
        return PartReceipt(part_number=part_number, size=size, etag=response["ETag"],
                           checksum_sha256=response.get("ChecksumSHA256"))

    async def list_parts(self, key: str, upload_id: str) -> dict[int, PartReceipt]:
        parts: dict[int, PartReceipt] = {}
        marker = 0
        while True:
            response = await self._call("list_parts", key, self._deadline(), self._client_op("list_parts"),
                                        Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker)
            for part in response.get("Parts", []):
                number = int(part["PartNumber"])
                parts[number] = PartReceipt(part_number=number, size=int(part["Size"]), etag=part["ETag"],
                                            checksum_sha256=part.get("ChecksumSHA256"))
            next_marker = int(response.get("NextPartNumberMarker") or 0)
            if not response.get("IsTruncated") or next_marker <= marker:
                return dict(sorted(parts.items()))
            marker = next_marker

    async def complete_multipart(self, key: str, upload_id: str, parts: list[PartReceipt]) -> StoredObject:
        listed = [{"PartNumber": p.part_number, "ETag": p.etag,
                   **({"ChecksumSHA256": p.checksum_sha256} if p.checksum_sha256 else {})} for p in parts]
        # S3 assembles server-side; it may take a while for many parts (it keeps the connection alive).
        deadline = self._deadline() + 0.1 * len(parts)
        try:
            response = await self._call("complete_multipart", key, deadline,
                                        self._client_op("complete_multipart_upload"),
                                        Bucket=self.bucket, Key=key, UploadId=upload_id,
                                        MultipartUpload={"Parts": listed}, IfNoneMatch="*")
        except TransientStoreError as exc:
            # If the upload is gone, repeating this complete can never succeed: say so, and the caller heads
            # the key instead. (A complete that landed but whose answer was lost looks like this; so does
            # moto's 500 for completing an aborted upload, where S3 answers NoSuchUpload.)
            if await self._upload_is_gone(key, upload_id):
                raise NoSuchUploadError(f"complete_multipart {key!r}: upload {upload_id} is gone after: {exc}",
                                        code="NoSuchUpload") from exc
            raise
        if not response.get("ETag"):
            # botocore turns a "200 with an error body" into an error; an empty 200 is no success either.
            raise TransientStoreError(f"complete_multipart {key!r}: the response carried no ETag",
                                      code="IncompleteResponse")
        etag = response.get("ETag")
        checksum = _qualified_checksum(response.get("ChecksumSHA256"), etag)
        if checksum is None:
            # moto (and some S3-compatibles) leave the composite out of this response but report it on HEAD:
            # ask, so the daemon can compare it instead of reading the whole blob again for MD5s.
            with contextlib.suppress(StoreError):
                stored = await self.head(key)
                if stored is not None and stored.etag == etag:
                    checksum = stored.checksum_sha256
        return StoredObject(key=key, size=sum(p.size for p in parts), checksum_sha256=checksum, etag=etag)

    async def _upload_is_gone(self, key: str, upload_id: str) -> bool:
        try:
            await self._call("list_parts", key, self._deadline(), self._client_op("list_parts"),
                             Bucket=self.bucket, Key=key, UploadId=upload_id, MaxParts=1)
        except NoSuchUploadError:
            return True
        except StoreError:
            return False
        return False

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self._call("abort_multipart", key, self._deadline(), self._client_op("abort_multipart_upload"),
                             Bucket=self.bucket, Key=key, UploadId=upload_id)
        except NoSuchUploadError:
            return

    async def list_multipart_uploads(self, prefix: str) -> list[PendingUpload]:
        pending: list[PendingUpload] = []
        markers: dict[str, str] = {}
        while True:
            response = await self._call("list_multipart_uploads", prefix, self._deadline(),
                                        self._client_op("list_multipart_uploads"),
                                        Bucket=self.bucket, Prefix=prefix, **markers)
            pending += [PendingUpload(key=u["Key"], upload_id=u["UploadId"]) for u in response.get("Uploads", [])]
            if not response.get("IsTruncated"):
                return pending
            new_markers = {"KeyMarker": response.get("NextKeyMarker") or "",
                           "UploadIdMarker": response.get("NextUploadIdMarker") or ""}
            if new_markers == markers or not new_markers["KeyMarker"]:
                return pending  # a service that says "truncated" but gives no way on: stop, do not loop
            markers = new_markers

    def _client_op(self, name: str) -> Callable[..., Awaitable[Any]]:
        if self._client is None:
            raise PermanentStoreError(f"{name}: {self!r} is not open (call open() first)", code="NotOpen")
        return getattr(self._client, name)


def _with_credential_files(target: S3Target, session: Any) -> S3Target:
    """`target` with the profile and files the credential chain of `session` reads (taken from the environment
    as they are: whether the profile exists is found out when the client is made)."""
    return dataclasses.replace(target, profile=session.profile or "default",
                               credentials_file=str(session.get_config_variable("credentials_file")),
                               config_file=str(session.get_config_variable("config_file")))


async def _resolved_target(target: S3Target, session: Any, client: Any) -> S3Target:
    """`target` as botocore resolved it for `client`: its endpoint and region, and where it found the credentials
    (by the provider's name: their values are never looked at)."""
    target = dataclasses.replace(target, resolved_endpoint=client.meta.endpoint_url, region=client.meta.region_name)
    try:
        # Resolved when the client was made, and cached: no second lookup (unless none was found then).
        credentials = await session.get_credentials()
    except Exception:  # wording only: a chain that fails now fails the first request, with its own error
        return target
    return dataclasses.replace(target, credentials=describe_credentials(getattr(credentials, "method", None), target))


_MULTIPART_ETAG = re.compile(r'"?[0-9a-fA-F]+-([0-9]+)"?')


def _qualified_checksum(checksum: str | None, etag: str | None) -> str | None:
    """The composite checksum with its "-N" part count, as S3's GetObject reports it.

    S3 reports "base64-N" for a multipart SHA256 object, but moto's HeadObject drops the "-N" (its GetObject
    keeps it). A SHA256 checksum of a multipart object is always composite, and a multipart object's ETag
    ends in "-N" with the same N, so the suffix can be restored from it; everything else passes unchanged.
    """
    if not checksum or "-" in checksum or not etag:
        return checksum
    match = _MULTIPART_ETAG.fullmatch(etag)
    return f"{checksum}-{match.group(1)}" if match else checksum


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
