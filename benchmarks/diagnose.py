"""Experiments behind the "why" of the missed targets (docs/benchmarks.md, "Why targets are missed").

    python -m benchmarks.diagnose stall        [--size-mib 1024] [--rounds 5]
    python -m benchmarks.diagnose drain-large  [--size-mib 1024] [--rounds 3]
    python -m benchmarks.diagnose drain-small  [--files 1000] [--rounds 2]
    python -m benchmarks.diagnose put-paths    [--files 1000] [--rounds 3]
    python -m benchmarks.diagnose rss          [--size-mib 1024]
    python -m benchmarks.diagnose json-sched   [--calls 250]
    python -m benchmarks.diagnose inode-alloc  [--files 4000]
    python -m benchmarks.diagnose quota        [--files 50000]

These are not benchmarks of the product: several variants switch a piece of mldash off (by patching it in
this process) to measure what that piece costs. Nothing here is part of the results table; re-run them after
a fix to see whether the cost went away. Variants are interleaved like the benchmarks (rotated order).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from benchmarks.context import MIB, Context, clear_spool
from benchmarks.stats import interleave, percentile


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _print(samples: dict[str, list[dict[str, Any]]]) -> None:
    for name, values in samples.items():
        keys = list(values[0])
        cells = "  ".join(f"{k} {[round(v[k], 3) for v in values]}" for k in keys)
        print(f"{name:36s} {cells}")


# ---- stall: where the time of save_torch goes ------------------------------------------------------------
class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:064x}"


class _NoHash:
    def update(self, data: Any) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 64


def stall(ctx: Context, args: argparse.Namespace) -> None:
    import torch

    import mldash.spool.hashing as hashing
    from benchmarks.stall_torch import build_model
    from mldash import Experiment

    model = build_model(args.size_mib * MIB)
    views = [memoryview(t.numpy()).cast("B") for t in model.state_dict().values()]
    settings = ctx.settings("stall")
    handle = Experiment(prefix="diag/stall/torch", settings=settings).files("ckpt")
    me = psutil.Process()

    def timed(fn: Callable[[], None]) -> dict[str, float]:
        cpu0, wall0 = _cpu(me), time.perf_counter()
        fn()
        return {"wall_s": time.perf_counter() - wall0, "cpu_s": _cpu(me) - cpu0}

    def save_torch(hasher: Any) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            original = hashing.hashlib.sha256
            hashing.hashlib.sha256 = hasher
            try:
                return timed(lambda: handle.save_torch(model, to="m.pt"))
            finally:
                hashing.hashlib.sha256 = original
                clear_spool(settings)
        return run

    def torch_save() -> dict[str, float]:
        path = settings.spool.parent / "m.pt"
        result = timed(lambda: torch.save(model.state_dict(), path))
        path.unlink()
        return result

    def digest(factory: Callable[[], Any]) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            def go() -> None:
                state = factory()
                for view in views:
                    state.update(view)
            return timed(go)
        return run

    variants = {"torch.save to a file": torch_save, "save_torch (SHA256, as shipped)": save_torch(hashlib.sha256),
                "save_torch with CRC32 instead": save_torch(_Crc32), "save_torch without any hash": save_torch(_NoHash),
                "sha256 of the tensors alone": digest(hashlib.sha256), "md5 of the tensors alone": digest(hashlib.md5),
                "crc32 of the tensors alone": digest(_Crc32)}
    _print(interleave(args.rounds, variants, between=ctx.settle))


# ---- drain-large: what the daemon's per-byte work costs against moto --------------------------------------
def drain_large(ctx: Context, args: argparse.Namespace) -> None:
    import botocore.auth

    import mldash_syncd.upload as upload
    from benchmarks.daemon_timing import drain_timed
    from benchmarks.stall_upload import make_random_file
    from mldash import Experiment

    size = args.size_mib * MIB
    moto = ctx.moto()
    bucket = "diag"
    moto.create_bucket(bucket)
    source = ctx.fresh_dir("src") / "big.bin"
    make_random_file(source, size)
    server, me = psutil.Process(moto.process.pid), psutil.Process()
    hash_part, sign_payload = upload._hash_part, botocore.auth.S3SigV4Auth._should_sha256_sign_payload

    def sha256_only(data: bytes) -> Any:
        return upload._PartHashes(base64.b64encode(hashlib.sha256(data).digest()).decode(), "")

    def measure(fn: Callable[[], None]) -> dict[str, float]:
        server0, me0, wall0 = _cpu(server), _cpu(me), time.perf_counter()
        fn()
        wall = time.perf_counter() - wall0
        return {"MB/s": size / wall / 1e6, "client_cpu_s": _cpu(me) - me0, "moto_cpu_s": _cpu(server) - server0}

    def daemon(no_md5: bool = False, no_payload_hash: bool = False, **overrides: Any) -> Callable[[], dict]:
        def run() -> dict[str, float]:
            upload._hash_part = sha256_only if no_md5 else hash_part
            botocore.auth.S3SigV4Auth._should_sha256_sign_payload = (
                (lambda self, request: False) if no_payload_hash else sign_payload)
            if no_md5:
                overrides["verify_etag"] = False  # the ETag check needs the MD5
            settings = ctx.settings("drain", store="s3", bucket=bucket, endpoint_url=moto.url, **overrides)
            Experiment(prefix="diag/drain/large", settings=settings).files("x").upload(source, to="big.bin")
            ctx.settle()
            try:
                return measure(lambda: drain_timed(settings, expect=1))
            finally:
                upload._hash_part, botocore.auth.S3SigV4Auth._should_sha256_sign_payload = hash_part, sign_payload
                ctx.remove(settings.spool.parent)
        return run

    def boto3_upload(extra: dict | None = None) -> Callable[[], dict]:
        return lambda: measure(lambda: moto.client().upload_file(str(source), bucket, f"b/{uuid.uuid4().hex}",
                                                                 ExtraArgs=extra))

    variants = {"daemon (as shipped)": daemon(), "daemon without MD5": daemon(no_md5=True),
                "daemon without MD5, SigV4 payload hash": daemon(no_md5=True, no_payload_hash=True),
                "boto3 upload_file": boto3_upload(), "boto3 upload_file SHA256": boto3_upload(
                    {"ChecksumAlgorithm": "SHA256"})}
    _print(interleave(args.rounds, variants, between=lambda: (moto.empty_bucket(bucket), ctx.settle())))


# ---- drain-small: the daemon's per-file overhead ------------------------------------------------------------
def _moto_bucket_and_bodies(ctx: Context, bucket: str, count: int,
                            size: int) -> tuple[Any, psutil.Process, psutil.Process, list[bytes]]:
    """moto with `bucket` created, this process and moto's (for their CPU times), and `count` random bodies."""
    moto = ctx.moto()
    moto.create_bucket(bucket)
    return moto, psutil.Process(), psutil.Process(moto.process.pid), [os.urandom(size) for _ in range(count)]


def drain_small(ctx: Context, args: argparse.Namespace) -> None:
    from benchmarks.daemon_timing import drain_timed
    from benchmarks.drain_small import FILE_SIZE, put_all, spool_small_files

    count = args.files
    bucket = "diag"
    moto, me, moto_process, bodies = _moto_bucket_and_bodies(ctx, bucket, count, FILE_SIZE)

    def cpu_per_file(before: tuple[float, float]) -> dict[str, float]:
        return {"client_cpu_ms_per_file": (_cpu(me) - before[0]) * 1000 / count,
                "moto_cpu_ms_per_file": (_cpu(moto_process) - before[1]) * 1000 / count}

    def daemon(catalog: str = "sqlite", *, direct_puts: bool = True, **overrides: Any) -> Callable[[], dict]:
        def run() -> dict[str, float]:
            from mldash.store.s3_direct import DirectPut

            settings = ctx.settings("small", store="s3", catalog=catalog, bucket=bucket, endpoint_url=moto.url,
                                    **overrides)
            spool_small_files(settings, count)
            ctx.settle()
            before = (_cpu(me), _cpu(moto_process))
            learn = DirectPut.learn
            if not direct_puts:  # every PUT through botocore, as before the direct path
                async def no_direct_path(*_: Any, **__: Any) -> None:
                    return None
                DirectPut.learn = no_direct_path  # type: ignore[method-assign]
            try:
                timed = drain_timed(settings, expect=count)
            finally:
                DirectPut.learn = learn  # type: ignore[method-assign]
                ctx.remove(settings.spool.parent)
            return {"files/s": count / timed["seconds"], "startup_ms": timed["startup_s"] * 1000,
                    **cpu_per_file(before)}
        return run

    def baseline() -> dict[str, float]:
        before, wall0 = (_cpu(me), _cpu(moto_process)), time.perf_counter()
        asyncio.run(put_all(moto.url, bucket, bodies))
        return {"files/s": count / (time.perf_counter() - wall0), **cpu_per_file(before)}

    variants = {"daemon + SQLite (as shipped)": daemon(), "daemon + MongoDB (as shipped)": daemon("mongo"),
                "daemon + SQLite, PUTs through botocore": daemon(direct_puts=False),
                "aioboto3 16-way put_object": baseline}
    _print(interleave(args.rounds, variants, between=lambda: (moto.empty_bucket(bucket), ctx.settle())))


# ---- put-paths: what one small PUT costs the client, and moto, by the way it is sent ----------------------
def put_paths(ctx: Context, args: argparse.Namespace) -> None:
    """N × 4 KiB PUTs, 16 in flight, to moto: aioboto3's put_object (the drain_small baseline), the store's
    PUT as the daemon sends it (direct, mldash/store/s3_direct.py) and the same through botocore, and unsigned
    bare aiohttp PUTs (no client work beyond HTTP: moto's own ceiling on this machine). CPU per PUT of this
    process and of moto's, and the share of the wall time moto was on a CPU."""
    import aiohttp

    from benchmarks.drain_small import CONCURRENCY, FILE_SIZE, put_all
    from mldash.store import S3Store, b64_sha256

    count = args.files
    bucket = "putpaths"
    moto, me, moto_process, bodies = _moto_bucket_and_bodies(ctx, bucket, count, FILE_SIZE)
    checksums = [b64_sha256(body) for body in bodies]

    async def store_puts(direct: bool) -> None:
        store = S3Store(bucket, "store", endpoint_url=moto.url, max_connections=CONCURRENCY)
        await store.open()
        if not direct:
            store._direct = None
        gate, run = asyncio.Semaphore(CONCURRENCY), uuid.uuid4().hex
        try:
            async def put(i: int) -> None:
                async with gate:
                    await store.put(f"store/{run}/f{i:05d}", bodies[i], checksums[i])
            await asyncio.gather(*(put(i) for i in range(count)))
        finally:
            await store.close()

    async def bare_puts() -> None:
        gate, run = asyncio.Semaphore(CONCURRENCY), uuid.uuid4().hex
        scope = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as http:
            async def put(i: int) -> None:
                async with gate, http.put(f"{moto.url}/{bucket}/bare/{run}/f{i:05d}", data=bodies[i],
                                          headers={"Authorization": f"{scope}, Signature=0"}) as response:
                    response.raise_for_status()
            await asyncio.gather(*(put(i) for i in range(count)))

    def timed(make: Callable[[], Any]) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            before, wall0 = (_cpu(me), _cpu(moto_process)), time.perf_counter()
            asyncio.run(make())
            wall = time.perf_counter() - wall0
            moto_cpu = _cpu(moto_process) - before[1]
            return {"puts/s": count / wall, "client_cpu_ms": (_cpu(me) - before[0]) * 1000 / count,
                    "moto_cpu_ms": moto_cpu * 1000 / count, "moto_busy": moto_cpu / wall}
        return run

    variants = {"aioboto3 put_object (baseline)": timed(lambda: put_all(moto.url, bucket, bodies)),
                "S3Store.put, direct (as shipped)": timed(lambda: store_puts(True)),
                "S3Store.put through botocore": timed(lambda: store_puts(False)),
                "bare aiohttp, unsigned": timed(bare_puts)}
    _print(interleave(args.rounds, variants, between=lambda: (moto.empty_bucket(bucket), ctx.settle())))


# ---- rss: the daemon's peak memory with glibc malloc tuned ------------------------------------------------
def rss(ctx: Context, args: argparse.Namespace) -> None:
    import benchmarks.daemon_rss as daemon_rss

    plain_env = daemon_rss.settings_env
    size = args.size_mib * MIB

    def run(extra_env: dict[str, str]) -> Callable[[], dict]:
        def sample() -> dict[str, float]:
            daemon_rss.settings_env = lambda s: {**plain_env(s), **extra_env}
            settings = ctx.settings("rss")
            try:
                daemon_rss.spool_file(settings, size)
                ctx.settle()
                result = daemon_rss.drain_and_sample(ctx, settings)
            finally:
                daemon_rss.settings_env = plain_env
                ctx.remove(settings.spool.parent)
            return {"peak_mib": result["peak_mib"], "seconds": result["seconds"]}
        return sample

    idle = ctx.settings("idle")
    daemon_rss.spool_file(idle, 4096)
    print(f"idle daemon (4 KiB drain): peak {daemon_rss.drain_and_sample(ctx, idle)['peak_mib']:.0f} MiB")
    _print(interleave(args.rounds, {"default glibc malloc": run({}),
                                    "MALLOC_MMAP_THRESHOLD_=1 MiB": run({"MALLOC_MMAP_THRESHOLD_": str(MIB)}),
                                    "MALLOC_ARENA_MAX=1": run({"MALLOC_ARENA_MAX": "1"})}))


# ---- json-sched: where the tail latency of 8 synchronized writers goes -------------------------------------
def _schedstat() -> tuple[int, int]:
    """(ns on a CPU, ns waiting on a run queue) of this thread, from /proc/thread-self/schedstat."""
    with open("/proc/thread-self/schedstat") as handle:
        on_cpu, waiting, _ = handle.read().split()
    return int(on_cpu), int(waiting)


def _sched_writer(rank: int, settings: Any, kind: str, calls: int, barrier: Any, out: Any) -> None:
    from mldash import Experiment

    handle = Experiment(prefix="diag/json/sched", settings=settings).files("m")
    record = {"rank": rank, "step": 0, "loss": 0.1}
    plain = Path(settings.spool).parent / "plain"
    plain.mkdir(exist_ok=True)

    def call(i: int) -> None:
        if kind == "save_json":
            handle.save_json(record, to=f"r{rank}-{i}.json")
        else:
            path = plain / f"r{rank}-{i}.json"
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as stream:
                json.dump(record, stream)
            os.replace(tmp, path)

    for i in range(5):
        call(-1 - i)
    rows = []
    barrier.wait()
    for i in range(calls):
        barrier.wait()
        cpu0, queue0 = _schedstat()
        start = time.perf_counter_ns()
        call(i)
        wall = time.perf_counter_ns() - start
        cpu1, queue1 = _schedstat()
        rows.append((wall / 1e6, (cpu1 - cpu0) / 1e6, (queue1 - queue0) / 1e6))
    out.put(rows)


def json_sched(ctx: Context, args: argparse.Namespace) -> None:
    settings = ctx.settings("json")
    spawn = multiprocessing.get_context("spawn")
    for kind in ("save_json", "plain write", "save_json", "plain write"):
        barrier, out = spawn.Barrier(8), spawn.Queue()
        procs = [spawn.Process(target=_sched_writer, args=(r, settings, kind, args.calls, barrier, out))
                 for r in range(8)]
        for proc in procs:
            proc.start()
        rows = sorted(row for _ in procs for row in out.get(timeout=300))
        for proc in procs:
            proc.join()
        tail = rows[int(len(rows) * 0.99):]

        def mean(items: list[tuple[float, ...]], i: int) -> float:
            return sum(item[i] for item in items) / len(items)

        walls = [r[0] for r in rows]
        print(f"{kind:12s} p50 {percentile(walls, 50):.2f} p99 {percentile(walls, 99):.2f} max {walls[-1]:.2f} ms | "
              f"mean per call: on-CPU {mean(rows, 1):.3f}, run-queue wait {mean(rows, 2):.3f} ms | slowest 1%: "
              f"wall {mean(tail, 0):.2f} = on-CPU {mean(tail, 1):.2f} + run-queue wait {mean(tail, 2):.2f} + "
              f"blocked {mean(tail, 0) - mean(tail, 1) - mean(tail, 2):.2f} ms")
        clear_spool(settings)


# ---- inode-alloc: what one file creation costs after many deletions, by name vs unnamed ----------------------
def _create_micros(directory: Path, count: int, tag: str, *, unnamed: bool) -> list[float]:
    """µs per creation of `count` new files in `directory` (named O_EXCL creates, or O_TMPFILE + linkat)."""
    from mldash.spool.newfile import publish_bytes

    times = []
    for i in range(count):
        start = time.perf_counter_ns()
        if unnamed:
            publish_bytes(b"x", directory / f"{tag}{i}", directory, lambda: directory / "unused", fsync=False)
        else:
            os.close(os.open(directory / f"{tag}{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        times.append((time.perf_counter_ns() - start) / 1e3)
    return times


def _parallel_creator(directory: str, count: int, rank: int, unnamed: bool, barrier: Any, out: Any) -> None:
    barrier.wait()
    out.put(_create_micros(Path(directory), count, f"w{rank}-", unnamed=unnamed))


def inode_alloc(ctx: Context, args: argparse.Namespace) -> None:
    """ext4 without a journal skips inodes freed in the last 5 s (300 s while their inode-table block is dirty)
    on every allocation (fs/ext4/ialloc.c: find_inode_bit → recently_deleted); a create by name holds the
    directory's i_rwsem meanwhile. Shows the cost per create before/after `--files` deletions, and 8 processes
    creating at once in one directory, by name vs unnamed (O_TMPFILE + linkat, what the spool does)."""
    directory = ctx.fresh_dir("inode-alloc")
    journals = os.listdir("/proc/fs/jbd2") if os.path.isdir("/proc/fs/jbd2") else []
    print(f"ext4 journals on this machine (/proc/fs/jbd2): {journals or 'none'}")

    def median_create(tag: str, *, unnamed: bool = False) -> str:
        return f"{percentile(_create_micros(directory, 200, tag, unnamed=unnamed), 50):.1f} µs"

    print(f"fresh directory: create median {median_create('a')}")
    for i in range(args.files):
        (directory / f"d{i}").touch()
    for i in range(args.files):
        (directory / f"d{i}").unlink()
    print(f"right after deleting {args.files} files: create median {median_create('b')} (same second: not recent yet)")
    time.sleep(2)
    for unnamed in (False, True):
        kind = "O_TMPFILE + linkat" if unnamed else "create by name"
        print(f"2 s later, {kind}: median {median_create(f'c{unnamed:d}', unnamed=unnamed)}")
    spawn = multiprocessing.get_context("spawn")
    for unnamed in (False, True, False, True):
        barrier, out = spawn.Barrier(8), spawn.Queue()
        procs = [spawn.Process(target=_parallel_creator, args=(str(directory), 25, rank + 100 * unnamed + 1000 * len(
            os.listdir(directory)), unnamed, barrier, out)) for rank in range(8)]
        for proc in procs:
            proc.start()
        times = sorted(t for _ in procs for t in out.get(timeout=300))
        for proc in procs:
            proc.join()
        kind = "O_TMPFILE + linkat" if unnamed else "create by name"
        print(f"8 processes × 25 creates at once, {kind}: p50 {percentile(times, 50):.0f} µs, "
              f"p99 {percentile(times, 99):.0f} µs, max {times[-1]:.0f} µs")
    ctx.remove(directory)


def quota(ctx: Context, args: argparse.Namespace) -> None:
    """What a save pays for the spool quota while many entries wait in the spool (a long outage): the admission
    reads the quota ledger, and sums blobs/ only after something other than an admission changed it."""
    from mldash.config import Settings
    from mldash.spool.enqueue import Enqueuer, EntrySpec
    from mldash.spool.quota import quota_lock

    root = ctx.fresh_dir("quota")
    settings = Settings.load(env={}, spool=str(root / "spool"), store=(root / "store").as_uri(),
                             catalog="sqlite://" + str(root / "catalog.sqlite"), autostart=False)
    with_quota = Enqueuer(settings.replace(spool_quota=2**40))
    without = Enqueuer(settings)
    layout = with_quota.layout
    layout.ensure()
    body = os.urandom(4096)
    spec = EntrySpec("bench", "quota", "run", "files", "f.bin", "application/octet-stream", "blob")

    def save_micros(enqueuer: Enqueuer) -> float:
        started = time.perf_counter()
        enqueuer.enqueue(spec, lambda sink: sink.write(body), expected_size=len(body))
        return (time.perf_counter() - started) * 1e6

    save_micros(without), save_micros(with_quota)  # warm-up: imports, first file creations
    made = 0
    for count in sorted({1000, 10_000, args.files}):
        for i in range(made, count):  # stand-ins for spooled entries: the quota only counts blobs/
            (layout.blobs_dir / f"x{i}.blob").write_bytes(body)
        made = count
        with quota_lock(layout) as ledger:
            started = time.perf_counter()
            ledger.used(fresh=True)
            summed = (time.perf_counter() - started) * 1e3
            started = time.perf_counter()
            ledger.used()
            read = (time.perf_counter() - started) * 1e6
        plain = [save_micros(without) for _ in range(50)]
        quota_saves = [save_micros(with_quota) for _ in range(50)]
        (layout.blobs_dir / "x0.blob").unlink()  # as eviction does: the next admission sums blobs/ again
        (layout.blobs_dir / "x0.blob").write_bytes(body)
        after_change = save_micros(with_quota)
        print(f"{count:>6} blobs: summing blobs/ {summed:.1f} ms, ledger read {read:.0f} µs; save p50 without quota "
              f"{percentile(plain, 50):.0f} µs, with quota {percentile(quota_saves, 50):.0f} µs; first save after "
              f"blobs/ changed {after_change / 1e3:.1f} ms")
    ctx.remove(root)


EXPERIMENTS = {"stall": stall, "drain-large": drain_large, "drain-small": drain_small, "put-paths": put_paths,
               "rss": rss, "json-sched": json_sched, "inode-alloc": inode_alloc, "quota": quota}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=list(EXPERIMENTS))
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=int, default=None,
                        help="drain-small, put-paths: 1000; inode-alloc: 4000; quota: 50000")
    parser.add_argument("--calls", type=int, default=250)
    args = parser.parse_args(argv)
    if args.files is None:
        args.files = {"inode-alloc": 4000, "quota": 50_000}.get(args.experiment, 1000)
    workdir = Path(tempfile.mkdtemp(prefix="mldash-diagnose-", dir="/tmp"))
    ctx = Context(workdir, quick=False)
    try:
        EXPERIMENTS[args.experiment](ctx, args)
    finally:
        ctx.close()
        ctx.remove(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
