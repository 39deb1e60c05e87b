"""Scenario 12: hostile names, prefixes, filenames, tags and metadata (hypothesis) through the public API.

Every generated save either succeeds or raises InvalidInputError whose message names the input it
refused (nothing else may escape: no OSError from a path that went somewhere, no TypeError). Then one
daemon drain uploads every accepted save, and:
- nothing was created outside the spool, the store and the catalog (the sandbox is walked, symlinks
  included); every stored file resolves inside the store's root;
- every object key is at most 1024 bytes (UTF-8) and lies under its own experiment's prefix
  (`files/{namespace}/{project}/{experiment}/`), including with an S3 root prefix;
- the invariants hold (each accepted save committed once, with its bytes).
The alphabet favours what breaks paths: separators, dots and their NFKC look-alikes ("．", "‥", "﹒",
"／", "＼"), NUL and control characters, 4-byte characters (255-*byte* limits) and long runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from mldash import Experiment, InvalidInputError
from mldash.config import Settings
from mldash.keys import MAX_KEY_BYTES, experiment_key_prefix
from mldash_syncd import drain
from tests.reliability.conftest import loop_count
from tests.reliability.invariants import check_invariants, list_keys

NASTY = ["/", "\\", ".", "..", "\x00", "\n", "\x7f", "．", "‥", "﹒", "／", "＼", "~", ":", "*", "?", "%2e", " ",
         "\u202e", "é", "e\u0301", "😀", "𝔘", "ǅ", "$", "{", "'", '"']
SAFE = list("abcXYZ019_-")


def hostile_text(max_size: int = 40) -> st.SearchStrategy[str]:
    pieces = st.one_of(st.sampled_from(NASTY), st.sampled_from(SAFE), st.text(min_size=1, max_size=3),
                       st.sampled_from(["..", "../..", "/..", "x" * 250, "😀" * 64, "é" * 130]))
    return st.lists(pieces, min_size=0, max_size=max_size).map("".join)


# Unusual but legal: any printable character except the separators (NFKC look-alikes of "/" or "." get refused).
weird = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/\\"), min_size=1,
                max_size=30)


def name(default: str, max_size: int = 12) -> st.SearchStrategy[str]:
    return st.one_of(st.just(default), weird, weird, hostile_text(max_size))


json_leaves = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                        st.floats(allow_nan=True, allow_infinity=True), hostile_text(8), st.binary(max_size=4))
metadata = st.one_of(st.none(), st.dictionaries(
    st.one_of(hostile_text(6), st.integers()),
    st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text(4), inner,
                                                                                         max_size=3), max_leaves=6),
    max_size=4))
saves = st.fixed_dictionaries({
    "namespace": name("ns"),
    "project": name("proj"),
    "name": name("exp"),
    "prefix": st.one_of(name("ckpt", 60), st.lists(weird, min_size=1, max_size=8).map("/".join)),
    "to": st.one_of(name("model.pt", 60), st.lists(weird, min_size=1, max_size=3).map("/".join)),
    "tags": st.one_of(st.none(), st.lists(st.one_of(weird, hostile_text(10)), max_size=4)),
    "metadata": metadata,
    "description": st.one_of(st.none(), weird, hostile_text(20)),
})

# Words a refusal must use to say which input it refused.
NAMED = ("namespace", "project", "experiment", "prefix", "filename", "to=", "tag", "metadata", "description",
         "key", "name")


def save_one(settings: Settings, case: dict[str, Any], accepted: list[dict[str, Any]]) -> None:
    try:
        exp = Experiment(namespace=case["namespace"], project=case["project"], name=case["name"], settings=settings)
        result = exp.files(case["prefix"]).save_blob(os.urandom(64), to=case["to"], tags=case["tags"],
                                                     metadata=case["metadata"], description=case["description"])
    except InvalidInputError as exc:
        message = str(exc)
        assert message and any(word in message for word in NAMED), f"unclear refusal: {message!r}"
        return
    accepted.append({**result, "_exp": (exp.namespace, exp.project, exp.name)})


def assert_nothing_outside(sandbox: Path, allowed: set[str]) -> None:
    for entry in sandbox.iterdir():
        assert entry.name in allowed, f"created outside the spool/store/catalog: {entry}"
    store = (sandbox / "store").resolve()
    for path in (sandbox / "store").rglob("*"):
        assert not path.is_symlink(), f"symlink in the store: {path}"
        assert path.resolve().is_relative_to(store), f"{path} resolves outside the store"


def assert_keys(settings: Settings, accepted: list[dict[str, Any]], root: str = "") -> None:
    keys = list_keys(settings)
    assert len(keys) == len(accepted)
    by_id = {str(r["id"]): r for r in accepted}
    for key in keys:
        assert len(key.encode("utf-8")) <= MAX_KEY_BYTES, f"key of {len(key.encode())} bytes: {key[:80]!r}…"
        file_id = key.split("/")[-2]
        namespace, project, experiment = by_id[file_id]["_exp"]
        prefix = experiment_key_prefix(namespace=namespace, project=project, experiment=experiment, root=root)
        assert key.startswith(prefix), f"{key!r} is not under its experiment's prefix {prefix!r}"
        assert ".." not in key.split("/"), key


def run_hostile(settings: Settings, examples: int) -> list[dict[str, Any]]:
    accepted: list[dict[str, Any]] = []

    @hyp_settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(saves)
    def attempt(case: dict[str, Any]) -> None:
        save_one(settings, case, accepted)

    attempt()
    return accepted


def test_hostile_names_local_store(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    local = settings.replace(spool=sandbox / "spool", store=(sandbox / "store").as_uri(),
                             catalog="sqlite://" + str(sandbox / "catalog.sqlite"))
    accepted = run_hostile(local, loop_count(request, 300))
    print(f"hostile input: {len(accepted)} saves accepted and checked downstream")
    assert len(accepted) >= 10, "hypothesis produced almost no valid saves: the test checks nothing downstream"
    report = drain(local, max_wait=120)
    assert report.committed == len(accepted) and report.clean, report
    assert_nothing_outside(sandbox, {"spool", "store", "catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"})
    assert_keys(local, accepted)
    check_invariants(local, accepted)


def test_hostile_names_s3_with_root_prefix(s3_settings: Settings, request: pytest.FixtureRequest) -> None:
    accepted = run_hostile(s3_settings, loop_count(request, 100))
    report = drain(s3_settings, max_wait=120)
    assert report.committed == len(accepted) and report.clean, report
    assert_keys(s3_settings, accepted, root="root")
    check_invariants(s3_settings, accepted)


@pytest.mark.parametrize("to", ["a" * 300, "é" * 200 + ".bin", "x/" * 520 + "f", "😀" * 70])
def test_names_over_the_limits_are_refused_clearly(settings: Settings, to: str) -> None:
    exp = Experiment(prefix="ns/proj/exp", settings=settings)
    with pytest.raises(InvalidInputError) as refused:
        exp.files("ckpt").save_blob(b"x", to=to)
    assert "bytes" in str(refused.value)
    assert not any(SpoolLayoutFiles(settings)), "a refused save left something in the spool"
    check_invariants(settings)  # nothing stored, nothing catalogued, nothing pending


def SpoolLayoutFiles(settings: Settings) -> list[Path]:
    spool = Path(settings.spool)
    return [p for p in spool.rglob("*") if p.is_file() and p.parent.name in ("blobs", "manifests", "tmp")]
