"""Snapshot semantics: what reaches the store is the object as it was when the save call returned.

ML-Dash reads the file later and uploads the new bytes under the old checksum. Here every test changes the
source right after the call — overwrite, rewrite in place, truncate, delete, keep training, mutate the
buffer — and then checks the store (after a real drain) against the bytes captured at call time.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mldash import Experiment
from mldash.config import Settings
from tests.client_helpers import sha256, spool_blob, store_bytes


@pytest.fixture
def exp(settings: Settings) -> Experiment:
    return Experiment(prefix="alice/project/snap", settings=settings)


@pytest.fixture
def synced(settings: Settings, drain: Any):
    def run() -> None:
        report = drain(settings)
        assert report.failed == 0 and report.quarantined == 0, report
    return run


@pytest.mark.parametrize("change", ["replace", "rewrite-in-place", "grow", "truncate", "delete"])
def test_upload_ignores_changes_to_the_file_after_the_call(exp, settings, synced, tmp_path, change):
    source = tmp_path / "checkpoint.pt"
    original = os.urandom(256 * 1024)
    source.write_bytes(original)
    result = exp.files("ckpt").upload(source)
    assert result["checksum"] == sha256(original)

    if change == "replace":  # a new file under the same name (what torch.save(path) does)
        (tmp_path / "new").write_bytes(b"new contents")
        os.replace(tmp_path / "new", source)
    elif change == "rewrite-in-place":  # same inode, same size: would defeat a hard link
        with open(source, "r+b") as handle:
            handle.write(b"\xff" * len(original))
    elif change == "grow":
        with open(source, "ab") as handle:
            handle.write(b"more")
    elif change == "truncate":
        source.write_bytes(b"")
    else:
        source.unlink()

    assert spool_blob(settings, result) == original
    synced()
    assert store_bytes(settings, result) == original


def test_save_torch_then_keep_training(exp, settings, synced):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = {name: value.clone() for name, value in model.state_dict().items()}

    result = exp.files("ckpt").save_torch(model, to="model.pt")
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 0}
    ckpt_result = exp.files("ckpt").save_torch(checkpoint, to="ckpt.pt")

    for _ in range(3):  # keep training: parameters change in place
        optimizer.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    checkpoint["step"] = 99
    assert not torch.equal(model[0].weight, expected["0.weight"])  # the model really changed

    spooled = torch.load(io.BytesIO(spool_blob(settings, result)), weights_only=True)
    assert all(torch.equal(spooled[k], v) for k, v in expected.items())
    synced()
    stored = torch.load(io.BytesIO(store_bytes(settings, result)), weights_only=True)
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[k], v) for k, v in expected.items())
    stored_ckpt = torch.load(io.BytesIO(store_bytes(settings, ckpt_result)), weights_only=True)
    assert stored_ckpt["step"] == 0
    assert all(torch.equal(stored_ckpt["model"][k], v) for k, v in expected.items())


def test_save_blob_buffer_mutated_after_the_call(exp, settings, synced):
    buffer = bytearray(b"A" * 1_000_000)  # large enough for the parallel hashing path
    array = np.zeros(1000, dtype=np.uint8)
    first = exp.files("data").save_blob(buffer, to="buf.bin")
    second = exp.files("data").save_blob(array, to="arr.bin")
    buffer[:] = b"B" * len(buffer)
    array[:] = 7
    synced()
    assert store_bytes(settings, first) == b"A" * 1_000_000
    assert store_bytes(settings, second) == bytes(1000)
    assert first["checksum"] == sha256(b"A" * 1_000_000)


def test_save_pkl_and_json_objects_mutated_after_the_call(exp, settings, synced):
    obj = {"history": [1, 2, 3]}
    pkl = exp.files("data").save_pkl(obj, to="h.pkl")
    js = exp.files("data").save_json(obj, to="h.json")
    obj["history"].append(4)
    synced()
    assert pickle.loads(store_bytes(settings, pkl)) == {"history": [1, 2, 3]}
    assert store_bytes(settings, js) == b'{\n  "history": [\n    1,\n    2,\n    3\n  ]\n}'


def test_save_video_frames_mutated_after_the_call(exp, settings, synced):
    frames = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    result = exp.files("v").save_video(frames, to="a.gif")
    spooled = spool_blob(settings, result)
    frames[:] = 255
    synced()
    assert store_bytes(settings, result) == spooled


def test_spool_bytes_are_private_copies(exp, settings, tmp_path):
    """Not a hard link (which a later in-place rewrite of the source would change): a separate inode, mode 0600."""
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 10)
    result = exp.files("d").upload(source)
    blob = Path(settings.spool) / "blobs" / result["id"]
    assert os.stat(blob).st_ino != os.stat(source).st_ino
    assert os.stat(blob).st_mode & 0o777 == 0o600
