"""The manifest: one immutable msgpack map per artifact, the source of truth of the spool.

Format version 1: the bytes are in blobs/{id}. Format version 2: the same map plus `payload`, the
bytes themselves (small saves, setting inline_max): a tiny save is then one file instead of two. A daemon
that only reads format 1 quarantines a format-2 entry (visible, `retry` after an upgrade) instead of
looking for a blob that does not exist. See docs/spool-format.md. Unknown keys are ignored when
decoding so a newer minor writer does not break an older daemon; an unknown *major* format version
is refused (the entry is quarantined, never guessed at).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

from mldash.errors import SpoolCorruptError
from mldash.keys import object_key

FORMAT_VERSION = 1         # bytes in blobs/{id}
INLINE_FORMAT_VERSION = 2  # bytes in the manifest's `payload`
READABLE_FORMATS = (FORMAT_VERSION, INLINE_FORMAT_VERSION)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


MAX_MANIFEST_BYTES = 4 * 2**20  # metadata is small; anything bigger is corrupt or hostile


@dataclass(frozen=True)
class Manifest:
    id: int
    namespace: str
    project: str
    experiment: str
    prefix: str          # "" or "models/checkpoints" (no leading/trailing slash)
    filename: str
    size: int
    sha256: str | None   # hex digest of the spooled bytes, computed while they were written; None = deferred:
    #                      the daemon computes it when it reads the bytes (settings.checksum = "deferred")
    content_type: str
    created_at: float    # Unix seconds
    kind: str = "blob"   # which call produced it: upload, json, text, blob, torch, pkl, fig, video, image
    description: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    host: str = ""       # producing host and pid: for people reading `ls`, never used as a path
    pid: int = 0
    format: int = FORMAT_VERSION
    payload: bytes | None = None  # format 2 only: the artifact's bytes (else they are in blobs/{id})

    @property
    def inline(self) -> bool:
        return self.payload is not None

    @property
    def path(self) -> str:
        """The logical folder shown to users (ML-Dash's `path`): "/models/checkpoints", or "/"."""
        return "/" + self.prefix

    @property
    def logical_path(self) -> str:
        """Folder and filename: "/models/checkpoints/model.pt"."""
        return "/" + (f"{self.prefix}/" if self.prefix else "") + self.filename

    @property
    def experiment_path(self) -> str:
        return f"{self.namespace}/{self.project}/{self.experiment}"

    def key(self, root: str = "") -> str:
        return object_key(namespace=self.namespace, project=self.project, experiment=self.experiment,
                          prefix=self.prefix, file_id=self.id, filename=self.filename, root=root)

    def encode(self) -> bytes:
        # A shallow map, not dataclasses.asdict (which deep-copies tags and metadata on every save);
        # `payload` only in format 2, so format-1 manifests stay byte-for-byte what older writers wrote.
        raw = {name: getattr(self, name) for name in _ENCODED_FIELDS}
        if self.payload is not None:
            raw["payload"] = self.payload
        return msgpack.packb(raw, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes, *, source: str = "manifest") -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise SpoolCorruptError(f"{source}: {len(data)} bytes is too large for a manifest")
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types for truncated input
            raise SpoolCorruptError(f"{source}: not a valid msgpack manifest ({exc})") from None
        if not isinstance(raw, dict):
            raise SpoolCorruptError(f"{source}: manifest is a {type(raw).__name__}, expected a map")
        version = raw.get("format")
        if version not in READABLE_FORMATS or isinstance(version, bool):
            raise SpoolCorruptError(f"{source}: unknown manifest format {version!r}; this mldash reads "
                                    f"formats {', '.join(map(str, READABLE_FORMATS))}")
        known = {name: raw[name] for name in cls.__dataclass_fields__ if name in raw}
        if version == FORMAT_VERSION:
            known.pop("payload", None)  # not a format-1 field: its bytes are in blobs/, whatever else is here
        elif known.get("payload") is None:
            raise SpoolCorruptError(f"{source}: manifest format 2 without its payload")
        try:
            manifest = cls(**known)
        except TypeError as exc:
            raise SpoolCorruptError(f"{source}: manifest is missing fields ({exc})") from None
        manifest._check(source)
        return manifest

    def _check(self, source: str) -> None:
        # Numbers must fit the index's int64/float columns: an oversized value would make SQLite
        # raise OverflowError inside the daemon's ingest instead of quarantining one entry.
        checks = [
            (_is_int(self.id) and 0 < self.id < 2**63, "id"),
            (_is_int(self.size) and 0 <= self.size < 2**63, "size"),
            (self.sha256 is None or _is_sha256_hex(self.sha256), "sha256"),
            (all(isinstance(v, str) for v in (self.namespace, self.project, self.experiment, self.prefix,
                                               self.filename, self.content_type)), "names"),
            (_is_number(self.created_at) and 0 <= self.created_at < 2**53, "created_at"),
            (self.description is None or isinstance(self.description, str), "description"),
            (isinstance(self.kind, str) and isinstance(self.host, str) and _is_int(self.pid), "kind/host/pid"),
            (isinstance(self.tags, list), "tags"),
            (isinstance(self.metadata, dict), "metadata"),
            (self.payload is None or (isinstance(self.payload, bytes) and len(self.payload) == self.size),
             "payload"),
        ]
        for ok, what in checks:
            if not ok:
                raise SpoolCorruptError(f"{source}: manifest field {what} is invalid")
        from mldash import names  # validated again: a manifest could have been edited by hand

        try:  # stored=True: the rules the save was made under (an older client's saves must still upload)
            for part in (self.namespace, self.project, self.experiment, self.filename):
                names.validate_segment(part, "name", stored=True)
            names.validate_prefix(self.prefix, stored=True)
        except ValueError as exc:
            raise SpoolCorruptError(f"{source}: {exc}") from None
        for what, validate, value in (("tags", lambda tags: names.validate_tags(tags, stored=True), self.tags),
                                      ("metadata", lambda meta: names.validate_metadata(meta, stored=True),
                                       self.metadata)):
            try:
                validate(value)
            except ValueError as exc:  # e.g. msgpack bin values: not JSON, the catalog could not store them
                raise SpoolCorruptError(f"{source}: manifest field {what} is invalid ({exc})") from None

    def to_public(self) -> dict[str, Any]:
        """The user-facing dict (camelCase, as ML-Dash returns it)."""
        return {
            "id": str(self.id),
            "namespace": self.namespace,
            "project": self.project,
            "experiment": self.experiment,
            "path": self.path,
            "filename": self.filename,
            "sizeBytes": self.size,
            "checksum": self.sha256,
            "checksumPending": self.sha256 is None,
            "contentType": self.content_type,
            "description": self.description,
            "tags": list(self.tags),
            "metadata": dict(self.metadata),
            "createdAt": self.created_at,
        }


_ENCODED_FIELDS = tuple(f.name for f in fields(Manifest) if f.name != "payload")
