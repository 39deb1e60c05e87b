"""What an S3 failure means for the daemon: `classify_error` turns anything an S3 call raised into the
`StoreError` whose class decides whether the daemon retries it (transient) or leaves the entry 'failed'
until a human acts (permanent). The one table of S3 error codes is here, so the retry policy reads in one place.

A failure a human must fix by changing the configuration is worded with what to change (`S3Target`): a missing
bucket or a denial names the bucket and the endpoint, and whether the endpoint is MLDASH_S3_ENDPOINT_URL or AWS's
default; a credential error also says where botocore found the credentials and where it looks for them. S3's
own message names none of these. No secret is ever shown: credentials are described by their source only.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

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
    bce.ProfileNotFound,  # AWS_PROFILE names a profile the files do not hold
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


# Errors a configuration change fixes, by what their message adds (`S3Target.hint`). Codes are S3's, an HTTP status
# for a HEAD answer, or a botocore exception's name.
# The bucket is wrong, or not behind this endpoint: the bucket and the endpoint.
_BUCKET_CODES = frozenset({"NoSuchBucket", "InvalidBucketName"})
# A refusal: the bucket and the endpoint (with the region) it came from, and whose credentials it refused.
_REFUSAL_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "AuthorizationHeaderMalformed"})
# The credentials: the bucket and the endpoint, where the credentials came from and where botocore looks for them.
_CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
    # A HEAD answer has no body, so no code: 403 for bad credentials or a denial, 400 for an expired or invalid
    # token (or a region mismatch) — the status cannot tell which.
    "400", "403",
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ProfileNotFound",
})


@dataclass(frozen=True)
class S3Target:
    """Where a store's requests go and what signs them, as configuration errors must name it. The store fills in
    what botocore resolved once its client exists (`S3Store.open`); before that, only what was configured."""

    bucket: str
    endpoint_url: str | None  # MLDASH_S3_ENDPOINT_URL; None: AWS's default endpoint for the region
    resolved_endpoint: str | None = None  # the endpoint botocore resolved
    region: str | None = None
    credentials: str | None = None  # where botocore found credentials (never their values); None: none, or unknown
    # What the credential chain reads, as botocore's session says (None: not asked yet, botocore's defaults apply).
    profile: str | None = None  # AWS_PROFILE, else "default"
    credentials_file: str | None = None  # AWS_SHARED_CREDENTIALS_FILE, else ~/.aws/credentials
    config_file: str | None = None  # AWS_CONFIG_FILE, else ~/.aws/config

    @property
    def endpoint(self) -> str:
        """Where requests go, with their region: "https://s3.eu-west-1.amazonaws.com (region eu-west-1)"."""
        url = self.resolved_endpoint or self.endpoint_url or "AWS's default endpoint"
        return f"{url} (region {self.region})" if self.region else url

    def place(self) -> str:
        """The bucket, the endpoint and the setting the endpoint comes from."""
        if self.endpoint_url is not None:
            where = f"{self.endpoint_url} (MLDASH_S3_ENDPOINT_URL)" + (f", region {self.region}" if self.region else "")
        elif self.resolved_endpoint:
            where = (f"{self.resolved_endpoint}, AWS's default endpoint for region {self.region} "
                     "(MLDASH_S3_ENDPOINT_URL is unset)")
        else:
            where = "AWS's default endpoint (MLDASH_S3_ENDPOINT_URL is unset)"
        return f"bucket {self.bucket!r} at {where}"

    def chain(self) -> str:
        """Where botocore looks for credentials, in its order, with the files and profile this process uses."""
        profile = f"profile {self.profile!r}" if self.profile else "the profile"
        return (f"botocore looks in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, then {profile} (AWS_PROFILE) in "
                f"{self.credentials_file or '~/.aws/credentials'} (AWS_SHARED_CREDENTIALS_FILE; the systemd units "
                f"load it with LoadCredential) and {self.config_file or '~/.aws/config'} (AWS_CONFIG_FILE), then a "
                "container or instance role: see docs/operations.md, 'Credentials'")

    def hint(self, code: str) -> str:
        """What to check for an error with this code, in parentheses after the message; "" if nothing."""
        if code in _BUCKET_CODES:
            return f" ({self.place()}; check the bucket in MLDASH_STORE and the endpoint)"
        if code in _CREDENTIAL_CODES:
            if code == "NoCredentialsError":
                found = "no credentials found: "
            elif self.credentials:
                found = f"the credentials came from {self.credentials}; "
            else:
                found = ""
            return f" ({self.place()}; {found}{self.chain()})"
        if code in _REFUSAL_CODES:
            signer = f"; the credentials came from {self.credentials}" if self.credentials else ""
            return f" ({self.place()}{signer})"
        return ""


def describe_credentials(method: str | None, target: S3Target) -> str | None:
    """Where botocore found credentials, from their `method` (botocore's name for the provider); None: nowhere."""
    if method is None:
        return None
    profile = f"profile {target.profile or 'default'!r}"
    return {
        "env": "the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
        "shared-credentials-file": f"{profile} in {target.credentials_file}",
        "config-file": f"{profile} in {target.config_file}",
        "assume-role": f"a role assumed for {profile}",
        "assume-role-with-web-identity": "a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE or the profile)",
        "sso": f"AWS SSO ({profile})",
        "custom-process": f"the credential_process of {profile}",
        "container-role": "the container's role (ECS/EKS task credentials)",
        "iam-role": "the instance's role (EC2 instance metadata)",
    }.get(method, f"botocore's {method!r} provider")


def classify_error(exc: BaseException, *, operation: str, key: str, target: S3Target | None = None) -> StoreError:
    """The StoreError for anything an S3 call raised: by S3 error code, then by HTTP status.
    `target` (the store's, when it has one) is named in the messages of errors a configuration change fixes."""
    if isinstance(exc, StoreError):
        return exc
    what = f"{operation} {key!r}" if key else operation
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status in REDIRECT_STATUSES:  # whatever its code: what it names decides (see s3_redirects.py)
            return redirect_error(exc.response, operation=operation, key=key,
                                  endpoint=target.endpoint if target else None)
        message = f"{what}: {code or status} {error.get('Message') or ''}".rstrip()
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
        return kind(message + _hint(code or str(status), target), code=code or str(status))
    name = type(exc).__name__
    if (tls := _tls_misconfiguration(exc, target)) is not None:
        return PermanentStoreError(f"{what}: {tls}", code="TLSConfiguration")
    if isinstance(exc, _PERMANENT_CLIENT_ERRORS):
        return PermanentStoreError(f"{what}: {name}: {exc}{_hint(name, target)}", code=name)
    if isinstance(exc, TimeoutError):
        return TransientStoreError(f"{what}: no answer within the deadline", code="Timeout")
    if isinstance(exc, _TRANSIENT_CLIENT_ERRORS):
        return TransientStoreError(f"{what}: {name}: {exc}{_hint(name, target)}", code=name)
    # Anything else from botocore/aiohttp: retrying is the safe default; the daemon's attempt limit ends it
    # in a visible 'failed' state if it never passes.
    return TransientStoreError(f"{what}: {name}: {exc}", code=name)


def _tls_misconfiguration(exc: BaseException, target: S3Target | None) -> str | None:
    """What is wrong when a TLS handshake failed in a way no retry changes — the endpoint speaks plain HTTP, or
    its certificate is not one we trust — else None. These used to be retried as an outage, for ever: a `run
    --once` without --max-wait never ended, saying only "store unavailable"."""
    endpoint = (target.endpoint if target is not None else None) or "the S3 endpoint"
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            # aiohttp's wrapper claims the class too, without ssl's attributes: the reason is on the original.
            why = getattr(cause, "verify_message", None) or getattr(
                getattr(cause, "certificate_error", None), "verify_message", None) or "certificate verify failed"
            return (f"the certificate of {endpoint} could not be verified ({why}): if it is signed by your own CA, "
                    "point AWS_CA_BUNDLE at that CA's certificate")
        if isinstance(cause, ssl.SSLError) and getattr(cause, "reason", None) == "WRONG_VERSION_NUMBER":
            return (f"{endpoint} does not answer TLS (it speaks plain HTTP?): use http:// in MLDASH_S3_ENDPOINT_URL, "
                    "or the endpoint's TLS port")
        cause = cause.__cause__ or cause.__context__
    return None


def _hint(code: str, target: S3Target | None) -> str:
    return target.hint(code) if target is not None else ""
