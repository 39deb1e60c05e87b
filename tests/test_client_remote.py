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
