"""The exception hierarchy: one root, and each exception carries what a user needs to act."""

from __future__ import annotations

import errno

# OSErrors that may pass if retried later — space freed, a device or server back, a mount remounted, a ticket
# renewed — as opposed to a path that cannot exist or is not allowed, which needs a person (a configuration).
# ENOTCONN: a FUSE mount (sshfs, s3fs, rclone) whose daemon died; EKEYEXPIRED: an NFS mount's Kerberos ticket ran
# out; ESTALE and the network errors: a network filesystem's server.
TRANSIENT_OS_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE,
    errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ENOTCONN, errno.EKEYEXPIRED, errno.EHOSTDOWN,
    errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNRESET, errno.ECONNREFUSED})


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


class CatalogUnavailableError(MldashError):
    """The catalog could not be reached (or did not answer in time), so a read that needs it cannot say whether a
    file exists: never a NotFoundError then — code that restarts training on "not found" must not do so because
    the database is down. Files still in the local spool are read without it."""


class CommittedElsewhereError(MldashError):
    """`wait()`/`flush()` found files committed by a daemon that sends to another store or catalog than this
    process's settings name (a systemd daemon configured apart, a job run with other settings): they are
    delivered, but not where this process would read them. `elsewhere` maps id → where they went."""

    def __init__(self, message: str, *, elsewhere: dict[int, str]) -> None:
        super().__init__(message)
        self.elsewhere = elsewhere


class WaitTimeoutError(MldashError, TimeoutError):
    """`wait()`/`flush()` ran out of time; `pending` lists the ids not yet committed."""

    def __init__(self, message: str, *, pending: list[int]) -> None:
        super().__init__(message)
        self.pending = pending


class DaemonBusyError(MldashError):
    """Another `mldash-syncd` already holds this spool's lock."""


class SourceNotFoundError(InvalidInputError, FileNotFoundError):
    """`upload(path)` was given a path with no file behind it; `filename` is that path. Nothing was written."""

    def __init__(self, message: str, *, filename: str) -> None:
        super().__init__(message)
        self.errno = 2  # ENOENT, as a FileNotFoundError raised by open() would carry
        self.filename = filename

    def __str__(self) -> str:  # OSError's own __str__ would print "[Errno 2] None: ..."
        return str(self.args[0])


class MissingDependencyError(MldashError, ImportError):
    """An optional dependency (torch, matplotlib, imageio, Pillow) is needed; the message names the extra."""


class UploadFailedError(MldashError):
    """`wait()`/`flush()` found entries the daemon gave up on; `failures` maps id → state and last error.

    Their bytes are still in the spool: fix the cause, then `mldash-syncd retry`.
    """

    def __init__(self, message: str, *, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures
