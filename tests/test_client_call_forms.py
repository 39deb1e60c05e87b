"""Every call form of the ML-Dash files docs, checked where it matters: the bytes that land in the store.

Each test saves through the public API, drains the spool with the real daemon (in-process), then reads the
object from the local store directory at the path the key layout dictates and decodes it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from mldash import Experiment, dxp
from mldash.config import Settings
from tests.client_helpers import check_result, sha256, spool_blob, store_bytes
from tests.fixtures.daemon import settings_env


@pytest.fixture
def exp(settings: Settings) -> Experiment:
    return Experiment(prefix="alice/project/my-experiment", settings=settings)


@pytest.fixture
def synced(settings: Settings, drain: Any):
    """Call after saving: drains the spool and asserts everything was committed."""
    def run() -> None:
        report = drain(settings)
        assert report.failed == 0 and report.quarantined == 0, report
    return run


def _catalog_entry(exp: Experiment, result: dict[str, Any]) -> dict[str, Any]:
    entry = exp.files().get(result["id"])
    assert entry["status"] in ("committed", "evicted")
    return entry


# ---- upload --------------------------------------------------------------------------------------------

def test_upload_keeps_the_name_or_takes_to(exp, settings, synced, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = os.urandom(3000)
    Path("model.pt").write_bytes(data)
    first = exp.files("checkpoints").upload("./model.pt")
    second = exp.files("checkpoints").upload(Path("model.pt"), to="best.pt")
    check_result(first, filename="model.pt", path="/checkpoints", data=data)
    check_result(second, filename="best.pt", path="/checkpoints", data=data)
    assert first["id"] != second["id"]
    assert spool_blob(settings, first) == data  # durable in the spool when the call returned
    synced()
    assert store_bytes(settings, first) == data
    assert store_bytes(settings, second) == data
    assert _catalog_entry(exp, second)["checksum"] == sha256(data)


def test_upload_to_a_subfolder_of_the_prefix(exp, settings, synced, tmp_path):
    source = tmp_path / "w.bin"
    source.write_bytes(b"weights")
    result = exp.files("/checkpoints/").upload(source, to="epoch-10/model.pt")
    check_result(result, filename="model.pt", path="/checkpoints/epoch-10", data=b"weights")
    synced()
    assert store_bytes(settings, result) == b"weights"


# ---- save_* ----------------------------------------------------------------------------------------------

def test_save_json(exp, settings, synced):
    config = {"lr": 1e-3, "layers": [64, 64], "name": "résnet", "beta": np.float32(0.5), "steps": np.int64(7)}
    result = exp.files("configs").save_json(config, to="config.json")
    check_result(result, filename="config.json", path="/configs")
    assert result["contentType"] == "application/json"
    synced()
    assert json.loads(store_bytes(settings, result)) == {"lr": 1e-3, "layers": [64, 64], "name": "résnet",
                                                         "beta": 0.5, "steps": 7}


def test_save_json_passes_options(exp, settings, synced):
    result = exp.files("configs").save_json({"b": 1, "a": 2}, "c.json", indent=None, sort_keys=True)
    synced()
    assert store_bytes(settings, result) == b'{"a": 2, "b": 1}'


def test_save_text(exp, settings, synced):
    text = "yaml: content\nunicode: ✓\n"
    result = exp.files("configs").save_text(text, to="view.yaml")
    check_result(result, filename="view.yaml", path="/configs", data=text.encode())
    assert result["contentType"] == "application/yaml"
    notes = exp.files("configs").save_text("plain", to="notes.txt")
    assert notes["contentType"] == "text/plain; charset=utf-8"
    synced()
    assert store_bytes(settings, result).decode() == text


@pytest.mark.parametrize("make", [
    lambda: b"\x00\x01",
    lambda: bytearray(b"\x00\x01"),
    lambda: memoryview(b"..\x00\x01")[2:],
    lambda: np.array([0, 1], dtype=np.uint8),
    lambda: io.BytesIO(b"\x00\x01"),
], ids=["bytes", "bytearray", "memoryview", "numpy-buffer", "binary-file"])
def test_save_blob(exp, settings, synced, make):
    result = exp.files("data").save_blob(make(), to="data.bin")
    check_result(result, filename="data.bin", path="/data", data=b"\x00\x01")
    assert result["contentType"] == "application/octet-stream"
    synced()
    assert store_bytes(settings, result) == b"\x00\x01"


def test_save_torch_module_state_dict_and_checkpoint(exp, settings, synced):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    as_module = exp.files("checkpoints").save_torch(model, to="model.pt")
    as_state = exp.files("checkpoints").save_torch(model.state_dict(), "model_state.pt")
    ckpt = {"model": model.state_dict(), "epoch": 3, "optimizer": {"lr": 0.1}}
    as_dict = exp.files("checkpoints").save_torch(ckpt, to="ckpt.pt")
    tensor = exp.files("checkpoints").save_torch(torch.arange(5), to="t.pt")
    check_result(as_module, filename="model.pt", path="/checkpoints")
    assert as_module["contentType"] == "application/x-pytorch"
    synced()
    for result in (as_module, as_state):
        loaded = torch.load(io.BytesIO(store_bytes(settings, result)), weights_only=True)
        assert loaded.keys() == model.state_dict().keys()
        for name, value in model.state_dict().items():
            assert torch.equal(loaded[name], value)
    loaded = torch.load(io.BytesIO(store_bytes(settings, as_dict)), weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["0.weight"], model[0].weight)
    assert torch.equal(torch.load(io.BytesIO(store_bytes(settings, tensor)), weights_only=True), torch.arange(5))


def test_save_pkl(exp, settings, synced):
    obj = {"a": [1, 2, 3], "b": (4, 5), "c": {6}}
    result = exp.files("data").save_pkl(obj, to="data.pkl")
    check_result(result, filename="data.pkl", path="/data")
    assert result["contentType"] == "application/x-python-pickle"
    synced()
    assert pickle.loads(store_bytes(settings, result)) == obj


def test_save_fig_given_figure_is_closed_after_saving(exp, settings, synced):
    fig, ax = plt.subplots()
    ax.plot([0.5, 0.4, 0.3])
    result = exp.files("plots").save_fig(fig, to="loss.png")
    check_result(result, filename="loss.png", path="/plots")
    assert result["contentType"] == "image/png"
    assert fig.number not in plt.get_fignums()
    synced()
    image = Image.open(io.BytesIO(store_bytes(settings, result)))
    assert image.format == "PNG" and image.size[0] > 0


def test_save_fig_current_figure_ml_dash_form(exp, settings, synced):
    plt.figure()
    plt.plot([0.5, 0.4, 0.3, 0.2])
    plt.title("Training Loss")
    assert plt.get_fignums()
    result = exp.files(prefix="/visualizations").save_fig("loss_curve.png")
    options = exp.files(prefix="/visualizations")
    plt.figure()
    plt.plot([1, 2])
    pdf = options.save_fig("plot.pdf", dpi=150, transparent=True, bbox_inches="tight")
    assert not plt.get_fignums()  # both figures closed
    check_result(result, filename="loss_curve.png", path="/visualizations")
    assert pdf["contentType"] == "application/pdf"
    synced()
    assert store_bytes(settings, result)[:8] == b"\x89PNG\r\n\x1a\n"
    assert store_bytes(settings, pdf)[:5] == b"%PDF-"


def test_save_fig_options(exp, settings, synced):
    fig = plt.figure(figsize=(2, 1))
    small = exp.files("plots").save_fig(fig, to="small.png", dpi=10, close=False)
    assert fig.number in plt.get_fignums()  # close=False keeps it open
    big = exp.files("plots").save_fig(fig, to="big", dpi=40)  # no extension: .png, like matplotlib
    svg = exp.files("plots").save_fig(plt.figure(), to="vector", format="svg")
    assert big["filename"] == "big.png" and svg["filename"] == "vector.svg"
    assert svg["contentType"] == "image/svg+xml"
    synced()
    assert Image.open(io.BytesIO(store_bytes(settings, small))).size == (20, 10)
    assert Image.open(io.BytesIO(store_bytes(settings, big))).size == (80, 40)
    assert b"<svg" in store_bytes(settings, svg)


def _read_video(data: bytes, tmp_path: Path, height: int, width: int) -> np.ndarray:
    """Decode with the bundled ffmpeg to raw RGB frames (imageio's readers leak their pipes' file objects)."""
    import subprocess

    import imageio_ffmpeg

    path = tmp_path / "check.video"
    path.write_bytes(data)
    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    assert len(out) % (height * width * 3) == 0, "decoded frames do not have the expected size"
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, height, width, 3)


def test_save_video_mp4_from_float_frames(exp, settings, synced, tmp_path):
    frames = [np.full((16, 24, 3), i / 5, dtype=np.float32) for i in range(6)]  # float in [0, 1]
    result = exp.files("videos").save_video(frames, to="rollout.mp4", fps=30)
    check_result(result, filename="rollout.mp4", path="/videos")
    assert result["contentType"] == "video/mp4"
    synced()
    video = _read_video(store_bytes(settings, result), tmp_path, 16, 24)
    assert video.shape == (6, 16, 24, 3)
    # lossy, but a flat grey level survives: frame i is ≈ i/5 × 255
    assert abs(float(video[5].mean()) - 255) < 8 and float(video[0].mean()) < 8


def test_save_video_positional_name_default_fps_and_odd_sizes(exp, settings, synced, tmp_path):
    frames = np.random.default_rng(0).random((4, 9, 11))  # stacked greyscale (N, H, W), odd sides
    result = exp.files(prefix="/videos").save_video(frames, "animation.mp4")
    synced()
    video = _read_video(store_bytes(settings, result), tmp_path, 10, 12)  # padded to even sides, not resampled
    assert video.shape[0] == 4


def test_save_video_gif_and_frame_layouts(exp, settings, synced):
    stacked = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    stacked[1] = 255
    gif = exp.files("videos").save_video(stacked, "animation.gif")
    grey = exp.files("videos").save_video([np.zeros((8, 8)), np.ones((8, 8))], to="grey.gif", fps=10)
    one_channel = exp.files("videos").save_video(np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1),
                                                  to="c1.gif")
    assert gif["contentType"] == "image/gif"
    synced()
    image = Image.open(io.BytesIO(store_bytes(settings, gif)))
    assert image.n_frames == 3 and image.size == (8, 8)
    assert image.info["duration"] == 50  # default 20 fps
    image = Image.open(io.BytesIO(store_bytes(settings, grey)))
    assert image.n_frames == 2 and image.info["duration"] == 100
    assert Image.open(io.BytesIO(store_bytes(settings, one_channel))).n_frames == 2


def test_save_image(exp, settings, synced):
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    png = exp.files("images").save_image(pixels, to="x.png")
    scaled = exp.files("images").save_image(np.ones((2, 2)), to="white.png")
    jpg = exp.files("images").save_image(np.zeros((8, 8, 4)), to="x.jpg", quality=90)
    default = exp.files("images").save_image(pixels, to="noext")
    assert png["contentType"] == "image/png" and jpg["contentType"] == "image/jpeg"
    assert default["filename"] == "noext.png"
    synced()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(store_bytes(settings, png)))), pixels)
    assert np.asarray(Image.open(io.BytesIO(store_bytes(settings, scaled)))).tolist() == [[255, 255], [255, 255]]
    assert Image.open(io.BytesIO(store_bytes(settings, jpg))).format == "JPEG"


# ---- save(): dispatch on type -----------------------------------------------------------------------------

def test_save_dispatches_on_type(exp, settings, synced, tmp_path):
    source = tmp_path / "local.bin"
    source.write_bytes(b"from disk")
    model = torch.nn.Linear(2, 2)
    fig = plt.figure()
    files = exp.files("mixed")
    results = {
        "path": files.save(str(source)),
        "pathlike": files.save(source, to="p.bin"),
        "bytes": files.save(b"raw", to="raw.bin"),
        "dict": files.save({"a": 1}, to="d.json"),
        "list": files.save([1, 2], to="l.json"),
        "array": files.save(np.zeros((2, 2, 3), dtype=np.uint8), to="a.png"),
        "npy": files.save(np.arange(3), to="a.npy"),
        "module": files.save(model, to="m.pt"),
        "state_dict": files.save(model.state_dict(), to="sd.pt"),
        "pkl": files.save({"x": {1, 2}}, to="s.pkl"),
        "figure": files.save(fig, to="f.png"),
        "pil": files.save(Image.new("RGB", (3, 2)), to="pil.png"),
    }
    assert results["path"]["filename"] == "local.bin"
    assert results["dict"]["contentType"] == "application/json"
    assert results["state_dict"]["contentType"] == "application/x-pytorch"
    synced()
    got = {name: store_bytes(settings, r) for name, r in results.items()}
    assert got["path"] == got["pathlike"] == b"from disk"
    assert got["bytes"] == b"raw"
    assert json.loads(got["dict"]) == {"a": 1} and json.loads(got["list"]) == [1, 2]
    assert got["array"][:4] == b"\x89PNG" and got["figure"][:4] == b"\x89PNG" and got["pil"][:4] == b"\x89PNG"
    assert np.array_equal(np.load(io.BytesIO(got["npy"])), np.arange(3))
    assert torch.load(io.BytesIO(got["module"]), weights_only=True).keys() == model.state_dict().keys()
    assert torch.load(io.BytesIO(got["state_dict"]), weights_only=True).keys() == model.state_dict().keys()
    assert pickle.loads(got["pkl"]) == {"x": {1, 2}}


# ---- description, tags, metadata ----------------------------------------------------------------------

SAVES = {
    "upload": lambda f, p, **kw: f.upload(p, to="u.bin", **kw),
    "save": lambda f, p, **kw: f.save(b"x", to="s.bin", **kw),
    "save_json": lambda f, p, **kw: f.save_json({}, to="j.json", **kw),
    "save_text": lambda f, p, **kw: f.save_text("t", to="t.txt", **kw),
    "save_blob": lambda f, p, **kw: f.save_blob(b"b", to="b.bin", **kw),
    "save_torch": lambda f, p, **kw: f.save_torch(torch.zeros(1), to="t.pt", **kw),
    "save_pkl": lambda f, p, **kw: f.save_pkl(1, to="p.pkl", **kw),
    "save_fig": lambda f, p, **kw: f.save_fig(plt.figure(), to="f.png", **kw),
    "save_video": lambda f, p, **kw: f.save_video([np.zeros((4, 4))], to="v.gif", **kw),
    "save_image": lambda f, p, **kw: f.save_image(np.zeros((4, 4)), to="i.png", **kw),
}


@pytest.mark.parametrize("method", list(SAVES))
def test_every_save_takes_description_tags_metadata(exp, settings, synced, tmp_path, method):
    source = tmp_path / "src.bin"
    source.write_bytes(b"src")
    meta = {"epoch": 50, "val_accuracy": 0.95, "nested": {"ok": [1, None, True]}}
    result = SAVES[method](exp.files("models"), source, description="Best model from epoch 50",
                           tags=["checkpoint", "best"], metadata=meta)
    assert result["description"] == "Best model from epoch 50"
    assert result["tags"] == ["checkpoint", "best"] and result["metadata"] == meta
    synced()
    committed = _catalog_entry(exp, result)
    assert committed["description"] == "Best model from epoch 50"
    assert committed["tags"] == ["checkpoint", "best"] and committed["metadata"] == meta
    assert committed["checksum"] == result["checksum"] == sha256(store_bytes(settings, result))


def test_handle_defaults_merge_with_call_values(exp, synced):
    handle = exp.files("ckpt", description="default", tags=["run-1"], metadata={"seed": 1, "lr": 0.1})
    result = handle.save_blob(b"x", to="a.bin", tags=["best"], metadata={"lr": 0.2})
    assert result["description"] == "default"
    assert result["tags"] == ["run-1", "best"]
    assert result["metadata"] == {"seed": 1, "lr": 0.2}
    override = handle.save_blob(b"y", to="b.bin", description="mine")
    assert override["description"] == "mine"


# ---- the older call forms ------------------------------------------------------------------------------

def test_older_files_form_save_download_list(exp, settings, synced, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("model.pth").write_bytes(b"older form")
    upload = exp.files("model.pth", prefix="/models", description="Best model from epoch 50",
                       tags=["checkpoint", "best"], metadata={"epoch": 50, "val_accuracy": 0.95}).save()
    check_result(upload, filename="model.pth", path="/models", data=b"older form")
    assert upload["tags"] == ["checkpoint", "best"]
    bare = exp.files("model.pth").save()  # an existing file as the only argument: the root folder
    assert bare["path"] == "/" and bare["filename"] == "model.pth"
    synced()
    assert store_bytes(settings, upload) == b"older form"

    downloaded = exp.files(file_id=upload["id"], dest_path="./downloaded_model.pth").download()
    assert Path(downloaded).read_bytes() == b"older form"
    os.remove("model.pth")
    original = exp.files(file_id=upload["id"]).download()
    assert Path(original) == tmp_path / "model.pth" and Path(original).read_bytes() == b"older form"

    files = exp.files().list()
    assert {(f["path"], f["filename"]) for f in files} == {("/models", "model.pth"), ("/", "model.pth")}
    for f in files:
        assert f["sizeBytes"] == len(b"older form")
    best = next((f for f in files if "best" in f.get("tags", [])), None)
    assert best is not None and best["id"] == upload["id"]
    exp.files(file_id=best["id"], dest_path="./best.pth").download()
    assert Path("best.pth").read_bytes() == b"older form"


def test_experiment_file_dreamlake_form(exp, settings, synced, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("model.pth").write_bytes(b"m")
    Path("config.json").write_text("{}")
    result = exp.file("model.pth", prefix="/models")
    meta = exp.file("config.json", prefix="/config", description="Experiment configuration", tags=["config"])
    check_result(result, filename="model.pth", path="/models", data=b"m")
    assert meta["tags"] == ["config"] and meta["contentType"] == "application/json"
    synced()
    assert store_bytes(settings, result) == b"m"
    assert store_bytes(settings, meta) == b"{}"


# ---- Experiment forms and dxp ------------------------------------------------------------------------------

def test_experiment_forms(settings, synced):
    by_name = Experiment(name="my-experiment", project="project", namespace="alice", settings=settings)
    assert by_name.path == "alice/project/my-experiment"
    default_ns = Experiment(name="e", project="p", settings=settings.replace(experiment="team/x/y"))
    assert default_ns.path == "team/p/e"
    with Experiment(prefix="/alice/project/run-a/", settings=settings).run as exp:
        assert isinstance(exp, Experiment) and exp.path == "alice/project/run-a"
        a = exp.files.save_blob(b"a", "a.bin")  # exp.files is callable *and* a handle of the root folder
    with Experiment(prefix="alice/project/run-b", settings=settings) as exp_b:
        b = exp_b.files("x").save_blob(b"b", "b.bin")
    synced()
    assert (a["experiment"], a["path"]) == ("run-a", "/")
    assert store_bytes(settings, a) == b"a" and store_bytes(settings, b) == b"b"


def test_dxp_module_level_default(settings, synced, monkeypatch):
    env = settings_env(settings.replace(experiment="bob/proj/default-run"))
    for name, value in env.items():
        if name.startswith("MLDASH_"):
            monkeypatch.setenv(name, value)
    dxp._reset()
    try:
        model = torch.nn.Linear(2, 1)
        result = dxp.files.save_torch(model, "model.pt")
        state = dxp.files.save_torch(model.state_dict(), "model_state.pt")
        assert (result["namespace"], result["project"], result["experiment"]) == ("bob", "proj", "default-run")
        with dxp.run as exp:
            assert exp.path == "bob/proj/default-run"
        synced()
        for r in (result, state):
            loaded = torch.load(io.BytesIO(store_bytes(settings, r)), weights_only=True)
            assert torch.equal(loaded["weight"], model.weight)
    finally:
        dxp._reset()


def test_content_types_from_extension_then_serializer(exp):
    files = exp.files("ct")
    assert files.save_blob(b"x", "a.csv")["contentType"] == "text/csv"
    assert files.save_blob(b"x", "a.unknownext")["contentType"] == "application/octet-stream"
    assert files.save_json([], "no-extension")["contentType"] == "application/json"
    assert files.save_text("x", "README")["contentType"] == "text/plain; charset=utf-8"
    assert files.save_pkl(1, "obj")["contentType"] == "application/x-python-pickle"
    assert files.save_torch(torch.zeros(1), "weights.ckpt")["contentType"] == "application/x-pytorch"


def test_local_path_keeps_everything_under_one_directory(settings, drain, tmp_path):
    exp = Experiment(name="my-experiment", project="project", local_path=tmp_path / ".ml-dash", settings=settings)
    assert exp.settings.spool == tmp_path / ".ml-dash" / "spool"
    result = exp.file(__file__, prefix="/code")
    assert (tmp_path / ".ml-dash" / "spool" / "blobs" / result["id"]).exists()
    assert drain(exp.settings).committed == 1
    assert store_bytes(exp.settings, result) == Path(__file__).read_bytes()
    assert not Path(settings.spool).exists()  # the configured spool was not used


def test_save_fig_accepts_axes_and_subfigures(exp, settings, synced):
    fig = plt.figure()
    left, _right = fig.subfigures(1, 2)
    ax = left.subplots()
    ax.plot([1, 2])
    from_axes = exp.files("plots").save_fig(ax, to="ax.png", close=False)
    from_subfigure = exp.files("plots").save_fig(left, to="sub.png")
    assert fig.number not in plt.get_fignums()
    synced()
    assert store_bytes(settings, from_axes) == store_bytes(settings, from_subfigure)  # the whole figure


def test_unusual_but_valid_names(exp, settings, synced):
    files = exp.files("odd names/ünïcode")
    colon = files.save_blob(b"1", "a:b.txt")
    spaced = files.save_blob(b"2", "with space [1].bin")
    dotted = files.save_blob(b"3", ".hidden")
    synced()
    assert colon["path"] == "/odd names/ünïcode"
    for result, data in ((colon, b"1"), (spaced, b"2"), (dotted, b"3")):
        assert store_bytes(settings, result) == data
    assert exp.files("odd names/ünïcode").get("with space [1].bin")["id"] == spaced["id"]


def test_a_local_file_named_like_the_folder_does_not_move_saves(exp, settings, tmp_path, monkeypatch):
    """exp.files("checkpoints") is ML-Dash's older file form when ./checkpoints is a file; its save_torch(...)
    used to land at the experiment's root because of that stray file. Other saves now mean the folder."""
    monkeypatch.chdir(tmp_path)
    Path("checkpoints").write_text("notes")
    saved = exp.files("checkpoints").save_torch(torch.nn.Linear(2, 2), to="m.pt")
    assert (saved["path"], saved["filename"]) == ("/checkpoints", "m.pt")
    assert exp.files("checkpoints").save_blob(b"x", "b.bin")["path"] == "/checkpoints"
    uploaded = exp.files("checkpoints").save()  # the older form itself: upload the local file
    assert (uploaded["path"], uploaded["filename"]) == ("/", "checkpoints")
    assert spool_blob(settings, uploaded) == b"notes"
    assert exp.files("checkpoints")("epoch1").save_blob(b"e", "e.bin")["path"] == "/checkpoints/epoch1"
    Path("other.txt").write_text("other")
    assert exp.files("checkpoints").upload("other.txt")["path"] == "/checkpoints"
    named = exp.files("checkpoints").save_json({"a": 1})  # no to=: the older form names the file
    assert (named["path"], named["filename"]) == ("/", "checkpoints"), named
    handle = exp.files("checkpoints")
    metrics = handle.save_json({"m": 1}, to="metrics.json")
    assert handle.get("metrics.json")["id"] == metrics["id"] and handle.path == "/checkpoints"  # reads: the folder
    assert metrics["id"] in {f["id"] for f in handle.list()} and named["id"] not in {f["id"] for f in handle.list()}
    Path("sub").mkdir()
    Path("sub/checkpoints").write_text("another file of the same name")
    assert handle.upload("sub/checkpoints")["path"] == "/checkpoints"  # not the handle's own file
