"""The object key layout — the one place that decides where an artifact lives in a store.

    [{root}/]files/{namespace}/{project}/{experiment}/[{prefix}/]{file_id}/{filename}

The same layout is used for S3 and for the embedded local directory store. Keys are limited to
1024 bytes (real S3 refuses longer ones; moto does not, so we check ourselves).
"""

from __future__ import annotations

from mldash.errors import InvalidInputError

MAX_KEY_BYTES = 1024


def object_key(
    *, namespace: str, project: str, experiment: str, prefix: str, file_id: int, filename: str, root: str = ""
) -> str:
    """The store key of one file version; inputs must already be validated (see `mldash.names`)."""
    parts = [root.strip("/")] if root.strip("/") else []
    parts += ["files", namespace, project, experiment]
    if prefix:
        parts.append(prefix)
    parts += [str(file_id), filename]
    key = "/".join(parts)
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise InvalidInputError(
            f"object key for {filename!r} would be {size} bytes (> {MAX_KEY_BYTES}); "
            "shorten the prefix or the filename"
        )
    return key


def experiment_key_prefix(*, namespace: str, project: str, experiment: str, root: str = "") -> str:
    """The key prefix under which every file of one experiment lives (ends with '/')."""
    parts = [root.strip("/")] if root.strip("/") else []
    return "/".join([*parts, "files", namespace, project, experiment]) + "/"


def storage_uri(store_url: str, full_key: str) -> str:
    """A URI naming one object: "s3://bucket/<key>" or "file:///abs/dir/<key>".

    `full_key` already carries the store's root prefix (see `Store.key`), so only the bucket or the
    directory of `store_url` is used here.
    """
    from pathlib import Path
    from urllib.parse import quote, unquote, urlparse

    parsed = urlparse(store_url)
    if parsed.scheme == "s3":
        return f"s3://{parsed.netloc}/{full_key}"
    if parsed.scheme == "file":
        return (Path(unquote(parsed.path)) / full_key).as_uri()
    return f"{store_url.rstrip('/')}/{quote(full_key)}"


def file_id_from_key(key: str) -> int | None:
    """The file id inside a key built by `object_key` (the component before the filename), else None."""
    parts = key.split("/")
    if len(parts) < 3 or "files" not in parts or not parts[-2].isdigit():
        return None
    return int(parts[-2])
