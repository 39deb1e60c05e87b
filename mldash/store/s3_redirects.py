"""Redirects from an S3 endpoint: which ones the client follows, and what the rest mean for the daemon.

S3 redirects a request to the region its bucket lives in: a 301 PermanentRedirect (the client is configured
for another region) or a 307 TemporaryRedirect (a new bucket's name is still propagating), with the region in
`x-amz-bucket-region` (or `<Region>` in the error). botocore's `S3RegionRedirectorv2.redirect_from_error`
(botocore/utils.py; aiobotocore's `AioS3RegionRedirectorv2` is the same, async) follows 301, 302, 307 and a
PermanentRedirect code by that region, once per request (its `s3_redirect["redirected"]` flag), and asks
`get_bucket_region` when the answer names no region: that sends a HeadBucket. botocore never follows a
`Location` header (its urllib3 session sends with `redirect=False`). Two ways this went wrong here:

- A HeadBucket that is itself answered by a redirect naming no region goes through the same redirector, which
  asks for the region with another HeadBucket, and so on: one HEAD per level, ~110 levels, then a
  RecursionError (which the store classified as transient, so the daemon retried it forever). botocore guards
  its 400-to-HeadBucket case this way (it needs `x-amz-bucket-region`), not its 3xx case.
  `stop_region_lookup_recursion` makes such a HeadBucket final: the lookup then learns nothing, and the
  request that was redirected fails with its own 3xx, after one HeadBucket.
- aiobotocore sends through aiohttp, which follows any `Location` itself, up to 10 times: a redirect to the
  same URL made 10 requests (20 with botocore's retry) and ended in a transient error, and a redirect to
  another host sent the PUT, body included, to that host without its Authorization header. `NoRedirectSession`
  hands every 3xx to botocore instead, as botocore's own HTTP session does.

What reaches the store after that is a 3xx botocore could not follow, or followed once and got again;
`redirect_error` says which, and whether retrying can help.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiobotocore.httpsession import AIOHTTPSession

from mldash.store.base import PermanentStoreError, StoreError, TransientStoreError

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class NoRedirectSession(AIOHTTPSession):
    """aiobotocore's aiohttp session, except that a 3xx is returned to botocore instead of followed."""

    async def _get_session(self, proxy_url: Any) -> Any:
        return _NoRedirects(await super()._get_session(proxy_url))


class _NoRedirects:
    """The one method of `aiohttp.ClientSession` that aiobotocore sends with, never following redirects."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def request(self, *args: Any, **kwargs: Any) -> Any:
        return self._session.request(*args, allow_redirects=False, **kwargs)


def stop_region_lookup_recursion(request_dict: dict[str, Any], response: Any, **_: Any) -> None:
    """'needs-retry.s3.HeadBucket' handler (runs before botocore's redirector, registered on 'needs-retry.s3').

    The store itself sends no HeadBucket: the ones it sees are botocore's region lookups. A lookup answered
    without `x-amz-bucket-region` is marked as already redirected, so the redirector lets it fail instead of
    looking up the region of this lookup with yet another HeadBucket. One answered with the header is left to
    botocore (it redirects it once, as for real S3)."""
    if response is None:  # a transport error: nothing to redirect
        return
    headers = response[1].get("ResponseMetadata", {}).get("HTTPHeaders", {})
    redirect = request_dict.get("context", {}).get("s3_redirect")
    if "x-amz-bucket-region" not in headers and isinstance(redirect, dict):
        redirect["redirected"] = True


def redirect_error(response: dict[str, Any], *, operation: str, key: str, endpoint: str | None) -> StoreError:
    """The StoreError for a 3xx answer that reached the store (`response`: a botocore ClientError's).

    Permanent unless it names a region and is temporary: a 302/307 naming a region that reaches us was followed
    once by botocore and came back, which S3 does while a new bucket's name propagates (up to hours), so the
    daemon retries it with backoff, two requests per attempt. Everything else will be answered the same way next time:
    a redirect that names no destination (a misconfigured endpoint or a proxy in front of it), one to a
    `Location` (botocore follows S3's region redirects only: the endpoint setting should name where it points),
    and a 301/308 naming a region (the configured region is wrong). The item goes to 'failed' after one attempt,
    with this message, and `mldash-syncd retry` re-queues it once the configuration is fixed."""
    metadata = response.get("ResponseMetadata", {})
    status = int(metadata.get("HTTPStatusCode") or 0)
    headers = metadata.get("HTTPHeaders", {})
    error = response.get("Error", {})
    code = str(error.get("Code") or status)
    answered = f"{operation} {key!r}: {endpoint or 'the S3 endpoint'} answered {status}" + (
        f" {code}" if code != str(status) else "")
    region = headers.get("x-amz-bucket-region") or error.get("Region")
    location = headers.get("location") or error.get("Endpoint")
    if region and status in (302, 307):
        return TransientStoreError(f"{answered} towards region {region} (S3 does so while a new bucket's name "
                                   "propagates): retried with backoff", code=code)
    if region:
        return PermanentStoreError(f"{answered}: the bucket is in region {region}; set MLDASH_S3_REGION={region} "
                                   "and check MLDASH_S3_ENDPOINT_URL", code=code)
    if location:
        # Its origin is what the endpoint setting needs (the rest names the bucket and key, and a query may carry
        # a signature); a relative one (a proxy's rewrite of the path) is shown as a path.
        parts = urlsplit(location if "/" in location else f"//{location}")  # S3's <Endpoint> is a bare host
        where = (f"{parts.scheme}://{parts.netloc}" if parts.scheme else parts.netloc) or parts.path[:200]
        return PermanentStoreError(f"{answered} redirecting to {where}, which the S3 client does not follow (it "
                                   "follows S3's region redirects only): set MLDASH_S3_ENDPOINT_URL to the "
                                   "endpoint to use", code=code)
    return PermanentStoreError(f"{answered} without a Location or a region to redirect to, which the S3 client "
                               "cannot follow: check MLDASH_S3_ENDPOINT_URL and MLDASH_S3_REGION (or a proxy in front "
                               "of the store)", code=code)
