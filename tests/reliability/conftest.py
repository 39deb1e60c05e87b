"""Reliability suite fixtures: loop counts, the `slow` switch, the fork server, fault-ready settings.

Loop counts: every loop takes its count from `--iterations N` or `$MLDASH_TEST_ITERATIONS` (the option is
registered once for the whole test tree by tests/spool_helpers.py, shared with the spool crash tests), else
the test's CI default. CI defaults are sized so the whole suite runs in about 6 minutes on 2 cores
(scripts/test.sh: 2 pytest workers).
`@pytest.mark.slow` tests are the long versions (default: 20× the CI count); they run only when selected
with `-m slow` or `MLDASH_TEST_SLOW=1`, e.g.

    MLDASH_TEST_SLOW=1 pytest tests/reliability -m slow --iterations 2000
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mldash.config import Settings
from tests.faults import FaultProxy
from tests.reliability.forkserver import ForkServer
from tests.spool_helpers import iterations, slow_enabled

MIB = 2**20
SLOW_FACTOR = 20


@pytest.fixture(autouse=True)
def _slow_only_when_selected(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("slow") and not slow_enabled(request.config):
        pytest.skip("long version: select with -m slow or MLDASH_TEST_SLOW=1 (count: --iterations)")


def loop_count(request: pytest.FixtureRequest, ci: int) -> int:
    """--iterations / $MLDASH_TEST_ITERATIONS, else `ci` (× SLOW_FACTOR for a @slow test)."""
    default = ci * SLOW_FACTOR if request.node.get_closest_marker("slow") else ci
    return iterations(request.config, default)


@pytest.fixture(scope="session")
def fork_server() -> Iterator[ForkServer]:
    server = ForkServer().start()
    try:
        yield server
    finally:
        server.stop()


def fast(settings: Settings, **changes: object) -> Settings:
    """Short backoffs and deadlines, 5 MiB parts: faults play out in seconds, multipart stays cheap for moto."""
    values: dict[str, object] = dict(retry_base_delay=0.05, retry_max_delay=0.5, request_timeout=5.0,
                                     part_size=5 * MIB, multipart_threshold=5 * MIB, max_concurrent_parts=2,
                                     max_concurrent_files=4)
    values.update(changes)
    return settings.replace(**values)


@pytest.fixture
def s3_via_proxy(s3_settings: Settings, s3_fault_proxy: FaultProxy) -> tuple[Settings, Settings, FaultProxy]:
    """(settings the daemon uses: S3 through the fault proxy, a direct view of the same bucket, the proxy)."""
    direct = fast(s3_settings)
    return direct.replace(s3_endpoint_url=s3_fault_proxy.url), direct, s3_fault_proxy


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path
