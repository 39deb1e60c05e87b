"""`DirectPut`: small single PUTs without botocore's per-request pipeline — same signature, same HTTP session.

Why: a 4 KiB PutObject through aiobotocore costs the daemon ~1.3 ms of CPU on this machine, most of it
machinery a known, fixed request does not need: the event hooks, rebuilding the User-Agent string twice,
parameter validation and serialization, the endpoint ruleset's inputs, the response parser and the retry
handler. Signed by botocore's own `S3SigV4Auth` and sent on the client's own HTTP session, the same PUT
costs ~0.5 ms (`benchmarks.diagnose put-paths`). For a daemon draining many small files — metrics and
configs saved every step — that is the CPU it takes from the training on the same node; against a local
S3 server on the same cores (MinIO on a workstation, moto here) it is also throughput.

What stays botocore's, so nothing about the request is decided twice:
- the endpoint, learned once per store from a PutObject of a probe key that botocore prepares and signs
  but does not send (the same ruleset, addressing style, region and signing scope), and used only when
  that request is plain SigV4 (S3 Express and SigV4a endpoints keep botocore's path);
- the credentials (the session's provider chain; `get_frozen_credentials` refreshes expiring ones);
- the signature (`S3SigV4Auth`, over every header we send but the User-Agent);
- the connection pool, TLS and proxy settings (the client's HTTP session sends the request), and the
  exception types of transport failures, which `classify_error` already knows.

What is ours: building the request — the same headers botocore sends for our PutObject, except that the
payload hash is the body's SHA256 we already hold instead of UNSIGNED-PAYLOAD (free here, and S3 checks
it) — and reading the answer: a 2xx gives the ETag and checksum; anything else becomes the `ClientError`
botocore would raise (its XML Code and Message, or the status as the code when there is no body), so one
classification decides for both paths. A redirect or a region error is handed back (`HandBack`): botocore's
region redirector knows what to do with it, and the store then stops using this path.
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
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

import mldash

DIRECT_PUT_LIMIT = 64 << 10  # bodies up to this size: above it, the transfer outweighs the per-request CPU
# Characters S3 keys may hold that URL quoting treats differently (space, "~", "+", "%", non-ASCII): botocore's
# URL for this key shows whether it quotes keys the way `url_for` does (if not, the direct path is not used).
_PROBE_KEY = "mldash-probe/a b~+%é"
# Answers that botocore's S3 region redirector handles (a bucket in another region than configured).
_REDIRECT_STATUSES = frozenset({301, 302, 307, 308})
_REGION_ERROR_CODES = frozenset({"AuthorizationHeaderMalformed", "IllegalLocationConstraintException",
                                 "PermanentRedirect", "TemporaryRedirect"})
_EMPTY_SHA256_B64 = base64.b64encode(hashlib.sha256(b"").digest()).decode()
_ERROR_BODY_LIMIT = 64 << 10  # an error document is a few hundred bytes; never parse more than this


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
        if http_session is None or not hasattr(http_session, "send"):
            return None
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
        plain_sigv4 = (algorithm == "AWS4-HMAC-SHA256" and len(scope) == 5 and scope[3:] == ["s3", "aws4_request"]
                       and "X-Amz-S3session-Token" not in captured[0].headers)
        if not plain_sigv4 or parts.query or not parts.path.endswith("/" + quoted_probe):
            return None
        prefix = f"{parts.scheme}://{parts.netloc}{parts.path[:-len(quoted_probe)]}"
        return cls(http_session, credentials, prefix, region=scope[2], service=scope[3])

    def url_for(self, key: str) -> str:
        # As botocore renders the greedy {Key+} label of PutObject's URI (percent-encoded, "/" and "~" kept).
        return self.url_prefix + quote(key, safe="/~")

    async def put(self, key: str, data: bytes, sha256_b64: str) -> dict[str, str]:
        """One attempt: the response headers of a 2xx; a `ClientError` (or botocore's transport error) else."""
        try:
            payload_hash = base64.b64decode(sha256_b64, validate=True).hex()
        except (binascii.Error, ValueError) as exc:
            raise bce.ParamValidationError(report=f"ChecksumSHA256 {sha256_b64!r} is not base64") from exc
        request = AWSRequest(method="PUT", url=self.url_for(key), data=data, headers={
            "User-Agent": self._user_agent,
            "If-None-Match": "*",
            "x-amz-sdk-checksum-algorithm": "SHA256",
            "x-amz-checksum-sha256": sha256_b64,
            "X-Amz-Content-SHA256": payload_hash,
        })
        frozen = await self._credentials.get_frozen_credentials()
        S3SigV4Auth(frozen, self.service, self.region).add_auth(request)
        response = await self._http.send(request.prepare())
        body = await response.content
        if 200 <= response.status_code < 300:
            return dict(response.headers)
        error = client_error(response.status_code, dict(response.headers), body)
        if response.status_code in _REDIRECT_STATUSES or error.response["Error"]["Code"] in _REGION_ERROR_CODES:
            raise HandBack(f"{response.status_code} {error.response['Error']['Code']}") from error
        raise error


class _Captured(Exception):
    """Raised by the probe's 'before-send' handler: the request was prepared, and must not be sent."""


def client_error(status: int, headers: dict[str, str], body: bytes) -> bce.ClientError:
    """The `ClientError` botocore raises for an S3 error answer: the XML's Code and Message, else the status."""
    code = message = ""
    if body:
        try:
            root = ET.fromstring(body[:_ERROR_BODY_LIMIT])
        except ET.ParseError:  # not XML (a proxy's HTML page, a truncated body): the status speaks
            root = None
        if root is not None:
            code = (root.findtext("Code") or "").strip()
            message = (root.findtext("Message") or "").strip()
    return bce.ClientError({
        "Error": {"Code": code or str(status), "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers,
                             "RequestId": headers.get("x-amz-request-id", "")},
    }, "PutObject")
