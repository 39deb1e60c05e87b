"""Bad input: each case raises a clear exception and leaves nothing in the spool (tmp/, blobs/, manifests/)."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from mldash import (
    Experiment,
    FileTooLargeError,
    InvalidInputError,
    MissingDependencyError,
    NotFoundError,
    SourceNotFoundError,
    SpoolFullError,
)
from mldash.config import Settings
from mldash.errors import ConfigError
from tests.client_helpers import spool_blob, spool_snapshot


@pytest.fixture
def exp(settings: Settings) -> Experiment:
    experiment = Experiment(prefix="alice/project/bad", settings=settings)
    experiment.files.save_blob(b"warm-up", "first.bin")  # the spool exists: "nothing written" is meaningful
    return experiment


@pytest.fixture
def unchanged(settings: Settings, exp: Experiment):
    """Asserts at the end of the test that the spool holds exactly what it held before the bad calls."""
    before = spool_snapshot(settings)
    yield
    assert spool_snapshot(settings) == before


def raises(exc: type[BaseException], *fragments: str):
    """pytest.raises that also checks the message names what the user must fix."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *args):
            handled = self.ctx.__exit__(*args)
            message = str(self.info.value)
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in {message!r}"
            return handled
    return _Check()


# ---- types ---------------------------------------------------------------------------------------------

def _closed_file():
    import io

    stream = io.BytesIO(b"data")
    stream.close()
    return stream


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_save_of_an_unsupported_type_lists_the_accepted_ones(exp, unchanged):
    with raises(InvalidInputError, "object", "Accepted", "bytes", "dict", "numpy array", "torch", "save_pkl"):
        exp.files("x").save(object(), to="o.bin")
    with raises(InvalidInputError, "save_text"):  # a str that is not a file: not silently saved as text
        exp.files("x").save("just some text", to="t.txt")
    with raises(InvalidInputError, "something to save"):
        exp.files("x").save()


@pytest.mark.parametrize("call, fragments", [
    (lambda f: f.save_text(b"bytes", "t.txt"), ("str", "save_blob")),
    (lambda f: f.save_text("é", "t.txt", encoding="ascii"), ("ascii",)),
    (lambda f: f.save_blob("text", "b.bin"), ("str", "save_text")),
    (lambda f: f.save_blob(12, "b.bin"), ("int",)),
    (lambda f: f.save_json({"s": {1, 2}}, "j.json"), ("set", "save_pkl")),
    (lambda f: f.save_json(object(), "j.json"), ("object",)),
    (lambda f: f.save_pkl(lambda: 1, "p.pkl"), ("save_pkl",)),
    (lambda f: f.save_torch(lambda: 1, "t.pt"), ("save_torch",)),
    (lambda f: f.save(np.array([object()]), "a.npy"), ("object",)),
    # A numpy object array's buffer is PyObject pointers and a numpy scalar's is its 8 raw bytes: both used to
    # be stored as the file's content (save(np.float64(0.25), "loss.json") wrote 8 binary bytes as JSON).
    (lambda f: f.save_blob(np.array([object(), object()]), "b.bin"), ("dtype=object", "save_pkl")),
    (lambda f: f.save(np.float64(0.25), "loss.json"), ("numpy float64", "save_json({'loss': float(x)})")),
    (lambda f: f.save(np.int64(7), "epoch.txt"), ("numpy int64", "save_text(str(x))")),
    (lambda f: f.save_text("t", "t.txt", encoding=None), ("encoding must be a codec name", "None")),
    (lambda f: f.save_json(_deep(100_000), "j.json"), ("nested too deeply", "save_pkl")),
    (lambda f: f.save_blob(_closed_file(), "b.bin"), ("file object is closed",)),
    (lambda f: f.save_pkl({"a": 1}, "p.pkl", protocol=True), ("protocol must be an int", "True")),
    (lambda f: f.save_image(None, "i.png"), ("takes a numpy array", "NoneType")),
    (lambda f: f.save_image("cat.png", "i.png"), ("got str", "upload(path)")),
    (lambda f: f.save_image([[0, 1], [0]], "i.png"), ("not a rectangular array",)),
    (lambda f: f.save_fig(plt.figure(), "f.png", format=123), ("format must be a str", "123")),
    (lambda f: f.save_json({"loss": float("nan")}, "j.json", allow_nan=False), ("Out of range float",)),
], ids=["text-bytes", "text-encoding", "blob-str", "blob-int", "json-set", "json-object", "pkl-lambda",
        "torch-lambda", "npy-object", "blob-object-array", "save-np-float", "save-np-int",
        "text-encoding-none", "json-deep", "blob-closed-file", "pkl-protocol-bool", "image-none", "image-str",
        "image-ragged", "fig-format-int", "json-nan-refused"])
def test_serializer_refusals(exp, unchanged, call, fragments):
    with raises(InvalidInputError, *fragments):
        call(exp.files("x"))


def test_a_diverged_loss_is_saved_as_json_writes_it(exp):
    # A NaN loss must not crash the loop that records it: written as Python's json writes it (docs/client.md).
    import io

    from mldash.serializers import json_payload

    written = io.BytesIO()
    json_payload({"loss": float("nan")}).write(written)
    assert b'"loss": NaN' in written.getvalue()
    exp.files("m").save_json({"loss": float("nan")}, "m.json")


def test_figure_refusals(exp, unchanged):
    plt.close("all")
    with raises(InvalidInputError, "no open figure"):
        exp.files("p").save_fig(to="none.png")
    with raises(InvalidInputError, "Figure"):
        exp.files("p").save_fig(42, to="x.png")
    fig = plt.figure()
    with raises(InvalidInputError, "not supported", "png"):
        exp.files("p").save_fig(fig, to="x.docx")
    with raises(InvalidInputError, "format='pdf'", "png"):
        exp.files("p").save_fig(fig, to="x.png", format="pdf")
    assert fig.number in plt.get_fignums()  # a failed save does not close the figure
    plt.close(fig)


@pytest.mark.parametrize("frames, to, fragments", [
    ([], "a.mp4", ("no frames",)),
    (np.zeros((2, 8, 8, 2)), "a.mp4", ("shape", "(8, 8, 2)", "RGB")),
    (np.zeros((2, 2, 8, 8, 3)), "a.mp4", ("shape",)),
    ([np.zeros((8, 8)), np.zeros((4, 4))], "a.mp4", ("same shape",)),
    (np.full((2, 8, 8), 2.0), "a.mp4", ("[0, 1]",)),
    (np.full((2, 8, 8), np.nan), "a.mp4", ("NaN",)),
    (np.full((2, 8, 8), 300, dtype=np.int32), "a.mp4", ("0..255",)),
    (np.zeros((2, 8, 8)), "a.webm", ("unsupported extension", ".mp4", ".gif")),
    ("frames", "a.mp4", ("list of frames",)),
], ids=["empty", "2-channels", "5-dims", "mixed-shapes", "float-range", "nan", "int-range", "extension", "str"])
def test_video_refusals(exp, unchanged, frames, to, fragments):
    with raises(InvalidInputError, *fragments):
        exp.files("v").save_video(frames, to=to)


def test_video_encoder_failure_leaves_no_temp_file(exp, unchanged):
    with raises(InvalidInputError, "ffmpeg could not encode", "no-such-codec"):
        exp.files("v").save_video(np.zeros((2, 8, 8)), to="a.mp4", codec="no-such-codec")


def test_video_fps_refusals(exp, unchanged):
    for fps in (0, -1, "20", True):
        with raises(InvalidInputError, "fps"):
            exp.files("v").save_video(np.zeros((2, 8, 8)), to="a.mp4", fps=fps)


@pytest.mark.parametrize("image, to, fragments", [
    (np.zeros((4, 4, 2)), "a.png", ("shape",)),
    (np.zeros((2, 4, 4, 3)), "a.png", ("shape",)),
    (np.full((4, 4), -0.5), "a.png", ("[0, 1]",)),
    (np.zeros((4, 4)), "a.svg", ("unsupported extension", ".png")),
], ids=["2-channels", "4-dims", "negative", "extension"])
def test_image_refusals(exp, unchanged, image, to, fragments):
    with raises(InvalidInputError, *fragments):
        exp.files("i").save_image(image, to=to)


# ---- metadata, tags, description ----------------------------------------------------------------------

@pytest.mark.parametrize("metadata, fragments", [
    ({"epoch": 1, "optimizer": object()}, ("metadata['optimizer']", "object", "JSON")),
    ({"a": {"b": [1, {2, 3}]}}, ("metadata['a']['b'][1]", "set")),
    ({"x": float("nan")}, ("metadata['x']", "NaN")),
    ({1: "int key"}, ("non-str key",)),
    ("epoch=1", ("dict",)),
], ids=["object", "nested-set", "nan", "int-key", "str"])
def test_metadata_must_be_json_and_the_key_is_named(exp, unchanged, metadata, fragments):
    with raises(InvalidInputError, *fragments):
        exp.files("m").save_blob(b"x", "x.bin", metadata=metadata)
    with raises(InvalidInputError, *fragments):
        exp.files("m", metadata=metadata)


@pytest.mark.parametrize("tags, fragments", [
    (["ok", 3], ("3", "str")),
    ("best", ("list of str",)),
    ([None], ("None",)),
    ([""], ("1–256",)),
], ids=["int", "str-not-list", "none", "empty"])
def test_tags_must_be_strings(exp, unchanged, tags, fragments):
    with raises(InvalidInputError, *fragments):
        exp.files("m").save_blob(b"x", "x.bin", tags=tags)
    with raises(InvalidInputError, *fragments):
        exp.files("m", tags=tags)


def test_description_must_be_str(exp, unchanged):
    with raises(InvalidInputError, "description"):
        exp.files("m").save_blob(b"x", "x.bin", description=42)


# ---- hostile names -------------------------------------------------------------------------------------

HOSTILE_FILENAMES = {
    "dotdot": "..",
    "dot": ".",
    "escape": "../../etc/passwd",
    "middle-escape": "a/../../b",
    "absolute": "/etc/passwd",
    "backslash": "a\\b",
    "windows-absolute": "C:\\x",
    "windows-unc": "\\\\server\\x",
    "nul": "x\x00y",
    "newline": "x\ny",
    "fullwidth-dotdot": "．．",
    "fullwidth-escape": "．．/x",
    "two-dot-leader": "‥",
    "long-component": "a" * 256,
    "long-utf8-component": "é" * 128,  # 256 bytes in UTF-8
    "trailing-slash": "dir/",
    "empty": "",
}


@pytest.mark.parametrize("name", list(HOSTILE_FILENAMES.values()), ids=list(HOSTILE_FILENAMES))
def test_hostile_filenames(exp, unchanged, tmp_path, name):
    source = tmp_path / "ok.bin"
    source.write_bytes(b"x")
    with pytest.raises(InvalidInputError):
        exp.files("d").save_blob(b"x", to=name)
    with pytest.raises(InvalidInputError):
        exp.files("d").upload(source, to=name)


HOSTILE_PREFIXES = {"dotdot": "..", "escape": "../up", "middle": "/a/../../b", "fullwidth": "．．/x",
                    "leader": "a/‥", "nul": "a\x00", "backslash": "a\\..", "long": "p" * 300}


@pytest.mark.parametrize("prefix", list(HOSTILE_PREFIXES.values()), ids=list(HOSTILE_PREFIXES))
def test_hostile_prefixes(exp, unchanged, prefix):
    with pytest.raises(InvalidInputError):
        exp.files(prefix)
    with pytest.raises(InvalidInputError):
        exp.files("model.pth", prefix=prefix)


@pytest.mark.parametrize("kwargs", [
    {"prefix": "../project/exp"}, {"prefix": "a/b"}, {"prefix": "a/b/c/d"}, {"prefix": "ns/．．/exp"},
    {"name": "..", "project": "p"}, {"name": "e", "project": "a/b"}, {"name": "e", "namespace": "x\x00"},
    {"prefix": "a/b/c", "name": "d"}, {"prefix": 3},
])
def test_hostile_experiment_names(settings, kwargs):
    with pytest.raises(InvalidInputError):
        Experiment(settings=settings, **kwargs)


def test_object_keys_over_1024_bytes(exp, unchanged):
    deep = "/".join(["d" * 200] * 4)  # every component is fine; the key is not
    with raises(InvalidInputError, "1024", "shorten"):
        exp.files(deep).save_blob(b"x", to="f" * 200)
    long_root = Experiment(prefix="alice/project/bad", settings=exp.settings.replace(
        store="s3://bucket/" + "/".join(["r" * 200] * 4)))
    with raises(InvalidInputError, "1024"):  # the store's root prefix counts too
        long_root.files("d" * 200).save_blob(b"x", to="f.bin")


# ---- source files --------------------------------------------------------------------------------------

def test_missing_source_file_names_the_path(exp, unchanged, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with raises(SourceNotFoundError, "nope/model.pt") as info:
        exp.files("d").upload("nope/model.pt")
    assert isinstance(info.value, FileNotFoundError) and info.value.filename == "nope/model.pt"
    with pytest.raises(FileNotFoundError):
        exp.file("missing.pth", prefix="/models")
    with pytest.raises(FileNotFoundError):
        exp.files("missing.pth", prefix="/models").save()
    (tmp_path / "file").write_text("x")
    with raises(SourceNotFoundError, "not a directory"):
        exp.files("d").upload("file/below")


def test_directories_and_special_files_are_refused(exp, unchanged, tmp_path):
    (tmp_path / "run").mkdir()
    with raises(InvalidInputError, "directory", "not supported yet"):
        exp.files("d").upload(tmp_path / "run")
    os.mkfifo(tmp_path / "fifo")
    with raises(InvalidInputError, "not a regular file"):
        exp.files("d").upload(tmp_path / "fifo")


def test_too_large_is_refused_before_copying(settings, tmp_path, monkeypatch):
    exp = Experiment(prefix="alice/project/bad", settings=settings.replace(max_file_size=10))
    exp.files.save_blob(b"ok", "ok.bin")
    before = spool_snapshot(settings)
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * 11)

    def no_copy(*args: object) -> None:
        raise AssertionError("the file was read although it is too large")

    monkeypatch.setattr("mldash.serializers.copy_into", no_copy)
    with raises(FileTooLargeError, "big.bin", "11", "10"):
        exp.files("d").upload(source)
    with raises(FileTooLargeError):
        exp.files("d").save_blob(b"x" * 11, "b.bin")
    with raises(FileTooLargeError):  # size known only after serializing: still nothing left behind
        exp.files("d").save_pkl(b"x" * 100, "p.pkl")
    assert spool_snapshot(settings) == before


def test_default_limit_is_100_gb(settings):
    assert settings.max_file_size == 100 * 10**9


def test_full_spool(settings):
    exp = Experiment(prefix="alice/project/bad", settings=settings.replace(spool_quota="1MiB", save_timeout=0.0))
    exp.files.save_blob(b"x" * 600_000, "a.bin")
    before = spool_snapshot(settings)
    with pytest.raises(SpoolFullError) as info:
        exp.files.save_blob(b"x" * 600_000, "b.bin")
    assert info.value.quota == 2**20 and info.value.requested == 600_000
    assert "quota" in str(info.value) and "nothing was written" in str(info.value)
    with pytest.raises(SpoolFullError, match="never fit"):
        exp.files.save_blob(b"x" * (2**20 + 1), "c.bin")
    with pytest.raises(SpoolFullError):  # size known only after serializing
        exp.files.save_pkl(b"x" * 600_000, "d.pkl")
    assert spool_snapshot(settings) == before


# ---- optional dependencies -----------------------------------------------------------------------------

@pytest.mark.parametrize("module, call, extra", [
    ("torch", lambda f: f.save_torch({"a": 1}, "t.pt"), "mldash[torch]"),
    ("matplotlib", lambda f: f.save_fig(None, "f.png"), "mldash[media]"),
    ("imageio_ffmpeg", lambda f: f.save_video(np.zeros((2, 8, 8)), "v.mp4"), "mldash[media]"),
    ("PIL", lambda f: f.save_image(np.zeros((8, 8)), "i.png"), "mldash[media]"),
])
def test_missing_optional_dependency_names_the_extra(exp, unchanged, monkeypatch, module, call, extra):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with raises(MissingDependencyError, extra) as info:
        call(exp.files("opt"))
    assert isinstance(info.value, ImportError)


def test_nothing_left_when_serialization_fails_midway(exp, unchanged):
    class Explodes:
        def __reduce__(self):
            raise RuntimeError("boom")

    with raises(InvalidInputError, "boom"):
        exp.files("x").save_pkl({"big": b"x" * 2_000_000, "bad": Explodes()}, "p.pkl")


def test_warm_up_file_is_there(exp, settings):
    assert any(p.startswith("manifests/") for p in spool_snapshot(settings))
    assert Path(settings.spool, "SPOOL").exists()


def test_oversized_metadata_is_refused(exp, unchanged):
    with raises(InvalidInputError, "bytes", "save_json"):
        exp.files("m").save_blob(b"x", "x.bin", metadata={"history": list(range(300_000))})
    with raises(InvalidInputError, "bytes"):
        exp.files("m", tags=[f"{i:0>200}" for i in range(6000)]).save_blob(b"x", "x.bin")


# ---- values that change, come from elsewhere, or name things in other ways ---------------------------

def test_a_handles_metadata_is_a_snapshot_of_what_was_checked(exp, settings):
    """exp.files(..., metadata=config) checked `config` once and kept a reference: a NaN added to it later went
    into every later save, which returned "queued" and was then quarantined by the daemon, never uploaded."""
    config = {"lr": 0.1, "layers": [64, 64]}
    handle = exp.files("runs", metadata={"config": config})
    config["lr"] = float("nan")
    config["layers"].append({"not": {"json"}})
    result = handle.save_blob(b"x", "a.bin")
    assert result["metadata"] == {"config": {"lr": 0.1, "layers": [64, 64]}}


def test_non_utf8_names_are_refused_naming_them(exp, settings, tmp_path):
    """A file name in another encoding (os.listdir gives lone surrogates) used to crash in str.encode."""
    source = tmp_path / os.fsdecode(b"model-\xe9.pt")
    source.write_bytes(b"weights")
    before = spool_snapshot(settings)
    with raises(InvalidInputError, "is not valid Unicode text", "U+DCE9", "to='model.pt'"):
        exp.files("m").upload(source)
    with raises(InvalidInputError, "is not valid Unicode text"):
        exp.files("m").save_blob(b"x", "a\udcff.bin")
    with raises(InvalidInputError, "tag", "is not valid Unicode text"):
        exp.files("m").save_blob(b"x", "a.bin", tags=["a\ud800"])
    with raises(InvalidInputError, "description", "is not valid Unicode text"):
        exp.files("m").save_blob(b"x", "a.bin", description="\ud800")
    assert spool_snapshot(settings) == before
    assert exp.files("m").upload(source, to="model.pt")["filename"] == "model.pt"  # the way out it names


def test_cyclic_metadata_is_refused(exp, unchanged):
    cyclic: dict = {"run": 1}
    cyclic["self"] = cyclic
    with raises(InvalidInputError, "contains itself"):
        exp.files("m").save_blob(b"x", "a.bin", metadata=cyclic)
    with raises(InvalidInputError, "contains itself"):
        exp.files("m", metadata=cyclic)


def test_path_objects_mean_what_the_same_str_means(exp, settings):
    """to=Path("state.pkl") skipped the extension rules (a dict became JSON labelled as a pickle), and
    exp.files(Path("checkpoints")) was taken as a file to upload, so its saves landed at the root."""
    pkl = exp.files("p").save({"step": 3}, to=Path("state.pkl"))
    assert pkl["contentType"] == "application/x-python-pickle"
    assert pickle.loads(spool_blob(settings, pkl)) == {"step": 3}
    npy = exp.files("p").save(np.zeros(3), to=Path("a.npy"))
    assert npy["filename"] == "a.npy"
    saved = exp.files(Path("checkpoints")).save_blob(b"w", "model.bin")
    assert saved["path"] == "/checkpoints" and saved["filename"] == "model.bin"


def test_wait_refuses_a_nan_timeout(exp):
    """NaN compares false to everything: `timeout < 0` let it through and the wait never ended."""
    with raises(InvalidInputError, "timeout must be None or a number of seconds ≥ 0", "nan"):
        exp.flush(timeout=float("nan"))
    with raises(InvalidInputError, "nan"):
        exp.files.wait(timeout=float("nan"))


def test_reads_name_bad_ids_and_destinations(exp, unchanged):
    first = exp.files.list()[0]
    with raises(NotFoundError, "²"):  # "²".isdigit() is True, and int("²") raised a bare ValueError
        exp.files.get("²")
    with raises(InvalidInputError, "file ids are positive integers, got 0"):
        exp.files.get(0)
    with raises(InvalidInputError, "file ids are positive integers, got -5"):
        exp.files.get(-5)
    with raises(InvalidInputError, "dest_path must be a str or os.PathLike, got int"):
        exp.files.download(first["id"], dest_path=123)


def test_a_spool_setting_that_is_not_a_spool_directory_is_named(settings, tmp_path):
    """MLDASH_SPOOL=$HOME used to fill the home directory with tmp/, blobs/ and manifests/; a file failed
    later with a bare NotADirectoryError."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine\n")
    (home / "thesis.tex").write_text("% mine\n")
    exp = Experiment(prefix="alice/project/bad", settings=settings.replace(spool=home))
    with raises(ConfigError, str(home), "holding other files (thesis.tex)", "MLDASH_SPOOL"):
        exp.files.save_blob(b"x", "a.bin")
    assert sorted(os.listdir(home)) == [".bashrc", "thesis.tex"]

    a_file = tmp_path / "afile"
    a_file.write_text("x")
    exp = Experiment(prefix="alice/project/bad", settings=settings.replace(spool=a_file))
    with raises(ConfigError, "exists and is not a directory", "MLDASH_SPOOL"):
        exp.files.save_blob(b"x", "a.bin")

    empty = tmp_path / "empty"
    empty.mkdir()
    exp = Experiment(prefix="alice/project/bad", settings=settings.replace(spool=empty))
    assert exp.files.save_blob(b"x", "a.bin")["status"] == "queued"  # a new or empty directory is fine

    mount = tmp_path / "mount"  # the root of a filesystem made for the spool
    (mount / "lost+found").mkdir(parents=True)
    (mount / ".snapshot").mkdir()
    exp = Experiment(prefix="alice/project/bad", settings=settings.replace(spool=mount))
    assert exp.files.save_blob(b"x", "a.bin")["status"] == "queued"


def test_a_module_whose_state_dict_fails_is_named(exp, unchanged):
    torch = pytest.importorskip("torch")

    class Broken(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            raise RuntimeError("buffer on an unavailable device")

    with raises(InvalidInputError, "save_torch could not get the module's state_dict()", "unavailable device"):
        exp.files("t").save_torch(Broken(), "m.pt")


def test_experiment_arguments_of_the_wrong_type_are_named(settings):
    with raises(InvalidInputError, "settings must be a mldash.config.Settings", "dict"):
        Experiment(prefix="alice/project/bad", settings={"spool": "/tmp/x"})
    with raises(InvalidInputError, "local_path must be a directory path, got int 123"):
        Experiment(prefix="alice/project/bad", settings=settings, local_path=123)


def test_figure_render_failures_are_named(exp, unchanged):
    """dpi=1e6 ran Agg out of memory (std::bad_alloc); a mathtext typo was blamed on "the options {}"."""
    fig = plt.figure()
    with raises(InvalidInputError, "dpi=1000000.0 makes a 6400000 × 4800000 pixel image", "megapixels"):
        exp.files("p").save_fig(fig, to="big.png", dpi=1e6, close=False)
    with raises(InvalidInputError, "dpi=0", "must be > 0"):
        exp.files("p").save_fig(fig, to="zero.png", dpi=0, close=False)
    plt.title(r"$\alpah$")
    with raises(InvalidInputError, "matplotlib could not render the figure", "alpah"):
        exp.files("p").save_fig(fig, to="typo.png")
    plt.close(fig)


def test_a_bad_to_is_quoted_as_written(exp, unchanged):
    """The error named the joined folder ("prefix 'checkpoints/..'"), which the caller never wrote."""
    with raises(InvalidInputError, "save_text: to='../x.txt' is not a usable name", "'..'"):
        exp.files("checkpoints").save_text("x", to="../x.txt")
    with raises(InvalidInputError, "to='sub/' is not a usable name (it ends with '/'"):
        exp.files("checkpoints").save_text("x", to="sub/")
    with raises(InvalidInputError, "to='' is not a usable name (it is empty: give a filename, e.g. 'best.pt')"):
        exp.files("checkpoints").save_text("x", to="")


def test_a_large_dpi_is_fine_for_a_vector_format(exp):
    fig = plt.figure()
    pdf = exp.files("p").save_fig(fig, to="vector.pdf", dpi=20_000)  # dpi sizes only the rasters inside a PDF
    assert pdf["sizeBytes"] > 0
