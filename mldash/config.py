"""One validated settings object, built from environment variables, then a TOML file, then defaults.

Precedence: ``MLDASH_*`` environment variables > the TOML file (``$MLDASH_CONFIG``, else
``$XDG_CONFIG_HOME/mldash/config.toml``) > the embedded defaults under ``$XDG_DATA_HOME/mldash``,
which need no setup at all. Every field is listed in `FIELDS` with its env var and meaning; the
TOML file uses the field names as keys. Unknown keys and bad values raise `ConfigError` naming the
key and where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mldash.errors import ConfigError
from mldash.redact import redact_uri

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as "512MiB", "10GB", "1.5 GiB"."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size; use bytes or e.g. '512MiB', '10GB'")
    size = Decimal(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]  # exact: "1.1MB" is 1100000 bytes
    if size != size.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bytes ({size} B); e.g. '512MiB', '1.5GiB'")
    return int(size)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean; use 1/0, true/false, yes/no")


def _parse_auto_bool(value: Any) -> bool | None:
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        return _parse_bool(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a boolean or 'auto'; use auto (default), 1/0, true/false, yes/no") from None


def _parse_float(minimum: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number; expected one ≥ {minimum:g}, e.g. 30 or 2.5") from None
        if not math.isfinite(number):  # float() takes "inf" and "nan": no deadline or delay means either
            raise ValueError(f"{value!r} is not a finite number; expected one ≥ {minimum:g}, e.g. 30 or 2.5")
        if number < minimum:
            raise ValueError(f"{value!r} must be ≥ {minimum}")
        return number
    return parse


def _parse_int(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{value!r} is not an integer")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not an integer; expected one ≥ {minimum}") from None
        if number < minimum:
            raise ValueError(f"{value!r} must be ≥ {minimum}")
        return number
    return parse


def _parse_optional_size(value: Any) -> int | None:
    """A limit that may be off: unset, "none", "unlimited" or a size of 0 (in any unit: "0" and "0B" alike)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "unlimited")):
        return None
    return parse_size(value) or None


MIN_SPOOL_QUOTA = 1 << 20  # a smaller quota holds no checkpoint worth the name: almost surely a missing unit ("200")


def _parse_spool_quota(value: Any) -> int | None:
    """Bytes, or None (no quota): a size ("50GiB", "500MB"); unset, 0, "none" or "unlimited" mean no quota."""
    quota = _parse_optional_size(value)
    if quota is not None and quota < MIN_SPOOL_QUOTA:
        raise ValueError(f"{value!r} is {quota} bytes, below the smallest quota of 1MiB; give a unit, e.g. '50GiB' "
                         f"or '500MB' (0 = no quota)")
    return quota


MIN_UPLOAD_RATE = 64 << 10  # one 64 KiB slice a second: a smaller cap is almost surely a missing unit ("10")


def _parse_upload_rate(value: Any) -> int | None:
    """Bytes per second, or None (no cap): a size with an optional "/s" ("50MB/s", "100MiB"); unset, 0,
    "none" or "unlimited" mean no cap."""
    size = value.strip().removesuffix("/s").removesuffix("/S") if isinstance(value, str) else value
    try:
        rate = _parse_optional_size(size)
    except ValueError:
        raise ValueError(f"{value!r} is not a rate; use bytes per second, e.g. '50MB/s', '1GiB/s' or 10485760 "
                         f"(0 = no cap; 1 Gbit/s is '125MB/s')") from None
    if rate is not None and rate < MIN_UPLOAD_RATE:
        raise ValueError(f"{value!r} is {rate} bytes per second, below the smallest cap of 64KiB/s; give a unit, "
                         f"e.g. '10MB/s' (0 = no cap)")
    return rate


def _text(value: Any, example: str) -> str:
    """A setting that is text: environment values always are; a TOML true, 12 or list is a mistake, not a name."""
    if not isinstance(value, str):
        kind = type(value).__name__
        article = "an" if kind[0] in "aeiou" else "a"
        raise ValueError(f"{value!r} is {article} {kind}; expected a string such as {example!r}")
    return value


def _parse_path(value: Any) -> Path:
    text = os.fspath(value) if isinstance(value, os.PathLike) else _text(value, "/scratch/mldash/spool")
    if not isinstance(text, str) or not text.strip() or "\x00" in text:
        raise ValueError(f"{value!r} is not a path")
    return Path(os.path.expanduser(text)).absolute()


def _parse_store(value: Any) -> str:
    url = _text(value, "s3://bucket/prefix")
    shown = redact_uri(url)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError(f"{shown!r}: a file store must be an absolute 'file:///abs/dir' URL")
        return url
    if parsed.scheme == "s3":
        bucket = parsed.netloc.rpartition("@")[2]
        if not bucket:
            raise ValueError(f"{shown!r}: no bucket; write 's3://bucket[/root-prefix]' (two slashes after 's3:')")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"{shown!r}: {bucket!r} is not a valid S3 bucket name: 3–63 lowercase letters, digits, "
                             "'.' and '-', beginning and ending with a letter or digit")
        if parsed.password is not None or parsed.username is not None:
            raise ValueError(f"{shown!r}: credentials do not go in the store URL; use the standard AWS chain "
                             "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, an instance role)")
        return url
    raise ValueError(f"{shown!r}: accepted stores are 'file:///abs/dir' and 's3://bucket[/root-prefix]'")


def _parse_catalog(value: Any) -> str:
    url = _text(value, "mongodb://host:27017")
    shown = redact_uri(url)
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        if not parsed.path.startswith("/") or parsed.netloc:
            raise ValueError(f"{shown!r}: a SQLite catalog must be 'sqlite:///abs/file'")
        return url
    if parsed.scheme in ("mongodb", "mongodb+srv"):
        return url
    raise ValueError(f"{shown!r}: accepted catalogs are 'sqlite:///abs/file' and 'mongodb://…' URIs")


def _parse_endpoint_url(value: Any) -> str:
    url = _text(value, "http://127.0.0.1:9000")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{redact_uri(url)!r}: expected an http:// or https:// URL such as 'http://minio:9000'")
    return url


def _parse_region(value: Any) -> str:
    text = _text(value, "us-east-1").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text):  # AWS's, and S3-compatible services' own names
        raise ValueError(f"{value!r}: expected a region name such as 'us-east-1'")
    return text


def _parse_database(value: Any) -> str:
    text = _text(value, "mldash")
    # MongoDB's own rules for database names (on any platform): 1–63 bytes, none of /\. "$*<>:|? or space/NUL.
    if not text or len(text.encode()) > 63 or re.search(r'[/\\. "$*<>:|?\x00]', text):
        raise ValueError(f"{value!r}: a MongoDB database name is 1–63 bytes without spaces or any of "
                         "/\\.\"$*<>:|?")
    return text


def _parse_durability(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ("process", "power"):
        raise ValueError(f"{value!r}: accepted durability levels are 'process' (default) and 'power'")
    return text


def _parse_checksum(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ("auto", "sync", "deferred"):
        raise ValueError(f"{value!r}: accepted checksum modes are 'auto' (default), 'sync' and 'deferred'")
    return text


def _parse_experiment(value: Any) -> str:
    text = _text(value, "team/project/run-1").strip("/")
    if text.count("/") != 2:
        raise ValueError(f"{value!r}: expected 'namespace/project/experiment'")
    from mldash import names  # imports no setting; here so config stays the first module loaded

    for part, what in zip(text.split("/"), ("namespace", "project", "experiment"), strict=True):
        try:
            names.validate_segment(part, what)
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}; expected 'namespace/project/experiment'") from None
    return text


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "mldash"


def _config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mldash"


@dataclass(frozen=True)
class Field:
    name: str
    env: str
    parse: Callable[[Any], Any]
    default: Callable[[], Any]
    doc: str


FIELDS: tuple[Field, ...] = (
    Field("spool", "MLDASH_SPOOL", _parse_path, lambda: _data_home() / "spool",
          "Spool directory (local disk of the training node). Artifacts wait here until synced. A relative path is "
          "relative to the config file that gives it (to the working directory in MLDASH_SPOOL)."),
    Field("store", "MLDASH_STORE", _parse_store, lambda: (_data_home() / "store").as_uri(),
          "Where bytes go: 'file:///abs/dir' (embedded default) or 's3://bucket[/root-prefix]'."),
    Field("s3_endpoint_url", "MLDASH_S3_ENDPOINT_URL", _parse_endpoint_url, lambda: None,
          "Endpoint of an S3-compatible service (MinIO, Ceph…); unset means AWS S3."),
    Field("s3_region", "MLDASH_S3_REGION", _parse_region, lambda: None,
          "S3 region; unset means the standard AWS chain (AWS_REGION, profile), else us-east-1."),
    Field("catalog", "MLDASH_CATALOG", _parse_catalog, lambda: "sqlite://" + str(_data_home() / "catalog.sqlite"),
          "Where metadata goes: 'sqlite:///abs/file' (embedded default) or a 'mongodb://' (or 'mongodb+srv://') "
          "URI. mldash-syncd checks a MongoDB URI before using it: an option PyMongo does not know (it would "
          "only warn and ignore it), a bad option value or an unescaped password is an error naming the option."),
    Field("mongo_database", "MLDASH_MONGO_DATABASE", _parse_database, lambda: "mldash",
          "MongoDB database holding the 'files' collection."),
    Field("autostart", "MLDASH_AUTOSTART", _parse_bool, lambda: True,
          "Start a detached mldash-syncd for the spool on the first save if none runs (0 = never)."),
    Field("durability", "MLDASH_DURABILITY", _parse_durability, lambda: "process",
          "'process': an acknowledged save survives any process crash. 'power': also power loss "
          "(fsync of files and directories, SQLite synchronous=FULL); slower."),
    Field("checksum", "MLDASH_CHECKSUM", _parse_checksum, lambda: "auto",
          "Who computes an artifact's SHA256. 'sync': the save, before it returns (the result's 'checksum' "
          "holds it). 'deferred': the daemon, in its one read of the bytes; the save only copies/serializes into "
          "the spool (a shorter stall: SHA256 runs at ~2 GB/s, slower than writing to the page cache) and "
          "returns checksum None with checksumPending True. Given up: corruption of the spooled bytes between "
          "the save and the daemon's read cannot be detected, and the checksum is known only once the daemon "
          "has read the bytes. 'auto' (default): 'sync' for artifacts up to sync_checksum_limit, 'deferred' "
          "for larger ones."),
    Field("sync_checksum_limit", "MLDASH_SYNC_CHECKSUM_LIMIT", parse_size, lambda: 64 * 2**20,
          "With checksum 'auto': the largest artifact whose SHA256 the save computes itself (e.g. '64MiB', "
          "the default: ~30 ms of hashing)."),
    Field("spool_quota", "MLDASH_SPOOL_QUOTA", _parse_spool_quota, lambda: None,
          "Maximum bytes of artifacts held in the spool (e.g. '50GiB'); unset, 0 or 'unlimited' = only the disk "
          "limits it. At least 1 MiB: a smaller number is taken for a missing unit and refused."),
    Field("save_timeout", "MLDASH_SAVE_TIMEOUT", _parse_float(0.0), lambda: 60.0,
          "Seconds a save blocks waiting for spool space (quota or full disk) before SpoolFullError. Over quota "
          "it waits only while a daemon may make room (autostart on, or one held the spool in the last 30 s)."),
    Field("max_file_size", "MLDASH_MAX_FILE_SIZE", parse_size, lambda: 100 * 10**9,
          "Largest accepted artifact, checked before copying (default 100 GB)."),
    Field("inline_max", "MLDASH_INLINE_MAX", parse_size, lambda: 64 * 2**10,
          "Saves of at most this many bytes (serialized in memory, no spool_quota set) keep their bytes inside "
          "their manifest: one spool file per save instead of two, which shortens the save when many processes "
          "save at once. 0 = every save gets its own blob file. At most 1 MiB."),
    Field("experiment", "MLDASH_EXPERIMENT", _parse_experiment, lambda: "local/default/dxp",
          "'namespace/project/experiment' of the module-level `dxp` experiment."),
    Field("max_concurrent_files", "MLDASH_MAX_CONCURRENT_FILES", _parse_int(1), lambda: 64,
          "Daemon: files uploaded at once (small files are latency-bound: many in flight keep the store busy; "
          "multipart files at once are limited to max_concurrent_parts)."),
    Field("max_concurrent_parts", "MLDASH_MAX_CONCURRENT_PARTS", _parse_int(1), lambda: 4,
          "Daemon: multipart parts in flight at once, over all files (memory ≈ this × part size)."),
    Field("multipart_threshold", "MLDASH_MULTIPART_THRESHOLD", parse_size, lambda: 16 * 2**20,
          "Daemon: files at least this large use multipart upload."),
    Field("part_size", "MLDASH_PART_SIZE", parse_size, lambda: 8 * 2**20,
          "Daemon: minimum multipart part size (raised to size/10,000 for huge files; ≥ 5 MiB)."),
    Field("max_upload_rate", "MLDASH_MAX_UPLOAD_RATE", _parse_upload_rate, lambda: None,
          "Daemon: cap on the bytes per second sent to the store, over all uploads together (e.g. '50MB/s'; "
          "1 Gbit/s is '125MB/s'). Unset or 0 = no cap. S3 bodies are paced 64 KiB at a "
          "time; a local store's puts and parts each wait for their share before they are written. Time "
          "spent waiting for the cap does not count against request_timeout. Set in the file, it changes "
          "with a reload of the running daemon (SIGHUP, `systemctl reload`)."),
    Field("request_timeout", "MLDASH_REQUEST_TIMEOUT", _parse_float(0.1), lambda: 60.0,
          "Daemon: deadline in seconds of every single S3, MongoDB or local-store call (bodies scale it by "
          "size; a local store's file operations get it too: a hung network mount must not stall a worker)."),
    Field("lease_seconds", "MLDASH_LEASE_SECONDS", _parse_float(1.0), lambda: 300.0,
          "Daemon: how long a claim on an entry lasts without renewal."),
    Field("stop_grace", "MLDASH_STOP_GRACE", _parse_float(0.0), lambda: 20.0,
          "Daemon: seconds in-flight uploads get to finish after SIGTERM/SIGINT; then they are interrupted "
          "(completed parts stay recorded, so the next start resumes them) and the daemon exits. A second "
          "signal stops at once. Keep it well below the service's TimeoutStopSec (60 s in our units)."),
    Field("max_attempts", "MLDASH_MAX_ATTEMPTS", _parse_int(1), lambda: 20,
          "Daemon: attempts per entry for transient errors before it is left 'failed'."),
    Field("retry_base_delay", "MLDASH_RETRY_BASE_DELAY", _parse_float(0.0), lambda: 1.0,
          "Daemon: first backoff step in seconds (exponential, full jitter)."),
    Field("retry_max_delay", "MLDASH_RETRY_MAX_DELAY", _parse_float(0.0), lambda: 300.0,
          "Daemon: longest backoff in seconds."),
    Field("verify_etag", "MLDASH_VERIFY_ETAG", _parse_auto_bool, lambda: None,
          "Daemon: also check S3 ETags against the MD5 of the bytes sent, which catches corruption in flight "
          "on stores that accept a wrong SHA256 checksum without validating it. 'auto' (default): on for "
          "S3-compatible endpoints (MLDASH_S3_ENDPOINT_URL set), off for AWS S3, which validates the SHA256 "
          "itself; for single PUTs only, since a multipart object is checked against the composite SHA256 the "
          "store computes from the parts it received (a store that reports none gets its ETag checked). "
          "'true': every part's ETag too, as it is sent (an MD5 of every byte, ~1 s of CPU per GiB). Turn off "
          "for SSE-KMS buckets, whose ETags are not MD5s."),
    Field("keep_committed", "MLDASH_KEEP_COMMITTED", _parse_int(0), lambda: 0,
          "Daemon: committed artifacts whose bytes stay in the spool (newest first) for fast local reads."),
    Field("evict_after", "MLDASH_EVICT_AFTER", _parse_float(0.0), lambda: 0.0,
          "Daemon: seconds after commit before bytes beyond keep_committed are evicted."),
    Field("idle_exit", "MLDASH_IDLE_EXIT", _parse_float(0.0), lambda: 300.0,
          "Autostarted daemon: exit after this many idle seconds (0 = never). Ignored by 'run' as a service."),
    Field("log_level", "MLDASH_LOG_LEVEL", lambda v: str(v).upper(), lambda: "INFO",
          "Daemon log level (DEBUG, INFO, WARNING, ERROR). botocore's wire log is never shown. Set in the "
          "file, it changes with a reload of the running daemon (SIGHUP, `systemctl reload`)."),
)

_BY_NAME = {f.name: f for f in FIELDS}
_ENV_NAMES = frozenset(f.env for f in FIELDS)


INLINE_MAX_LIMIT = 2**20


@dataclass(frozen=True)
class Settings:
    spool: Path
    store: str
    s3_endpoint_url: str | None
    s3_region: str | None
    catalog: str
    mongo_database: str
    autostart: bool
    durability: str
    checksum: str
    sync_checksum_limit: int
    spool_quota: int | None
    save_timeout: float
    max_file_size: int
    inline_max: int
    experiment: str
    max_concurrent_files: int
    max_concurrent_parts: int
    multipart_threshold: int
    part_size: int
    max_upload_rate: int | None
    request_timeout: float
    lease_seconds: float
    stop_grace: float
    max_attempts: int
    retry_base_delay: float
    retry_max_delay: float
    verify_etag: bool | None  # None = auto, see `checks_etags`
    keep_committed: int
    evict_after: float
    idle_exit: float
    log_level: str
    # The settings given (the config file, the environment, arguments), not left to their defaults: what the user
    # asked for. Where files went is judged only against an explicit store or catalog (mldash/targets.py).
    explicit: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, *, check_catalog_uri: bool = False,
             **overrides: Any) -> Settings:
        """Settings from `env` (default: os.environ), the TOML file, defaults, then `overrides`.

        `check_catalog_uri`: also have PyMongo check a MongoDB URI's options and credentials (no connection). The
        daemon's commands ask for it; the training client does not, since it would import PyMongo (~0.1 s) in every
        process that saves, and its catalog is the daemon's to use."""
        env = os.environ if env is None else env
        _warn_unknown_variables(env)
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}  # where each value came from, for errors that involve several settings
        config_file = Path(env["MLDASH_CONFIG"]) if env.get("MLDASH_CONFIG") else _config_home() / "config.toml"
        if config_file.is_file() or env.get("MLDASH_CONFIG"):
            from_file = _read_toml(config_file)
            values.update(from_file)
            sources.update(dict.fromkeys(from_file, str(config_file)))
        for field in FIELDS:
            if env.get(field.env, "") != "":
                values[field.name] = _parse(field, env[field.env], f"environment variable {field.env}")
                sources[field.name] = f"environment variable {field.env}"
        for name, raw in overrides.items():
            if name not in _BY_NAME:
                raise ConfigError(f"unknown setting {name!r}; known: {', '.join(_BY_NAME)}")
            # None = this setting's default (for the optional ones, the default is None: unset).
            values[name] = _parse(_BY_NAME[name], raw, "argument") if raw is not None else _BY_NAME[name].default()
            sources[name] = "argument"
        for field in FIELDS:
            if field.name not in values:
                values[field.name] = field.default()
        settings = cls(**values, explicit=frozenset(sources))
        settings._check(sources)
        if check_catalog_uri:
            settings._check_catalog_uri(sources.get("catalog", "the default"))
        return settings

    def _check_catalog_uri(self, source: str) -> None:
        if urlparse(self.catalog).scheme not in ("mongodb", "mongodb+srv"):
            return
        from mldash.catalog.mongo import uri_problem

        if (problem := uri_problem(self.catalog)) is not None:
            raise ConfigError(f"catalog ({source}) {redact_uri(self.catalog)!r}: {problem}")

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes`, each parsed and checked as `load` does (None = the setting's default)."""
        parsed = {}
        for name, raw in changes.items():
            if name not in _BY_NAME:
                raise ConfigError(f"unknown setting {name!r}; known: {', '.join(_BY_NAME)}")
            parsed[name] = _parse(_BY_NAME[name], raw, "argument") if raw is not None else _BY_NAME[name].default()
        settings = dataclasses.replace(self, **parsed, explicit=self.explicit | frozenset(parsed))
        settings._check(dict.fromkeys(parsed, "argument"), others="the settings replace() was called on")
        return settings

    def _check(self, sources: Mapping[str, str] | None = None, *, others: str = "the default") -> None:
        """Checks that involve a value's limits or several settings; errors say where each value came from
        (`others`: what to say of a setting `sources` does not name)."""
        def where(*names: str) -> str:
            return " (" + "; ".join(f"{n} from {(sources or {}).get(n, others)}" for n in names) + ")"

        if self.part_size < 5 * 2**20:
            raise ConfigError(f"part_size = {self.part_size} bytes; S3 needs at least 5 MiB (5242880)"
                              + where("part_size"))
        if self.multipart_threshold < self.part_size:
            raise ConfigError(f"multipart_threshold ({self.multipart_threshold}) must be ≥ part_size "
                              f"({self.part_size})" + where("multipart_threshold", "part_size"))
        if self.inline_max > INLINE_MAX_LIMIT:
            raise ConfigError(f"inline_max = {self.inline_max} bytes; at most {INLINE_MAX_LIMIT} (1 MiB): the "
                              "bytes live in the manifest, which the daemon reads several times" + where("inline_max"))
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level = {self.log_level!r}; accepted: DEBUG, INFO, WARNING, ERROR"
                              + where("log_level"))

    @property
    def checks_etags(self) -> bool:
        """Whether the daemon compares ETags with MD5s (see the verify_etag field)."""
        return self.s3_endpoint_url is not None if self.verify_etag is None else self.verify_etag

    @property
    def hash_limit(self) -> int | None:
        """The most bytes a save hashes itself (see the checksum field): None = all, 0 = none. A larger
        artifact is saved without a checksum, which the daemon then computes."""
        return {"sync": None, "deferred": 0}.get(self.checksum, self.sync_checksum_limit)

    @property
    def power_safe(self) -> bool:
        return self.durability == "power"

    @property
    def experiment_parts(self) -> tuple[str, str, str]:
        namespace, project, experiment = self.experiment.split("/")
        return namespace, project, experiment


# MLDASH_* variables that are not settings but are ours: the config file's path, and the test suite's knobs.
_OTHER_VARIABLES = ("MLDASH_CONFIG",)
_warned_variables: set[str] = set()


def _warn_unknown_variables(env: Mapping[str, str]) -> None:
    """A misspelt variable (MLDASH_SPOOL_QUOTE) would otherwise be ignored in silence: the setting it meant keeps
    its default. Warned once per process, with the closest setting's name."""
    for name in env:
        if (not name.startswith("MLDASH_") or name in _ENV_NAMES or name in _OTHER_VARIABLES
                or name.startswith("MLDASH_TEST_") or name in _warned_variables):
            continue
        _warned_variables.add(name)
        close = difflib.get_close_matches(name, [*_ENV_NAMES, *_OTHER_VARIABLES], n=1)
        hint = f"; did you mean {close[0]}?" if close else "; docs/configuration.md lists the settings"
        logging.getLogger("mldash").warning("environment variable %s is not an mldash setting and is ignored%s",
                                            name, hint)


def _parse(field: Field, raw: Any, source: str) -> Any:
    try:
        return field.parse(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{field.name} ({source}): {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} (from MLDASH_CONFIG) does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory, not a TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); TOML files must be UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    section = data.get("mldash", data)  # both a flat file and an [mldash] table are accepted
    if not isinstance(section, dict):
        raise ConfigError(f"'mldash' in {str(path)!r} must be a table ([mldash]), not {type(section).__name__}")
    if section is not data:  # keys outside the [mldash] table would otherwise be silently ignored
        section = {**{k: v for k, v in data.items() if k != "mldash"}, **section}
    values: dict[str, Any] = {}
    for key, raw in section.items():
        if key not in _BY_NAME:
            close = difflib.get_close_matches(key, _BY_NAME, n=1)  # as for misspelt variables
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key!r} in {str(path)!r}{hint} (known keys: {', '.join(_BY_NAME)})")
        if key == "spool" and isinstance(raw, str) and raw and not os.path.isabs(os.path.expanduser(raw)):
            raw = str(path.parent.absolute() / raw)  # relative to the file that says it, not to the job's cwd
        values[key] = _parse(_BY_NAME[key], raw, f"{path}")
    return values
