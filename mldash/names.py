"""Validation of every user-supplied name that ends up in a path or an object key.

Names are compared after NFKC normalisation, because look-alikes such as fullwidth "．．" or "‥"
become ".." there; what is *stored* is the NFC form, so a user's spelling is kept. Rules, per
path component: not empty, not "." or "..", no NUL or other control characters (C0, DEL, C1), no line
separators or bidirectional-override characters (a name must read as it sorts: "evil\u202egnp.exe"), no
"/" or "\\" inside a component, valid Unicode (no lone surrogates, which is how Python spells a file name
in another encoding), at most 255 bytes in UTF-8. Tags follow the same character rules; descriptions and
metadata strings need only be valid Unicode.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from mldash.errors import InvalidInputError

MAX_COMPONENT_BYTES = 255
# One regex search instead of a generator over every character: names are checked on every save and for every
# manifest the daemon ingests (half of its start-up CPU for 1,000 entries went to per-character generators).
# Characters no name may hold: C0/DEL/C1 controls, line and paragraph separators, bidirectional marks and
# overrides, and lone surrogates (a file name that is not UTF-8, as os.fsdecode and os.listdir return it).
_FORBIDDEN_IN_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                                 "\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# What a stored manifest's names are checked against (`stored=True`): the rules older clients applied — path
# safety only. A save an earlier version accepted must still be uploaded, not quarantined by a newer daemon.
_UNSAFE_IN_STORED_NAMES = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_UNSAFE_IN_STORED_TAGS = re.compile("[\x00-\x1f\ud800-\udfff]")
MAX_METADATA_DEPTH = 100  # nesting levels of metadata; a cyclic dict or list is infinitely deep
STORED_METADATA_DEPTH = 400  # for manifests read back: older clients had no limit (the walk recurses per level)


def _bad_character(text: str, what: str, shown: str, rules: re.Pattern[str] = _FORBIDDEN_IN_NAMES
                   ) -> InvalidInputError | None:
    """The error for the first character of `text` no name may hold (under `rules`), or None."""
    match = rules.search(text)
    if match is None:
        return None
    char = match.group()
    if _SURROGATE.match(char):
        return InvalidInputError(
            f"{what} {shown!r} is not valid Unicode text (U+{ord(char):04X}, a lone surrogate: a file name in "
            "another encoding than UTF-8?); pass a UTF-8 name, e.g. to='model.pt'")
    return InvalidInputError(f"{what} {shown!r} contains a control or bidirectional-formatting character "
                             f"(U+{ord(char):04X}); printable text only")


def _check_text(text: str, what: str) -> str:
    """Any stored string (description, metadata): must encode to UTF-8."""
    match = _SURROGATE.search(text)
    if match is not None:
        raise InvalidInputError(f"{what} {text[:80]!r} is not valid Unicode text (U+{ord(match.group()):04X}, a "
                                "lone surrogate); decode bytes before passing them as text")
    return text


def _check_component(component: str, what: str, full: str, stored: bool = False) -> str:
    if not component:
        raise InvalidInputError(f"{what} {full!r} has an empty path component; use names like 'checkpoints'")
    error = _bad_character(component, what, full, _UNSAFE_IN_STORED_NAMES if stored else _FORBIDDEN_IN_NAMES)
    if error is not None:
        raise error
    folded = unicodedata.normalize("NFKC", component)
    if folded in (".", "..") or "/" in folded or "\\" in folded:
        acts = f"that acts as {folded!r}" if folded != component else "that holds a path separator or is '.'/'..'"
        raise InvalidInputError(
            f"{what} {full!r} has component {component!r} {acts} (a path escape); "
            "'.', '..', '/' and '\\' are not accepted, even as look-alike characters"
        )
    if not stored and (component[0].isspace() or component[-1].isspace()):
        # ' model.pt' and 'model.pt' look the same in every listing, and become different keys: refused on save
        # (names saved by earlier versions, `stored`, are still uploaded).
        raise InvalidInputError(f"{what} {full!r} has component {component!r} with leading or trailing whitespace; "
                                "names may hold spaces, but not at their ends")
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


def validate_segment(value: object, what: str, *, stored: bool = False) -> str:
    """One path component: a namespace, project, experiment or filename. `stored`: a name read back from a
    manifest, checked against the rules it was saved under (path safety; see _UNSAFE_IN_STORED_NAMES)."""
    text = _require_str(value, what)
    if "/" in text:
        raise InvalidInputError(f"{what} {text!r} must be a single name without '/'")
    return _check_component(text, what, text, stored)


def validate_filename(value: object) -> str:
    return validate_segment(value, "filename")


def validate_prefix(value: object, *, stored: bool = False) -> str:
    """A logical folder such as "checkpoints" or "/models/checkpoints"; returns "models/checkpoints".

    A leading or trailing "/" is accepted (ML-Dash writes prefixes as "/models"); "" and "/" mean
    the experiment's root.
    """
    if value is None:
        return ""
    text = _require_str(value, "prefix").strip("/")
    if not text:
        return ""
    return "/".join(_check_component(part, "prefix", text, stored) for part in text.split("/"))


def validate_tags(tags: object, *, stored: bool = False) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str) or not isinstance(tags, (list, tuple, set, frozenset)):
        raise InvalidInputError(f"tags must be a list of str, got {type(tags).__name__} {tags!r}")
    out: list[str] = []
    seen: set[str] = set()  # dedup in O(n): `tag not in out` made 50k tags take half a minute
    for tag in tags:
        if not isinstance(tag, str):
            raise InvalidInputError(f"tag {tag!r} is a {type(tag).__name__}; every tag must be a str")
        if not tag or len(tag) > 256:
            raise InvalidInputError(f"tag {tag!r} must be 1–256 printable characters")
        error = _bad_character(tag, "tag", tag, _UNSAFE_IN_STORED_TAGS if stored else _FORBIDDEN_IN_NAMES)
        if error is not None:
            raise error
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
    return _check_text(description, "description")


def validate_metadata(metadata: object, *, stored: bool = False) -> dict:
    """JSON-serialisable metadata: str keys; None, bool, int, float, str, list and dict values.

    Returns a copy: what is saved is the metadata as it was when checked, whatever the caller changes later
    (a handle keeps it for every later save; a config dict that gets a NaN afterwards must not reach them).
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidInputError(f"metadata must be a dict, got {type(metadata).__name__}")
    # A stored manifest (an older client set no depth limit) gets the most Python's recursion allows with margin.
    return _json_copy(metadata, "metadata", 0, STORED_METADATA_DEPTH if stored else MAX_METADATA_DEPTH)


def _json_copy(value: object, where: str, depth: int, limit: int = MAX_METADATA_DEPTH) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _check_text(value, where)
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidInputError(f"{where} = {value} does not fit in 64 bits")
        return int(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidInputError(f"{where} = {value} is not valid JSON (NaN/Infinity)")
        return float(value)
    if isinstance(value, (list, tuple, dict)) and depth >= limit:
        raise InvalidInputError(f"{where[:200]}… is nested deeper than {limit} levels (or contains "
                                "itself); metadata must be a JSON tree")
    if isinstance(value, (list, tuple)):
        return [_json_copy(item, f"{where}[{i}]", depth + 1, limit) for i, item in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{where} has a non-str key {key!r}; JSON object keys are str")
            _check_text(key, f"{where} key")
            out[key] = _json_copy(item, f"{where}[{key!r}]", depth + 1, limit)
        return out
    raise InvalidInputError(
        f"{where} is a {type(value).__name__} ({value!r:.80}), which is not JSON-serialisable; "
        "accepted: None, bool, int, float, str, list, dict"
    )
