"""Running the daemon's event loop in the CLI so that a stop stays bounded.

`asyncio.run` ends by waiting, without a bound, for whatever runs in the default executor's threads — and some
daemon work there cannot be cancelled: hashing a whole blob to judge an object already at its key, a local store
copying the parts of a large file together, unlinking a batch of evicted files on a slow filesystem. A stop —
even a second SIGTERM — then waited for it (a 100 GB checkpoint: minutes; a hung NFS mount: for ever), past
`stop_grace` and systemd's patience. Here the executor is shut down without waiting, and a process whose
threads are still busy a moment later exits without them. What they were doing is crash-safe, like a kill -9
at any point (tests/reliability/test_kill_daemon.py): a partial temp file is debris, a copy is redone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
THREAD_PREFIX = "mldash-syncd-io"
THREADS_GRACE = 2.0  # seconds busy executor threads get, after the run, before the process exits without them

log = logging.getLogger("mldash_syncd")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, without its unbounded wait for executor threads at the end."""
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(thread_name_prefix=THREAD_PREFIX)
    loop.set_default_executor(executor)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_remaining(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)  # idle threads end; busy ones are left to exit()
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def busy_threads(grace: float = THREADS_GRACE) -> list[threading.Thread]:
    """The executor threads still at work after `grace` seconds (idle ones end at once after `run_loop`)."""
    deadline = time.monotonic() + grace
    for thread in [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


def exit_now_if_threads_are_stuck(code: int, before: Callable[[], object] | None = None) -> None:
    """Exit with `code` at once if executor threads are still busy: Python would join them at exit, unbounded.
    `before()` runs first in that case (the traceback of the error that ends the process)."""
    if stuck := busy_threads():
        if before is not None:
            before()
        log.warning("exiting without waiting for %d thread(s) still at work (hashing or file I/O that cannot be "
                    "interrupted): what they did is redone at the next start", len(stuck))
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        os._exit(code)
