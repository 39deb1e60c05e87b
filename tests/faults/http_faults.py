"""S3-shaped HTTP pieces for fault injection: request patterns for `match=` and canned error responses.

Patterns are searched in the request head (request line + headers) by the proxy in HTTP mode. Botocore
uses path-style URLs against an IP endpoint (`PUT /bucket/key?partNumber=1&uploadId=...`); the patterns
accept the query parameters in any order.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from xml.sax.saxutils import escape

_Q = rb"[^ ]*[?&]"  # up to a query parameter in the request target

# One pattern per S3 operation we fault. `\A` anchors at the request line.
CREATE_MULTIPART_UPLOAD = re.compile(rb"\APOST " + _Q + rb"uploads(?:[=& ]|\Z)")
UPLOAD_PART = re.compile(rb"\APUT (?=" + _Q + rb"partNumber=)(?=" + _Q + rb"uploadId=)")
COMPLETE_MULTIPART_UPLOAD = re.compile(rb"\APOST " + _Q + rb"uploadId=")
ABORT_MULTIPART_UPLOAD = re.compile(rb"\ADELETE " + _Q + rb"uploadId=")
LIST_PARTS = re.compile(rb"\AGET " + _Q + rb"uploadId=")
# PutObject: a PUT that is neither an UploadPart nor a copy (x-amz-copy-source) nor a bucket-level PUT.
PUT_OBJECT = re.compile(rb"\APUT /[^/ ?]+/(?![^ ]*[?&](?:partNumber|uploadId)=)(?!.*\r\nx-amz-copy-source:)",
                        re.IGNORECASE | re.DOTALL)
GET_OBJECT = re.compile(rb"\AGET /[^/ ?]+/[^ ?]+(?:\?(?![^ ]*uploadId=)[^ ]*)? ")
HEAD_OBJECT = re.compile(rb"\AHEAD /[^/ ?]+/[^ ?]+")
ANY_WRITE = re.compile(rb"\A(?:PUT|POST|DELETE) ")


@dataclass(frozen=True)
class S3Error:
    """An S3 error response: status, error code, message (as S3 documents them)."""

    status: int
    code: str
    message: str

    def body(self, request_id: str = "0000000000000000", resource: str = "") -> bytes:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(self.code)}</Code><Message>{escape(self.message)}</Message>"
            f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId></Error>"
        ).encode()

    def response(self, request_id: str = "0000000000000000", close: bool = False,
                 extra_headers: dict[str, str] | None = None) -> bytes:
        """The whole HTTP/1.1 response, ready to write to a socket."""
        return http_response(self.status, self.body(request_id), {
            "Content-Type": "application/xml",
            "x-amz-request-id": request_id,
            **(extra_headers or {}),
        }, close=close)


SLOW_DOWN = S3Error(503, "SlowDown", "Please reduce your request rate.")
SERVICE_UNAVAILABLE = S3Error(503, "ServiceUnavailable", "Service is unable to handle request.")
INTERNAL_ERROR = S3Error(500, "InternalError", "We encountered an internal error. Please try again.")
ACCESS_DENIED = S3Error(403, "AccessDenied", "Access Denied")
INVALID_ACCESS_KEY_ID = S3Error(403, "InvalidAccessKeyId",
                                "The AWS Access Key Id you provided does not exist in our records.")
SIGNATURE_DOES_NOT_MATCH = S3Error(403, "SignatureDoesNotMatch",
                                   "The request signature we calculated does not match the signature you provided.")
EXPIRED_TOKEN = S3Error(400, "ExpiredToken", "The provided token has expired.")
NO_SUCH_BUCKET = S3Error(404, "NoSuchBucket", "The specified bucket does not exist")
NO_SUCH_UPLOAD = S3Error(404, "NoSuchUpload", "The specified upload does not exist.")
BAD_DIGEST = S3Error(400, "BadDigest",
                     "The Content-MD5 or checksum value you specified did not match what we received.")
REQUEST_TIMEOUT = S3Error(400, "RequestTimeout", "Your socket connection to the server was not read from or written "
                                                 "to within the timeout period.")
# Redirects as S3 words them, but naming no <Endpoint>, Location or x-amz-bucket-region: what a misconfigured
# endpoint or a proxy in front of it may send, and what no client can follow.
TEMPORARY_REDIRECT_NOWHERE = S3Error(307, "TemporaryRedirect", "Please re-send this request to the specified "
                                     "temporary endpoint. Continue to use the original request endpoint for future "
                                     "requests.")
PERMANENT_REDIRECT_NOWHERE = S3Error(301, "PermanentRedirect", "The bucket you are attempting to access must be "
                                     "addressed using the specified endpoint. Please send all future requests to "
                                     "this endpoint.")
# CompleteMultipartUpload can fail *after* S3 sent "200 OK": the error is in the body.
COMPLETE_200_INTERNAL_ERROR = S3Error(200, "InternalError", "We encountered an internal error. Please try again.")

_REASONS = {200: "OK", 301: "Moved Permanently", 307: "Temporary Redirect",
            400: "Bad Request", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
            412: "Precondition Failed", 429: "Too Many Requests", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable"}

_request_ids = itertools.count(1)


def next_request_id() -> str:
    return f"FAULT{next(_request_ids):011d}"


def http_response(status: int, body: bytes, headers: dict[str, str] | None = None, close: bool = False) -> bytes:
    """An HTTP/1.1 response with a Content-Length body."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    hdrs = {"Content-Length": str(len(body)), **(headers or {})}
    if close:
        hdrs["Connection"] = "close"
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
