"""A daemon task that ends by an error nobody expected is said at once, with its traceback — not left for asyncio's
"exception was never retrieved" when the task is collected, minutes later, or never."""

from __future__ import annotations

import logging

import pytest

from mldash.config import Settings
from tests.fixtures.daemon import enqueue_bytes
from tests.reliability.helpers import ServiceThread, all_in, wait_for


def test_an_eviction_pass_that_fails_unexpectedly_is_logged_and_the_next_pass_runs(
        settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import mldash_syncd.service as service

    calls = []
    remove_files = service.remove_files

    def broken_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a bug in eviction")
        return remove_files(*args, **kwargs)

    monkeypatch.setattr(service, "remove_files", broken_once)
    entries = [enqueue_bytes(settings, b"x" * 100, filename=f"{i}.bin") for i in range(3)]
    with caplog.at_level(logging.ERROR, logger="mldash_syncd"):
        daemon = ServiceThread(settings).start()
        try:
            wait_for(lambda: all_in(settings, [e.id for e in entries], ("evicted",)), timeout=30,
                     what="eviction after the failed pass")
        finally:
            daemon.stop()
    said = [r for r in caplog.records if "evict ended by an error: RuntimeError: a bug in eviction" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is not None, [r.getMessage() for r in caplog.records]
    assert len(calls) >= 2  # the next pass ran
