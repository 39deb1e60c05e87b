"""Independent views of what landed in the store and the catalog — for assertions.

These read the backends directly (plain files, boto3, sqlite3, pymongo), not through the code
under test, so a bug in our store/catalog code cannot make its own test pass.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import boto3
import pymongo

from mldash.config import Settings


def _s3(settings: Settings):
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name="us-east-1")


def store_root(settings: Settings) -> tuple[str, str]:
    parsed = urlparse(settings.store)
    return parsed.scheme, (parsed.netloc if parsed.scheme == "s3" else unquote(parsed.path))


def full_key(settings: Settings, layout_key: str) -> str:
    parsed = urlparse(settings.store)
    root = parsed.path.strip("/") if parsed.scheme == "s3" else ""
    return f"{root}/{layout_key}" if root else layout_key


def read_object(settings: Settings, layout_key: str) -> bytes | None:
    """The stored bytes of a key built by mldash.keys (the store's root prefix is added here)."""
    scheme, where = store_root(settings)
    key = full_key(settings, layout_key)
    if scheme == "file":
        path = Path(where) / key
        return path.read_bytes() if path.exists() else None
    try:
        return _s3(settings).get_object(Bucket=where, Key=key)["Body"].read()
    except _s3(settings).exceptions.NoSuchKey:
        return None


def list_objects(settings: Settings) -> list[str]:
    scheme, where = store_root(settings)
    if scheme == "file":
        root = Path(where)
        if not root.exists():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and
                      not any(part.startswith(".") for part in p.relative_to(root).parts))
    keys = []
    for page in _s3(settings).get_paginator("list_objects_v2").paginate(Bucket=where):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def pending_uploads(settings: Settings) -> list[dict[str, Any]]:
    scheme, where = store_root(settings)
    if scheme == "file":
        uploads = Path(where) / ".uploads"
        return [{"UploadId": p.name} for p in uploads.iterdir() if p.is_dir()] if uploads.exists() else []
    uploads = []
    for page in _s3(settings).get_paginator("list_multipart_uploads").paginate(Bucket=where):
        uploads += page.get("Uploads", [])
    return uploads


def catalog_docs(settings: Settings) -> list[dict[str, Any]]:
    parsed = urlparse(settings.catalog)
    if parsed.scheme == "sqlite":
        path = Path(unquote(parsed.path))
        if not path.exists():
            return []
        conn = sqlite3.connect(path)
        conn.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in conn.execute("SELECT * FROM files ORDER BY id")]
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()
        for row in rows:
            for name in ("tags", "metadata"):
                if isinstance(row.get(name), str):
                    row[name] = json.loads(row[name])
        return rows
    client = pymongo.MongoClient(settings.catalog, serverSelectionTimeoutMS=10_000)
    try:
        return list(client[settings.mongo_database]["files"].find({}, sort=[("id", 1)]))
    finally:
        client.close()
