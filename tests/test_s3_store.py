"""S3Store behaviour beyond the shared contract: error classification and deadlines over real HTTP.

Two kinds of endpoint: moto's server (a real S3 implementation) and `FakeS3`, a tiny HTTP/1.1 server on
127.0.0.1 that answers as a test scripts it — how we reproduce what moto cannot: 503 SlowDown, a 200 with
an error body, a 409 conflict, a server that accepts and never answers, a body that stalls or is corrupt.
Every call goes through the real aioboto3 client; nothing of ours is patched.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import botocore.exceptions as bce
import pytest

from mldash.config import Settings
from mldash.store import (
    NoSuchUploadError,
    ObjectExistsError,
    PartReceipt,
    PermanentStoreError,
    S3Store,
    StoreError,
    TransientStoreError,
    b64_sha256,
    make_store,
)
from mldash.store.s3 import classify_error, unread_endpoint_params
from mldash.store.s3_direct import DIRECT_PUT_LIMIT, client_error

MiB = 2**20
KEY = "root/files/ns/proj/exp/ckpt/1/model.pt"
DEADLINE_CHECK = 10.0  # seconds: "returns within its deadline", generous for a loaded 2-core machine


# -- a scriptable HTTP server --------------------------------------------------------------------------

@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stall_after: int | None = None  # send only this many body bytes, then go silent


BLACKHOLE = None  # an answer of None: accept the request and never read or answer anything more
Script = Callable[[Request], Answer | None]


def s3_error(status: int, code: str, message: str = "scripted") -> Answer:
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>' \
           f"<RequestId>1</RequestId></Error>"
    return Answer(status, body.encode(), {"Content-Type": "application/xml"})


class FakeS3:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[Request] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeS3:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines if ":" in h)}
                request = Request(method, target, headers)
                self.requests.append(request)
                answer = self.script(request)
                if answer is BLACKHOLE:
                    await asyncio.Event().wait()  # until cancelled at teardown
                    return
                request.body = await reader.readexactly(int(headers.get("content-length", 0)))
                reason = {200: "OK", 404: "Not Found", 409: "Conflict", 403: "Forbidden", 400: "Bad Request",
                          500: "Internal Server Error", 503: "Slow Down"}.get(answer.status, "Status")
                out = {"Content-Length": str(len(answer.body)), **answer.headers}
                payload = answer.body if method != "HEAD" else b""
                writer.write(f"HTTP/1.1 {answer.status} {reason}\r\n".encode()
                             + "".join(f"{k}: {v}\r\n" for k, v in out.items()).encode() + b"\r\n")
                if answer.stall_after is not None:
                    writer.write(payload[:answer.stall_after])
                    await writer.drain()
                    await asyncio.Event().wait()
                writer.write(payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


@pytest.fixture
def aws_env(moto_server: str) -> str:
    """Fake credentials in the environment (the moto fixture sets them for the session)."""
    return moto_server


async def open_store(endpoint_url: str, bucket: str = "bucket", *, timeout: float = 1.0) -> S3Store:
    store = S3Store(bucket, "root", endpoint_url=endpoint_url, request_timeout=timeout)
    await store.open()
    return store


@pytest.fixture
async def s3_store(s3_bucket: tuple[str, str]) -> AsyncIterator[S3Store]:
    endpoint_url, bucket = s3_bucket
    store = await open_store(endpoint_url, bucket, timeout=30.0)
    yield store
    await store.close()


# -- configuration ------------------------------------------------------------------------------------

async def test_make_store_builds_an_s3_store(s3_settings: Settings, s3_bucket: tuple[str, str]) -> None:
    endpoint_url, bucket = s3_bucket
    store = make_store(s3_settings.replace(request_timeout=7.0, s3_region="eu-west-1"))
    assert isinstance(store, S3Store)
    assert (store.bucket, store.root, store.endpoint_url) == (bucket, "root", endpoint_url)
    assert (store.request_timeout, store.region, store.url) == (7.0, "eu-west-1", f"s3://{bucket}/root")
    assert store.key("files/a/b/c/1/x") == "root/files/a/b/c/1/x"
    assert S3Store("bkt").key("files/x") == "files/x"


async def test_calls_before_open_fail_clearly() -> None:
    store = S3Store("bucket")
    with pytest.raises(PermanentStoreError) as caught:
        await store.head(KEY)
    assert caught.value.code == "NotOpen"
    await store.close()  # closing an unopened store is fine


async def test_overlong_key_is_refused_before_any_request(aws_env: str) -> None:
    async with FakeS3(lambda r: Answer(200)) as server:
        store = await open_store(server.url)
        try:
            with pytest.raises(PermanentStoreError):
                await store.put("k" * 1025, b"x", b64_sha256(b"x"))
        finally:
            await store.close()
        assert server.requests == []


# -- classification through moto ------------------------------------------------------------------------

async def test_missing_bucket_is_permanent_and_named_with_its_endpoint(moto_server: str) -> None:
    """The message said "NoSuchBucket The specified bucket does not exist": not which bucket, nor where."""
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    store = await open_store(moto_server, bucket, timeout=30.0)
    try:
        for call in (lambda: store.put(KEY, b"x", b64_sha256(b"x")), lambda: store.create_multipart(KEY)):
            with pytest.raises(PermanentStoreError) as caught:
                await call()
            assert caught.value.code == "NoSuchBucket" and caught.value.transient is False
            assert (f"(bucket {bucket!r} at {moto_server} (MLDASH_S3_ENDPOINT_URL), region us-east-1; check the "
                    "bucket in MLDASH_STORE and the endpoint") in str(caught.value), str(caught.value)
    finally:
        await store.close()


async def test_without_an_endpoint_setting_errors_name_aws_default_endpoint(aws_env: str) -> None:
    """Opening sends nothing (botocore resolves the endpoint locally), so no request reaches AWS here."""
    store = S3Store("my-bucket", "root", region="eu-west-1")
    await store.open()
    try:
        answer = bce.ClientError({"Error": {"Code": "NoSuchBucket", "Message": "The specified bucket does not exist"},
                                  "ResponseMetadata": {"HTTPStatusCode": 404}}, "PutObject")
        error = classify_error(answer, operation="put", key=KEY, target=store.target)
    finally:
        await store.close()
    assert str(error) == (f"put {KEY!r}: NoSuchBucket The specified bucket does not exist (bucket 'my-bucket' at "
                          "https://s3.eu-west-1.amazonaws.com, AWS's default endpoint for region eu-west-1 "
                          "(MLDASH_S3_ENDPOINT_URL is unset); check the bucket in MLDASH_STORE and the endpoint)")


def set_moto_auth(endpoint_url: str, count: str) -> None:
    """Switch moto's authentication on ("0": every later request is checked) or off ("inf")."""
    request = urllib.request.Request(f"{endpoint_url}/moto-api/reset-auth", data=count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).close()


async def test_wrong_credentials_are_permanent(s3_bucket: tuple[str, str]) -> None:
    """moto checks credentials once its auth is switched on (moto-api/reset-auth): ours are unknown to it."""
    endpoint_url, bucket = s3_bucket
    store = await open_store(endpoint_url, bucket, timeout=30.0)
    medium = os.urandom(DIRECT_PUT_LIMIT + 1)
    await asyncio.to_thread(set_moto_auth, endpoint_url, "0")
    try:
        for body in (b"x", medium):  # a direct PUT and one through botocore
            with pytest.raises(PermanentStoreError) as caught:
                await store.put(KEY, body, b64_sha256(body))
            assert caught.value.code == "InvalidAccessKeyId"
            # Where to look: the bucket and endpoint, where these credentials came from, where others would.
            message = str(caught.value)
            assert f"(bucket {bucket!r} at {endpoint_url} (MLDASH_S3_ENDPOINT_URL), region us-east-1; " in message
            assert "the credentials came from the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)" in message
            assert CREDENTIAL_CHAIN in message, message
            assert "testing" not in message  # the fake key id and secret (tests/fixtures/s3.py)
    finally:
        await asyncio.to_thread(set_moto_auth, endpoint_url, "inf")
        await store.close()


# What a credential error adds (the credentials file is /dev/null in tests: tests/fixtures/s3.py).
CREDENTIAL_CHAIN = ("botocore looks in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, then profile 'default' (AWS_PROFILE) "
                    "in /dev/null (AWS_SHARED_CREDENTIALS_FILE; the systemd units load it with LoadCredential) and "
                    "/dev/null (AWS_CONFIG_FILE), then a container or instance role: see docs/operations.md, "
                    "'Credentials'")


async def test_missing_credentials_say_where_they_are_looked_for(s3_bucket: tuple[str, str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    endpoint_url, bucket = s3_bucket
    store = await open_store(endpoint_url, bucket, timeout=30.0)
    try:
        for body in (b"x", os.urandom(DIRECT_PUT_LIMIT + 1)):
            with pytest.raises(PermanentStoreError) as caught:
                await store.put(KEY, body, b64_sha256(body))
            assert caught.value.code == "NoCredentialsError"
            assert str(caught.value) == (
                f"put {KEY!r}: NoCredentialsError: Unable to locate credentials (bucket {bucket!r} at {endpoint_url} "
                f"(MLDASH_S3_ENDPOINT_URL), region us-east-1; no credentials found: {CREDENTIAL_CHAIN})")
    finally:
        await store.close()


async def test_a_profile_that_does_not_exist_is_named_at_open(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's ProfileNotFound escaped open() as it was, not as a StoreError."""
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    store = S3Store("bucket", "root", endpoint_url=aws_env)
    with pytest.raises(PermanentStoreError) as caught:
        await store.open()
    chain = CREDENTIAL_CHAIN.replace("profile 'default'", "profile 'no-such-profile'")
    assert str(caught.value) == ("open: ProfileNotFound: The config profile (no-such-profile) could not be found "
                                 f"(bucket 'bucket' at {aws_env} (MLDASH_S3_ENDPOINT_URL); {chain})")
    await store.close()


async def test_downloaded_object_matches_its_checksum(s3_store: S3Store, tmp_path: Path) -> None:
    data = b"verified on the way down" * 1000
    await s3_store.put(KEY, data, b64_sha256(data))
    stored = await s3_store.download(KEY, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert (stored.size, stored.checksum_sha256) == (len(data), b64_sha256(data))


# -- deadlines ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("operation", ["put", "upload_part", "head", "complete"])
async def test_blackhole_endpoint_fails_transiently_within_the_deadline(aws_env: str, operation: str) -> None:
    """A server that accepts and never answers (the Expect: 100-continue hang) cannot hold a call."""
    async with FakeS3(lambda r: BLACKHOLE) as server:
        store = await open_store(server.url, timeout=1.0)
        data = bytes(5 * MiB)
        calls = {
            "put": lambda: store.put(KEY, b"small", b64_sha256(b"small")),
            "upload_part": lambda: store.upload_part(KEY, "upload-1", 1, data, b64_sha256(data)),
            "head": lambda: store.head(KEY),
            "complete": lambda: store.complete_multipart(KEY, "upload-1", [PartReceipt(1, 5, '"e"', None)]),
        }
        started = time.monotonic()
        try:
            with pytest.raises(TransientStoreError) as caught:
                await calls[operation]()
        finally:
            await store.close()
        assert time.monotonic() - started < DEADLINE_CHECK
        assert caught.value.code in ("Timeout", "ReadTimeoutError", "ConnectTimeoutError")
        assert server.requests, "the request must have reached the server"


async def test_download_that_stalls_mid_body_fails_transiently(aws_env: str, tmp_path: Path) -> None:
    body = bytes(2 * MiB)
    answer = Answer(200, body, {"ETag": '"x"'}, stall_after=MiB // 2)
    async with FakeS3(lambda r: answer) as server:
        store = await open_store(server.url, timeout=1.0)
        started = time.monotonic()
        try:
            with pytest.raises(TransientStoreError):
                await store.download(KEY, tmp_path / "out")
        finally:
            await store.close()
        assert time.monotonic() - started < DEADLINE_CHECK
    assert list(tmp_path.iterdir()) == []  # the partial temp file was removed


async def test_connection_refused_is_transient(aws_env: str) -> None:
    async with FakeS3(lambda r: Answer(200)) as server:
        url = server.url
    store = await open_store(url, timeout=1.0)  # the port is closed now
    try:
        with pytest.raises(TransientStoreError):
            await store.put(KEY, b"x", b64_sha256(b"x"))
    finally:
        await store.close()


async def test_https_to_a_plain_http_endpoint_is_a_configuration_error(aws_env: str) -> None:
    """TLS spoken to a plain-HTTP port (an https:// endpoint for MinIO without TLS) used to be retried as an outage
    for ever: it is permanent, with what to change."""
    async def plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # a TLS ClientHello: an HTTP server answers it as a bad request
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain_http, "127.0.0.1", 0)
    message = await tls_configuration_error(server)
    assert "does not answer TLS (it speaks plain HTTP?): use http:// in MLDASH_S3_ENDPOINT_URL" in message


async def tls_configuration_error(server: asyncio.Server) -> str:
    """A PUT over https:// to `server` (closed after): the permanent TLSConfiguration error's message."""
    store = await open_store(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        with pytest.raises(PermanentStoreError) as raised:
            await store.put(KEY, b"x", b64_sha256(b"x"))
    finally:
        await store.close()
        server.close()
    assert raised.value.code == "TLSConfiguration"
    return str(raised.value)


async def test_an_endpoint_certificate_we_do_not_trust_is_a_configuration_error(aws_env: str, tmp_path: Path) -> None:
    """A self-signed (or private-CA) certificate: no retry changes it; the message says how to trust it."""
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "private-s3")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    message = await tls_configuration_error(server)
    assert f"the certificate of https://127.0.0.1:{port}" in message
    assert "point AWS_CA_BUNDLE at that CA's certificate" in message


# -- what goes over the wire -------------------------------------------------------------------------

async def test_requests_carry_our_checksum_and_no_expect_header(aws_env: str) -> None:
    """No "Expect: 100-continue" (a server that never sends "100 Continue" would hold us), our SHA256 is
    sent as is, and the create is conditional. Large bodies are not hashed a second time for SigV4
    (UNSIGNED-PAYLOAD, even on plain HTTP): the checksum header, which the signature covers, is what protects
    them; a small direct PUT signs the SHA256 it already holds as the payload hash."""
    async with FakeS3(lambda r: s3_error(503, "SlowDown")) as server:
        store = await open_store(server.url, timeout=5.0)
        part = bytearray(os.urandom(5 * MiB))
        medium = os.urandom(DIRECT_PUT_LIMIT + 1)
        try:
            with pytest.raises(TransientStoreError):
                await store.put(KEY, b"small", b64_sha256(b"small"))
            with pytest.raises(TransientStoreError):
                await store.put(KEY, medium, b64_sha256(medium))
            with pytest.raises(TransientStoreError):
                await store.upload_part(KEY, "u1", 1, memoryview(part)[1:], b64_sha256(part[1:]))
        finally:
            await store.close()
    puts = [r for r in server.requests if r.method == "PUT"]
    assert puts and all("expect" not in r.headers for r in puts)
    first = puts[0]
    assert "(direct put)" in first.headers["user-agent"]
    assert first.headers["x-amz-checksum-sha256"] == b64_sha256(b"small")
    assert first.headers["if-none-match"] == "*"
    assert first.headers["x-amz-content-sha256"] == hashlib.sha256(b"small").hexdigest()
    assert first.body == b"small"
    by_botocore = [r for r in puts if r.body == medium]
    assert by_botocore and "(direct put)" not in by_botocore[0].headers["user-agent"]
    assert by_botocore[0].headers["if-none-match"] == "*"
    assert by_botocore[0].target == first.target  # the same URL for the same key, whoever sends it
    parts = [r for r in puts if "partNumber=1" in r.target]
    assert parts and parts[0].headers["x-amz-checksum-sha256"] == b64_sha256(part[1:])
    assert parts[0].body == bytes(part[1:])  # sent from the caller's buffer, by reference (s3_body.py)
    for request in (first, by_botocore[0], parts[0]):
        if request is not first:
            assert request.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        signed = request.headers["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
        assert {"x-amz-checksum-sha256", "x-amz-content-sha256", "host"} <= set(signed)


# -- small PUTs without botocore's pipeline (mldash/store/s3_direct.py) -----------------------------------

ODD_KEY = "root/files/ns/proj/exp/a b/~+%&=é€/model v2 (final).pt"


async def test_direct_put_is_signed_as_s3_expects(s3_bucket: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """With moto's authentication on, moto recomputes every request's SigV4 signature from what it received:
    a direct PUT (and botocore's, for comparison) of a key with spaces, "~", "+", "%" and non-ASCII characters
    is accepted with the right secret, and refused as SignatureDoesNotMatch — permanent — with a wrong one."""
    import boto3

    endpoint_url, bucket = s3_bucket
    iam = boto3.client("iam", endpoint_url=endpoint_url, region_name="us-east-1")
    user = f"mldash-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    small, medium = os.urandom(1000), os.urandom(DIRECT_PUT_LIMIT + 1)
    await asyncio.to_thread(set_moto_auth, endpoint_url, "0")
    try:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        store = await open_store(endpoint_url, bucket, timeout=30.0)
        try:
            assert store._direct is not None
            stored = await store.put(ODD_KEY, small, b64_sha256(small))
            assert stored.checksum_sha256 == b64_sha256(small)
            await store.put(ODD_KEY + ".botocore", medium, b64_sha256(medium))
            head = await store.head(ODD_KEY)
            assert head is not None and (head.size, head.checksum_sha256) == (1000, b64_sha256(small))
        finally:
            await store.close()

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        store = await open_store(endpoint_url, bucket, timeout=30.0)
        try:
            with pytest.raises(PermanentStoreError) as caught:
                await store.put(ODD_KEY + ".2", small, b64_sha256(small))
        finally:
            await store.close()
        assert caught.value.code == "SignatureDoesNotMatch"
    finally:
        await asyncio.to_thread(set_moto_auth, endpoint_url, "inf")


async def test_direct_put_hands_a_redirect_to_botocore_and_stops(aws_env: str) -> None:
    """A redirect (a bucket in another region) is botocore's to handle: the PUT is sent again through botocore,
    and later small PUTs of that store go through botocore from the start."""
    def script(request: Request) -> Answer:
        if "(direct put)" in request.headers.get("user-agent", ""):
            return s3_error(307, "TemporaryRedirect")
        return Answer(200, headers={"ETag": '"e"', "x-amz-checksum-sha256": b64_sha256(b"x")})

    async with FakeS3(script) as server:
        store = await open_store(server.url, timeout=5.0)
        try:
            assert (await store.put(KEY, b"x", b64_sha256(b"x"))).etag == '"e"'
            assert store._direct is None
            await store.put(KEY + "2", b"x", b64_sha256(b"x"))
        finally:
            await store.close()
    direct = ["(direct put)" in r.headers["user-agent"] for r in server.requests]
    assert direct == [True, False, False]


async def test_direct_put_hands_a_redirect_on_its_retry_to_botocore_too(aws_env: str) -> None:
    """A redirect met by the direct path's second attempt (after a 503) is handed to botocore as at the first."""
    def script(request: Request) -> Answer:
        if "(direct put)" not in request.headers.get("user-agent", ""):
            return Answer(200, headers={"ETag": '"e"', "x-amz-checksum-sha256": b64_sha256(b"x")})
        direct_so_far = sum("(direct put)" in r.headers.get("user-agent", "") for r in server.requests)
        return s3_error(503, "SlowDown") if direct_so_far == 1 else s3_error(307, "TemporaryRedirect")

    async with FakeS3(script) as server:
        store = await open_store(server.url, timeout=5.0)
        try:
            assert (await store.put(KEY, b"x", b64_sha256(b"x"))).etag == '"e"'
            assert store._direct is None
        finally:
            await store.close()
    assert ["(direct put)" in r.headers["user-agent"] for r in server.requests] == [True, True, False]


async def test_direct_put_follows_botocore_on_the_endpoint(aws_env: str) -> None:
    """The URL prefix, region and signing name come from botocore's own resolution (no request is sent): virtual
    hosts on AWS, path style for a bucket name with dots (TLS) and for custom endpoints."""
    expected = {
        ("my-bucket", "eu-west-1", None): "https://my-bucket.s3.eu-west-1.amazonaws.com/",
        ("my.bucket", "eu-west-1", None): "https://s3.eu-west-1.amazonaws.com/my.bucket/",
        ("my-bucket", "us-east-1", "http://127.0.0.1:9"): "http://127.0.0.1:9/my-bucket/",
    }
    for (bucket, region, endpoint), prefix in expected.items():
        store = S3Store(bucket, endpoint_url=endpoint, region=region)
        await store.open()
        try:
            assert store._direct is not None
            assert (store._direct.url_prefix, store._direct.region, store._direct.service) == (prefix, region, "s3")
            assert store._direct.url_for("a b/é~") == prefix + "a%20b/%C3%A9~"
        finally:
            await store.close()


def test_error_answers_become_the_client_error_botocore_raises() -> None:
    xml = s3_error(403, "AccessDenied", "no").body
    error = client_error(403, {"x-amz-request-id": "r1"}, xml)
    assert error.response["Error"] == {"Code": "AccessDenied", "Message": "no"}
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert classify_error(error, operation="put", key="k").code == "AccessDenied"
    for body in (b"", b"<html>proxy error</html", b"<html><body>Bad gateway</body></html>"):
        error = client_error(502, {}, body)
        assert error.response["Error"] == {"Code": "502", "Message": "Bad Gateway"}
        assert isinstance(classify_error(error, operation="put", key="k"), TransientStoreError)
    wrapped = (b"<ErrorResponse><Error><Code>ConditionalRequestConflict</Code><Message>m</Message></Error>"
               b"</ErrorResponse>")
    assert isinstance(classify_error(client_error(409, {}, wrapped), operation="put", key="k"), ObjectExistsError)


async def test_direct_put_signs_the_payload_hash_it_is_given(aws_env: str) -> None:
    """The SHA256 the daemon computed while reading the spooled bytes is the signed payload hash, not a second
    hash of the body (S3 compares it with the bytes it receives)."""
    async with FakeS3(lambda r: Answer(200, headers={"ETag": '"e"'})) as server:
        store = await open_store(server.url, timeout=5.0)
        try:
            assert store._direct is not None
            claimed = b64_sha256(b"other bytes")
            await store._direct.put(KEY, b"x", claimed)
        finally:
            await store.close()
    assert server.requests[0].headers["x-amz-content-sha256"] == hashlib.sha256(b"other bytes").hexdigest()


async def test_direct_put_is_not_used_when_botocore_sends_more(aws_env: str) -> None:
    """If botocore's PutObject carries a header the direct path does not send (a newer botocore, a hook of the
    deployment), the probe at open sees it and every PUT keeps botocore's path."""
    from aiobotocore.session import get_session

    from mldash.store.s3_direct import DirectPut

    store = await open_store("http://127.0.0.1:9", timeout=5.0)
    try:
        assert store._direct is not None

        def extra(request: object, **_: object) -> None:
            request.headers["x-amz-request-payer"] = "requester"  # type: ignore[attr-defined]

        store._client.meta.events.register("before-sign.s3.PutObject", extra)
        assert await DirectPut.learn(store._client, get_session(), store.bucket) is None
    finally:
        await store.close()


# -- redirects ------------------------------------------------------------------------------------------
# botocore follows a redirect the way S3 sends one: by the region it names (x-amz-bucket-region, or <Region> in
# the error), once per request, asking HeadBucket where an answer names none; it never follows a Location.
# These answers name no region, so no client can follow them: each request must end in a clear, permanent error
# after a bounded number of requests (botocore's own HeadBucket lookup once used to recurse ~110 times deep,
# sending a HEAD at every level, and end in a RecursionError that was classified transient: retried forever).


def to_itself(status: int) -> Script:
    """A redirect answered with a Location naming the very URL asked for (a proxy's loop)."""
    return lambda r: Answer(status, headers={"Location": f"http://{r.headers['host']}{r.target}"})


UNFOLLOWABLE_REDIRECTS: dict[str, Script] = {
    "307-s3-error": lambda r: s3_error(307, "TemporaryRedirect"),  # S3-shaped, naming no endpoint or region
    "301-permanent-redirect": lambda r: s3_error(301, "PermanentRedirect"),
    "302-bare": lambda r: Answer(302),  # a proxy's redirect without a body
    "308-bare": lambda r: Answer(308),
    "307-location-to-itself": to_itself(307),
    "301-location-to-itself": to_itself(301),
}
BODY = os.urandom(DIRECT_PUT_LIMIT + 1)  # above the direct path's limit: sent by botocore
REDIRECTED_CALLS: dict[str, Callable[[S3Store, Path], Awaitable[object]]] = {
    "put-direct": lambda store, tmp: store.put(KEY, b"x", b64_sha256(b"x")),
    "put": lambda store, tmp: store.put(KEY, BODY, b64_sha256(BODY)),
    "create_multipart": lambda store, tmp: store.create_multipart(KEY),
    "upload_part": lambda store, tmp: store.upload_part(KEY, "u1", 1, BODY, b64_sha256(BODY)),
    "complete_multipart": lambda store, tmp: store.complete_multipart(KEY, "u1", [PartReceipt(1, 5, '"e"', None)]),
    "head": lambda store, tmp: store.head(KEY),
    "download": lambda store, tmp: store.download(KEY, tmp / "out"),
}


@pytest.mark.parametrize("call", list(REDIRECTED_CALLS))
@pytest.mark.parametrize("redirect", list(UNFOLLOWABLE_REDIRECTS))
async def test_redirect_the_client_cannot_follow_fails_permanently_and_bounded(
        aws_env: str, tmp_path: Path, redirect: str, call: str) -> None:
    """At most: the direct PUT, botocore's request, and botocore's one HeadBucket asking for the region; then a
    permanent error that names the endpoint, the status and what to check."""
    script = UNFOLLOWABLE_REDIRECTS[redirect]
    status = int(redirect[:3])
    async with FakeS3(script) as server:
        url = server.url
        store = await open_store(url, timeout=5.0)
        try:
            with pytest.raises(StoreError) as caught:
                await REDIRECTED_CALLS[call](store, tmp_path)
            if call == "put-direct":
                assert store._direct is None, "a redirect answering a direct PUT hands every later PUT to botocore"
        finally:
            await store.close()
    sent = [(r.method, r.target.split("?")[0]) for r in server.requests]
    assert len(sent) <= (3 if call == "put-direct" else 2), sent
    assert sent.count(("HEAD", "/bucket")) <= 1, sent
    assert type(caught.value) is PermanentStoreError, caught.value
    message = str(caught.value)
    assert url in message and f" {status}" in message and "MLDASH_S3_ENDPOINT_URL" in message, message
    if "location" in redirect:
        assert f"redirecting to {url}" in message, message
    else:
        assert "without a Location or a region" in message, message
    assert list(tmp_path.iterdir()) == []


async def test_redirect_elsewhere_is_not_followed(aws_env: str) -> None:
    """A Location is not followed, as botocore does not follow one (aiohttp would: the PUT, body included and
    without its Authorization header, would go to whatever host the answer names)."""
    async with FakeS3(lambda r: Answer(200, headers={"ETag": '"e"'})) as elsewhere:
        elsewhere_url = elsewhere.url
        async with FakeS3(lambda r: Answer(307, headers={"Location": f"{elsewhere.url}{r.target}"})) as server:
            store = await open_store(server.url, timeout=5.0)
            try:
                for body in (b"x", BODY):
                    with pytest.raises(PermanentStoreError) as caught:
                        await store.put(KEY, body, b64_sha256(body))
                    assert f"redirecting to {elsewhere_url}" in str(caught.value)
            finally:
                await store.close()
    assert elsewhere.requests == []


def signed_for(request: Request) -> str:
    """The region of a SigV4 request's credential scope."""
    return request.headers["authorization"].split("Credential=", 1)[1].split("/")[2]


@pytest.mark.parametrize("size", [1, DIRECT_PUT_LIMIT + 1], ids=["direct", "botocore"])
async def test_redirect_naming_a_region_is_followed_once(aws_env: str, size: int) -> None:
    """What real S3 sends (a bucket in another region, or a new bucket's name still propagating) is botocore's
    to follow, once per request; an endpoint that answers the followed request with the same redirect again
    gets a transient error (S3's 307 TemporaryRedirect passes), not a loop."""
    body = os.urandom(size)
    moved = s3_error(307, "TemporaryRedirect")
    moved.headers["x-amz-bucket-region"] = "eu-west-1"

    def moves_once(request: Request) -> Answer:
        return moved if signed_for(request) == "us-east-1" else Answer(200, headers={"ETag": '"e"'})

    async with FakeS3(moves_once) as server:
        store = await open_store(server.url, timeout=5.0)
        try:
            assert (await store.put(KEY, body, b64_sha256(body))).etag == '"e"'
        finally:
            await store.close()
    assert [signed_for(r) for r in server.requests][-2:] == ["us-east-1", "eu-west-1"]
    assert len(server.requests) == (3 if size == 1 else 2)

    async with FakeS3(lambda r: moved) as server:
        store = await open_store(server.url, timeout=5.0)
        try:
            with pytest.raises(TransientStoreError) as caught:
                await store.put(KEY, body, b64_sha256(body))
        finally:
            await store.close()
    assert len(server.requests) == (3 if size == 1 else 2)
    assert "307" in str(caught.value) and "eu-west-1" in str(caught.value)


# -- classification of scripted answers -----------------------------------------------------------------

@pytest.mark.parametrize(("answer", "expected", "code"), [
    (s3_error(503, "SlowDown"), TransientStoreError, "SlowDown"),
    (s3_error(500, "InternalError"), TransientStoreError, "InternalError"),
    (s3_error(400, "RequestTimeout"), TransientStoreError, "RequestTimeout"),
    (s3_error(403, "RequestTimeTooSkewed"), TransientStoreError, "RequestTimeTooSkewed"),
    (s3_error(400, "BadDigest"), TransientStoreError, "BadDigest"),
    (s3_error(429, "SomethingNew"), TransientStoreError, "SomethingNew"),
    (s3_error(412, "PreconditionFailed"), ObjectExistsError, "PreconditionFailed"),
    (s3_error(409, "ConditionalRequestConflict"), ObjectExistsError, "ConditionalRequestConflict"),
    (s3_error(403, "AccessDenied"), PermanentStoreError, "AccessDenied"),
    (s3_error(403, "SignatureDoesNotMatch"), PermanentStoreError, "SignatureDoesNotMatch"),
    (s3_error(400, "InvalidDigest"), PermanentStoreError, "InvalidDigest"),
    (s3_error(400, "SomethingNew"), PermanentStoreError, "SomethingNew"),
    # No success either, as through botocore: a 200 whose body is an error document (S3 reports some errors after
    # sending 200) or is cut off, and a 200 without an ETag.
    (Answer(200, s3_error(200, "InternalError").body, {"ETag": '"e"'}), TransientStoreError, "InternalError"),
    (Answer(200, b"<Err", {"ETag": '"e"'}), TransientStoreError, "500"),
    (Answer(200, b""), TransientStoreError, "IncompleteResponse"),
])
async def test_put_error_classification(aws_env: str, answer: Answer, expected: type[StoreError],
                                        code: str) -> None:
    async with FakeS3(lambda r: answer) as server:
        store = await open_store(server.url, timeout=5.0)
        try:
            with pytest.raises(StoreError) as caught:
                await store.put(KEY, b"x", b64_sha256(b"x"))
        finally:
            await store.close()
    assert type(caught.value) is expected
    assert caught.value.code == code


@pytest.mark.parametrize(("status", "expected"), [(404, None), (403, PermanentStoreError),
                                                  (500, TransientStoreError)])
async def test_head_status_without_body(aws_env: str, status: int, expected: type[StoreError] | None) -> None:
    async with FakeS3(lambda r: Answer(status)) as server:
        store = await open_store(server.url, timeout=5.0)
        try:
            if expected is None:
                assert await store.head(KEY) is None
            else:
                with pytest.raises(expected):
                    await store.head(KEY)
        finally:
            await store.close()


LIST_PARTS_OK = (b'<?xml version="1.0" encoding="UTF-8"?><ListPartsResult><Bucket>bucket</Bucket>'
                 b"<Key>k</Key><UploadId>u1</UploadId><IsTruncated>false</IsTruncated></ListPartsResult>")


async def test_complete_200_with_error_body_is_transient(aws_env: str) -> None:
    """S3 may answer CompleteMultipartUpload with 200 and an <Error> body: that is a failure, retry it."""
    def script(request: Request) -> Answer:
        if request.method == "POST":
            return s3_error(200, "InternalError", "We encountered an internal error. Please try again.")
        return Answer(200, LIST_PARTS_OK, {"Content-Type": "application/xml"})  # the upload still exists

    async with FakeS3(script) as server:
        store = await open_store(server.url, timeout=5.0)
        try:
            with pytest.raises(TransientStoreError) as caught:
                await store.complete_multipart(KEY, "u1", [PartReceipt(1, 5, '"e"', None)])
        finally:
            await store.close()
    assert caught.value.code == "InternalError"
    assert [r.method for r in server.requests].count("POST") >= 1


async def test_complete_failing_on_a_vanished_upload_says_so(aws_env: str) -> None:
    def script(request: Request) -> Answer:
        if request.method == "POST":
            return s3_error(500, "InternalError")
        return s3_error(404, "NoSuchUpload")

    async with FakeS3(script) as server:
        store = await open_store(server.url, timeout=5.0)
        try:
            with pytest.raises(NoSuchUploadError):
                await store.complete_multipart(KEY, "u1", [PartReceipt(1, 5, '"e"', None)])
        finally:
            await store.close()


async def test_complete_conflict_is_object_exists(aws_env: str) -> None:
    async with FakeS3(lambda r: s3_error(409, "ConditionalRequestConflict")) as server:
        store = await open_store(server.url, timeout=5.0)
        try:
            with pytest.raises(ObjectExistsError):
                await store.complete_multipart(KEY, "u1", [PartReceipt(1, 5, '"e"', None)])
        finally:
            await store.close()


async def test_corrupt_download_is_detected_and_not_kept(aws_env: str, tmp_path: Path) -> None:
    body = b"the bytes that arrive" * 100
    answer = Answer(200, body, {"ETag": '"x"', "x-amz-checksum-sha256": b64_sha256(b"the bytes that were stored")})
    async with FakeS3(lambda r: answer) as server:
        store = await open_store(server.url, timeout=5.0)
        try:
            with pytest.raises(TransientStoreError) as caught:
                await store.download(KEY, tmp_path / "out")
        finally:
            await store.close()
    assert caught.value.code == "FlexibleChecksumError"
    assert list(tmp_path.iterdir()) == []


def test_classification_of_client_side_failures() -> None:
    import botocore.exceptions as bce

    assert isinstance(classify_error(TimeoutError(), operation="put", key="k"), TransientStoreError)
    assert isinstance(classify_error(bce.NoCredentialsError(), operation="put", key="k"), PermanentStoreError)
    assert isinstance(classify_error(bce.EndpointConnectionError(endpoint_url="http://x"), operation="put", key="k"),
                      TransientStoreError)
    assert isinstance(classify_error(ConnectionResetError(), operation="put", key="k"), TransientStoreError)
    error = PermanentStoreError("kept", code="X")
    assert classify_error(error, operation="put", key="k") is error


@pytest.mark.parametrize("size", [1, DIRECT_PUT_LIMIT + 1], ids=["direct", "botocore"])
async def test_botocore_retries_at_most_once(aws_env: str, size: int) -> None:
    """Retry policy belongs to the daemon: botocore — or a direct PUT, likewise — may add one quick retry
    (see mldash/store/s3.py), no more; a permanent error is not retried at all."""
    body = os.urandom(size)
    for answer, requests in ((s3_error(503, "SlowDown"), 2), (s3_error(403, "AccessDenied"), 1),
                             (s3_error(400, "BadDigest"), 1)):  # what botocore retries, not what we call transient
        async with FakeS3(lambda r, answer=answer: answer) as server:
            store = await open_store(server.url, timeout=10.0)
            try:
                with pytest.raises(StoreError):
                    await store.put(KEY, body, b64_sha256(body))
            finally:
                await store.close()
        assert len(server.requests) == requests


async def test_store_leaves_botocore_logging_alone(s3_bucket: tuple[str, str]) -> None:
    """botocore at DEBUG logs Authorization headers: the store must never turn that on or add handlers."""
    import logging

    before = [(name, logging.getLogger(name).level, list(logging.getLogger(name).handlers))
              for name in ("botocore", "aiobotocore", "boto3", "aioboto3")]
    endpoint_url, bucket = s3_bucket
    store = await open_store(endpoint_url, bucket, timeout=30.0)
    try:
        await store.put(KEY, b"x", b64_sha256(b"x"))
    finally:
        await store.close()
    after = [(name, logging.getLogger(name).level, list(logging.getLogger(name).handlers))
             for name in ("botocore", "aiobotocore", "boto3", "aioboto3")]
    assert after == before


# -- endpoint resolution ------------------------------------------------------------------------------

async def test_endpoint_is_resolved_once_not_per_key(s3_store: S3Store) -> None:
    """botocore would evaluate S3's endpoint ruleset for every object key (the key is one of its inputs and
    its cache never hits); the store drops the inputs no rule reads, so the cached endpoint serves every key."""
    ruleset = s3_store._client._ruleset_resolver._provider.ruleset
    evaluations = 0
    original = ruleset.evaluate

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal evaluations
        evaluations += 1
        return original(*args, **kwargs)

    ruleset.evaluate = counting
    try:
        for i in range(5):  # bodies over DIRECT_PUT_LIMIT: these go through botocore
            data = os.urandom(DIRECT_PUT_LIMIT + 1 + i)
            await s3_store.put(s3_store.key(f"files/ns/p/e/x/{uuid.uuid4().hex}/f{i}"), data, b64_sha256(data))
    finally:
        del ruleset.evaluate
    assert evaluations <= 1


def test_only_inputs_no_rule_reads_are_dropped() -> None:
    @dataclass
    class Spec:
        required: bool = False
        builtin: str | None = None

    definitions = {"Bucket": Spec(), "Key": Spec(), "Prefix": Spec(), "Region": Spec(builtin="AWS::Region"),
                   "Needed": Spec(required=True), "Templated": Spec()}
    rules = {"rules": [{"conditions": [{"fn": "isSet", "argv": [{"ref": "Bucket"}]}],
                        "endpoint": {"url": "https://{Templated}.example.com"}}]}
    assert unread_endpoint_params(rules, definitions) == {"Key", "Prefix"}
    rules["rules"].append({"conditions": [{"fn": "isSet", "argv": [{"ref": "Key"}]}], "error": "x"})
    assert unread_endpoint_params(rules, definitions) == {"Prefix"}
