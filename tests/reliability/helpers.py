"""Small helpers shared by the reliability scenarios: a daemon running as a service in a thread, polling."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from mldash.config import Settings
from mldash.spool import SpoolIndex, SpoolLayout
from mldash_syncd.service import Daemon, RunReport


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.02)
    return value


def entry_rows(settings: Settings) -> dict[int, dict[str, Any]]:
    """Index rows by id through a read-only connection ({} while no daemon has created the index)."""
    index = SpoolIndex.open_readonly(SpoolLayout(settings.spool))
    if index is None:
        return {}
    try:
        return {row["id"]: row for row in index.rows()}
    except Exception:  # the daemon may be creating the schema right now
        return {}
    finally:
        index.close()


def states_of(settings: Settings, ids: list[int]) -> list[str | None]:
    rows = entry_rows(settings)
    return [rows.get(i, {}).get("state") for i in ids]


def all_in(settings: Settings, ids: list[int], states: tuple[str, ...]) -> bool:
    return all(state in states for state in states_of(settings, ids))


class ServiceThread:
    """`Daemon(settings).run()` (service mode: it keeps watching the spool) on its own event loop and thread;
    `stop()` is the graceful stop SIGTERM triggers, and returns the run's report."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.daemon = Daemon(settings, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._result: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name="mldash-syncd", daemon=True)

    def _run(self) -> None:
        async def main() -> RunReport:
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            return await self.daemon.run()

        try:
            self._result["report"] = asyncio.run(main())
        except BaseException as exc:
            self._result["error"] = exc
        finally:
            self._ready.set()

    def start(self) -> ServiceThread:
        self._thread.start()
        self._ready.wait(30)
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 60.0) -> RunReport:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.daemon.request_stop)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the daemon did not stop within {timeout}s of a stop request"
        if "error" in self._result:
            raise self._result["error"]
        return self._result["report"]
