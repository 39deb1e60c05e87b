"""Validation of every user-supplied name that ends up in a path or an object key.

Names are compared after NFKC normalisation, because look-alikes such as fullwidth "．．" or "‥"
become ".." there; what is *stored* is the NFC form, so a user's spelling is kept. Rules, per
path component: not empty, not "." or "..", no NUL or other control characters, no "/" or "\\"
inside a component, at most 255 bytes in UTF-8.
"""

from __future__ import annotations

import re
import unicodedata

from mldash.errors import InvalidInputError

MAX_COMPONENT_BYTES = 255
# One regex search instead of a generator over every character: names are checked on every save and for every
# manifest the daemon ingests (half of its start-up CPU for 1,000 entries went to per-character generators).
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
_BELOW_SPACE = re.compile(r"[\x00-\x1f]")


def _check_component(component: str, what: str, full: str) -> str:
    if not component:
        raise InvalidInputError(f"{what} {full!r} has an empty path component; use names like 'checkpoints'")
    if _CONTROL_CHARACTER.search(component):
        raise InvalidInputError(f"{what} {full!r} contains a NUL or control character; printable text only")
    folded = unicodedata.normalize("NFKC", component)
    if folded in (".", "..") or "/" in folded or "\\" in folded:
        raise InvalidInputError(
            f"{what} {full!r} has component {component!r} that acts as {folded!r} (a path escape); "
            "'.', '..', '/' and '\\' are not accepted, even as look-alike characters"
        )
    size = len(component.encode("utf-8"))
    if size > MAX_COMPONENT_BYTES:
        raise InvalidInputError(
            f"{what} {full[:60]!r}… has a component of {size} bytes; at most {MAX_COMPONENT_BYTES} "
            "bytes (UTF-8) are accepted"
        )
    return component


def _require_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a str, got {type(value).__name__} {value!r}")
    return unicodedata.normalize("NFC", value)


def validate_segment(value: object, what: str) -> str:
    """One path component: a namespace, project, experiment or filename."""
    text = _require_str(value, what)
    if "/" in text:
        raise InvalidInputError(f"{what} {text!r} must be a single name without '/'")
    return _check_component(text, what, text)


def validate_filename(value: object) -> str:
    return validate_segment(value, "filename")


def validate_prefix(value: object) -> str:
    """A logical folder such as "checkpoints" or "/models/checkpoints"; returns "models/checkpoints".

    A leading or trailing "/" is accepted (ML-Dash writes prefixes as "/models"); "" and "/" mean
    the experiment's root.
    """
    if value is None:
        return ""
    text = _require_str(value, "prefix").strip("/")
    if not text:
        return ""
    return "/".join(_check_component(part, "prefix", text) for part in text.split("/"))


def validate_tags(tags: object) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str) or not isinstance(tags, (list, tuple, set, frozenset)):
        raise InvalidInputError(f"tags must be a list of str, got {type(tags).__name__} {tags!r}")
    out: list[str] = []
    seen: set[str] = set()  # dedup in O(n): `tag not in out` made 50k tags take half a minute
    for tag in tags:
        if not isinstance(tag, str):
            raise InvalidInputError(f"tag {tag!r} is a {type(tag).__name__}; every tag must be a str")
        if not tag or len(tag) > 256 or _BELOW_SPACE.search(tag):
            raise InvalidInputError(f"tag {tag!r} must be 1–256 printable characters")
        if tag not in seen:
            seen.add(tag)
            out.append(tag)
    return out


def validate_description(description: object) -> str | None:
    if description is None:
        return None
    if not isinstance(description, str):
        raise InvalidInputError(f"description must be a str, got {type(description).__name__}")
    if len(description) > 65_536:
        raise InvalidInputError(f"description is {len(description)} characters; at most 65536 are accepted")
    return description


def validate_metadata(metadata: object) -> dict:
    """JSON-serialisable metadata: str keys; None, bool, int, float, str, list and dict values."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidInputError(f"metadata must be a dict, got {type(metadata).__name__}")
    _check_json(metadata, "metadata")
    return metadata


def _check_json(value: object, where: str) -> None:
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidInputError(f"{where} = {value} does not fit in 64 bits")
        return
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidInputError(f"{where} = {value} is not valid JSON (NaN/Infinity)")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{where} has a non-str key {key!r}; JSON object keys are str")
            _check_json(item, f"{where}[{key!r}]")
        return
    raise InvalidInputError(
        f"{where} is a {type(value).__name__} ({value!r:.80}), which is not JSON-serialisable; "
        "accepted: None, bool, int, float, str, list, dict"
    )
