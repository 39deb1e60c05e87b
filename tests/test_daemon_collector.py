"""The cyclic garbage collector is paused during the daemon's start-up only, and always given back."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

from mldash.config import Settings
from mldash.store import make_store
from tests.faults.wrapped import Wrapped
from tests.fixtures.daemon import enqueue_bytes


class _RecordsCollectorState(Wrapped):
    """A real store that notes whether automatic collection was enabled when it was opened and at each put."""

    def __init__(self, settings: Settings, *, fail_open: bool = False) -> None:
        super().__init__(make_store(settings))
        self.fail_open = fail_open
        self.at_open: bool | None = None
        self.at_put: list[bool] = []

    async def __aenter__(self) -> _RecordsCollectorState:
        self.at_open = gc.isenabled()
        if self.fail_open:
            raise OSError("the store cannot be opened")
        await super().__aenter__()
        return self

    async def put(self, *args: object, **kwargs: object) -> object:
        self.at_put.append(gc.isenabled())
        return await self._inner.put(*args, **kwargs)


@pytest.fixture
def collector_enabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_paused_while_starting_then_enabled_once_uploads_run(settings: Settings, drain, collector_enabled) -> None:
    entries = [enqueue_bytes(settings, os.urandom(100), filename=f"f{i}") for i in range(40)]
    store = _RecordsCollectorState(settings)

    report = drain(settings, store=store)

    assert report.committed == len(entries)
    assert store.at_open is False, "start-up (store and catalog open) runs with the collector paused"
    assert store.at_put and store.at_put[-1] is True, "the collector must be back once uploads are running"
    assert gc.isenabled()


def test_given_back_when_start_up_fails(settings: Settings, drain, collector_enabled) -> None:
    enqueue_bytes(settings, b"x")
    store = _RecordsCollectorState(settings, fail_open=True)
    with pytest.raises(OSError, match="cannot be opened"):
        drain(settings, store=store)
    assert store.at_open is False
    assert gc.isenabled()


def test_a_host_that_disabled_it_keeps_it_disabled(settings: Settings, drain, collector_enabled) -> None:
    enqueue_bytes(settings, b"x")
    gc.disable()
    assert drain(settings).committed == 1
    assert not gc.isenabled()
