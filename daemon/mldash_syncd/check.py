"""`mldash-syncd check`: try the configured store and catalog for what the daemon relies on, before relying on it.

Why: S3-compatible stores differ in what they honour, and a difference shows late — with the first checkpoint of
a week-long run, or never. The daemon's "never overwrite" rests on conditional creates (`If-None-Match: *` on a
PUT and on completing a multipart upload): a store that ignores the header replaces an object where it should
refuse — another host's file under a clashing id, or an earlier attempt's. Its verification rests on the SHA256
checksums the store records and reports (composite for multipart), and on the store refusing bytes that do not
match the checksum sent with them; where it does not, the daemon needs `verify_etag` (MD5 against ETags). And
credentials may allow writes but not deletes (which gc needs).

`check` writes a few small probe objects under `mldash-check/<random>/` in the store and removes them; it reads
the catalog and writes no document there (a local store's folder or a SQLite catalog that does not exist yet is
created, as the daemon would, and said: a mistyped path shows). A failure exits 1 and says what it means; a
warning says what to set.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mldash.catalog import make_catalog
from mldash.catalog.base import Catalog, CatalogError
from mldash.config import Settings
from mldash.store import make_store
from mldash.store.base import ObjectExistsError, Store, StoreError, b64_sha256
from mldash.targets import sync_targets

PROBE_PREFIX = "mldash-check"
_PROBE_BYTES = 1024

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Finding:
    target: str  # "store" | "catalog"
    verdict: str  # OK | WARN | FAIL
    what: str

    def as_json(self) -> dict[str, Any]:
        return {"target": self.target, "verdict": self.verdict, "what": self.what}


async def check(settings: Settings, *, store: Store | None = None, catalog: Catalog | None = None) -> list[Finding]:
    """Every finding, store first. `store`/`catalog`: instead of the ones the settings name (tests)."""
    # A local store or SQLite catalog is created where it is named: a mistyped path would check as all ok.
    new_store, new_catalog = (_local_path(uri) for uri in (settings.store, settings.catalog))
    new_store = new_store if new_store is not None and not new_store.exists() else None
    new_catalog = new_catalog if new_catalog is not None and not new_catalog.exists() else None
    found = [*await _check_store(settings, store or make_store(settings)),
             *await _check_catalog(catalog or make_catalog(settings))]
    for target, path in (("store", new_store), ("catalog", new_catalog)):
        if path is not None and path.exists():
            found.append(Finding(target, WARN, f"{path} did not exist: this check created it, empty — if the "
                                               "path is mistyped, fix it and remove what was created"))
    return found


def _local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("file", "sqlite") else None


async def _check_store(settings: Settings, store: Store) -> list[Finding]:
    found: list[Finding] = []

    def say(verdict: str, what: str) -> None:
        found.append(Finding("store", verdict, what))

    prefix = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
    single, multi, wrong = (store.key(f"{prefix}/{name}") for name in ("single.bin", "multipart.bin", "wrong.bin"))
    first, second = os.urandom(_PROBE_BYTES), os.urandom(_PROBE_BYTES)
    written: list[str] = []
    try:
        await store.open()
    except StoreError as exc:
        say(FAIL, f"cannot be opened: {exc}")
        return found
    try:
        started = time.monotonic()
        try:
            await store.put(single, first, b64_sha256(first))
        except StoreError as exc:
            say(FAIL, f"a {_PROBE_BYTES}-byte object cannot be written: {exc}")
            return found
        written.append(single)
        say(OK, f"a {_PROBE_BYTES}-byte object written in {time.monotonic() - started:.2f} s")

        stored = await store.head(single)
        if stored is not None and stored.checksum_sha256 == b64_sha256(first):
            say(OK, "SHA256 checksums are recorded and reported")
        elif stored is not None and stored.checksum_sha256 is None:
            say(WARN, "the store reports no SHA256 checksums (older MinIO, Ceph RGW): uploads are verified by "
                      "size and ETag only; keep verify_etag on (MLDASH_VERIFY_ETAG=1)")
        else:
            say(FAIL, f"the object written reads back as {stored!r}, not {_PROBE_BYTES} bytes with the SHA256 sent")

        try:
            await store.put(single, second, b64_sha256(second))
        except ObjectExistsError:
            say(OK, "a conditional create (If-None-Match: *) refuses to overwrite")
        else:
            say(FAIL, "the store ignores If-None-Match: a second PUT replaced the object. mldash never overwrites "
                      "on this guarantee (an id another file holds, an attempt whose answer was lost); use a store "
                      "that honours conditional writes (AWS S3, recent MinIO)")

        upload = await store.create_multipart(multi)
        try:
            part = await store.upload_part(multi, upload, 1, first, b64_sha256(first))
            done = await store.complete_multipart(multi, upload, [part])
            written.append(multi)
            checksum = done.checksum_sha256 or (await store.head(multi) or done).checksum_sha256
            say(OK, "multipart upload with SHA256 part checksums" + (
                f" (composite checksum {checksum})" if checksum else " (no composite checksum reported)"))
        except StoreError as exc:
            with contextlib.suppress(StoreError):
                await store.abort_multipart(multi, upload)
            say(FAIL, f"a multipart upload fails: {exc}")
        else:
            found.append(await _conditional_complete(store, multi, second))

        try:
            await store.put(wrong, first, b64_sha256(second))
        except StoreError:
            say(OK, "bytes that do not match the SHA256 sent with them are refused")
        else:
            written.append(wrong)
            say(WARN if settings.checks_etags else FAIL,
                "the store accepts bytes whose SHA256 does not match the one sent with them: corruption in "
                "flight is caught only by the ETag (MD5) check, " + (
                    "which is on" if settings.checks_etags else "which is off: set MLDASH_VERIFY_ETAG=1"))
    except StoreError as exc:
        say(FAIL, f"{exc}")
    finally:
        left = []
        for key in written:
            try:
                await store.delete(key)
            except StoreError:
                left.append(key)
        if left:
            say(WARN, f"probe objects could not be removed (no delete permission? gc needs it for its own "
                      f"leftovers): {', '.join(left)}")
        elif written:
            say(OK, "probe objects removed")
        with contextlib.suppress(Exception):
            await store.close()
    return found


async def _conditional_complete(store: Store, key: str, data: bytes) -> Finding:
    """Completing a second multipart upload at an existing key must be refused like a PUT."""
    upload = await store.create_multipart(key)
    try:
        part = await store.upload_part(key, upload, 1, data, b64_sha256(data))
        await store.complete_multipart(key, upload, [part])
    except ObjectExistsError:
        return Finding("store", OK, "a conditional completion of a multipart upload refuses to overwrite")
    finally:
        with contextlib.suppress(StoreError):
            await store.abort_multipart(key, upload)
    return Finding("store", FAIL, "the store ignores If-None-Match when completing a multipart upload: it replaced "
                                  "the object. Use a store that honours conditional writes")


async def _check_catalog(catalog: Catalog) -> list[Finding]:
    try:
        async with catalog:
            await catalog.get("0")
    except CatalogError as exc:
        return [Finding("catalog", FAIL, f"cannot be used: {exc}")]
    return [Finding("catalog", OK, "opened (indexes in place) and read")]


def render(settings: Settings, findings: list[Finding]) -> str:
    targets = sync_targets(settings)
    lines = []
    for target in ("store", "catalog"):
        lines.append(f"{target:<8} {targets[target]}")
        lines += [f"  {f.verdict:<5} {f.what}" for f in findings if f.target == target]
    return "\n".join(lines)
