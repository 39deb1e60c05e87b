"""The catalog contract (mldash/catalog/base.py), run against every implementation: SQLite and MongoDB."""

from __future__ import annotations

import asyncio
import fnmatch
import os
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mldash.catalog import (
    Catalog,
    FileDocument,
    FileQuery,
    MongoCatalog,
    PermanentCatalogError,
    SqliteCatalog,
    TransientCatalogError,
    make_catalog,
)
from mldash.catalog.query import Glob
from mldash.config import Settings
from tests.fixtures.mongo import release_driver_sockets

NS, PROJECT, EXP = "team", "vision", "run-1"


@pytest.fixture(params=["sqlite", "mongo"])
async def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Catalog]:
    if request.param == "sqlite":
        cat: Catalog = SqliteCatalog(tmp_path / "catalog" / "catalog.sqlite", request_timeout=10.0)
    else:
        cat = MongoCatalog(request.getfixturevalue("mongo_uri"), database=request.getfixturevalue("mongo_db_name"),
                           request_timeout=10.0)
    async with cat:
        yield cat
    if request.param == "mongo":
        release_driver_sockets()


_counter = iter(range(10**9))


def make_doc(**changes: object) -> FileDocument:
    n = next(_counter)
    file_id = str(changes.pop("id", 7_000_000_000_000_000 + n))
    base = FileDocument(
        id=file_id, namespace=NS, project=PROJECT, experiment=EXP, path="/models", filename=f"f{n}.pt",
        sizeBytes=1234, checksum="ab" * 32, contentType="application/octet-stream",
        storageKey=f"files/{NS}/{PROJECT}/{EXP}/models/{file_id}/f{n}.pt",
        storageUri=f"s3://bucket/files/{NS}/{PROJECT}/{EXP}/models/{file_id}/f{n}.pt",
        createdAt=1_700_000_000.0 + n, committedAt=1_700_000_100.0 + n,
    )
    return replace(base, **changes)


async def test_roundtrip_every_field(catalog: Catalog) -> None:
    doc = make_doc(
        filename="modèle-β 🚀.pt", path="/models/checkpoints", description="ünïcode ✓ \"quoted\"",
        tags=["best", "épοch-3", "z"], sizeBytes=2**40 + 3, createdAt=1_700_000_000.123456,
        metadata={"lr": 0.001, "steps": 2**53 + 1, "ok": True, "none": None, "name": "résumé",
                  "nested": {"list": [1, 2.5, "x", {"deep": []}], "empty": {}}, "a.b": 1, "$dollar": "x"},
    )
    await catalog.upsert(doc)
    got = await catalog.get(doc.id)
    assert got == doc.to_dict()
    assert list(got) == list(doc.to_dict())  # the same keys, no backend extras such as _id
    assert isinstance(got["sizeBytes"], int) and isinstance(got["createdAt"], float)


async def test_roundtrip_defaults(catalog: Catalog) -> None:
    doc = make_doc()
    await catalog.upsert(doc)
    assert await catalog.get(doc.id) == {**doc.to_dict(), "description": None, "tags": [], "metadata": {}}


async def test_get_missing_is_none(catalog: Catalog) -> None:
    assert await catalog.get("404") is None


async def test_replay_changes_nothing(catalog: Catalog) -> None:
    first = make_doc(tags=["a"])
    await catalog.upsert(first)
    await catalog.upsert(replace(first, committedAt=first.committedAt + 500, tags=["b"], description="later"))
    await catalog.upsert(first)
    assert await catalog.get(first.id) == first.to_dict()
    assert await catalog.find(FileQuery(NS, PROJECT, EXP)) == [first.to_dict()]
    # the replay's tag must not have been indexed either
    assert await catalog.find(FileQuery(NS, PROJECT, EXP, tags=("b",))) == []


async def test_concurrent_upserts_of_one_id_make_one_document(catalog: Catalog) -> None:
    doc = make_doc()
    variants = [replace(doc, committedAt=doc.committedAt + i) for i in range(10)]
    await asyncio.gather(*(catalog.upsert(v) for v in variants))
    found = await catalog.find(FileQuery(NS, PROJECT, EXP))
    assert len(found) == 1
    assert found[0]["committedAt"] in {v.committedAt for v in variants}
    assert await catalog.get(doc.id) == found[0]


async def test_upsert_many_stores_every_new_document(catalog: Catalog) -> None:
    docs = [make_doc(tags=["batch", f"t{i}"], metadata={"i": i, "$dollar": i}) for i in range(5)]
    assert await catalog.upsert_many(docs) == set()
    assert await catalog.get_many([d.id for d in docs]) == {d.id: d.to_dict() for d in docs}
    assert await catalog.find(FileQuery(NS, PROJECT, EXP)) == [d.to_dict() for d in docs]
    assert await catalog.find(FileQuery(NS, PROJECT, EXP, tags=("batch", "t3"))) == [docs[3].to_dict()]


async def test_upsert_many_reports_present_ids_and_leaves_them_alone(catalog: Catalog) -> None:
    first = make_doc(tags=["first"])
    await catalog.upsert(first)
    clash = replace(first, checksum="cd" * 32, storageKey="files/other", tags=["clash"])  # another file, same id
    fresh = [make_doc(), make_doc()]
    assert await catalog.upsert_many([fresh[0], clash, fresh[1]]) == {first.id}
    stored = await catalog.get_many([first.id, *(d.id for d in fresh)])
    assert stored == {first.id: first.to_dict(), **{d.id: d.to_dict() for d in fresh}}
    assert await catalog.find(FileQuery(NS, PROJECT, EXP, tags=("clash",))) == []


async def test_upsert_many_replay_reports_every_id(catalog: Catalog) -> None:
    docs = [make_doc() for _ in range(3)]
    assert await catalog.upsert_many(docs) == set()
    later = [replace(d, committedAt=d.committedAt + 500) for d in docs]
    assert await catalog.upsert_many(later) == {d.id for d in docs}
    assert await catalog.find(FileQuery(NS, PROJECT, EXP)) == [d.to_dict() for d in docs]


async def test_upsert_many_same_id_twice_keeps_the_first(catalog: Catalog) -> None:
    doc = make_doc()
    second = replace(doc, committedAt=doc.committedAt + 1)
    assert await catalog.upsert_many([doc, second]) == {doc.id}
    assert await catalog.get(doc.id) == doc.to_dict()


async def test_upsert_many_after_upsert_and_upsert_after_upsert_many(catalog: Catalog) -> None:
    """Both write paths share one notion of "present": a single replay of a batched document is a no-op."""
    batched, single = make_doc(), make_doc()
    await catalog.upsert(single)
    assert await catalog.upsert_many([batched, single]) == {single.id}
    await catalog.upsert(replace(batched, checksum="ef" * 32))
    assert await catalog.get(batched.id) == batched.to_dict()


async def test_empty_batches(catalog: Catalog) -> None:
    assert await catalog.upsert_many([]) == set()
    assert await catalog.get_many([]) == {}


async def test_get_many_leaves_out_missing_ids(catalog: Catalog) -> None:
    docs = [make_doc() for _ in range(3)]
    await catalog.upsert_many(docs)
    got = await catalog.get_many(["404", docs[2].id, docs[0].id, docs[0].id])
    assert got == {docs[0].id: docs[0].to_dict(), docs[2].id: docs[2].to_dict()}
    assert all(list(doc) == list(docs[0].to_dict()) for doc in got.values())  # no backend extras


async def test_large_batches(catalog: Catalog) -> None:
    docs = [make_doc() for _ in range(1200)]  # more ids than one SQL statement may bind
    assert await catalog.upsert_many(docs) == set()
    assert len(await catalog.get_many([d.id for d in docs])) == len(docs)
    assert await catalog.upsert_many(docs[::2]) == {d.id for d in docs[::2]}


async def test_find_isolates_experiments(catalog: Catalog) -> None:
    mine = make_doc()
    others = [make_doc(experiment="run-2"), make_doc(project="other"), make_doc(namespace="someone")]
    for doc in [mine, *others]:
        await catalog.upsert(doc)
    assert await catalog.find(FileQuery(NS, PROJECT, EXP)) == [mine.to_dict()]
    assert await catalog.find(FileQuery(NS, PROJECT, "run-2")) == [others[0].to_dict()]
    assert await catalog.find(FileQuery(NS, PROJECT, "nothing-here")) == []


async def test_path_filter_is_exact_folder(catalog: Catalog) -> None:
    root = make_doc(path="/")
    models = make_doc(path="/models")
    nested = make_doc(path="/models/checkpoints")
    sibling = make_doc(path="/models2")
    for doc in (root, models, nested, sibling):
        await catalog.upsert(doc)

    async def ids(path: str) -> list[str]:
        return [d["id"] for d in await catalog.find(FileQuery(NS, PROJECT, EXP, path=path))]

    assert await ids("/models") == [models.id]
    assert await ids("models/") == [models.id]  # the same folder, spelled without the slashes
    assert await ids("/models/checkpoints") == [nested.id]
    assert await ids("/") == [root.id]
    assert await ids("") == [root.id]
    assert await ids("/mod") == []


async def test_tags_filter_is_all_of(catalog: Catalog) -> None:
    ab = make_doc(tags=["a", "b"])
    a = make_doc(tags=["a"])
    abc = make_doc(tags=["c", "b", "a"])
    none = make_doc()
    for doc in (ab, a, abc, none):
        await catalog.upsert(doc)

    async def ids(*tags: str) -> list[str]:
        return [d["id"] for d in await catalog.find(FileQuery(NS, PROJECT, EXP, tags=tags))]

    assert await ids("a") == [ab.id, a.id, abc.id]
    assert await ids("a", "b") == [ab.id, abc.id]
    assert await ids("b", "a", "c") == [abc.id]
    assert await ids("d") == []
    assert await ids() == [ab.id, a.id, abc.id, none.id]
    other = make_doc(experiment="run-2", tags=["a"])
    await catalog.upsert(other)
    assert await ids("a") == [ab.id, a.id, abc.id]


@pytest.mark.parametrize(("pattern", "expected"), [
    ("*.pt", ["model.pt", "ckpt_001.pt", "a*b.pt"]),
    ("ckpt_[0-9]*.pt", ["ckpt_001.pt"]),
    ("ckpt_[!0-9]*", ["ckpt_x.json"]),
    ("?odel.pt", ["model.pt"]),
    ("model.PT", []),                 # case-sensitive, like fnmatchcase
    ("a[*]b.pt", ["a*b.pt"]),         # a literal '*'
    ("[[]x].txt", ["[x].txt"]),       # a literal '['
    ("%_*", []),                      # SQL LIKE wildcards mean nothing here
    ("[]x]*", []),                    # a set holding ']' (filtered in Python)
    ("*", ["model.pt", "ckpt_001.pt", "ckpt_x.json", "a*b.pt", "[x].txt", "notes"]),
    ("n*s", ["notes"]),
])
async def test_filename_glob(catalog: Catalog, pattern: str, expected: list[str]) -> None:
    names = ["model.pt", "ckpt_001.pt", "ckpt_x.json", "a*b.pt", "[x].txt", "notes"]
    for name in names:
        await catalog.upsert(make_doc(filename=name))
    found = [d["filename"] for d in await catalog.find(FileQuery(NS, PROJECT, EXP, filename_glob=pattern))]
    assert found == expected
    assert found == [n for n in names if fnmatch.fnmatchcase(n, pattern)]


async def test_limit_and_order(catalog: Catalog) -> None:
    # Inserted out of order; equal createdAt is broken by id.
    docs = [make_doc(createdAt=30.0), make_doc(createdAt=10.0), make_doc(id="9000", createdAt=20.0),
            make_doc(id="8000", createdAt=20.0), make_doc(createdAt=40.0, filename="x.json")]
    for doc in docs:
        await catalog.upsert(doc)
    ordered = [docs[1].id, "8000", "9000", docs[0].id, docs[4].id]
    assert [d["id"] for d in await catalog.find(FileQuery(NS, PROJECT, EXP))] == ordered
    assert [d["id"] for d in await catalog.find(FileQuery(NS, PROJECT, EXP, limit=2))] == ordered[:2]
    assert await catalog.find(FileQuery(NS, PROJECT, EXP, limit=0)) == []
    assert [d["id"] for d in await catalog.find(FileQuery(NS, PROJECT, EXP, limit=10))] == ordered
    assert [d["id"] for d in await catalog.find(FileQuery(NS, PROJECT, EXP, filename_glob="f*", limit=3))] \
        == ordered[:3]
    # an inexact glob (filtered in Python) still honours the limit after filtering
    assert [d["id"] for d in await catalog.find(FileQuery(NS, PROJECT, EXP, filename_glob="[^x]*", limit=1))] \
        == [docs[4].id]
    with pytest.raises(ValueError):
        await catalog.find(FileQuery(NS, PROJECT, EXP, limit=-1))


async def test_combined_filters(catalog: Catalog) -> None:
    hit = make_doc(path="/models", tags=["best"], filename="best.pt")
    for doc in (hit, make_doc(path="/models", tags=["best"], filename="best.json"),
                make_doc(path="/other", tags=["best"], filename="best.pt"),
                make_doc(path="/models", filename="best.pt")):
        await catalog.upsert(doc)
    query = FileQuery(NS, PROJECT, EXP, path="/models", tags=("best",), filename_glob="*.pt")
    assert await catalog.find(query) == [hit.to_dict()]


async def test_ping(catalog: Catalog) -> None:
    await catalog.ping()


async def test_use_before_open_is_a_bug(tmp_path: Path, mongo_uri: str) -> None:
    for cat in (SqliteCatalog(tmp_path / "c.sqlite"), MongoCatalog(mongo_uri)):
        with pytest.raises(RuntimeError, match="not open"):
            await cat.get("1")


# -- implementation specifics ------------------------------------------------------------------------


async def test_make_catalog(settings: Settings, mongo_settings: Settings) -> None:
    sqlite_catalog = make_catalog(settings)
    assert isinstance(sqlite_catalog, SqliteCatalog)
    assert sqlite_catalog.path == Path(settings.catalog.removeprefix("sqlite://"))
    mongo_catalog = make_catalog(mongo_settings)
    assert isinstance(mongo_catalog, MongoCatalog)
    assert mongo_catalog.database == mongo_settings.mongo_database
    assert mongo_catalog.request_timeout == mongo_settings.request_timeout
    async with mongo_catalog:
        await mongo_catalog.ping()


async def test_sqlite_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "sub" / "catalog.sqlite"
    async with SqliteCatalog(path) as cat:
        await cat.upsert(make_doc())
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path.parent.parent).st_mode) == 0o700
        for suffix in ("-wal", "-shm"):
            assert stat.S_IMODE(os.stat(str(path) + suffix).st_mode) == 0o600
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            plan = " ".join(str(r) for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT 1 FROM files WHERE namespace='a' AND project='b' AND experiment='c' "
                "AND EXISTS (SELECT 1 FROM file_tags WHERE file_id = files.id AND tag = 'x')"))
            assert "USING INDEX" in plan or "USING PRIMARY KEY" in plan or "COVERING INDEX" in plan
        finally:
            conn.close()


async def test_sqlite_reopen_keeps_documents(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    doc = make_doc(tags=["t"])
    async with SqliteCatalog(path) as cat:
        await cat.upsert(doc)
    async with SqliteCatalog(path) as cat:
        assert await cat.get(doc.id) == doc.to_dict()
        assert await cat.find(FileQuery(NS, PROJECT, EXP, tags=("t",))) == [doc.to_dict()]


async def test_sqlite_locked_database_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    async with SqliteCatalog(path, request_timeout=0.5) as cat:
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
            with pytest.raises(TransientCatalogError):
                await cat.upsert(make_doc())
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        doc = make_doc()
        await cat.upsert(doc)  # the lock is gone: the same catalog object works again
        assert await cat.get(doc.id) == doc.to_dict()


async def test_mongo_url_hides_password(mongo_uri: str) -> None:
    cat = MongoCatalog("mongodb://alice:s3cr%40t@db1:27017,db2:27018/?authSource=admin", database="x")
    assert "s3cr" not in cat.url and "s3cr" not in repr(cat)
    assert cat.url == "mongodb://alice:***@db1:27017,db2:27018/?authSource=admin"
    assert MongoCatalog(mongo_uri).url == mongo_uri
    bad = MongoCatalog("mongodb://alice:s3cr3t@db1:notaport/")
    with pytest.raises(PermanentCatalogError) as info:
        await bad.open()
    assert "s3cr3t" not in str(info.value) and info.value.__cause__ is None


async def test_sqlite_deadline(tmp_path: Path) -> None:
    """A call that cannot finish within request_timeout raises TransientCatalogError at the deadline."""
    async with SqliteCatalog(tmp_path / "c.sqlite", request_timeout=0.3) as cat:
        release = threading.Event()
        assert cat._executor is not None
        cat._executor.submit(release.wait, 10)  # the catalog thread is busy with something slow
        try:
            with pytest.raises(TransientCatalogError, match=r"longer than 0\.3s"):
                await cat.upsert(make_doc())
        finally:
            release.set()
        doc = make_doc()
        await cat.upsert(doc)
        assert await cat.find(FileQuery(NS, PROJECT, EXP)) == [doc.to_dict()]  # the timed-out write never ran


# -- the glob translation, against fnmatch itself ------------------------------------------------------

_GLOB_ALPHABET = "ab.-]![^\\*?é"


@settings(max_examples=400, deadline=None)
@given(pattern=st.text(_GLOB_ALPHABET, max_size=8),
       names=st.lists(st.text("ab.-]![^\\*?é", min_size=1, max_size=6), min_size=1, max_size=8))
def test_glob_translations_agree_with_fnmatch(pattern: str, names: list[str]) -> None:
    import re

    glob = Glob.parse(pattern)
    expected = [fnmatch.fnmatchcase(n, pattern) for n in names]
    assert [glob.matches(n) for n in names] == expected
    if glob.exact:
        assert glob.regex is not None and glob.sqlite_glob is not None
        assert [re.search(glob.regex, n) is not None for n in names] == expected
        conn = sqlite3.connect(":memory:")
        try:
            got = [bool(conn.execute("SELECT ? GLOB ?", (n, glob.sqlite_glob)).fetchone()[0]) for n in names]
        finally:
            conn.close()
        assert got == expected
