"""Serializers: turn a Python object into bytes written to a binary file object. No storage logic here.

Each ``*_payload`` function checks its input *before* anything is written (so bad input raises with
nothing in the spool) and returns a `Payload` whose `write(fileobj)` produces the bytes. `write` may be
called more than once (the spool retries after ENOSPC once space is free), so it must be re-runnable,
and it must finish writing before it returns: what is written is the object as it was during the call
(snapshot semantics), whatever the caller does with the object afterwards.

Where the bytes come from:
- streamed straight into the file object: torch, pickle, numpy, uploads (read once, hashed on the way);
- encoded in memory first (small by nature, and the encoding is the validation): JSON, text, figures, images;
- encoded to a temporary file, then copied: videos (ffmpeg needs a real, seekable file to write an MP4).

torch, matplotlib, imageio-ffmpeg and Pillow are optional and imported only when used; a missing one
raises `MissingDependencyError` naming the extra to install.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickle
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

from mldash.errors import InvalidInputError, MissingDependencyError, SourceNotFoundError
from mldash.spool.hashing import copy_into

Writer = Callable[[BinaryIO], None]
_EXTRA = {"torch": "torch", "matplotlib": "media", "imageio_ffmpeg": "media", "PIL": "media", "numpy": "media"}


@dataclass
class Payload:
    """The bytes of one artifact, ready to be written; `close()` releases what it holds (files, temp files)."""

    kind: str                      # upload, json, text, blob, torch, pkl, npy, fig, image, video
    write: Writer                  # re-runnable; writes the whole artifact into a binary file object
    size: int | None = None        # known in advance when possible (lets the spool refuse too-large input early)
    # An estimate where the exact size is not known (a state_dict's tensor bytes): a save clearly larger than the
    # sync checksum limit then skips the hashing it would abandon at the limit (see Enqueuer.enqueue).
    size_hint: int | None = None
    on_saved: Callable[[], None] | None = None  # run once the artifact is safely spooled (e.g. close a figure)
    _close: Callable[[], None] | None = None

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


def require(module: str, *, feature: str) -> ModuleType:
    """Import an optional dependency or raise a MissingDependencyError that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRA.get(module.split(".")[0], "media")
        raise MissingDependencyError(
            f"{feature} needs {module.split('.')[0]!r}, which is not installed: pip install 'mldash[{extra}]' "
            f"({exc})") from None


def _buffer_payload(kind: str, data: bytes | bytearray | memoryview) -> Payload:
    view = memoryview(data)
    return Payload(kind, lambda f: f.write(view), size=view.nbytes)


def _wrap_errors(what: str, write: Writer) -> Writer:
    """Errors from the object's own serialization become InvalidInputError; I/O errors pass unchanged
    (the spool retries ENOSPC and cleans up everything else)."""
    def run(f: BinaryIO) -> None:
        try:
            write(f)
        except OSError:
            raise
        except Exception as exc:
            raise InvalidInputError(f"{what} could not serialize the object: {type(exc).__name__}: {exc}") from exc
    return run


# ---- JSON, text, bytes ------------------------------------------------------------------------------------

def _json_default(value: Any) -> Any:
    """numpy scalars and arrays are everywhere in ML configs and results; write them as plain JSON."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(value, numpy.generic):
            return value.item()
        if isinstance(value, numpy.ndarray):
            return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def json_payload(obj: Any, **json_kwargs: Any) -> Payload:
    """JSON as UTF-8. Defaults: indent=2, ensure_ascii=False; numpy scalars/arrays become numbers/lists."""
    options = {"indent": 2, "ensure_ascii": False, "default": _json_default, **json_kwargs}
    try:
        text = json.dumps(obj, **options)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"save_json: {exc}. JSON accepts dict, list, str, int, float, bool, None (and numpy scalars/arrays); "
            "use save_pkl or save_torch for other objects, or pass default=") from None
    except RecursionError:
        raise InvalidInputError("save_json: the object is nested too deeply, or contains itself, to encode as "
                                "JSON; use save_pkl") from None
    return _buffer_payload("json", text.encode("utf-8"))


def text_payload(text: Any, encoding: str = "utf-8") -> Payload:
    if not isinstance(text, str):
        hint = "; for bytes use save_blob" if isinstance(text, (bytes, bytearray, memoryview)) else ""
        raise InvalidInputError(f"save_text takes a str, got {type(text).__name__}{hint}")
    if not isinstance(encoding, str):
        raise InvalidInputError(f"save_text: encoding must be a codec name such as 'utf-8', got {encoding!r}")
    try:
        data = text.encode(encoding)
    except (LookupError, UnicodeEncodeError) as exc:
        raise InvalidInputError(f"save_text: cannot encode the text as {encoding!r}: {exc}") from None
    return _buffer_payload("text", data)


def is_bytes_like(value: Any) -> bool:
    if isinstance(value, (str, dict, list, tuple)):
        return False
    try:
        memoryview(value)
    except TypeError:
        return False
    return True


def blob_payload(data: Any) -> Payload:
    """Bytes-like objects (bytes, bytearray, memoryview, contiguous numpy buffers) or a readable binary file."""
    if isinstance(data, str):
        raise InvalidInputError("save_blob takes bytes, got str; use save_text for text, or upload(path) for a file")
    if is_bytes_like(data):
        if "O" in memoryview(data).format:  # a numpy object array: its buffer is PyObject pointers, not data
            raise InvalidInputError("save_blob: this buffer holds Python object pointers (a numpy array of "
                                    "dtype=object), not bytes; use save_pkl, or save_json for JSON-able values")
        try:
            view = memoryview(data).cast("B")
        except TypeError as exc:
            raise InvalidInputError(f"save_blob: the buffer is not contiguous ({exc}); pass bytes(data)") from None
        return Payload("blob", lambda f: f.write(view), size=view.nbytes)
    if callable(getattr(data, "read", None)):
        if getattr(data, "closed", False) is True:
            raise InvalidInputError("save_blob: the file object is closed; open it again (or pass its bytes)")
        return _stream_payload(data)
    raise InvalidInputError(
        f"save_blob takes bytes, bytearray, memoryview, a contiguous buffer or a readable binary file; "
        f"got {type(data).__name__}")


def _stream_payload(stream: Any) -> Payload:
    start = None
    with contextlib.suppress(Exception):
        start = stream.tell() if stream.seekable() else None
    calls = 0

    def write(f: BinaryIO) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            if start is None:
                raise InvalidInputError("save_blob: the stream cannot be rewound to retry the write; pass bytes")
            stream.seek(start)
        while chunk := stream.read(8 * 2**20):
            if isinstance(chunk, str):
                raise InvalidInputError("save_blob: the file object is in text mode; open it with 'rb'")
            f.write(chunk)

    return Payload("blob", write)


# ---- files on disk -----------------------------------------------------------------------------------------

def source_file_payload(path: str | os.PathLike[str]) -> Payload:
    """The bytes of a local file, read once into the spool (a snapshot: later changes to the file don't count)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"upload takes a path (str or os.PathLike), got {type(path).__name__}")
    name = os.fspath(path)
    if not name or "\x00" in name:
        raise InvalidInputError(f"upload: {name!r} is not a valid path")
    try:
        info = os.stat(name)
    except FileNotFoundError:
        raise SourceNotFoundError(f"upload: no file at {name!r} (resolved: {os.path.abspath(name)!r}); "
                                  "nothing was saved", filename=name) from None
    except NotADirectoryError:
        raise SourceNotFoundError(f"upload: no file at {name!r}; a component of the path is not a directory",
                                  filename=name) from None
    if stat.S_ISDIR(info.st_mode):
        raise InvalidInputError(f"upload: {name!r} is a directory; uploading directories is not supported yet — "
                                "upload its files one by one (or save an archive of it)")
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInputError(f"upload: {name!r} is not a regular file (a FIFO, socket or device); "
                                "only regular files can be uploaded")
    source = open(name, "rb", buffering=0)  # noqa: SIM115 - closed by Payload.close()
    try:
        size = os.fstat(source.fileno()).st_size  # of what we opened, not of what the name points to now
    except BaseException:
        source.close()
        raise

    def write(f: BinaryIO) -> None:
        source.seek(0)
        copy_into(source, f)  # type: ignore[arg-type]

    return Payload("upload", write, size=size, _close=source.close)


# ---- pickle, torch, numpy ------------------------------------------------------------------------------

def pkl_payload(obj: Any, protocol: int | None = None) -> Payload:
    proto = pickle.DEFAULT_PROTOCOL if protocol is None else protocol
    if isinstance(proto, bool) or not isinstance(proto, int) or not 0 <= proto <= pickle.HIGHEST_PROTOCOL:
        raise InvalidInputError(f"save_pkl: protocol must be an int in 0..{pickle.HIGHEST_PROTOCOL}, got {proto!r}")
    return Payload("pkl", _wrap_errors("save_pkl", lambda f: pickle.dump(obj, f, protocol=proto)))


def is_torch_object(value: Any) -> bool:
    """A tensor or module, without importing torch when the caller never did."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, (torch.Tensor, torch.nn.Module))


def torch_payload(obj: Any) -> Payload:
    """`torch.save` into the spool; an nn.Module is saved as its state_dict() (the portable form)."""
    torch = require("torch", feature="save_torch")
    if isinstance(obj, torch.nn.Module):
        try:
            obj = obj.state_dict()
        except Exception as exc:  # a module's own code (hooks, custom state_dict) failed: say where it failed
            raise InvalidInputError(f"save_torch could not get the module's state_dict(): {type(exc).__name__}: "
                                    f"{exc}") from exc
    # torch.save copies every tensor's bytes out during the call, so training may go on as soon as it returns.
    return Payload("torch", _wrap_errors("save_torch", lambda f: torch.save(obj, f)),
                   size_hint=_tensor_bytes(torch, obj))


def _tensor_bytes(torch: ModuleType, obj: Any) -> int | None:
    """The bytes of the tensor storages in `obj` (a state_dict, nested dicts/lists/tuples), each storage once —
    torch.save writes a storage shared by several tensors once. None when there is nothing to estimate from."""
    seen: set[int] = set()
    total = 0
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, torch.Tensor):
            try:
                storage = item.untyped_storage()
                key = storage.data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
            except (RuntimeError, NotImplementedError):  # e.g. tensors without storage: no estimate from them
                total += item.element_size() * item.numel()
        elif level < 8 and isinstance(item, dict):
            stack.extend((value, level + 1) for value in item.values())
        elif level < 8 and isinstance(item, (list, tuple)):
            stack.extend((value, level + 1) for value in item)
    return total or None


def npy_payload(array: Any) -> Payload:
    numpy = require("numpy", feature="saving a .npy file")
    if not isinstance(array, numpy.ndarray):
        raise InvalidInputError(f"a .npy file holds a numpy array, got {type(array).__name__}")
    if array.dtype.hasobject:
        raise InvalidInputError("a .npy file of dtype=object needs pickle; use save_pkl for object arrays")
    return Payload("npy", _wrap_errors("save (.npy)", lambda f: numpy.save(f, array, allow_pickle=False)))


# ---- pixels: shared conversion ---------------------------------------------------------------------------

def to_uint8(array: Any, what: str) -> Any:
    """An array of pixels as uint8: float in [0, 1] is scaled to 0–255, bool to 0/255, ints must fit 0–255."""
    numpy = require("numpy", feature=what)
    if "torch" in sys.modules and is_torch_object(array):
        array = array.detach().cpu().numpy()
    if array is None or isinstance(array, (str, bytes, os.PathLike)):
        hint = "; to store a file use upload(path)" if isinstance(array, (str, os.PathLike)) else ""
        raise InvalidInputError(f"{what} takes a numpy array (or PIL image / torch tensor) of pixels, got "
                                f"{type(array).__name__}{hint}")
    try:
        array = numpy.asarray(array)
    except ValueError as exc:  # ragged nested lists
        raise InvalidInputError(f"{what}: the pixels are not a rectangular array ({exc}); pass an (H, W) or "
                                "(H, W, C) array") from None
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(numpy.uint8) * 255
    if array.dtype == numpy.uint8:
        return array
    if array.size == 0:
        raise InvalidInputError(f"{what}: the array is empty (shape {array.shape})")
    if kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise InvalidInputError(f"{what}: integer pixels must be in 0..255, got {low}..{high}; "
                                    "scale them first (or pass floats in [0, 1])")
        return array.astype(numpy.uint8)
    if kind == "f":
        low, high = float(numpy.min(array)), float(numpy.max(array))
        if not (numpy.isfinite(low) and numpy.isfinite(high)):
            raise InvalidInputError(f"{what}: pixels contain NaN or infinity")
        if low < -1e-6 or high > 1 + 1e-6:
            raise InvalidInputError(f"{what}: float pixels must be in [0, 1] (they are scaled to 0–255), got "
                                    f"{low:g}..{high:g}; for 0–255 values pass .astype(numpy.uint8)")
        return numpy.rint(numpy.clip(array, 0.0, 1.0) * 255.0).astype(numpy.uint8)
    raise InvalidInputError(f"{what}: pixels of dtype {array.dtype} are not supported; use uint8, bool or float")


# A figure rendered larger than this (e.g. dpi=1e6) would exhaust memory inside Agg (std::bad_alloc) before any
# error: 2**28 pixels is 1 GiB of RGBA.
MAX_FIGURE_PIXELS = 2**28
_VECTOR_FORMATS = frozenset({"pdf", "svg", "svgz", "eps", "ps", "pgf"})  # dpi only sizes their embedded rasters

_IMAGE_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}


def _pixel_shape_error(what: str, shape: tuple[int, ...], accepted: str) -> InvalidInputError:
    return InvalidInputError(f"{what}: got an array of shape {shape}; accepted: {accepted} "
                             "(channels last: 1 = grey, 3 = RGB, 4 = RGBA)")


# ---- images --------------------------------------------------------------------------------------------

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF"}


def is_pil_image(value: Any) -> bool:
    image_module = sys.modules.get("PIL.Image")
    return image_module is not None and isinstance(value, image_module.Image)


def image_payload(image: Any, ext: str, **pil_kwargs: Any) -> Payload:
    """An (H,W), (H,W,1), (H,W,3) or (H,W,4) array (or a PIL image) encoded by Pillow; format from `ext`."""
    pil_image = require("PIL.Image", feature="save_image")
    fmt = IMAGE_FORMATS.get(ext)
    if fmt is None:
        raise InvalidInputError(f"save_image: unsupported extension {ext or '(none)'!r}; accepted: "
                                f"{', '.join(sorted(IMAGE_FORMATS))}")
    if not isinstance(image, pil_image.Image):
        pixels = to_uint8(image, "save_image")
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        if pixels.ndim == 2:
            mode = "L"
        elif pixels.ndim == 3 and pixels.shape[2] in (3, 4):
            mode = _IMAGE_CHANNELS[pixels.shape[2]]
        else:
            raise _pixel_shape_error("save_image", pixels.shape, "(H, W), (H, W, 1), (H, W, 3), (H, W, 4)")
        image = pil_image.fromarray(pixels, mode=mode) if mode != "L" else pil_image.fromarray(pixels)
    if fmt == "JPEG" and image.mode not in ("L", "RGB", "CMYK"):
        image = image.convert("RGB")  # JPEG has no alpha channel: drop it rather than fail
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt, **pil_kwargs)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InvalidInputError(f"save_image: Pillow could not encode a {image.mode} image as {fmt}: {exc}") from None
    return _buffer_payload("image", buffer.getbuffer())


# ---- figures -------------------------------------------------------------------------------------------

def is_figure(value: Any) -> bool:
    figure_module = sys.modules.get("matplotlib.figure")
    axes_module = sys.modules.get("matplotlib.axes")
    return (figure_module is not None and isinstance(value, figure_module.FigureBase)) or (
        axes_module is not None and isinstance(value, axes_module.Axes))


def figure_payload(fig: Any, fmt: str, *, close: bool = True, **savefig_kwargs: Any) -> Payload:
    """`fig.savefig` in format `fmt`; the current pyplot figure when `fig` is None. Closes it once saved."""
    require("matplotlib", feature="save_fig")
    import matplotlib.figure

    if fig is None:
        if "matplotlib.pyplot" not in sys.modules:
            raise InvalidInputError("save_fig: no figure given and pyplot has no current figure")
        import matplotlib.pyplot as plt

        if not plt.get_fignums():
            raise InvalidInputError("save_fig: no figure given and pyplot has no open figure to save")
        fig = plt.gcf()
    if not isinstance(fig, matplotlib.figure.FigureBase):
        if not is_figure(fig):
            raise InvalidInputError("save_fig takes a matplotlib Figure (or Axes), or None for the current figure")
        fig = fig.figure
    root = fig
    while getattr(root, "figure", root) is not root:  # SubFigure → its Figure (get_figure(root=) is mpl ≥ 3.10)
        root = root.figure
    supported = root.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise InvalidInputError(f"save_fig: format {fmt!r} is not supported by matplotlib here; accepted: "
                                f"{', '.join(sorted(supported))}")
    dpi = savefig_kwargs.get("dpi")
    if isinstance(dpi, (int, float)) and not isinstance(dpi, bool) and fmt not in _VECTOR_FORMATS:
        width, height = root.get_size_inches() * dpi
        if not (dpi > 0 and width * height <= MAX_FIGURE_PIXELS):
            raise InvalidInputError(f"save_fig: dpi={dpi!r} makes a {width:.0f} × {height:.0f} pixel image; dpi "
                                    f"must be > 0 and the image at most {MAX_FIGURE_PIXELS // 10**6} megapixels")
    buffer = io.BytesIO()
    try:
        root.savefig(buffer, format=fmt, **savefig_kwargs)
    except (TypeError, ValueError) as exc:
        # Options (dpi='x', an unknown keyword) or the figure's own content (a mathtext typo) can be the cause.
        what = f"the figure with the options {savefig_kwargs}" if savefig_kwargs else "the figure"
        raise InvalidInputError(f"save_fig: matplotlib could not render {what}: {type(exc).__name__}: "
                                f"{exc}") from None

    def close_figure() -> None:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if close and pyplot is not None:
            pyplot.close(root)

    payload = _buffer_payload("fig", buffer.getbuffer())
    payload.on_saved = close_figure
    return payload


# ---- videos --------------------------------------------------------------------------------------------

# container → ffmpeg muxer name; everything but GIF goes through ffmpeg (imageio-ffmpeg's bundled binary).
VIDEO_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".gif": "gif"}


def _frames(frames: Any, what: str) -> tuple[int, Iterator[Any], tuple[int, int, int]]:
    """(count, iterator of uint8 (H,W,C) frames, (H, W, C)); shapes are checked up front, pixels as they come."""
    numpy = require("numpy", feature=what)
    if "torch" in sys.modules and is_torch_object(frames):
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, numpy.ndarray):
        if frames.ndim == 2:        # one (H, W) frame
            items: list[Any] | Any = [frames]
        elif frames.ndim in (3, 4):  # (N, H, W) or (N, H, W, C)
            items = frames
        else:
            raise _pixel_shape_error(what, frames.shape, "(N, H, W), (N, H, W, C), or a list of (H, W) / (H, W, C)")
    elif isinstance(frames, (list, tuple)):
        items = list(frames)
    else:
        raise InvalidInputError(f"{what} takes a list of frames or a stacked numpy array, got {type(frames).__name__}")
    if len(items) == 0:
        raise InvalidInputError(f"{what}: there are no frames")
    shapes = set()
    for i, item in enumerate(items):
        shape = tuple(numpy.shape(item))
        if len(shape) == 2:
            shape = (*shape, 1)
        if len(shape) != 3 or shape[2] not in _IMAGE_CHANNELS or shape[0] == 0 or shape[1] == 0:
            raise _pixel_shape_error(f"{what} (frame {i})", tuple(numpy.shape(item)), "(H, W) or (H, W, C)")
        shapes.add(shape)
    if len(shapes) > 1:
        raise InvalidInputError(f"{what}: all frames must have the same shape, got {sorted(shapes)}")
    shape = shapes.pop()

    def iterate() -> Iterator[Any]:
        for i, item in enumerate(items):
            frame = to_uint8(item, f"{what} (frame {i})")
            yield frame.reshape(shape)

    return len(items), iterate(), shape


def _h264_encoder() -> str:
    """The first H.264 encoder this ffmpeg build has (probed once by imageio-ffmpeg, cached); else libx264."""
    try:
        from imageio_ffmpeg._io import get_first_available_h264_encoder  # not exported, but stable for years

        return str(get_first_available_h264_encoder())
    except (ImportError, RuntimeError):
        return "libx264"  # ffmpeg's own error then names the problem


def _encode_ffmpeg(path: Path, frames: Iterator[Any], shape: tuple[int, int, int], container: str, fps: float,
                   codec: str | None, quality: float | None) -> None:
    """Pipe raw frames into the ffmpeg binary bundled with imageio-ffmpeg.

    We run ffmpeg ourselves rather than through `imageio_ffmpeg.write_frames`, which ignores ffmpeg's exit
    status: a failed encode (unknown codec, full disk) would otherwise be saved as a broken video.
    """
    imageio_ffmpeg = require("imageio_ffmpeg", feature="save_video")
    height, width, channels = shape
    codec = codec or _h264_encoder()
    rate = str(Fraction(fps).limit_denominator(1001))
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-v", "error",
           "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
           "-pix_fmt", {1: "gray", 3: "rgb24", 4: "rgba"}[channels], "-r", rate, "-i", "-", "-an",
           "-vcodec", codec, "-pix_fmt", "yuv420p"]
    level = 5.0 if quality is None else float(quality)  # imageio's 0–10 scale, mapped the way imageio maps it
    if codec == "libx264":
        cmd += ["-crf", str(int((1 - level / 10) * 51))]
    else:
        cmd += ["-qscale:v", str(int((1 - level / 10) * 30) + 1)]
    if width % 2 or height % 2:  # yuv420p needs even sides: pad one black pixel rather than resample
        cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
    if container in ("mp4", "mov"):
        cmd += ["-movflags", "+faststart"]  # index at the front: plays while it downloads
    cmd += ["-f", container, str(path)]
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: ffmpeg can never block on a full stderr
        process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
        assert process.stdin is not None
        try:
            try:
                for frame in frames:
                    process.stdin.write(memoryview(frame if frame.flags.c_contiguous else frame.copy()).cast("B"))
                process.stdin.close()
            except BrokenPipeError:
                pass  # ffmpeg quit early; its exit status and message say why
            code = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
        if code != 0:
            errors.seek(0)
            message = errors.read()[-2000:].decode("utf-8", "replace").strip()
            raise InvalidInputError(f"save_video: ffmpeg could not encode {container} with codec {codec!r} "
                                    f"(exit status {code}): {message or 'no message'}")


def _encode_gif(path: Path, frames: Iterator[Any], shape: tuple[int, int, int], fps: float) -> None:
    pil_image = require("PIL.Image", feature="save_video (GIF)")
    channels = shape[2]

    def image(frame: Any) -> Any:
        if channels == 1:
            return pil_image.fromarray(frame[:, :, 0])
        return pil_image.fromarray(frame[:, :, :3])  # GIF has no real alpha: RGB

    first = image(next(frames))
    rest = (image(f) for f in frames)
    # GIF stores delays in 1/100 s; browsers clamp delays under 20 ms to 100 ms, so > 50 fps plays slower.
    first.save(path, format="GIF", save_all=True, append_images=rest, duration=max(10, round(1000 / fps)),
               loop=0)


def video_payload(frames: Any, ext: str, *, fps: float, tmp_dir: Path, codec: str | None = None,
                  quality: float | None = None) -> Payload:
    """Frames encoded to a temporary file in `tmp_dir` (the spool's tmp/: same disk, cleaned if we die)."""
    container = VIDEO_FORMATS.get(ext)
    if container is None:
        raise InvalidInputError(f"save_video: unsupported extension {ext or '(none)'!r}; accepted: "
                                f"{', '.join(sorted(VIDEO_FORMATS))}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
        raise InvalidInputError(f"save_video: fps must be a number in (0, 1000], got {fps!r}")
    if quality is not None and (not isinstance(quality, (int, float)) or not 1 <= quality <= 10):
        raise InvalidInputError(f"save_video: quality must be in 1..10, got {quality!r}")
    _count, iterator, shape = _frames(frames, "save_video")
    # "{pid}-…" makes a leftover temp file debris the daemon removes once this process is gone.
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=f"{os.getpid()}-", suffix=".video.part")
    os.close(fd)
    path = Path(name)
    try:
        if container == "gif":
            _encode_gif(path, iterator, shape, float(fps))
        else:
            _encode_ffmpeg(path, iterator, shape, container, float(fps), codec, quality)
    except BaseException as exc:  # KeyboardInterrupt too: never leave the temp file behind
        path.unlink(missing_ok=True)
        if isinstance(exc, (InvalidInputError, MissingDependencyError)) or not isinstance(exc, Exception):
            raise
        raise InvalidInputError(f"save_video: encoding {ext} failed: {type(exc).__name__}: {exc}") from exc

    def write(f: BinaryIO) -> None:
        with open(path, "rb", buffering=0) as source:
            copy_into(source, f)  # type: ignore[arg-type]

    return Payload("video", write, size=path.stat().st_size, _close=lambda: path.unlink(missing_ok=True))

