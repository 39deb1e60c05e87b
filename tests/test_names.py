"""Hostile names never reach a path or an object key, and every refusal names the value."""

from __future__ import annotations

import pytest

from mldash import names
from mldash.errors import InvalidInputError
from mldash.keys import MAX_KEY_BYTES, object_key


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


HOSTILE_SEGMENTS = [
    "", ".", "..", "．．", "‥", "﹒﹒", "․․", "．", "a/b", "/etc/passwd", "../x", "a\\b", "\\", "／", "a／b",
    "a\x00b", "\x00", "line\nbreak", "tab\there", "del\x7f", "a" * 256, "é" * 128, "😀" * 64,
    # C1 controls (\x9b is the ANSI CSI), line separators, bidi overrides ("evil\u202egnp.exe" shows as
    # "evilexe.png"), and a lone surrogate: a file name in another encoding, as os.listdir returns it.
    "a\x85b", "log\x9b31m.txt", "a\u2028b", "model\u202egnp.exe", "x\u2066y", "rtl\u200f", "model-\udce9.pt",
]


@pytest.mark.parametrize("value", HOSTILE_SEGMENTS, ids=repr)
def test_hostile_segments_are_refused_naming_the_value(value: str) -> None:
    for validate in (names.validate_filename, lambda v: names.validate_segment(v, "experiment")):
        with pytest.raises(InvalidInputError) as info:
            validate(value)
        assert repr(value[:60]) in str(info.value) or repr(value) in str(info.value), str(info.value)


@pytest.mark.parametrize("value", ["../x", "a/../b", "a/./b", "a//b", "a/．．/b", "‥/etc", "a\x00/b",
                                   "x/" + "b" * 256, "a\\..\\b"], ids=repr)
def test_hostile_prefixes_are_refused_naming_the_value(value: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        names.validate_prefix(value)
    assert repr(value.strip("/")[:60]) in str(info.value), str(info.value)


def test_why_a_lookalike_is_refused_is_explained() -> None:
    with pytest.raises(InvalidInputError, match=r"'‥' that acts as '\.\.' \(a path escape\)"):
        names.validate_filename("‥")
    with pytest.raises(InvalidInputError, match=r"'file\\\\x' that holds a path separator or is '\.'/'\.\.' \("):
        names.validate_filename("file\\x")


@pytest.mark.parametrize("value", [" c", "c ", " ", "\u3000model.pt", "model.pt\u00a0"], ids=repr)
def test_names_may_not_start_or_end_with_whitespace(value: str) -> None:
    for validate in (names.validate_filename, lambda v: names.validate_segment(v, "experiment"),
                     names.validate_prefix):
        with pytest.raises(InvalidInputError, match="with leading or trailing whitespace; names may hold spaces"):
            validate(value)
    assert names.validate_filename("my model.pt") == "my model.pt"  # inside a name, spaces are fine
    # A manifest saved by an earlier version with such a name is still read (and uploaded).
    assert names.validate_segment(value, "filename", stored=True) == value


@pytest.mark.parametrize(("value", "expected"), [
    ("model.pt", "model.pt"), ("a..b", "a..b"), ("...", "..."), ("…", "…"), (".hidden", ".hidden"),
    ("e\u0301", "é"),                       # NFD in, NFC kept
    ("ｆｕｌｌ", "ｆｕｌｌ"),                    # look-alikes that are not separators are kept as typed
    ("a" * 255, "a" * 255), ("é" * 127, "é" * 127),
])
def test_ordinary_names_are_kept(value: str, expected: str) -> None:
    assert names.validate_filename(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (None, ""), ("", ""), ("/", ""), ("/models/checkpoints/", "models/checkpoints"), ("ckpt", "ckpt"),
])
def test_prefix_forms(value: str | None, expected: str) -> None:
    assert names.validate_prefix(value) == expected


@pytest.mark.parametrize("value", [None, 3, b"bytes", ["a"]], ids=repr)
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(InvalidInputError, match="must be a str"):
        names.validate_filename(value)


def test_keys_over_1024_bytes_are_refused_naming_the_file() -> None:
    prefix = "/".join(["p" * 250] * 4)
    filename = "model-final.pt"
    with pytest.raises(InvalidInputError) as info:
        object_key(namespace="ns", project="proj", experiment="exp", prefix=prefix, file_id=1, filename=filename)
    message = str(info.value)
    assert repr(filename) in message and f"> {MAX_KEY_BYTES}" in message, message
    # just under the limit is fine
    key = object_key(namespace="ns", project="proj", experiment="exp", prefix="p" * 900, file_id=1, filename="f")
    assert len(key.encode()) <= MAX_KEY_BYTES


@pytest.mark.parametrize(("tags", "fragment"), [
    ("single", "must be a list of str"), ([1], "tag 1 is a int"), (["a\x00"], "tag 'a\\x00'"),
    (["x" * 257], "1–256 printable"), ([""], "tag ''"),
    (["best\x7f"], "control or bidirectional-formatting character (U+007F)"),
    (["a\u202eb"], "(U+202E)"), (["a\ud800"], "is not valid Unicode text (U+D800"),
])
def test_bad_tags(tags: object, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        names.validate_tags(tags)
    assert fragment in str(info.value)


def test_tags_are_deduplicated_in_order() -> None:
    assert names.validate_tags(("b", "a", "b")) == ["b", "a"]
    assert names.validate_tags(None) == []


@pytest.mark.parametrize(("metadata", "fragment"), [
    ({"lr": float("nan")}, "metadata['lr'] = nan"),
    ({"a": [1, float("inf")]}, "metadata['a'][1] = inf"),
    ({"blob": b"x"}, "metadata['blob'] is a bytes"),
    ({"s": {1, 2}}, "metadata['s'] is a set"),
    ({1: "x"}, "non-str key 1"),
    ({"big": 2**64}, "metadata['big'] = 18446744073709551616 does not fit"),
    ([1], "metadata must be a dict"),
    ({"\ud800": 1}, "is not valid Unicode text (U+D800"),
    ({"k": ["ok", "bad\udcff"]}, "metadata['k'][1] 'bad\\udcff' is not valid Unicode text"),
    ({"d": _nested(150)}, "is nested deeper than 100 levels (or contains itself)"),
])
def test_bad_metadata_names_the_path(metadata: object, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        names.validate_metadata(metadata)
    assert fragment in str(info.value), str(info.value)


def test_cyclic_metadata_is_refused() -> None:
    cyclic: dict = {"name": "run"}
    cyclic["parent"] = cyclic
    with pytest.raises(InvalidInputError, match=r"metadata\['parent'\]\['parent'\].*contains itself"):
        names.validate_metadata(cyclic)


def test_metadata_is_copied_when_checked() -> None:
    """What is saved is the metadata as checked: a config dict the caller changes later (a NaN appears) must
    not reach a handle's later saves unchecked."""
    config = {"lr": 0.1, "layers": [1, 2]}
    checked = names.validate_metadata(config)
    config["lr"] = float("nan")
    config["layers"].append({3})
    assert checked == {"lr": 0.1, "layers": [1, 2]}


def test_description_must_be_valid_unicode() -> None:
    with pytest.raises(InvalidInputError, match=r"description '\\ud800' is not valid Unicode text"):
        names.validate_description("\ud800")


def test_good_metadata_and_description() -> None:
    metadata = {"lr": 1e-3, "layers": [1, 2, {"k": None}], "ok": True, "name": "x"}
    assert names.validate_metadata(metadata) == metadata
    assert names.validate_description(None) is None
    with pytest.raises(InvalidInputError, match="65537 characters"):
        names.validate_description("d" * 65_537)
