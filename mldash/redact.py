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


# A secret this long is scrubbed wherever it occurs: a chance occurrence in a message is negligible. A shorter one
# ("a", "1234") is scrubbed only where it stands as a token of its own, or a one-letter password would turn every
# "a" of a driver's message into "***" and leave the message unreadable.
_SCRUB_ANYWHERE_FROM = 8


def scrub_secrets(text: str, secrets: set[str]) -> str:
    """`text` with every occurrence of the given secrets (e.g. `uri_password`) replaced by ``***``."""
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: a decoded form inside a raw one
        if len(secret) >= _SCRUB_ANYWHERE_FROM:
            text = text.replace(secret, "***")
        elif secret:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
    return text


def uri_password(uri: str) -> set[str]:
    """The URI's password as written and percent-decoded (to scrub from texts that may echo it); empty if none."""
    match = _USERINFO.match(uri)
    if not match or not match["password"]:
        return set()
    return {match["password"], unquote_plus(match["password"])}
