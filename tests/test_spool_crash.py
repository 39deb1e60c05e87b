"""kill -9 of an enqueuing process at random instants: acknowledged means durable, debris is cleaned.

A small "zygote" script imports mldash once and forks one writer per iteration (a fresh Python
per iteration would spend most of the test budget on interpreter start-up). Each writer enqueues
entries of random sizes (some multi-MB, written in 1 MiB chunks) in a loop and prints
"ack <id> <size> <sha256>" to stdout, flushed, after each enqueue returns. The test kills it with
SIGKILL after a random delay — or, one iteration in four, the writer kills itself at an exact
point of the commit protocol (before/after the blob link, before/after the manifest link) through
a hook on the link calls installed in the child only. After each kill the daemon-side recovery runs
with a fresh SpoolIndex and every invariant of the spool is checked. The loop runs twice: with
`inline_max=0` (every entry a blob + a manifest) and with the default inline_max, where the small
entries (most of them) are one inline manifest each (format 2) and the rest take the blob path.

Iterations: --iterations / $MLDASH_TEST_ITERATIONS (CI default 200, about 20 s here);
`test_kill9_loop_long` runs 10× that when slow tests are selected (-m slow or MLDASH_TEST_SLOW=1).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mldash.config import Settings
from mldash.spool.index import SpoolIndex
from mldash.spool.layout import SpoolLayout
from mldash.spool.newfile import unnamed_files_supported
from mldash.spool.recovery import ORPHAN_BLOB_GRACE, RecoveryReport, clean_debris, manifest_ids, recover
from tests.spool_helpers import Ack, assert_entry_intact, assert_spool_integrity, iterations, slow_enabled

REPO = Path(__file__).resolve().parents[1]
HOOK_POINTS = ("before_blob_link", "after_blob_link", "before_manifest_link", "after_manifest_link")
# Points after which the crashed entry's blob is in blobs/ but its manifest is not (blob-path entries only:
# an inline entry killed before its manifest link leaves nothing at all).
ORPHANING_POINTS = ("after_blob_link", "before_manifest_link")
DEFAULT_INLINE_MAX = Settings.load(env={"MLDASH_CONFIG": os.devnull}).inline_max

ZYGOTE = textwrap.dedent(r'''
    import json, os, random, signal, sys
    from pathlib import Path

    import mldash.spool.newfile as newfile
    from mldash.config import Settings
    from mldash.spool.enqueue import Enqueuer, EntrySpec

    spool = Path(sys.argv[1])
    settings = Settings.load(env={"MLDASH_CONFIG": os.devnull}, spool=str(spool), autostart=False,
                             store=(spool.parent / "store").as_uri(), inline_max=int(sys.argv[2]),
                             catalog="sqlite://" + str(spool.parent / "catalog.sqlite"))
    POOL = random.Random(1).randbytes(8 << 20)
    CHUNK = 1 << 20

    def say(line):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def pick_size(rng):
        roll = rng.random()
        if roll < 0.05:
            return 0
        if roll < 0.60:
            return rng.randrange(1, 4096)
        if roll < 0.90:
            return rng.randrange(4096, 256 << 10)
        return rng.randrange(1 << 20, 6 << 20)  # multi-MB

    def install_hook(point, nth):
        """SIGKILL ourselves at an exact step: around the nth blob link, or the nth manifest link (named
        temp files go through os.link, unnamed ones through newfile._link_fd)."""
        real_link, real_link_fd = os.link, newfile._link_fd
        counts = {"blobs": 0, "manifests": 0}

        def die():
            os.kill(os.getpid(), signal.SIGKILL)

        def hooked(target, do_link):
            for kind in counts:
                if os.sep + kind + os.sep in target:
                    counts[kind] += 1
                    stage = "blob" if kind == "blobs" else "manifest"
                    if point == f"before_{stage}_link" and counts[kind] == nth:
                        die()
                    do_link()
                    if point == f"after_{stage}_link" and counts[kind] == nth:
                        die()  # after a manifest link: committed, never acknowledged; must be complete
                    return
            do_link()

        os.link = lambda src, dst, *a, **k: hooked(os.fspath(dst), lambda: real_link(src, dst, *a, **k))
        newfile._link_fd = lambda fd, final: hooked(os.fspath(final), lambda: real_link_fd(fd, final))

    def writer(cmd):
        rng = random.Random(cmd["seed"])
        if cmd.get("point"):
            install_hook(cmd["point"], cmd["nth"])
        enqueuer = Enqueuer(settings)
        for number in range(cmd["limit"]):
            size = pick_size(rng)
            start = rng.randrange(0, len(POOL) - size + 1)
            data = memoryview(POOL)[start:start + size]

            def write(sink, data=data):
                for offset in range(0, len(data), CHUNK):
                    sink.write(data[offset:offset + CHUNK])

            spec = EntrySpec(namespace="ns", project="proj", experiment="crash", prefix="loop",
                             filename=f"{cmd['seed']}-{number}.bin", content_type="application/octet-stream",
                             kind="blob")
            manifest = enqueuer.enqueue(spec, write, expected_size=size)
            say(f"ack {manifest.id} {manifest.size} {manifest.sha256}")

    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                writer(cmd)
            except BaseException as exc:
                sys.stderr.write(f"writer failed: {exc!r}\n")
                code = 1
            finally:
                os._exit(code)
        say(json.dumps({"pid": pid}))
        _, status = os.waitpid(pid, 0)
        say(json.dumps({"exit": os.waitstatus_to_exitcode(status)}))
''')


class Zygote:
    """The forking writer host; a reader thread drains its stdout so writers never block on the pipe."""

    def __init__(self, tmp_path: Path, spool: Path, inline_max: int) -> None:
        script = tmp_path / "zygote.py"
        script.write_text(ZYGOTE)
        self.proc = subprocess.Popen([sys.executable, str(script), str(spool), str(inline_max)], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _next(self, acks: list[Ack], timeout: float) -> dict:
        """The next control line; ack lines met on the way are appended to `acks`."""
        while True:
            line = self.lines.get(timeout=timeout)
            assert line is not None, "zygote died"
            if not line.endswith("\n"):
                continue  # a torn line cannot be an acknowledgement: the write was not complete
            if line.startswith("ack "):
                _, file_id, size, sha = line.split()
                acks.append(Ack(int(file_id), int(size), sha))
                continue
            return json.loads(line)

    def run(self, cmd: dict, kill_after: float | None) -> tuple[list[Ack], int]:
        """Start one writer, SIGKILL it after `kill_after` seconds (None: it kills itself); returns acks, exit code."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        acks: list[Ack] = []
        pid = self._next(acks, timeout=30)["pid"]
        if kill_after is not None:
            time.sleep(kill_after)
            with contextlib.suppress(ProcessLookupError):  # it already finished its entries
                os.kill(pid, signal.SIGKILL)
        code = self._next(acks, timeout=60)["exit"]
        return acks, code

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # only after a failure: a writer is still running
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _evict(layout: SpoolLayout, index: SpoolIndex, ids: list[int]) -> None:
    """What the daemon does after commit + eviction (manifest first, then blob), to bound disk use."""
    for file_id in ids:
        layout.manifest_path(file_id).unlink(missing_ok=True)
        layout.blob_path(file_id).unlink(missing_ok=True)
    index.delete(ids)


def kill9_loop(tmp_path: Path, count: int, seed: int, inline_max: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    spool = tmp_path / "spool"
    layout = SpoolLayout(spool).ensure()
    zygote = Zygote(tmp_path, spool, inline_max)
    live: dict[int, Ack] = {}            # acknowledged and not yet evicted by the test
    generation: dict[int, int] = {}      # iteration in which each entry was acknowledged
    stats = dict(iterations=count, acks=0, random_kills=0, hook_kills=0, tmp_debris=0, orphans_removed=0,
                 unacked_committed=0, inline_acks=0)
    try:
        for iteration in range(count):
            point = HOOK_POINTS[(iteration // 4) % 4] if iteration % 4 == 3 else None
            cmd = dict(seed=seed * 100_000 + iteration, limit=2000)
            if point:
                cmd.update(point=point, nth=rng.randint(1, 4))
                acks, code = zygote.run(cmd, kill_after=None)
                assert code == -signal.SIGKILL, f"hook {point} did not fire (exit {code})"
                stats["hook_kills"] += 1
            else:
                acks, code = zygote.run(cmd, kill_after=rng.uniform(0.0, 0.12))
                assert code == -signal.SIGKILL, f"writer was not killed (exit {code}); raise the limit"
                stats["random_kills"] += 1
            stats["acks"] += len(acks)

            # Before the daemon looks: every acknowledged entry is complete on disk.
            for ack in acks:
                assert_entry_intact(layout, ack)
                live[ack.id] = ack
                generation[ack.id] = iteration
                stats["inline_acks"] += not layout.blob_path(ack.id).exists()

            if unnamed_files_supported():  # a manifest being written has no name: a kill leaves none behind
                assert not [n for n in os.listdir(layout.tmp_dir) if n.endswith(".manifest.part")]
            blobs_before = {int(name) for name in os.listdir(layout.blobs_dir)}
            orphans_before = blobs_before - manifest_ids(layout)
            if point in ORPHANING_POINTS:
                # with inline entries, the nth manifest link may be an inline entry's: nothing left then
                assert orphans_before or (inline_max and point == "before_manifest_link"), \
                    f"kill at {point} left no blob without manifest"
                # A young orphan may be a live writer between its two links: the default grace keeps it.
                young = RecoveryReport()
                clean_debris(layout, young)
                assert not young.removed_orphan_blobs
                assert orphans_before <= {int(name) for name in os.listdir(layout.blobs_dir)}

            # Daemon-side recovery, fresh index connection, clock moved past the orphan grace.
            index = SpoolIndex(layout)
            try:
                report = recover(index, layout, owner="test-daemon", now=time.time() + ORPHAN_BLOB_GRACE + 1)
                stats["tmp_debris"] += bool(report.removed_tmp)
                stats["orphans_removed"] += len(report.removed_orphan_blobs)
                assert set(report.removed_orphan_blobs) == orphans_before
                assert not report.quarantined
                assert os.listdir(layout.tmp_dir) == [], "tmp/ debris of a dead writer survived recovery"
                unacked = manifest_ids(layout) - set(live)
                stats["unacked_committed"] += len(unacked)
                assert_spool_integrity(layout, index, live, hash_bytes=iteration % 10 == 9)
                rows = index.rows()
                assert {row["id"] for row in rows} == manifest_ids(layout)
                assert all(row["state"] == "queued" for row in rows)
                # Bound disk use: evict entries two iterations old (and unacknowledged commits).
                old = [i for i, gen in generation.items() if gen < iteration - 1] + sorted(unacked)
                _evict(layout, index, old)
                for file_id in old:
                    live.pop(file_id, None)
                    generation.pop(file_id, None)
            finally:
                index.close()
    finally:
        zygote.close()
    return stats


@pytest.mark.parametrize("inline_max", [0, DEFAULT_INLINE_MAX], ids=["blobs-only", "inline"])
def test_kill9_loop(tmp_path: Path, request: pytest.FixtureRequest, inline_max: int) -> None:
    count = iterations(request.config, default=200)
    stats = kill9_loop(tmp_path, count, seed=count, inline_max=inline_max)
    print(f"\nkill -9 loop: {stats}")
    assert stats["acks"] > 0
    assert stats["tmp_debris"] > 0, "no kill landed inside an enqueue: the loop proves nothing"
    if inline_max:
        assert 0 < stats["inline_acks"] < stats["acks"], "the loop must mix inline and blob entries"
    else:
        assert stats["inline_acks"] == 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill9_loop_long(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if not slow_enabled(request.config):
        pytest.skip("long kill -9 loop: select with -m slow or MLDASH_TEST_SLOW=1")
    count = 10 * iterations(request.config, default=200)
    stats = kill9_loop(tmp_path, count, seed=count + 1, inline_max=DEFAULT_INLINE_MAX)
    print(f"\nkill -9 loop (long): {stats}")
    assert stats["tmp_debris"] > 0
