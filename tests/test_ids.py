"""Snowflake ids: unique in a tight loop, across processes and after fork; increasing per process."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import mldash.ids as ids
from mldash.ids import NODE_BITS, SEQUENCE_BITS, SnowflakeGenerator, id_timestamp_ms, new_id

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=120).stdout


def test_tight_loop_200k_unique_and_strictly_increasing() -> None:
    drawn = [new_id() for _ in range(200_000)]
    assert len(set(drawn)) == len(drawn), f"{len(drawn) - len(set(drawn))} duplicates"
    assert all(a < b for a, b in itertools.pairwise(drawn)), "not strictly increasing"
    assert all(0 < i < 2**63 for i in (drawn[0], drawn[-1])), "ids must fit a signed 64-bit column"


def test_id_encodes_its_creation_time() -> None:
    before = int(time.time() * 1000)
    stamp = id_timestamp_ms(new_id())
    assert before - 5 <= stamp <= int(time.time() * 1000) + 5


def test_more_than_a_sequence_per_millisecond_borrows_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids.time, "time", lambda: 1_800_000_000.0)  # a frozen clock
    generator = SnowflakeGenerator()
    drawn = [generator.next_id() for _ in range(5 * (1 << SEQUENCE_BITS))]
    assert all(a < b for a, b in itertools.pairwise(drawn))
    assert len(set(drawn)) == len(drawn)


def test_clock_going_backwards_never_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([1_800_000_000.5] * 3 + [1_799_999_000.0] * 3 + [1_800_000_001.0] * 3)
    monkeypatch.setattr(ids.time, "time", lambda: next(clock))
    generator = SnowflakeGenerator()
    drawn = [generator.next_id() for _ in range(9)]
    assert all(a < b for a, b in itertools.pairwise(drawn)), "an NTP step back broke monotonicity"


def test_generator_is_thread_safe() -> None:
    import threading

    generator = SnowflakeGenerator()
    out: list[list[int]] = [[] for _ in range(4)]

    def work(slot: list[int]) -> None:
        slot.extend(generator.next_id() for _ in range(20_000))

    threads = [threading.Thread(target=work, args=(slot,)) for slot in out]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for slot in out for i in slot]
    assert len(set(every)) == len(every)
    assert all(all(a < b for a, b in itertools.pairwise(s)) for s in out)


WRITER = """
    import sys
    from mldash.ids import new_id
    print("ready", flush=True)
    sys.stdin.readline()
    drawn = [new_id() for _ in range(int(sys.argv[1]))]
    sys.stdout.write("\\n".join(map(str, drawn)) + "\\n")
"""


def test_eight_processes_50k_each_no_duplicates() -> None:
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), "50000"], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(8)]
    try:
        for proc in procs:  # start all loops together, so they share milliseconds
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        per_process = []
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0
            per_process.append([int(line) for line in out.split()])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    every = [i for drawn in per_process for i in drawn]
    assert len(every) == 400_000
    assert len(set(every)) == len(every), f"{len(every) - len(set(every))} duplicate ids across processes"
    for drawn in per_process:
        assert all(a < b for a, b in itertools.pairwise(drawn))
    nodes = {(i >> SEQUENCE_BITS) & ((1 << NODE_BITS) - 1) for i in (drawn[0] for drawn in per_process)}
    assert len(nodes) == 8, "two live processes on one host share a node value"


def test_forked_child_draws_different_ids() -> None:
    out = _run("""
        import os
        from mldash import ids
        first = ids.new_id()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, " ".join(str(ids.new_id()) for _ in range(2000)).encode())
            os._exit(0)
        os.close(write)
        mine = [ids.new_id() for _ in range(2000)]
        chunks = []
        while chunk := os.read(read, 1 << 16):
            chunks.append(chunk)
        os.waitpid(pid, 0)
        child = [int(x) for x in b"".join(chunks).split()]
        print(len(set(mine) & set(child)), len(child), first in child)
    """)
    shared, child_count, repeated_first = out.split()
    shared, child_count = int(shared), int(child_count)
    assert child_count == 2000 and repeated_first == "False"
    assert shared == 0, f"parent and forked child drew {shared} identical ids"


def test_node_is_redrawn_after_fork() -> None:
    out = _run("""
        import os
        from mldash import ids
        ids.new_id()
        parent = ids._default._node
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            ids.new_id()
            os.write(write, str(ids._default._node).encode())
            os._exit(0)
        os.close(write)
        child = int(os.read(read, 100))
        os.waitpid(pid, 0)
        print(parent, child)
    """)
    parent, child = map(int, out.split())
    assert parent != child
