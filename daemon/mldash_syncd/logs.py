"""Logging for the daemon: one line per event that matters, journald-friendly, never a secret.

Under systemd (JOURNAL_STREAM set) lines carry sd-daemon priority prefixes instead of timestamps.
botocore/aiobotocore/pymongo wire logs are pinned at WARNING whatever the level asked for —
botocore's DEBUG stream prints Authorization headers and access key ids — and a redacting filter
on our handler masks anything credential-shaped that might still get through.
"""

from __future__ import annotations

import logging
import os
import re
import sys

from mldash_syncd.logfile import CappedFileHandler, CappedLogFile

_NOISY = ("botocore", "aiobotocore", "boto3", "s3transfer", "urllib3", "aiohttp", "pymongo", "watchfiles", "asyncio")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_SECRETS = [
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{12,}\b"), "<aws-key-id>"),
    (re.compile(r"(Signature=|Credential=|X-Amz-Security-Token=|X-Amz-Signature=)[^&\s,\"']+", re.I), r"\1<redacted>"),
    (re.compile(r"(Authorization[\"']?\s*[:=]\s*[\"']?)[^\"'\n]+", re.I), r"\1<redacted>"),
    # The session token as a header (botocore's request dicts print it as b'...'), not only as a query parameter.
    (re.compile(r"(X-Amz-Security-Token[\"']?\s*:\s*b?[\"']?)[^\"'\s,}]+", re.I), r"\1<redacted>"),
    (re.compile(r"(aws_secret_access_key|aws_session_token|secret[_-]?key|password)([\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+",
                re.I), r"\1\2<redacted>"),
    # user:password@ in any URL (a MongoDB URI, a proxy, an endpoint): the password runs to the last "@" before the
    # host, as in mldash.redact, whose "***" it also uses, so one URI reads the same in errors and in the log.
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?!\*\*\*@)[^/?#\s]*@"), r"\1***@"),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level: str = "INFO", stream=None, capped: CappedLogFile | None = None) -> None:
    """`capped`: stderr is an autostarted daemon's daemon.log, rotated at its cap (logfile.py)."""
    handler = CappedFileHandler(capped, stream) if capped is not None else logging.StreamHandler(stream or sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
