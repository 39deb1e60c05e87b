"""Content types of artifacts: from the filename's extension first, then from the serializer that wrote them.

Our own table comes before Python's `mimetypes`, because `mimetypes` reads the host's /etc/mime.types and
would make the same save produce different catalog entries on different machines. Types with no IANA
registration (PyTorch, pickle, NumPy) use the ``application/x-…`` names common in the ecosystem.
"""

from __future__ import annotations

import mimetypes
import posixpath

OCTET_STREAM = "application/octet-stream"

_BY_EXTENSION: dict[str, str] = {
    # ML artifacts
    ".pt": "application/x-pytorch", ".pth": "application/x-pytorch", ".ckpt": "application/x-pytorch",
    ".pkl": "application/x-python-pickle", ".pickle": "application/x-python-pickle",
    ".npy": "application/x-npy", ".npz": "application/x-npz",
    ".safetensors": "application/x-safetensors", ".onnx": "application/x-onnx",
    ".h5": "application/x-hdf5", ".hdf5": "application/x-hdf5",
    # structured text
    ".json": "application/json", ".jsonl": "application/jsonl", ".ndjson": "application/x-ndjson",
    ".yaml": "application/yaml", ".yml": "application/yaml", ".toml": "application/toml",
    ".xml": "application/xml",
    ".txt": "text/plain", ".log": "text/plain", ".md": "text/markdown", ".csv": "text/csv",
    ".tsv": "text/tab-separated-values", ".html": "text/html", ".htm": "text/html", ".py": "text/x-python",
    # images and figures
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
    ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
    ".svg": "image/svg+xml", ".pdf": "application/pdf", ".eps": "application/postscript",
    ".ps": "application/postscript",
    # video
    ".mp4": "video/mp4", ".mov": "video/quicktime", ".mkv": "video/x-matroska", ".avi": "video/x-msvideo",
    ".webm": "video/webm",
    # archives
    ".zip": "application/zip", ".tar": "application/x-tar", ".gz": "application/gzip",
    ".tgz": "application/gzip", ".zst": "application/zstd",
}

# What each serializer produces when the filename's extension says nothing useful.
_BY_KIND: dict[str, str] = {
    "json": "application/json",
    "text": "text/plain",
    "torch": "application/x-pytorch",
    "pkl": "application/x-python-pickle",
    "npy": "application/x-npy",
    "blob": OCTET_STREAM,
    "upload": OCTET_STREAM,
}


def extension(filename: str) -> str:
    """The lower-case extension with its dot (".pt"), or "" when there is none."""
    return posixpath.splitext(filename)[1].lower()


def content_type_for(filename: str, kind: str | None = None) -> str:
    """The content type of `filename` as written by serializer `kind` (upload, json, text, blob, torch…).

    Text types carry ``; charset=utf-8`` because everything mldash writes as text is UTF-8 (and a browser
    opening a text/plain object without a charset guesses wrong for non-ASCII).
    """
    ext = extension(filename)
    found = _BY_EXTENSION.get(ext)
    if found is None and ext:
        guessed, encoding = mimetypes.guess_type("x" + ext, strict=True)
        found = guessed if guessed and not encoding else None
    if found is None:
        found = _BY_KIND.get(kind or "", OCTET_STREAM)
    if found.startswith("text/") and kind in ("text", "json"):
        return found + "; charset=utf-8"
    return found
