"""The quota ledger: admissions with a quota set do not list blobs/ on every save, and the ledger never
understates what blobs/ holds (which would let the spool grow past its quota).

Removals that share a timestamp tick with the ledger's record are simulated by putting the directory's
mtime back with os.utime — the one change the ledger cannot see.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mldash.spool.quota as quota
from mldash.errors import SpoolFullError
from mldash.spool.enqueue import Enqueuer
from mldash.spool.layout import SpoolLayout
from mldash.spool.quota import quota_lock, spooled_bytes
from tests.spool_helpers import assert_spool_integrity, make_settings, put

MiB = 2**20  # the smallest quota (config.MIN_SPOOL_QUOTA)


def _counting_sums(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = quota.spooled_bytes

    def counted(layout: SpoolLayout) -> int:
        calls.append(1)
        return real(layout)

    monkeypatch.setattr(quota, "spooled_bytes", counted)
    return calls


def _same_tick(layout: SpoolLayout, change) -> None:
    """Run `change` on blobs/ and put the directory's timestamps back, as if it happened in the ledger's tick."""
    before = os.stat(layout.blobs_dir)
    change()
    os.utime(layout.blobs_dir, ns=(before.st_atime_ns, before.st_mtime_ns))


def _spool_with_one_blob(tmp_path: Path) -> SpoolLayout:
    """A spool whose blobs/ holds 100 bytes, and whose ledger has recorded them."""
    layout = SpoolLayout(tmp_path / "spool")
    layout.ensure()
    (layout.blobs_dir / "1.blob").write_bytes(b"a" * 100)
    with quota_lock(layout) as ledger:
        assert ledger.used() == 100
    return layout


def test_admissions_sum_blobs_once_while_nothing_else_changes_it(tmp_path: Path, monkeypatch) -> None:
    enqueuer = Enqueuer(make_settings(tmp_path / "spool", spool_quota="10MiB"))
    sums = _counting_sums(monkeypatch)
    saved = [put(enqueuer, os.urandom(1000 + n), f"{n}.bin") for n in range(40)]
    assert len(sums) == 1, f"blobs/ was listed {len(sums)} times for 40 saves"
    with quota_lock(enqueuer.layout) as ledger:
        assert ledger.used() == sum(m.size for m in saved) == spooled_bytes(enqueuer.layout)
    assert_spool_integrity(enqueuer.layout)


def test_a_removal_makes_the_next_admission_sum_again(tmp_path: Path, monkeypatch) -> None:
    enqueuer = Enqueuer(make_settings(tmp_path / "spool", spool_quota="10MiB"))
    saved = [put(enqueuer, os.urandom(1000), f"{n}.bin") for n in range(3)]
    sums = _counting_sums(monkeypatch)
    os.unlink(enqueuer.layout.blob_path(saved[0].id))  # as eviction does, in a later tick
    os.utime(enqueuer.layout.blobs_dir, ns=(0, os.stat(enqueuer.layout.blobs_dir).st_mtime_ns + 1_000_000))
    put(enqueuer, os.urandom(1000), "after.bin")
    assert len(sums) == 1
    with quota_lock(enqueuer.layout) as ledger:
        assert ledger.used() == 3000


def test_an_overstating_ledger_never_refuses_a_save_that_fits(tmp_path: Path) -> None:
    enqueuer = Enqueuer(make_settings(tmp_path / "spool", spool_quota="3MiB", save_timeout=0.2))
    layout = enqueuer.layout
    saved = [put(enqueuer, os.urandom(MiB), f"{n}.bin") for n in range(3)]
    _same_tick(layout, lambda: os.unlink(layout.blob_path(saved[0].id)))  # the ledger still says 3 MiB
    with quota_lock(layout) as ledger:
        assert ledger.used() == 3 * MiB  # what the test is about: the ledger could not see that removal
    put(enqueuer, os.urandom(MiB), "fits.bin")  # 2 MiB + 1 MiB ≤ 3 MiB: must be admitted, not wait and fail


def test_a_save_that_does_not_fit_sums_blobs_once_per_attempt(tmp_path: Path, monkeypatch) -> None:
    enqueuer = Enqueuer(make_settings(tmp_path / "spool", spool_quota="3MiB", save_timeout=0))
    layout = enqueuer.layout
    for n in range(3):
        put(enqueuer, os.urandom(MiB), f"{n}.bin")
    os.utime(layout.blobs_dir, ns=(0, os.stat(layout.blobs_dir).st_mtime_ns + 1_000_000))  # the ledger is stale
    sums = _counting_sums(monkeypatch)
    with pytest.raises(SpoolFullError, match="3145728 of 3145728 bytes in use"):
        put(enqueuer, os.urandom(MiB), "one-too-many.bin")
    assert len(sums) == 1, "a sum just made is not made again to check the ledger's word"


def test_a_writer_that_died_while_linking_makes_the_next_admission_sum_again(tmp_path: Path) -> None:
    layout = _spool_with_one_blob(tmp_path)
    with quota_lock(layout) as ledger:
        assert ledger.used() == 100
        ledger.linking()
        # ...it links its blob, in the same tick as the ledger's record, and dies before `linked`.
        _same_tick(layout, lambda: (layout.blobs_dir / "2.blob").write_bytes(b"b" * 50))
    with quota_lock(layout) as ledger:
        assert ledger.used() == 150


def test_a_torn_or_foreign_ledger_is_summed_again(tmp_path: Path) -> None:
    layout = _spool_with_one_blob(tmp_path)
    record = layout.quota_lock_path.read_bytes()
    for damaged in (record[:-1], record[:5] + bytes([record[5] ^ 1]) + record[6:], b"", b"x" * len(record)):
        _same_tick(layout, lambda: (layout.blobs_dir / "2.blob").write_bytes(b"b" * 50))
        layout.quota_lock_path.write_bytes(damaged)
        with quota_lock(layout) as ledger:
            assert ledger.used() == spooled_bytes(layout)
        (layout.blobs_dir / "2.blob").unlink()


_OPS = st.lists(st.tuples(st.sampled_from(["admit", "remove", "remove_same_tick", "die_linking"]),
                          st.integers(1, 5000)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_the_ledger_never_understates_blobs(tmp_path_factory, ops) -> None:
    layout = SpoolLayout(tmp_path_factory.mktemp("ledger") / "spool")
    layout.ensure()
    names = iter(range(10**6))
    for op, size in ops:
        existing = sorted(layout.blobs_dir.iterdir())
        with quota_lock(layout) as ledger:
            if op == "admit":
                ledger.used()
                ledger.linking()
                (layout.blobs_dir / f"{next(names)}.blob").write_bytes(b"x" * size)
                ledger.linked(size)
            elif op == "die_linking":
                ledger.used()
                ledger.linking()
                blob = layout.blobs_dir / f"{next(names)}.blob"
                _same_tick(layout, lambda blob=blob, size=size: blob.write_bytes(b"x" * size))
            elif existing:
                victim = existing[size % len(existing)]
                if op == "remove":
                    victim.unlink()
                else:
                    _same_tick(layout, victim.unlink)
        with quota_lock(layout) as ledger:
            actual = spooled_bytes(layout)
            assert ledger.used() >= actual, (op, ops)
            assert ledger.used(fresh=True) == actual


def test_ledger_linked_without_used_is_a_programming_error(tmp_path: Path) -> None:
    layout = SpoolLayout(tmp_path / "spool")
    layout.ensure()
    with quota_lock(layout) as ledger, pytest.raises(RuntimeError, match="without used"):
        ledger.linked(10)


def test_status_shows_what_the_spool_and_its_quota_hold(tmp_path: Path) -> None:
    from mldash_syncd.cli import status_data

    settings = make_settings(tmp_path / "spool", spool_quota="1MiB")
    enqueuer = Enqueuer(settings)
    saved = [put(enqueuer, os.urandom(1000 * (n + 1)), f"{n}.bin") for n in range(3)]
    disk = status_data(settings)["disk"]
    assert disk["quotaBytes"] == 2**20
    assert disk["quotaUsedBytes"] == sum(m.size for m in saved) == 6000
    assert disk["spoolBytes"] > disk["quotaUsedBytes"]  # the manifests are on disk too
    assert disk["filesystemFreeBytes"] > 0
