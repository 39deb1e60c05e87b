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
