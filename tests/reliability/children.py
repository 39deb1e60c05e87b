"""What the fork server's children run (see forkserver.py): a daemon run with an optional self-kill
hook, or a training-side writer that saves through the public API and records each acknowledgement.

Kill hooks make a daemon SIGKILL itself at an exact step of the pipeline, which random delays hit
only rarely: right after the store created a multipart upload (before the index records it), during
or after an UploadPart/PutObject, after CompleteMultipartUpload, after the index recorded "uploaded",
and just before or just after the catalog upsert (the window between upload and commit). They wrap
the real calls — nothing is faked; the process just dies at that instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
from collections.abc import Iterator
from typing import Any


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap_async(cls: type, name: str, when: str, nth: int, delay: float) -> None:
    original = getattr(cls, name)
    seen = [0]

    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen[0] += 1
        hit = seen[0] == nth
        if hit and when == "before":
            _die()
        if hit and when == "during":
            task = asyncio.ensure_future(original(self, *args, **kwargs))
            await asyncio.wait({task}, timeout=delay)
            _die()
        result = await original(self, *args, **kwargs)
        if hit and when == "after":
            _die()
        return result

    setattr(cls, name, wrapper)


def _hook_uploaded(nth: int) -> None:
    """Die once the nth "uploaded" is recorded — durably: when the daemon records it inside a larger index
    transaction (together with the claim of the next entry), right after that transaction commits."""
    from mldash.spool.index import SpoolIndex
    from mldash.spool.states import State

    original_transition, original_transaction = SpoolIndex.transition, SpoolIndex.transaction
    seen, pending = [0], [False]

    def transition(self: SpoolIndex, file_id: int, target: State, **kwargs: Any) -> None:
        original_transition(self, file_id, target, **kwargs)
        if target is State.UPLOADED:
            seen[0] += 1
            if seen[0] == nth:
                if not self.conn.in_transaction:
                    _die()
                pending[0] = True

    @contextlib.contextmanager
    def transaction(self: SpoolIndex) -> Iterator[Any]:
        with original_transaction(self) as conn:
            yield conn
        if pending[0] and not self.conn.in_transaction:
            _die()

    SpoolIndex.transition = transition  # type: ignore[method-assign]
    SpoolIndex.transaction = transaction  # type: ignore[method-assign]


# kill point → (what to wrap, when)
KILL_POINTS = {
    "after_create": ("store", "create_multipart", "after"),
    "mid_part": ("store", "upload_part", "during"),
    "after_part": ("store", "upload_part", "after"),
    "mid_put": ("store", "put", "during"),
    "after_put": ("store", "put", "after"),
    "after_complete": ("store", "complete_multipart", "after"),
    "after_uploaded": ("index", "transition", "after"),
    "before_commit": ("catalog", "upsert_many", "before"),  # the daemon commits in batches
    "after_commit": ("catalog", "upsert_many", "after"),
}


def install_kill_hook(point: str, nth: int = 1, delay: float = 0.0) -> None:
    from mldash.catalog.mongo import MongoCatalog
    from mldash.catalog.sqlite import SqliteCatalog
    from mldash.store.local import LocalStore
    from mldash.store.s3 import S3Store

    target, name, when = KILL_POINTS[point]
    if target == "index":
        _hook_uploaded(nth)
        return
    classes = (S3Store, LocalStore) if target == "store" else (SqliteCatalog, MongoCatalog)
    for cls in classes:
        _wrap_async(cls, name, when, nth, delay)


def run_daemon(args: list[str], kill_at: str | None = None, nth: int = 1, delay: float = 0.0) -> int:
    """`mldash-syncd <args>` (the real CLI entry point, signal handlers included), optionally with a kill hook."""
    from mldash_syncd.cli import main

    if kill_at:
        install_kill_hook(kill_at, nth, delay)
    return main(args)


def write_loop(ack_path: str, experiment: str, seed: int, saves: int = 10_000, big_every: int = 6) -> int:
    """Save artifacts through the public API in a loop; after each save returns, append its acknowledgement
    (the result dict's id, sizeBytes, checksum) to `ack_path` with one write() — a kill -9 cannot tear it."""
    from mldash import Experiment

    rng = random.Random(seed)
    exp = Experiment(prefix=experiment)
    files = exp.files("ckpt")
    source = os.path.join(os.path.dirname(ack_path), f"source-{seed}.bin")
    fd = os.open(ack_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for i in range(saves):
            kind = rng.choice(("blob", "blob", "json", "text", "upload"))
            big = i % big_every == big_every - 1
            size = rng.randrange(1 << 20, 5 << 20) if big else rng.randrange(0, 64 << 10)
            data = None
            if kind == "blob":
                data = rng.randbytes(size)
                result = files.save_blob(data, to=f"step-{i}.bin", metadata={"step": i})
            elif kind == "json":
                result = files.save_json({"step": i, "loss": rng.random(), "pad": "x" * (size % 4096)},
                                         to=f"metrics-{i}.json", tags=["metrics"])
            elif kind == "text":
                result = files("logs").save_text(f"step {i}\n" * (size % 2000), to=f"log-{i}.txt")
            else:
                data = rng.randbytes(size)
                with open(source, "wb") as handle:
                    handle.write(data)
                result = files.upload(source, to=f"upload-{i}.bin")
                os.unlink(source)  # the snapshot is in the spool: the source may go
            ack = {k: result[k] for k in ("id", "sizeBytes", "checksum")}
            if ack["checksum"] is None and data is not None:  # deferred checksums: we know what we saved
                ack["checksum"] = hashlib.sha256(data).hexdigest()
            line = json.dumps(ack) + "\n"
            os.write(fd, line.encode())
    finally:
        os.close(fd)
    return 0
