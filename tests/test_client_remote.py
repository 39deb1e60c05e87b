"""The client against the remote backends: S3 (moto's server over HTTP) and MongoDB (SecantusDB wire server).

Saves never touch them; list/get/download read the Mongo catalog and download from S3 (through the
reader's private event loop), and the bytes in the bucket are read independently with boto3.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

from mldash import Experiment
from mldash.config import Settings
from mldash.keys import object_key
from tests.backend_helpers import read_object


@pytest.fixture
def remote(settings: Settings, s3_settings: Settings, mongo_settings: Settings) -> Settings:
    return s3_settings.replace(catalog=mongo_settings.catalog, mongo_database=mongo_settings.mongo_database)


def _layout_key(result: dict[str, Any]) -> str:
    return object_key(namespace=result["namespace"], project=result["project"], experiment=result["experiment"],
                      prefix=result["path"].strip("/"), file_id=int(result["id"]), filename=result["filename"])


def test_save_list_download_through_s3_and_mongo(remote, drain, tmp_path):
    exp = Experiment(prefix="alice/project/remote", settings=remote)
    model = torch.nn.Linear(3, 2)
    source = tmp_path / "data.bin"
    source.write_bytes(b"uploaded")
    saved = {
        "torch": exp.files("checkpoints").save_torch(model, to="model.pt", tags=["best"], metadata={"epoch": 5}),
        "json": exp.files("configs").save_json({"lr": 0.1}, to="config.json"),
        "upload": exp.files("data").upload(source),
    }
    assert {f["status"] for f in exp.files().list()} == {"queued"}  # Mongo reached, nothing there yet
    report = drain(remote)
    assert report.committed == 3 and report.failed == 0

    for result in saved.values():  # the bytes in the bucket, read with boto3 under the root prefix
        stored = read_object(remote, _layout_key(result))
        assert stored is not None and len(stored) == result["sizeBytes"]
    assert read_object(remote, _layout_key(saved["upload"])) == b"uploaded"

    listed = {f["id"]: f for f in exp.files().list()}
    assert set(listed) == {r["id"] for r in saved.values()}
    entry = listed[saved["torch"]["id"]]
    assert entry["status"] in ("committed", "evicted") and entry["tags"] == ["best"]
    assert entry["storageKey"] == "root/" + _layout_key(saved["torch"])
    assert entry["storageUri"].startswith("s3://")
    assert [f["id"] for f in exp.files().list(tags=["best"])] == [saved["torch"]["id"]]

    out = exp.files("checkpoints").download("model.pt", tmp_path / "model.pt")  # from S3: evicted locally
    loaded = torch.load(io.BytesIO(Path(out).read_bytes()), weights_only=True)
    assert torch.equal(loaded["weight"], model.weight)
    assert exp.flush(timeout=10).keys() == {r["id"] for r in saved.values()}


def test_reads_with_the_catalog_down_answer_from_the_spool_without_waiting_again(settings, caplog):
    """MongoDB down: list() and get() used to wait ~63 s each (index creation, then the whole request timeout),
    call after call, and warned "(TimeoutError: )". A read now waits at most CATALOG_READ_TIMEOUT, says why,
    and skips the catalog for CATALOG_RETRY_AFTER seconds; creating indexes is the daemon's business."""
    import time

    from mldash import reader
    from tests.fixtures.mongo import free_port

    down = settings.replace(catalog=f"mongodb://127.0.0.1:{free_port()}/", request_timeout=60.0)
    exp = Experiment(prefix="alice/project/down", settings=down)
    saved = exp.files("c").save_blob(b"spooled", "a.bin")
    with caplog.at_level("WARNING", logger="mldash"):
        started = time.monotonic()
        first = exp.files().list()
        first_took = time.monotonic() - started
        started = time.monotonic()
        again = [exp.files().list(), exp.files("c").get("a.bin")]
        again_took = time.monotonic() - started
    assert [f["id"] for f in first] == [saved["id"]] and again[0] == first and again[1]["id"] == saved["id"]
    assert first_took < reader.CATALOG_READ_TIMEOUT + 10, first_took  # not the 60 s request timeout
    assert again_took < reader.CATALOG_READ_TIMEOUT - 1, again_took  # remembered: not asked again
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # one per outage, not one per call
    assert "find failed" in warnings[0] and "Connect call failed" in warnings[0], warnings  # the cause
    assert "not asked again for 30s" in warnings[0], warnings
    assert "Topology Description" not in warnings[0], warnings


def test_a_read_that_needs_a_catalog_that_is_down_never_says_not_found(settings, tmp_path, caplog):
    """On another machine (an empty spool) with MongoDB unreachable, get()/download() used to raise NotFoundError —
    and kept doing so for the 30 s the catalog is not asked again: resume code that starts training afresh on
    "not found" would have overwritten the run. They now raise CatalogUnavailableError; list(strict=True) too."""
    from mldash import CatalogUnavailableError, InvalidInputError, NotFoundError
    from tests.fixtures.mongo import free_port

    down = settings.replace(catalog=f"mongodb://127.0.0.1:{free_port()}/", spool=str(tmp_path / "other-machine"))
    files = Experiment(prefix="alice/project/down", settings=down).files("big")
    for read in (lambda: files.get("big-0.bin"), lambda: files.download("big-0.bin", dest_path=tmp_path / "y"),
                 lambda: files.get(384030690560157393), lambda: files.list(strict=True), lambda: files.get("x.bin")):
        with pytest.raises(CatalogUnavailableError) as raised:
            read()
        assert not isinstance(raised.value, NotFoundError)
        assert "127.0.0.1" in str(raised.value), raised.value  # names the catalog it could not reach
    assert "cannot tell whether '/big/x.bin' exists in experiment alice/project/down" in str(raised.value)
    assert not (tmp_path / "y").exists()
    with caplog.at_level("WARNING", logger="mldash"):
        assert files.list() == []  # the default stays lenient: the spool's files, with a warning
    assert any("showing only the files still in the local spool" in r.getMessage() for r in caplog.records)
    with pytest.raises(InvalidInputError, match="strict must be True or False"):
        files.list(strict="yes")
