"""`flush()`/`wait()` say "committed" only for files committed where this process's settings read: a daemon
configured apart (a systemd unit with another store, a job started with other settings) delivers them elsewhere,
and the training script that checks `flush()` before freeing a node must not be told all is well."""

from __future__ import annotations

import pytest

from mldash import CommittedElsewhereError, Experiment
from mldash.config import Settings


def test_flush_refuses_to_report_files_a_daemon_committed_to_another_store(settings: Settings, drain,
                                                                          tmp_path) -> None:
    exp = Experiment(prefix="alice/project/run", settings=settings)
    saved = [exp.files("ckpt").save_blob(b"weights %d" % i, f"model-{i}.pt") for i in range(2)]
    elsewhere = settings.replace(store=(tmp_path / "the-units-store").as_uri())
    assert drain(elsewhere).committed == 2  # the daemon has its own configuration

    with pytest.raises(CommittedElsewhereError) as raised:
        exp.flush(timeout=10)
    assert set(raised.value.elsewhere) == {int(r["id"]) for r in saved}
    message = str(raised.value)
    assert f"store {elsewhere.store} (configured here: {settings.store})" in message, message
    assert "Give the daemon (systemd unit, job environment) and this process the same store" in message

    same = Experiment(prefix="alice/project/run", settings=elsewhere)  # configured as the daemon is: fine
    assert same._reader().wait([int(r["id"]) for r in saved], timeout=10) == {r["id"]: "evicted" for r in saved}


def test_spellings_of_one_target_are_the_same_target(settings: Settings) -> None:
    from mldash.targets import mismatch, sync_targets

    a = settings.replace(store="s3://ckpts/root", s3_endpoint_url="http://s3.lab:9000",
                         catalog="mongodb://alice:secret@db1:27017,db2/?authSource=admin")
    b = settings.replace(store="s3://ckpts/root/", s3_endpoint_url="http://s3.lab:9000/",
                         catalog="mongodb://db1:27017,db2")
    assert mismatch(sync_targets(a), sync_targets(b)) is None
    assert "secret" not in str(sync_targets(a))
    other_db = b.replace(mongo_database="elsewhere")
    assert mismatch(sync_targets(a), sync_targets(other_db)) is not None


@pytest.mark.parametrize(("one", "other"), [
    ("file:///{tmp}/a//store", "file:///{tmp}/a/store/"),
    ("file:///{tmp}/link/store", "file:///{tmp}/a/store"),  # $HOME through a symlink, as on many clusters
    ("file:///{tmp}/a/./x/../store", "file:///{tmp}/a/store"),
    ("s3://ckpts//root/", "s3://ckpts/root"),
], ids=["double-slash", "symlink", "dots", "s3-prefix"])
def test_more_spellings_of_one_store(settings: Settings, tmp_path, one: str, other: str) -> None:
    from mldash.targets import mismatch, sync_targets

    (tmp_path / "a" / "store").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    tmp = str(tmp_path).lstrip("/")
    a, b = (settings.replace(store=uri.format(tmp=tmp)) for uri in (one, other))
    assert mismatch(sync_targets(a), sync_targets(b)) is None, (sync_targets(a), sync_targets(b))


def test_more_spellings_of_one_catalog(settings: Settings, tmp_path) -> None:
    from mldash.targets import mismatch, sync_targets

    path = tmp_path / "catalog.sqlite"
    slashes = settings.replace(catalog=f"sqlite:///{path}")  # SQLAlchemy's four slashes for an absolute path
    assert mismatch(sync_targets(settings.replace(catalog=f"sqlite://{path}")), sync_targets(slashes)) is None
    ports = [settings.replace(catalog=uri) for uri in ("mongodb://DB1,db2:27017", "mongodb://db2,db1:27017")]
    assert mismatch(*(sync_targets(s) for s in ports)) is None
    assert mismatch(sync_targets(ports[0]), sync_targets(settings.replace(catalog="mongodb://db1:27018,db2"))) \
        is not None


def test_a_process_that_names_no_store_asks_nothing_of_where_files_went(settings: Settings, drain,
                                                                         tmp_path) -> None:
    """A job under the per-researcher service sets only its spool (the store settings sit in the service's
    environment file, which jobs cannot read): its `flush()` used to raise CommittedElsewhereError for every
    file, and `status --check` in a shell configured the same way reported a problem."""
    import subprocess
    import sys

    from mldash.config import Settings as S
    from tests.fixtures.daemon import settings_env

    service = settings.replace(store=(tmp_path / "the-services-store").as_uri())
    job = S.load(env={}, spool=str(settings.spool), autostart=False, save_timeout=2.0)  # store, catalog: defaults
    assert "store" not in job.explicit and "catalog" not in job.explicit
    exp = Experiment(prefix="alice/project/run", settings=job)
    saved = exp.files("ckpt").save_blob(b"weights", "model.pt")
    assert drain(service).committed == 1
    assert exp._reader().wait([int(saved["id"])], timeout=10) == {saved["id"]: "evicted"}
    exp.flush(timeout=10)
    env = {k: v for k, v in settings_env(job).items() if k not in ("MLDASH_STORE", "MLDASH_CATALOG")}
    shell = subprocess.run([sys.executable, "-m", "mldash_syncd", "status", "--check"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0 and "committed to" not in shell.stdout, shell.stdout


def test_files_committed_to_targets_that_differ_from_ours_alike_are_counted_together(tmp_path) -> None:
    """A configuration that names only its store: two daemons with that other store and different catalogs
    differ from it alike, and used to be reported as two identical lines."""
    from mldash.spool.states import State
    from mldash.targets import delivered_elsewhere, fingerprint
    from tests.test_spool_lifecycle import _index_with_entries

    index, ids = _index_with_entries(tmp_path, 3)
    try:
        for file_id, catalog in zip(ids, ("sqlite:///c1", "sqlite:///c2", "sqlite:///c1"), strict=True):
            index.transition(file_id, State.UPLOADED)
            index.transition(file_id, State.COMMITTED, committed_at=100.0 + file_id % 7,
                             committed_to=fingerprint({"store": "file:///x", "catalog": catalog}))
        found = delivered_elsewhere(index, {"store": "file:///ours"})
    finally:
        index.close()
    assert len(found) == 1 and found[0].files == 3 and found[0].bytes == 1 + 2 + 3, found
    assert found[0].where == "store file:///x (configured here: file:///ours)"
