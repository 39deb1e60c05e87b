"""`DirectPut`: small single PUTs without botocore's per-request pipeline — same signature, same HTTP session.

Why: a 4 KiB PutObject through aiobotocore costs the daemon ~1.3 ms of CPU on this machine, most of it
machinery a known, fixed request does not need: the event hooks, rebuilding the User-Agent string twice,
parameter validation and serialization, the endpoint ruleset's inputs, the response parser and the retry
handler. Signed by botocore's own `S3SigV4Auth` and sent on the client's own HTTP session, the same PUT
costs ~0.65 ms (`python -m benchmarks.diagnose put-paths`). For a daemon draining many small files — metrics
and configs saved every step — that is CPU it takes from the training on the same node; against a local S3
server on the same cores (MinIO on a workstation, moto here) it is also throughput.

What stays botocore's, so nothing about the request is decided twice:
- the request itself: at open, botocore prepares and signs a PutObject of a probe key as it would send one,
  and a 'before-send' handler stops it (nothing goes over the network). Its URL gives the prefix (ruleset,
  addressing style) and its signature the scope (region, signing name); the path is used only when that
  request is plain SigV4 (not S3 Express or SigV4a), quotes the probe key as `url_for` does, and carries no
  header we do not send;
- the credentials (the session's provider chain; `get_frozen_credentials` refreshes expiring ones);
- the signature (`S3SigV4Auth`, over every header but the User-Agent), with the payload hash we already
  hold: the body's SHA256, which S3 checks (botocore would send UNSIGNED-PAYLOAD and rely on the checksum
  header; both are signed here);
- the connection pool, TLS and proxy settings (the client's HTTP session sends the request), and the
  exception types of transport failures, which `classify_error` already knows;
- reading an error: botocore's REST-XML parser gives the same `ClientError` its client would raise, so one
  classification decides for both paths; a 2xx whose body is an error document (or not XML) is a 500, as
  botocore's `_handle_200_error` makes it, and a 2xx without an ETag is no success either;
- the retry: one more attempt for what botocore's standard mode retries (transport errors, 500/502/503/504,
  throttling and request-timeout codes), after its first backoff step.
A redirect or a region error is handed back (`HandBack`): botocore's region redirector knows what to do with
it, and the store stops using this path. Not seen by this path: botocore's event hooks (a Stubber, tracing
instrumentation, `user_agent_extra`) — none is used here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote, urlsplit

import botocore
import botocore.exceptions as bce
import botocore.parsers
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.retries.standard import ThrottledRetryableChecker, TransientRetryableChecker

import mldash

DIRECT_PUT_LIMIT = 64 << 10  # bodies up to this size: above it, the transfer outweighs the per-request CPU
# Characters S3 keys may hold that URL quoting treats differently (space, "~", "+", "%", non-ASCII): botocore's
# URL for this key shows whether it quotes keys the way `url_for` does (if not, the direct path is not used).
_PROBE_KEY = "mldash-probe/a b~+%é"
# Headers of botocore's PutObject that say nothing about the request itself (ours has its own of each).
_OWN_HEADERS = frozenset({"authorization", "x-amz-date", "user-agent", "amz-sdk-invocation-id", "amz-sdk-request",
                          "content-length"})
_SENT_HEADERS = frozenset({"if-none-match", "x-amz-sdk-checksum-algorithm", "x-amz-checksum-sha256",
                           "x-amz-content-sha256", "x-amz-security-token"})
# Answers that botocore's S3 region redirector handles (a bucket in another region than configured).
_REDIRECT_STATUSES = frozenset({301, 302, 307, 308})
_REGION_ERROR_CODES = frozenset({"AuthorizationHeaderMalformed", "IllegalLocationConstraintException",
                                 "PermanentRedirect", "TemporaryRedirect"})
# What botocore's standard retry mode retries (besides transport errors), from its own tables.
_RETRIED_STATUSES = frozenset(TransientRetryableChecker._TRANSIENT_STATUS_CODES)
_RETRIED_CODES = frozenset(TransientRetryableChecker._TRANSIENT_ERROR_CODES
                           + ThrottledRetryableChecker._THROTTLED_ERROR_CODES)
_EMPTY_SHA256_B64 = base64.b64encode(hashlib.sha256(b"").digest()).decode()
_ERROR_PARSER = botocore.parsers.create_parser("rest-xml")


class HandBack(Exception):
    """This request needs botocore's handling (a redirect, a region error): send it the usual way."""


class DirectPut:
    """Sends PutObject requests for one bucket; build with `learn`. Use on the event loop that opened the client."""

    def __init__(self, http_session: Any, credentials: Any, url_prefix: str, region: str, service: str) -> None:
        self._http = http_session
        self._credentials = credentials
        self.url_prefix = url_prefix
        self.region = region
        self.service = service
        self._user_agent = f"mldash/{mldash.__version__} Botocore/{botocore.__version__} (direct put)"

    @classmethod
    async def learn(cls, client: Any, session: Any, bucket: str) -> DirectPut | None:
        """The direct path for `bucket` on `client`, or None where it would not send what botocore sends."""
        http_session = getattr(getattr(client, "_endpoint", None), "http_session", None)
        if http_session is None or not hasattr(http_session, "send") or bucket.endswith("--x-s3"):
            return None  # (an S3 Express directory bucket: its probe would open a session over the network)
        credentials = await session.get_credentials()
        if credentials is None:  # anonymous access: botocore sends unsigned requests, we do not
            return None
        # Let botocore prepare and sign a PutObject of a probe key exactly as it would send one, and stop it
        # there (a 'before-send' handler that raises: nothing goes over the network).
        captured: list[Any] = []

        def capture(request: Any, **_: Any) -> None:
            captured.append(request)
            raise _Captured

        client.meta.events.register_first("before-send.s3.PutObject", capture)
        try:
            await client.put_object(Bucket=bucket, Key=_PROBE_KEY, Body=b"", ChecksumAlgorithm="SHA256",
                                    ChecksumSHA256=_EMPTY_SHA256_B64, IfNoneMatch="*")
        except _Captured:
            pass
        finally:
            client.meta.events.unregister("before-send.s3.PutObject", capture)
        if not captured:
            return None
        parts = urlsplit(captured[0].url)
        authorization = captured[0].headers.get("Authorization", b"")
        if isinstance(authorization, bytes):
            authorization = authorization.decode("ascii", "replace")
        algorithm, _, fields = authorization.partition(" Credential=")
        scope = fields.split(",", 1)[0].split("/")  # access key id/date/region/service/aws4_request
        quoted_probe = quote(_PROBE_KEY, safe="/~")
        plain_sigv4 = algorithm == "AWS4-HMAC-SHA256" and len(scope) == 5 and scope[3:] == ["s3", "aws4_request"]
        unknown_headers = {name.lower() for name in captured[0].headers} - _OWN_HEADERS - _SENT_HEADERS
        if not plain_sigv4 or unknown_headers or parts.query or not parts.path.endswith("/" + quoted_probe):
            return None
        prefix = f"{parts.scheme}://{parts.netloc}{parts.path[:-len(quoted_probe)]}"
        return cls(http_session, credentials, prefix, region=scope[2], service=scope[3])

    def url_for(self, key: str) -> str:
        # As botocore renders the greedy {Key+} label of PutObject's URI (percent-encoded, "/" and "~" kept).
        return self.url_prefix + quote(key, safe="/~")

    async def put(self, key: str, data: bytes, sha256_b64: str) -> Any:
        """One attempt: the response headers of a 2xx (case-insensitive); botocore's `ClientError` or transport
        error else; `HandBack` for an answer botocore's region redirector should handle."""
        try:
            payload_hash = base64.b64decode(sha256_b64, validate=True).hex()
        except (binascii.Error, ValueError) as exc:
            raise bce.ParamValidationError(report=f"ChecksumSHA256 {sha256_b64!r} is not base64") from exc
        request = AWSRequest(method="PUT", url=self.url_for(key), data=data, headers={
            "User-Agent": self._user_agent,
            "If-None-Match": "*",
            "x-amz-sdk-checksum-algorithm": "SHA256",
            "x-amz-checksum-sha256": sha256_b64,
        })
        request.context["payload_sha256"] = payload_hash
        frozen = await self._credentials.get_frozen_credentials()
        _KnownPayloadAuth(frozen, self.service, self.region).add_auth(request)
        response = await self._http.send(request.prepare())
        body = await response.content
        status = response.status_code
        if 200 <= status < 300:
            if body and _is_error_document(body):
                status = 500  # as botocore's _handle_200_error: S3 reported an error after sending 200
            elif not response.headers.get("etag"):
                raise bce.ClientError({"Error": {"Code": "IncompleteResponse", "Message": "a 2xx without an ETag"},
                                       "ResponseMetadata": {"HTTPStatusCode": 500}}, "PutObject")
            else:
                return response.headers
        error = client_error(status, response.headers, body)
        if status in _REDIRECT_STATUSES or error.response["Error"]["Code"] in _REGION_ERROR_CODES:
            raise HandBack(f"{status} {error.response['Error']['Code']}") from error
        raise error


def is_retried(exc: BaseException) -> bool:
    """Whether botocore's standard retry mode would try `exc`'s request once more."""
    if isinstance(exc, bce.HTTPClientError):
        return True
    if isinstance(exc, bce.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in _RETRIED_STATUSES or exc.response.get("Error", {}).get("Code") in _RETRIED_CODES
    return False


class _KnownPayloadAuth(S3SigV4Auth):
    """SigV4 for S3 with the payload hash the caller already computed (request.context["payload_sha256"]),
    instead of hashing the body once more."""

    def payload(self, request: AWSRequest) -> str:
        return str(request.context["payload_sha256"])


class _Captured(Exception):
    """Raised by the probe's 'before-send' handler: the request was prepared, and must not be sent."""


def client_error(status: int, headers: Any, body: bytes) -> bce.ClientError:
    """The `ClientError` botocore raises for an S3 error answer (its REST-XML parser: the document's Code and
    Message; without one, the status and its reason phrase)."""
    parsed = _ERROR_PARSER.parse({"status_code": status, "headers": dict(headers), "body": body}, None)
    return bce.ClientError(parsed, "PutObject")


def _is_error_document(body: bytes) -> bool:
    try:
        return ET.fromstring(body).tag == "Error"
    except ET.ParseError:
        return True  # a truncated or garbled answer: botocore treats it as a 500 too
