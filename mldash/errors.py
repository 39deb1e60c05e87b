"""The exception hierarchy: one root, and each exception carries what a user needs to act."""

from __future__ import annotations


class MldashError(Exception):
    """Root of every error mldash raises on purpose."""


class InvalidInputError(MldashError, ValueError):
    """A caller passed a value mldash does not accept.

    The message names the offending value and what is accepted; nothing was written.
    """


class ConfigError(MldashError, ValueError):
    """A configuration key or value is invalid; the message names the key and its source."""


class SpoolFullError(MldashError, OSError):
    """The spool's byte quota (or its filesystem) stayed full past the save timeout.

    Nothing was written. Attributes say how much was asked for and how much is in use.
    """

    def __init__(self, message: str, *, requested: int, used: int, quota: int | None) -> None:
        super().__init__(message)
        self.requested = requested
        self.used = used
        self.quota = quota


class SpoolCorruptError(MldashError):
    """A spool file could not be decoded (truncated/corrupt manifest, unknown format version)."""


class FileTooLargeError(InvalidInputError):
    """The artifact is larger than the maximum accepted size (checked before copying)."""


class NotFoundError(MldashError, LookupError):
    """No file matches the id or path asked for."""


class WaitTimeoutError(MldashError, TimeoutError):
    """`wait()`/`flush()` ran out of time; `pending` lists the ids not yet committed."""

    def __init__(self, message: str, *, pending: list[int]) -> None:
        super().__init__(message)
        self.pending = pending


class DaemonBusyError(MldashError):
    """Another `mldash-syncd` already holds this spool's lock."""
