"""Read-your-writes: list/get/download see spooled and committed files with their state; wait/flush."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from mldash import Experiment, InvalidInputError, MldashError, NotFoundError, UploadFailedError, WaitTimeoutError
from mldash.config import Settings
from mldash.errors import SpoolCorruptError
from mldash.spool.index import SpoolIndex
from mldash.spool.layout import SpoolLayout
from tests.client_helpers import store_path
from tests.spool_helpers import overwrite_spooled


@pytest.fixture
def exp(settings: Settings) -> Experiment:
    return Experiment(prefix="alice/project/ryw", settings=settings)


@pytest.fixture
def synced(settings: Settings, drain: Any):
    def run(expect_clean: bool = True):
        report = drain(settings)
        if expect_clean:
            assert report.failed == 0 and report.quarantined == 0, report
        return report
    return run


# ---- list ------------------------------------------------------------------------------------------------

def test_list_before_any_daemon_shows_queued_files_without_creating_anything(exp, settings):
    assert exp.files().list() == []
    assert not Path(settings.spool).exists()  # reading creates no spool…
    catalog_file = Path(settings.catalog.removeprefix("sqlite://"))
    result = exp.files("models").save_blob(b"x", "a.bin", tags=["best"], metadata={"epoch": 1})
    listed = exp.files().list()
    assert [f["id"] for f in listed] == [result["id"]]
    assert listed[0]["status"] == "queued"
    assert listed[0]["tags"] == ["best"] and listed[0]["metadata"] == {"epoch": 1}
    assert listed[0]["sizeBytes"] == 1 and listed[0]["checksum"] == result["checksum"]
    assert not catalog_file.exists()  # …and no catalog


def test_list_after_commit_shows_committed_or_evicted_once(exp, settings, synced):
    a = exp.files("models").save_blob(b"a", "a.bin")
    synced()
    b = exp.files("models").save_blob(b"b", "b.bin")  # still queued
    listed = {f["id"]: f for f in exp.files().list()}
    assert set(listed) == {a["id"], b["id"]}
    assert listed[a["id"]]["status"] == "evicted"  # committed, bytes gone from the spool (keep_committed=0)
    assert listed[a["id"]]["storageKey"].endswith(f"/models/{a['id']}/a.bin")
    assert "committedAt" in listed[a["id"]]
    assert listed[b["id"]]["status"] == "queued"


def test_committed_file_still_in_the_spool_is_listed_once(settings, drain):
    keep = settings.replace(keep_committed=10)
    exp = Experiment(prefix="alice/project/keep", settings=keep)
    result = exp.files.save_blob(b"kept", "k.bin")
    assert drain(keep).committed == 1
    assert (Path(keep.spool) / "manifests" / f"{result['id']}.msgpack").exists()
    listed = exp.files().list()
    assert len(listed) == 1
    assert listed[0]["status"] == "committed" and "storageKey" in listed[0]


def test_list_filters(exp, synced):
    files = exp.files("models")
    best = files.save_blob(b"1", "best.pt", tags=["best", "checkpoint"])
    ckpt = files.save_blob(b"2", "epoch-1.pt", tags=["checkpoint"])
    sub = exp.files("models/old").save_blob(b"3", "epoch-0.pt", tags=["checkpoint"])
    other = exp.files("plots").save_blob(b"4", "loss.png")
    synced()
    late = files.save_blob(b"5", "late.pt", tags=["checkpoint"])  # queued, in the spool only

    def ids(items: list[dict[str, Any]]) -> list[str]:
        return [f["id"] for f in items]

    assert ids(exp.files().list()) == ids([best, ckpt, sub, other, late])  # oldest first
    assert ids(files.list()) == ids([best, ckpt, sub, late])  # the folder and its sub-folders
    assert ids(files.list(recursive=False)) == ids([best, ckpt, late])
    assert ids(exp.files().list(tags=["checkpoint"])) == ids([best, ckpt, sub, late])
    assert ids(exp.files().list(tags=["checkpoint", "best"])) == ids([best])
    assert ids(exp.files().list(pattern="epoch-*.pt")) == ids([ckpt, sub])
    assert ids(exp.files().list(pattern="/models/old/*")) == ids([sub])
    assert ids(exp.files().list(status="queued")) == ids([late])
    assert ids(exp.files().list(status="evicted")) == ids([best, ckpt, sub, other])
    with pytest.raises(InvalidInputError, match="status"):
        exp.files().list(status="done")
    with pytest.raises(InvalidInputError):
        exp.files().list(tags="best")


def test_other_experiments_are_not_listed(exp, settings, synced):
    mine = exp.files.save_blob(b"mine", "a.bin")
    other = Experiment(prefix="alice/project/other", settings=settings)
    theirs = other.files.save_blob(b"theirs", "a.bin")
    assert [f["id"] for f in exp.files().list()] == [mine["id"]]
    synced()
    assert [f["id"] for f in exp.files().list()] == [mine["id"]]
    assert [f["id"] for f in other.files().list()] == [theirs["id"]]
    with pytest.raises(NotFoundError, match="alice/project/other"):
        exp.files().get(theirs["id"])


def test_list_survives_an_unreachable_catalog(settings, caplog):
    broken = settings.replace(catalog="mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200", request_timeout=1.0)
    exp = Experiment(prefix="alice/project/offline", settings=broken)
    result = exp.files.save_blob(b"x", "a.bin")
    with caplog.at_level(logging.WARNING, logger="mldash"):
        listed = exp.files().list()
    assert [f["id"] for f in listed] == [result["id"]]
    assert "only the files still in the local spool" in caplog.text


async def test_reads_work_inside_a_running_event_loop(exp, tmp_path, synced):
    """Jupyter runs an event loop in the main thread: the synchronous client must still work there."""
    result = exp.files.save_blob(b"x", "a.bin")
    assert exp.files().list()[0]["id"] == result["id"]
    assert Path(exp.files.download(result["id"], tmp_path / "out.bin")).read_bytes() == b"x"


# ---- get / download ------------------------------------------------------------------------------------

def test_download_from_the_spool_before_any_daemon(exp, settings, tmp_path):
    result = exp.files("models").save_blob(b"spooled", "best.pt")
    written = exp.files("models").download("best.pt", tmp_path / "out.pt")
    assert written == str(tmp_path / "out.pt") and Path(written).read_bytes() == b"spooled"
    assert exp.files().get(result["id"])["status"] == "queued"


def test_download_from_the_store_after_eviction(exp, settings, synced, tmp_path):
    result = exp.files("models").save_blob(b"stored", "best.pt")
    synced()
    assert not SpoolLayout(settings.spool).blob_path(int(result["id"])).exists()
    out = exp.files().download(result["id"], tmp_path / "x.pt")
    assert Path(out).read_bytes() == b"stored"


def test_a_download_the_store_cannot_serve_names_the_store_and_where_the_file_was_recorded(
        exp, settings, synced, tmp_path):
    """It said only "download 'files/…': no such object" — not which store, nor that the catalog recorded the
    file in another one (the store setting had changed)."""
    from mldash.store.base import PermanentStoreError

    result = exp.files("models").save_blob(b"stored", "best.pt")
    synced()
    moved = Experiment(prefix="alice/project/ryw", settings=settings.replace(store=(tmp_path / "other").as_uri()))
    with pytest.raises(PermanentStoreError) as info:
        moved.files().download(result["id"], tmp_path / "x.pt")
    message = str(info.value)
    assert f"from the store {(tmp_path / 'other').as_uri()}" in message, message
    assert "the catalog recorded it at file://" in message and "has the store setting changed?" in message, message
    assert not (tmp_path / "x.pt").exists()


def test_download_prefers_the_spool_copy(settings, drain, tmp_path):
    keep = settings.replace(keep_committed=10)
    exp = Experiment(prefix="alice/project/keep", settings=keep)
    result = exp.files.save_blob(b"local copy", "k.bin")
    drain(keep)
    store_path(keep, result).unlink()  # the store copy is gone: only the spool can serve it
    assert Path(exp.files.download(result["id"], tmp_path / "k.bin")).read_bytes() == b"local copy"


def test_path_form_means_the_newest_version(exp, synced, tmp_path):
    files = exp.files("models")
    files.save_blob(b"v1", "best.pt")
    synced()
    files.save_blob(b"v2", "best.pt")
    newest = files.save_blob(b"v3", "best.pt")  # still queued: the newest is the spool's
    assert exp.files().get("/models/best.pt")["id"] == newest["id"]
    assert Path(exp.files().download("/models/best.pt", tmp_path / "a")).read_bytes() == b"v3"
    assert Path(exp.files("models").download("best.pt", tmp_path / "b")).read_bytes() == b"v3"
    assert Path(exp.files().download("models/best.pt", tmp_path / "c")).read_bytes() == b"v3"
    with pytest.raises(NotFoundError, match=r"/models/missing\.pt"):
        exp.files("models").download("missing.pt", tmp_path / "d")
    with pytest.raises(NotFoundError):
        exp.files().download("best.pt", tmp_path / "e")  # not in the root folder
    with pytest.raises(NotFoundError, match="no file with id"):
        exp.files().get(123456789)
    with pytest.raises(InvalidInputError):
        exp.files().get("/models/../../x")


def test_download_destinations(exp, tmp_path, monkeypatch):
    result = exp.files("m").save_blob(b"new", "model.pt")
    monkeypatch.chdir(tmp_path)
    assert exp.files("m").download("model.pt") == str(tmp_path / "model.pt")  # default: cwd, original name
    folder = tmp_path / "dir"
    folder.mkdir()
    assert exp.files().download(result["id"], folder) == str(folder / "model.pt")  # into a directory
    nested = tmp_path / "a" / "b" / "c.pt"
    assert exp.files().download(result["id"], nested) == str(nested)  # parents are created
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"old")
    exp.files().download(result["id"], existing)  # replaced, like ML-Dash
    assert existing.read_bytes() == b"new"
    existing.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        exp.files().download(result["id"], existing, overwrite=False)
    assert existing.read_bytes() == b"old"
    assert not [p for p in tmp_path.rglob(".mldash-*")]  # no temp files left behind
    with pytest.raises(InvalidInputError, match="which file"):
        exp.files().download()


def test_download_refuses_corrupt_bytes(exp, settings, synced, tmp_path):
    queued = exp.files.save_blob(b"spooled", "q.bin")
    SpoolLayout(settings.spool).blob_path(int(queued["id"])).write_bytes(b"changed")
    with pytest.raises(SpoolCorruptError, match="do not match"):
        exp.files.download(queued["id"], tmp_path / "q.bin")
    assert not (tmp_path / "q.bin").exists()

    committed = exp.files.save_blob(b"good bytes", "c.bin")
    synced(expect_clean=False)  # the corrupted one is quarantined
    store_path(settings, committed).write_bytes(b"bad bytes!")
    with pytest.raises(MldashError, match="does not match"):
        exp.files.download(committed["id"], tmp_path / "c.bin")
    assert not (tmp_path / "c.bin").exists()


# ---- status of failures ----------------------------------------------------------------------------------

def test_quarantined_entry_is_listed_with_its_reason_and_fails_flush(exp, settings, synced):
    good = exp.files.save_blob(b"good", "good.bin")
    bad = exp.files.save_blob(b"original", "bad.bin")
    overwrite_spooled(SpoolLayout(settings.spool), int(bad["id"]), b"tampered")
    report = synced(expect_clean=False)
    assert report.quarantined == 1
    entry = exp.files().get(bad["id"])
    assert entry["status"] == "quarantined" and "sha256" in entry["lastError"]
    with pytest.raises(UploadFailedError, match="retry") as info:
        exp.flush(timeout=5)
    assert list(info.value.failures) == [int(bad["id"])]
    assert exp.files().get(good["id"])["status"] in ("committed", "evicted")


# ---- wait / flush --------------------------------------------------------------------------------------

def test_flush_without_a_daemon_times_out_naming_the_pending_ids(exp):
    a = exp.files("x").save_blob(b"a", "a.bin")
    b = exp.files("y").save_blob(b"b", "b.bin")
    with pytest.raises(WaitTimeoutError) as info:
        exp.flush(timeout=0.05)
    assert info.value.pending == [int(a["id"]), int(b["id"])]
    assert a["id"] in str(info.value) and "No mldash-syncd" in str(info.value)
    assert isinstance(info.value, TimeoutError)


def test_a_wait_that_cannot_end_says_why_once(exp, monkeypatch, caplog):
    """flush() without a timeout, autostart off and no daemon would wait forever: after STUCK_WAIT_WARNING it
    says so, once, with what to do."""
    import mldash.reader

    monkeypatch.setattr(mldash.reader, "STUCK_WAIT_WARNING", 0.2)
    exp.files("x").save_blob(b"a", "a.bin")
    with caplog.at_level(logging.WARNING, logger="mldash"), pytest.raises(WaitTimeoutError):
        exp.flush(timeout=1.5)
    said = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert said == [f"waiting for 1 file(s) to be committed: no mldash-syncd is draining the spool "
                    f"{exp.settings.spool}: start one with `mldash-syncd run` (autostart is off: MLDASH_AUTOSTART=0)."]


def test_a_wait_names_the_store_the_daemon_cannot_reach(settings, daemon_process, monkeypatch):
    """A daemon runs but the store is down: the timeout (and the warning) says so, with the daemon's reason."""
    from tests.test_daemon_process import cli, wait_for

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # any: the endpoint is down
        monkeypatch.setenv(name, "testing")

    down = settings.replace(store="s3://bucket", s3_endpoint_url="http://127.0.0.1:9", retry_base_delay=0.05,
                            retry_max_delay=0.2, request_timeout=1.0)
    exp = Experiment(prefix="alice/project/ryw", settings=down)
    exp.files("x").save_blob(b"a", "a.bin")
    daemon_process(down, "run")
    wait_for(lambda: '"storeProblem": "' in cli(down, "status", "--json").stdout, timeout=60)
    with pytest.raises(WaitTimeoutError) as info:
        exp.flush(timeout=0.2)
    message = str(info.value)
    assert "They stay queued and will be uploaded, but mldash-syncd cannot reach the store: " in message, message
    assert "127.0.0.1:9" in message


def test_flush_returns_once_committed(exp, synced):
    a = exp.files("x").save_blob(b"a", "a.bin")
    synced()
    assert exp.flush(timeout=0) == {a["id"]: "evicted"}
    assert exp.files().wait() == {}  # already seen committed: not checked again
    b = exp.files("x").save_blob(b"b", "b.bin")
    synced()
    assert exp.files("x").wait() == {b["id"]: "evicted"}
    assert Experiment(prefix="alice/project/ryw", settings=exp.settings).flush(0) == {}  # saved nothing


def test_flush_waits_for_a_daemon_draining_concurrently(exp, settings, drain):
    results = [exp.files("x").save_blob(bytes([i]) * 1000, f"{i}.bin") for i in range(5)]
    reports: list[Any] = []
    worker = threading.Thread(target=lambda: reports.append(drain(settings)))
    worker.start()
    try:
        statuses = exp.flush(timeout=60)
    finally:
        worker.join(timeout=120)
    assert set(statuses) == {r["id"] for r in results}
    assert set(statuses.values()) <= {"committed", "evicted"}


def test_wait_on_a_handle_covers_its_folder_only(exp, synced):
    a = exp.files("a").save_blob(b"a", "a.bin")
    synced()
    b = exp.files("b").save_blob(b"b", "b.bin")
    assert exp.files("a").wait(timeout=0) == {a["id"]: "evicted"}
    with pytest.raises(WaitTimeoutError) as info:
        exp.files("b").wait(timeout=0.01)
    assert info.value.pending == [int(b["id"])]
    with pytest.raises(WaitTimeoutError) as info:
        exp.flush(timeout=0.01)
    assert info.value.pending == [int(b["id"])]
    with pytest.raises(InvalidInputError):
        exp.flush(timeout=-1)


def test_flush_after_the_index_forgot_an_old_entry(exp, settings, synced):
    a = exp.files.save_blob(b"a", "a.bin")
    synced()
    index = SpoolIndex(SpoolLayout(settings.spool))
    index.delete([int(a["id"])])  # what compaction does to week-old evicted rows
    index.close()
    assert exp.flush(timeout=5) == {a["id"]: "committed"}  # the catalog vouches for it


def test_leaving_the_with_block_does_not_wait(settings):
    with Experiment(prefix="alice/project/nowait", settings=settings) as exp:
        result = exp.files.save_blob(b"x", "a.bin")
    with Experiment(prefix="alice/project/nowait", settings=settings).run as exp2:
        exp2.files.save_blob(b"y", "b.bin")
    assert exp.files().get(result["id"])["status"] == "queued"  # left queued for the daemon


def test_saves_from_many_threads(exp, synced):
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        for i in range(10):
            r = exp.files(f"t{n}").save_json({"n": n, "i": i}, f"{i}.json")
            with lock:
                results.append(r)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r["id"] for r in results}) == 80
    assert len(exp.files().list()) == 80
    synced()
    assert len(exp.flush(timeout=5)) == 80
