"""Passwords in URLs (a MongoDB URI, an S3 URL with keys in it) never reach a message, a log or a `repr`."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

# scheme://user:password@… — the password runs to the last "@" before the path, so one holding an unescaped
# "@" is hidden whole, not cut at its first "@".
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z0-9+.-]+://)(?P<user>[^:@/?#]*):(?P<password>[^/?#]*)@")


def redact_uri(uri: str) -> str:
    """The URI with its password (if any) replaced by ``***``: safe for logs, errors and `repr`."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", uri, count=1)


def uri_password(uri: str) -> set[str]:
    """The URI's password as written and percent-decoded (to scrub from texts that may echo it); empty if none."""
    match = _USERINFO.match(uri)
    if not match or not match["password"]:
        return set()
    return {match["password"], unquote_plus(match["password"])}
