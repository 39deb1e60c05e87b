"""`exp.files(...)`: the handle through which every artifact is saved, listed and downloaded.

A handle is a logical folder (the *prefix*) of one experiment plus defaults for description, tags and
metadata. Saving never touches the network: each save validates its input, serializes the object into the
local spool and returns once the artifact is durable there; `mldash-syncd` uploads it later. Reads
(`list`, `download`, `get`) merge what is still in the spool with what the catalog holds.

Call forms (all of ML-Dash's):

    exp.files("checkpoints").save_torch(model, to="model.pt")      # a prefix, then a save
    exp.files.save_torch(model, "model.pt")                        # the experiment's root folder
    exp.files("model.pth", prefix="/models").save()                # older form: upload a local file
    exp.files(file_id=some_id, dest_path="./model.pth").download()
    exp.files().list()

`exp.files(x)` reads `x` as a prefix — unless `prefix=` is also given, or `x` names an existing file, in which
case `x` is the local file of the older form.
"""

from __future__ import annotations

import os
import sys
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import msgpack

from mldash import names, serializers
from mldash.content_types import content_type_for, extension
from mldash.errors import InvalidInputError, SourceNotFoundError
from mldash.keys import object_key
from mldash.spool.enqueue import EntrySpec
from mldash.spool.manifest import Manifest

if TYPE_CHECKING:
    from mldash.experiment import Experiment

MAX_METADATA_BYTES = 1 * 2**20
# The longest id a snowflake can take (19 digits): checking keys with it means no real id can exceed the limit.
_LONGEST_ID = 10**19 - 1
_TORCH_EXTENSIONS = (".pt", ".pth", ".ckpt")
_PICKLE_EXTENSIONS = (".pkl", ".pickle")
_ACCEPTED_BY_SAVE = ("a path (str or os.PathLike) of a local file → upload; bytes/bytearray/memoryview → save_blob; "
                     "dict/list/tuple → save_json (save_torch for .pt/.pth/.ckpt, save_pkl for .pkl); numpy array → "
                     "save_image (np.save for .npy); PIL image → save_image; torch tensor or module → save_torch; "
                     "matplotlib figure → save_fig")


def store_root(store_url: str) -> str:
    """The root prefix every key of this store starts with ("" for the local store)."""
    parsed = urlparse(store_url)
    return parsed.path.strip("/") if parsed.scheme == "s3" else ""


def _join(base: str, more: str) -> str:
    return f"{base}/{more}" if base and more else base or more


class FilesHandle:
    """A folder of one experiment. Cheap to create; `exp.files` is the root handle and is callable."""

    def __init__(self, experiment: Experiment, prefix: str = "", *, source: str | os.PathLike[str] | None = None,
                 file_id: int | str | None = None, dest_path: str | os.PathLike[str] | None = None,
                 description: str | None = None, tags: list[str] | None = None,
                 metadata: dict[str, Any] | None = None, as_folder: str | None = None) -> None:
        self._exp = experiment
        self.prefix = names.validate_prefix(prefix)
        self._source = source
        # exp.files("checkpoints") with a local file of that name in the working directory: the older form's
        # file for its own upload and a save without to=, but the folder for everything else (see `_folder`):
        # save_torch(model, to="m.pt") never means "upload ./checkpoints", so a stray file must not move it.
        self._as_folder = as_folder
        self._file_id = file_id
        self._dest_path = dest_path
        self._description = names.validate_description(description)
        self._tags = names.validate_tags(tags)
        self._metadata = names.validate_metadata(metadata)

    # ---- building handles ----------------------------------------------------------------------------
    def __call__(self, path_or_prefix: str | os.PathLike[str] | None = None, /, *, prefix: str | None = None,
                 file_id: int | str | None = None, dest_path: str | os.PathLike[str] | None = None,
                 description: str | None = None, tags: list[str] | None = None,
                 metadata: dict[str, Any] | None = None) -> FilesHandle:
        """A handle for a sub-folder (`exp.files("checkpoints")`) or, in the older form, for one local file
        (`exp.files("model.pth", prefix="/models")`). A prefix starting with "/" starts at the experiment's
        root; otherwise it is relative to this handle."""
        source = None
        folder = ""
        as_folder: str | None = None
        if prefix is not None:
            source, folder = path_or_prefix, prefix
        elif path_or_prefix is not None:
            if isinstance(path_or_prefix, (str, os.PathLike)) and os.path.isfile(path_or_prefix):
                source = path_or_prefix
                as_folder = os.fspath(path_or_prefix)
            elif isinstance(path_or_prefix, os.PathLike):  # not a file: a folder, spelled as a path
                folder = os.fspath(path_or_prefix)  # type: ignore[assignment]
            else:
                folder = path_or_prefix  # type: ignore[assignment]
        if folder is not None and not isinstance(folder, str):
            raise InvalidInputError(f"prefix must be a str such as 'checkpoints' or '/models', got "
                                    f"{type(folder).__name__}")
        new_prefix = self._subfolder(folder)
        folder_prefix = None
        if as_folder is not None:
            try:
                folder_prefix = self._subfolder(as_folder)
            except InvalidInputError:  # not usable as a folder name (e.g. "./model.pth"): only the file reading
                folder_prefix = None
        return FilesHandle(
            self._exp, new_prefix, source=source, file_id=file_id, dest_path=dest_path,
            description=description if description is not None else self._description,
            tags=[*self._tags, *names.validate_tags(tags)],
            metadata={**self._metadata, **names.validate_metadata(metadata)}, as_folder=folder_prefix)

    def _subfolder(self, folder: str) -> str:
        """`folder` from the experiment's root if it starts with "/", else under this handle's folder."""
        return names.validate_prefix(folder) if folder.startswith("/") else _join(
            self._folder, names.validate_prefix(folder))

    @property
    def path(self) -> str:
        """This handle's folder as users see it: "/" or "/models/checkpoints"."""
        return "/" + self._folder

    def __repr__(self) -> str:
        return f"FilesHandle({self._exp.path!r}, path={self.path!r})"

    # ---- saving --------------------------------------------------------------------------------------
    def upload(self, path: str | os.PathLike[str], to: str | None = None, *, description: str | None = None,
               tags: list[str] | None = None, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Copy a local file into the spool now (a snapshot: changing the file afterwards changes nothing).

        `to` defaults to the file's own name. Directories are not supported yet.
        """
        payload = serializers.source_file_payload(path)
        self_source = self._source is not None and os.path.abspath(os.fspath(path)) == os.path.abspath(
            os.fspath(self._source))
        try:
            return self._save("upload", lambda _name: payload, to, description, tags, metadata,
                              default_name=os.path.basename(os.fspath(path)), own_file=self_source)
        finally:
            payload.close()

    def save(self, content: Any = None, to: str | None = None, *, description: str | None = None,
             tags: list[str] | None = None, metadata: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
        """Save anything, dispatching on its type (see `_ACCEPTED_BY_SAVE`); with no content, upload the file of
        the older form `exp.files("model.pth", prefix="/models").save()`."""
        meta = {"description": description, "tags": tags, "metadata": metadata}
        if content is None:
            if self._source is None:
                raise InvalidInputError("save() needs something to save, e.g. save(obj, to='name.ext'), or a file "
                                        "given as exp.files('model.pth', prefix='/models').save()")
            return self.upload(self._source, to, **meta)
        target_ext = extension(os.fspath(to)) if isinstance(to, (str, os.PathLike)) else ""
        if isinstance(content, (str, os.PathLike)):
            if isinstance(content, str) and not os.path.lexists(content):
                raise SourceNotFoundError(
                    f"save: {content!r} is a str but no file by that name exists, and save() reads a str as a "
                    "path to upload; to store the text itself use save_text(text, to=...)", filename=content)
            return self.upload(content, to, **meta)
        if serializers.is_figure(content):
            return self.save_fig(content, to, **meta, **options)
        if serializers.is_torch_object(content):
            return self.save_torch(content, to, **meta)
        if serializers.is_pil_image(content):
            return self.save_image(content, to, **meta, **options)
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(content, numpy.generic):  # its buffer is 8 raw bytes, not a file
            raise InvalidInputError(
                f"save() does not store a bare numpy {type(content).__name__} ({content!r:.40}); for a number use "
                "save_json({'loss': float(x)}) or save_text(str(x)), for its raw bytes save_blob(x.tobytes())")
        if numpy is not None and isinstance(content, numpy.ndarray):
            if target_ext == ".npy":
                return self._save("npy", lambda _name: serializers.npy_payload(content), to, **meta)
            return self.save_image(content, to, **meta, **options)
        if serializers.is_bytes_like(content):
            return self.save_blob(content, to, **meta)
        if isinstance(content, (dict, list, tuple)):
            if target_ext in _TORCH_EXTENSIONS or _holds_tensors(content):
                return self.save_torch(content, to, **meta)
            if target_ext in _PICKLE_EXTENSIONS:
                return self.save_pkl(content, to, **meta)
            return self.save_json(content, to, **meta, **options)
        raise InvalidInputError(f"save() does not know how to store a {type(content).__name__}. Accepted: "
                                f"{_ACCEPTED_BY_SAVE}. For any picklable object use save_pkl.")

    def save_json(self, obj: Any, to: str | None = None, *, description: str | None = None,
                  tags: list[str] | None = None, metadata: dict[str, Any] | None = None,
                  **json_options: Any) -> dict[str, Any]:
        """JSON (UTF-8, indent=2 unless given); options go to json.dumps (sort_keys, default=…)."""
        return self._save("json", lambda _name: serializers.json_payload(obj, **json_options), to, description, tags,
                          metadata)

    def save_text(self, text: str, to: str | None = None, *, encoding: str = "utf-8",
                  description: str | None = None, tags: list[str] | None = None,
                  metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._save("text", lambda _name: serializers.text_payload(text, encoding), to, description, tags,
                          metadata)

    def save_blob(self, data: Any, to: str | None = None, *, description: str | None = None,
                  tags: list[str] | None = None, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Raw bytes (any contiguous buffer) or the contents of a readable binary file object."""
        return self._save("blob", lambda _name: serializers.blob_payload(data), to, description, tags, metadata)

    def save_torch(self, obj: Any, to: str | None = None, *, description: str | None = None,
                   tags: list[str] | None = None, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """`torch.save` of `obj`; an nn.Module is saved as its state_dict(). Returns when the bytes are spooled:
        training can modify the model right away."""
        return self._save("torch", lambda _name: serializers.torch_payload(obj), to, description, tags, metadata)

    def save_pkl(self, obj: Any, to: str | None = None, *, protocol: int | None = None,
                 description: str | None = None, tags: list[str] | None = None,
                 metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._save("pkl", lambda _name: serializers.pkl_payload(obj, protocol), to, description, tags,
                          metadata)

    def save_fig(self, fig: Any = None, to: str | None = None, *, dpi: float | str | None = None,
                 transparent: bool | None = None, bbox_inches: Any = None, format: str | None = None,
                 close: bool = True, description: str | None = None, tags: list[str] | None = None,
                 metadata: dict[str, Any] | None = None, **savefig_options: Any) -> dict[str, Any]:
        """A matplotlib figure (the current one when `fig` is None), format from the extension (default .png).

        `save_fig("loss.png")` works too (ML-Dash's form). The figure is closed once saved unless close=False.
        """
        if isinstance(fig, (str, os.PathLike)):
            if to is not None:
                raise InvalidInputError("save_fig: give the filename once, either first or as to=")
            fig, to = None, os.fspath(fig)
        if format is not None and not isinstance(format, str):
            raise InvalidInputError(f"save_fig: format must be a str such as 'png' or 'pdf', got {format!r}")
        fmt = format.lower().lstrip(".") if isinstance(format, str) else None
        default_ext = "." + (fmt or "png")
        options = {"dpi": dpi, "transparent": transparent, "bbox_inches": bbox_inches}
        options = {k: v for k, v in options.items() if v is not None} | savefig_options

        def build(filename: str) -> serializers.Payload:
            ext = extension(filename)[1:]
            if fmt is not None and fmt != ext and {fmt, ext} != {"jpg", "jpeg"} and {fmt, ext} != {"tif", "tiff"}:
                raise InvalidInputError(f"save_fig: format={fmt!r} but the filename {filename!r} says {ext!r}")
            return serializers.figure_payload(fig, fmt or ext, close=close, **options)

        return self._save("fig", build, to, description, tags, metadata, default_ext=default_ext)

    def save_video(self, frames: Any, to: str | None = None, *, fps: float = 20, codec: str | None = None,
                   quality: float | None = None, description: str | None = None, tags: list[str] | None = None,
                   metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Frames as MP4 (H.264; also .mov/.mkv/.avi) or GIF, by extension (default .mp4).

        `frames`: a list of (H,W) or (H,W,C) arrays, or a stacked (N,H,W) / (N,H,W,C) array; C in 1, 3, 4;
        uint8, bool, or float in [0, 1] (scaled to 0–255). `quality` 1–10 (ffmpeg formats).
        """
        def build(filename: str) -> serializers.Payload:
            return serializers.video_payload(frames, extension(filename), fps=fps, tmp_dir=self._exp._spool_tmp(),
                                             codec=codec, quality=quality)

        return self._save("video", build, to, description, tags, metadata, default_ext=".mp4")

    def save_image(self, image: Any, to: str | None = None, *, description: str | None = None,
                   tags: list[str] | None = None, metadata: dict[str, Any] | None = None,
                   **pil_options: Any) -> dict[str, Any]:
        """An (H,W), (H,W,1), (H,W,3) or (H,W,4) array or a PIL image, as PNG (default), JPEG, WebP…;
        floats in [0, 1] are scaled to 0–255. Options go to Pillow (e.g. quality=90 for JPEG)."""
        def build(filename: str) -> serializers.Payload:
            return serializers.image_payload(image, extension(filename), **pil_options)

        return self._save("image", build, to, description, tags, metadata, default_ext=".png")

    # ---- reading -------------------------------------------------------------------------------------
    def list(self, *, tags: list[str] | None = None, pattern: str | None = None, status: str | None = None,
             recursive: bool = True, strict: bool = False) -> list[dict[str, Any]]:
        """Files of this folder (and its sub-folders unless recursive=False), oldest first, whether still in the
        local spool or already committed; each dict has a `status`. Filters: all of `tags`, a glob `pattern`
        on the filename (or on the full path when it contains "/"), one `status`. If the catalog cannot be
        reached, the spool's files alone with a warning — or, with strict=True, CatalogUnavailableError."""
        if not isinstance(strict, bool):
            raise InvalidInputError(f"strict must be True or False, got {strict!r}")
        return self._exp._reader().list(self._exp.identity, prefix=self._folder, recursive=recursive,
                                        tags=names.validate_tags(tags), pattern=pattern, status=status, strict=strict)

    def get(self, file_id_or_path: int | str | None = None) -> dict[str, Any]:
        """One file's dict (with `status`), by id or by path ("best.pt" here, "/models/best.pt" from the root);
        a path means its newest version. Raises NotFoundError."""
        return self._exp._reader().resolve(self._exp.identity, self._target_ref(file_id_or_path),
                                           base=self._read_base(file_id_or_path))

    def download(self, file_id_or_path: int | str | None = None, dest_path: str | os.PathLike[str] | None = None,
                 *, overwrite: bool = True) -> str:
        """Write a file's bytes to `dest_path` (default: its filename in the current directory; an existing
        directory means "into it"), verified against its SHA256, atomically; returns the path written.

        Files still in the spool are read from there, others from the store. An existing destination is
        replaced (as ML-Dash does); pass overwrite=False to get FileExistsError instead.
        """
        reader = self._exp._reader()
        entry = reader.resolve(self._exp.identity, self._target_ref(file_id_or_path),
                               base=self._read_base(file_id_or_path))
        dest = dest_path if dest_path is not None else self._dest_path
        return reader.download(entry, dest, overwrite=overwrite)

    def wait(self, timeout: float | None = None) -> dict[str, str]:
        """Block until every file this experiment object saved under this folder is committed (or evicted after
        commit); returns id → status. Raises WaitTimeoutError (with `.pending`) or UploadFailedError."""
        return self._exp._wait(timeout, prefix=self._folder)

    # ---- internals -----------------------------------------------------------------------------------
    @property
    def _folder(self) -> str:
        """The folder this handle stands for in everything but the older form's own file (see `_as_folder`)."""
        return self._as_folder if self._as_folder is not None else self.prefix

    def _read_base(self, file_id_or_path: int | str | None) -> str:
        """Where a relative path read through this handle starts: the older form's own file (no argument) is
        next to the handle's prefix; a path given is in the folder."""
        return self.prefix if file_id_or_path is None else self._folder

    def _target_ref(self, file_id_or_path: int | str | None) -> int | str:
        if file_id_or_path is not None:
            return file_id_or_path
        if self._file_id is not None:
            return self._file_id
        if self._source is not None:
            return os.path.basename(os.fspath(self._source))
        raise InvalidInputError("which file? pass a file id or a path, e.g. download('best.pt') or "
                                "exp.files(file_id=...).download()")

    def _default_name(self) -> str | None:
        return os.path.basename(os.fspath(self._source)) if self._source is not None else None

    def _target(self, to: Any, method: str, default_name: str | None, default_ext: str | None) -> tuple[str, str]:
        """(prefix, filename) for `to`: a filename relative to this folder, possibly with sub-folders."""
        name = to if to is not None else default_name or self._default_name()
        if name is None:
            raise InvalidInputError(f"{method} needs a filename: {method}(..., to='name.ext')")
        if isinstance(name, os.PathLike):
            name = os.fspath(name)
        if not isinstance(name, str):
            raise InvalidInputError(f"{method}: to= must be a str filename, got {type(name).__name__}")
        name = unicodedata.normalize("NFC", name)
        if name.startswith(("/", "\\")):
            raise InvalidInputError(f"{method}: to={name!r} is an absolute path; to= is a filename relative to the "
                                    f"folder {self.path!r}, e.g. 'best.pt' or 'epoch-10/model.pt'")
        folder, _, filename = name.rpartition("/")
        try:
            filename = names.validate_filename(filename)
            prefix = names.validate_prefix(_join(self.prefix, folder)) if folder else self.prefix
        except InvalidInputError as exc:  # quote what the caller wrote, not the joined folder it became
            hint = (" (it is empty: give a filename, e.g. 'best.pt')" if not name else
                    " (it ends with '/': give a filename after the folder)" if not filename else "")
            raise InvalidInputError(f"{method}: to={name!r} is not a usable name{hint}: {exc}") from None
        if default_ext and not extension(filename):
            filename = names.validate_filename(filename + default_ext)
        settings = self._exp.settings
        object_key(namespace=self._exp.namespace, project=self._exp.project, experiment=self._exp.name,
                   prefix=prefix, file_id=_LONGEST_ID, filename=filename, root=store_root(settings.store))
        return prefix, filename

    def _save(self, method: str, build: Callable[[str], serializers.Payload], to: Any, description: str | None,
              tags: list[str] | None, metadata: dict[str, Any] | None, *, default_name: str | None = None,
              default_ext: str | None = None, own_file: bool = False) -> dict[str, Any]:
        # The older form's file (see __init__) names this handle's own upload, and a save's filename when no to= is
        # given; anything else through the handle — a save with to=, an upload of another file — means the folder.
        own_file = to is None and (method != "upload" or own_file)
        if self._as_folder is not None and not own_file:
            folder = FilesHandle(self._exp, self._as_folder, description=self._description, tags=self._tags,
                                 metadata=self._metadata)
            return folder._save(method, build, to, description, tags, metadata, default_name=default_name,
                                default_ext=default_ext)
        label = "upload" if method == "upload" else f"save_{method}"
        prefix, filename = self._target(to, label, default_name, default_ext)
        description = names.validate_description(description)
        spec_tags = names.validate_tags([*self._tags, *names.validate_tags(tags)])
        spec_metadata = {**self._metadata, **names.validate_metadata(metadata)}
        _check_metadata_size(description if description is not None else self._description, spec_tags,
                             spec_metadata)
        payload = build(filename)
        try:
            spec = EntrySpec(
                namespace=self._exp.namespace, project=self._exp.project, experiment=self._exp.name, prefix=prefix,
                filename=filename, content_type=content_type_for(filename, payload.kind), kind=payload.kind,
                description=description if description is not None else self._description,
                tags=spec_tags, metadata=spec_metadata)
            manifest = self._exp._enqueue(spec, payload)
        finally:
            payload.close()
        if payload.on_saved is not None:
            payload.on_saved()
        return _result(manifest)


def _check_metadata_size(description: str | None, tags: list[str], metadata: dict[str, Any]) -> None:
    """Description, tags and metadata travel in the manifest and the catalog document: keep them small (a
    manifest over the spool's limit would be quarantined by the daemon instead of uploaded)."""
    size = len(msgpack.packb([description, tags, metadata], use_bin_type=True))
    if size > MAX_METADATA_BYTES:
        raise InvalidInputError(f"description, tags and metadata take {size} bytes; at most {MAX_METADATA_BYTES} "
                                "are accepted — save large data as a file (save_json) instead")


def _result(manifest: Manifest) -> dict[str, Any]:
    return {**manifest.to_public(), "status": "queued"}


def _holds_tensors(content: Any) -> bool:
    """A dict/list carrying torch tensors (a state_dict, a checkpoint dict) belongs to torch.save, not JSON."""
    if "torch" not in sys.modules:
        return False
    values = content.values() if isinstance(content, dict) else content
    for value in list(values)[:1000]:
        if serializers.is_torch_object(value):
            return True
        if isinstance(value, dict) and any(serializers.is_torch_object(v) for v in list(value.values())[:1000]):
            return True
    return False


__all__ = ["FilesHandle", "store_root"]
