"""What an S3 failure means for the daemon: `classify_error` turns anything an S3 call raised into the
`StoreError` whose class decides whether the daemon retries it (transient) or leaves the entry 'failed'
until a human acts (permanent). The one table of S3 error codes is here, so the retry policy reads in one place.
"""

from __future__ import annotations

import aiohttp
import botocore.exceptions as bce

from mldash.store.base import (
    NoSuchUploadError,
    ObjectExistsError,
    PermanentStoreError,
    StoreError,
    TransientStoreError,
)
from mldash.store.s3_redirects import REDIRECT_STATUSES, redirect_error

_ERROR_CODES: dict[str, type[StoreError]] = {
    # The key is taken: a conditional create (If-None-Match: *) found an object (412), or raced another
    # conditional write to the same key (409). Not retryable as such: head the key and compare checksums.
    "PreconditionFailed": ObjectExistsError,
    "ConditionalRequestConflict": ObjectExistsError,
    # The multipart upload id is unknown: completed, aborted or expired by a lifecycle rule. Start over.
    "NoSuchUpload": NoSuchUploadError,
    # Credentials, permissions, configuration: a human must act; the same request cannot succeed.
    "AccessDenied": PermanentStoreError,
    "AllAccessDisabled": PermanentStoreError,
    "AccountProblem": PermanentStoreError,
    "InvalidAccessKeyId": PermanentStoreError,
    "SignatureDoesNotMatch": PermanentStoreError,
    "ExpiredToken": PermanentStoreError,
    "InvalidToken": PermanentStoreError,
    "NoSuchBucket": PermanentStoreError,
    "InvalidBucketName": PermanentStoreError,
    "PermanentRedirect": PermanentStoreError,  # wrong region/endpoint for the bucket
    "AuthorizationHeaderMalformed": PermanentStoreError,
    # The request itself is wrong (our bug or an input S3 refuses): resending it unchanged cannot help.
    "InvalidDigest": PermanentStoreError,  # malformed checksum header (not a mismatch: see BadDigest)
    "KeyTooLongError": PermanentStoreError,
    "KeyTooLong": PermanentStoreError,
    "EntityTooSmall": PermanentStoreError,
    "EntityTooLarge": PermanentStoreError,
    "InvalidPart": PermanentStoreError,
    "InvalidPartOrder": PermanentStoreError,
    "InvalidRequest": PermanentStoreError,
    "InvalidArgument": PermanentStoreError,
    "MalformedXML": PermanentStoreError,
    "MissingContentLength": PermanentStoreError,
    "MethodNotAllowed": PermanentStoreError,
    "NotImplemented": PermanentStoreError,  # a 501: the endpoint lacks a feature we need (e.g. If-None-Match)
    "InvalidObjectState": PermanentStoreError,
    "NoSuchKey": PermanentStoreError,  # download of an absent object
    # The service is busy or failed inside: back off and retry.
    "InternalError": TransientStoreError,
    "ServiceUnavailable": TransientStoreError,
    "SlowDown": TransientStoreError,
    "Throttling": TransientStoreError,
    "ThrottlingException": TransientStoreError,
    "RequestLimitExceeded": TransientStoreError,
    "TooManyRequests": TransientStoreError,
    "OperationAborted": TransientStoreError,  # a conflicting operation on the same resource is in progress
    # The request or our clock was slow: retry (the clock may be corrected, NTP catches up).
    "RequestTimeout": TransientStoreError,
    "RequestTimeTooSkewed": TransientStoreError,
    "TokenRefreshRequired": TransientStoreError,
    # The bytes were damaged on the way: resend them.
    "BadDigest": TransientStoreError,
    "XAmzContentSHA256Mismatch": TransientStoreError,
    "IncompleteBody": TransientStoreError,
}

# Client-side failures that are not S3 error responses.
_PERMANENT_CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    bce.NoCredentialsError,  # no credentials anywhere in the chain: configuration
    bce.PartialCredentialsError,
    bce.ParamValidationError,  # our bug
    bce.NoRegionError,
    bce.InvalidConfigError,
)
_TRANSIENT_CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,  # our asyncio.timeout deadline (asyncio.TimeoutError is TimeoutError on 3.11)
    bce.FlexibleChecksumError,  # the downloaded bytes do not match the object's checksum: corrupted in flight
    bce.HTTPClientError,  # connect/read timeouts, connection closed/refused, streaming errors
    bce.CredentialRetrievalError,  # e.g. the instance metadata service did not answer this time
    aiohttp.ClientError,
    OSError,
)


def classify_error(exc: BaseException, *, operation: str, key: str, endpoint: str | None = None) -> StoreError:
    """The StoreError for anything an S3 call raised: by S3 error code, then by HTTP status.
    `endpoint` names where the request went, for the messages that need it (a redirect)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status in REDIRECT_STATUSES:  # whatever its code: what it names decides (see s3_redirects.py)
            return redirect_error(exc.response, operation=operation, key=key, endpoint=endpoint)
        message = f"{operation} {key!r}: {code or status} {error.get('Message') or ''}".rstrip()
        kind = _ERROR_CODES.get(code)
        if kind is None:  # HEAD responses have no body: the code is just the status ("403")
            if status == 412:
                kind = ObjectExistsError
            elif status in (408, 429) or status >= 500:
                kind = TransientStoreError
            elif 400 <= status < 500:
                kind = PermanentStoreError
            else:  # a 200 with an unrecognised error body and the like: assume the service hiccuped
                kind = TransientStoreError
        return kind(message, code=code or str(status))
    name = type(exc).__name__
    if isinstance(exc, _PERMANENT_CLIENT_ERRORS):
        return PermanentStoreError(f"{operation} {key!r}: {name}: {exc}", code=name)
    if isinstance(exc, TimeoutError):
        return TransientStoreError(f"{operation} {key!r}: no answer within the deadline", code="Timeout")
    if isinstance(exc, _TRANSIENT_CLIENT_ERRORS):
        return TransientStoreError(f"{operation} {key!r}: {name}: {exc}", code=name)
    # Anything else from botocore/aiohttp: retrying is the safe default; the daemon's attempt limit ends it
    # in a visible 'failed' state if it never passes.
    return TransientStoreError(f"{operation} {key!r}: {name}: {exc}", code=name)
