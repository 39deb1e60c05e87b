"""The upload bandwidth cap (`max_upload_rate`, mldash/store/pacing.py): parsing, the token bucket, both stores,
and the daemon as a whole.

Timing here is only ever a lower bound — a capped upload cannot finish sooner than its bytes allow — so a
slow or loaded machine cannot make these tests fail; an upload that ignores the cap does.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest

from mldash.config import ConfigError, Settings
from mldash.store import LocalStore, S3Store, TransientStoreError, b64_sha256, make_store
from mldash.store.pacing import SLICE, RateLimit
from tests.fixtures.daemon import enqueue_bytes
from tests.fixtures.s3 import s3_client
from tests.test_s3_store import BLACKHOLE, DEADLINE_CHECK, FakeS3

MiB = 2**20


# -- configuration ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("50MB/s", 50_000_000), ("100MiB", 100 * MiB), (" 1 GiB/s ", 2**30), ("2mib/S", 2 * MiB),
    (10_485_760, 10_485_760), ("0", None), (0, None), ("unlimited", None), ("", None),
])
def test_rate_is_read_with_or_without_per_second(settings: Settings, value: object, expected: int | None) -> None:
    assert settings.replace(max_upload_rate=value).max_upload_rate == expected
    assert Settings.load(env={"MLDASH_MAX_UPLOAD_RATE": str(value)}).max_upload_rate == expected


@pytest.mark.parametrize(("value", "says"), [
    ("fast", "'fast' is not a rate"),
    ("1Gbit/s", "'1Gbit/s' is not a rate"),
    ("-5MB/s", "'-5MB/s' is not a rate"),
    ("10", "'10' is 10 bytes per second, below the smallest cap of 64KiB/s"),
])
def test_bad_rate_names_the_value_and_what_is_accepted(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.load(env={"MLDASH_MAX_UPLOAD_RATE": value})
    message = str(caught.value)
    assert says in message and "MLDASH_MAX_UPLOAD_RATE" in message
    assert "'50MB/s'" in message or "'10MB/s'" in message


def test_make_store_gives_both_stores_the_cap(settings: Settings) -> None:
    capped = settings.replace(max_upload_rate="3MiB/s")
    local = make_store(capped)
    assert isinstance(local, LocalStore) and local.rate_limit is not None and local.rate_limit.rate == 3 * MiB
    s3 = make_store(capped.replace(store="s3://bucket/root"))
    assert isinstance(s3, S3Store) and s3.rate_limit is not None and s3.rate_limit.rate == 3 * MiB
    uncapped = make_store(settings).rate_limit  # there all the same, unlimited: a reload can set a cap
    assert uncapped is not None and uncapped.rate is None and not uncapped.limited


# -- the token bucket -------------------------------------------------------------------------------------

async def test_concurrent_takers_share_one_rate() -> None:
    rate = 4 * MiB
    limit = RateLimit(rate)
    total = 2 * MiB

    async def sender(slices: int) -> None:
        for _ in range(slices):
            await limit.take(SLICE)

    started = time.monotonic()
    await asyncio.gather(*(sender(total // SLICE // 4) for _ in range(4)))
    elapsed = time.monotonic() - started
    # Four senders together may not beat the one rate; the bucket's initial credit is the only head start.
    assert elapsed >= (total - limit.burst) / rate * 0.98


async def test_a_cancelled_wait_gives_its_bytes_back() -> None:
    frozen = [100.0]
    limit = RateLimit(1 * MiB, clock=lambda: frozen[0])
    assert await limit.take(limit.burst) == 0.0  # the credit, spent
    waiting = asyncio.create_task(limit.take(20 * MiB))  # would wait 20 s
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # Had the cancelled 20 MiB stayed as debt, this would wait 20.25 s instead of 0.25 s.
    async with asyncio.timeout(5):
        assert await limit.take(MiB // 4) == pytest.approx(0.25)


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimit(0)


# -- the stores -------------------------------------------------------------------------------------------

async def test_s3_body_is_paced_and_its_wait_does_not_count_against_the_deadline(
        s3_bucket: tuple[str, str]) -> None:
    endpoint_url, bucket = s3_bucket
    rate = 2 * MiB
    # The deadline for a 3 MiB body: 1 s + 3 × 0.05 s — well under the ~1.45 s the cap makes the body take.
    store = S3Store(bucket, "root", endpoint_url=endpoint_url, request_timeout=1.0, seconds_per_mib=0.05,
                    max_upload_rate=rate)
    await store.open()
    try:
        data = os.urandom(3 * MiB)
        key = f"root/paced/{uuid.uuid4().hex}"
        started = time.monotonic()
        stored = await store.put(key, data, b64_sha256(data))
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    assert elapsed >= (len(data) - store.rate_limit.burst) / rate * 0.98
    assert stored.size == len(data)
    assert s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read() == data


async def test_s3_deadline_still_ends_a_stalled_call_when_capped(moto_server: str) -> None:
    """The cap pushes a call's deadline back only by the time spent waiting for it: a store that does not
    answer still times out (here after ~0.5 s + the ~0.4 s of waiting for the cap + the body's size share)."""
    async with FakeS3(lambda request: BLACKHOLE) as server:
        store = S3Store("bucket", "root", endpoint_url=server.url, request_timeout=0.5, max_upload_rate=MiB)
        await store.open()
        try:
            data = os.urandom(512 << 10)
            started = time.monotonic()
            with pytest.raises(TransientStoreError):
                await store.put("root/stall", data, b64_sha256(data))
            assert time.monotonic() - started < DEADLINE_CHECK
        finally:
            await store.close()
        assert server.requests, "the request must have reached the server"


async def test_small_direct_puts_are_paced_too(s3_bucket: tuple[str, str]) -> None:
    endpoint_url, bucket = s3_bucket
    rate = 1 * MiB
    store = S3Store(bucket, "root", endpoint_url=endpoint_url, request_timeout=30.0, max_upload_rate=rate)
    await store.open()
    try:
        assert store._direct is not None  # these go the direct way (s3_direct.py)
        bodies = [os.urandom(32 << 10) for _ in range(48)]  # 1.5 MiB
        run = uuid.uuid4().hex
        started = time.monotonic()
        await asyncio.gather(*(store.put(f"root/{run}/{i}", body, b64_sha256(body)) for i, body in enumerate(bodies)))
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    assert elapsed >= (sum(map(len, bodies)) - store.rate_limit.burst) / rate * 0.98


async def test_local_store_paces_puts_and_parts(tmp_path: Path) -> None:
    rate = 4 * MiB
    store = LocalStore(tmp_path / "store", max_upload_rate=rate)
    await store.open()
    data = os.urandom(1 * MiB)
    started = time.monotonic()
    await store.put("a/1/x", data, b64_sha256(data))
    upload = await store.create_multipart("a/2/y")
    for number in (1, 2):
        await store.upload_part("a/2/y", upload, number, data, b64_sha256(data))
    elapsed = time.monotonic() - started
    assert elapsed >= (3 * MiB - store.rate_limit.burst) / rate * 0.98


# -- the daemon -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("store", ["local", "s3"])
def test_daemon_drain_stays_under_the_cap(store: str, request: pytest.FixtureRequest, drain) -> None:
    settings: Settings = request.getfixturevalue("settings" if store == "local" else "s3_settings")
    rate = 2 * MiB
    capped = settings.replace(max_upload_rate=rate, multipart_threshold="5MiB", part_size="5MiB")
    sizes = [6 * MiB, 512 << 10, 512 << 10, 40 << 10]  # a multipart file, single PUTs, an inline save
    for i, size in enumerate(sizes):
        enqueue_bytes(capped, os.urandom(size), filename=f"f{i}.bin")
    started = time.monotonic()
    report = drain(capped)
    elapsed = time.monotonic() - started
    assert report.committed == len(sizes) and report.clean
    assert elapsed >= (sum(sizes) - RateLimit(rate).burst) / rate * 0.98


def test_status_shows_the_running_daemons_cap(settings: Settings, daemon_process) -> None:
    from tests.test_daemon_process import cli, wait_for

    daemon_process(settings.replace(max_upload_rate="3MiB/s"), "run")
    # `status` run with other settings (no cap of its own) reports the cap of the daemon that runs.
    wait_for(lambda: '"uploadRateCap": 3145728' in cli(settings, "status", "--json").stdout)
    shown = cli(settings, "status")
    assert shown.returncode == 0 and "capped at 3.0 MiB/s (max_upload_rate)" in shown.stdout, shown.stdout


def test_status_shows_the_wire_rate_while_the_first_capped_part_is_sent(s3_settings: Settings,
                                                                         daemon_process) -> None:
    """Under a cap, `status`'s rate is what the pacer lets through as it happens. Counted by finished parts, it
    read 0 B/s for as long as the first part took (here the whole 4 MiB file: 8 s at 512 KiB/s)."""
    import json

    from tests.test_daemon_process import cli, wait_for

    capped = s3_settings.replace(max_upload_rate="512KiB/s")
    entry = enqueue_bytes(capped, os.urandom(4 * 2**20), filename="ckpt.bin")
    daemon = daemon_process(capped, "run")
    wait_for(lambda: "started on" in daemon.log())
    time.sleep(4.5)  # two heartbeats into the upload, which the cap makes last 8 s
    status = json.loads(cli(capped, "status", "--json").stdout)
    assert status["states"]["uploading"]["count"] == 1, status["states"]  # still in its first (only) part
    # Not a speed check (the cap bounds it from above): was 0 until the part was done.
    assert 0.25 * 512 * 1024 < status["throughputBytesPerSecond"] < 1.5 * 512 * 1024, status
    assert entry.id and daemon.terminate() == 0
