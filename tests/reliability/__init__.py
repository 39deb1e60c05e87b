"""The reliability suite (issue 7): crashes, network faults, dead dependencies, full disks, clock jumps and
hostile input, each followed by the one invariant checker (`invariants.check_invariants`).

| #  | module                      | what is injected                                              | CI count      |
|----|-----------------------------|---------------------------------------------------------------|---------------|
| 1  | test_kill_client.py         | kill -9 of the training process during saves (sync, deferred) | 30 + 10 kills |
| 2  | test_kill_daemon.py         | kill -9 of the daemon at 9 pipeline steps and random moments  | 100 kills     |
| 3  | test_network_faults.py      | resets at 10/30/50 %; lost UploadPart/Complete/Create answers | 2 rounds × 3  |
| 4  | test_blackhole.py           | blackholed S3 and MongoDB (deadlines, resume)                 | 5 runs        |
| 5  | test_slowdown_storm.py      | 6 s of 503 SlowDown (bounded request rate), then recovery     | 1 storm       |
| 6  | test_catalog_outage.py      | MongoDB stopped mid-run; 4 failCommand failpoints             | 5 runs        |
| 7  | test_permanent_errors.py    | 403 on some keys, missing bucket, bad credentials, catalog 13 | 6 runs        |
| 8  | test_corruption.py          | spooled byte flipped; byte flipped in flight (once, always)   | 5 runs        |
| 9  | test_full_disk.py           | spool on a full 20 MiB tmpfs (idle daemon; running daemon)    | 2 runs        |
| 10 | test_sigterm.py             | SIGTERM mid-upload (random points; a hung part)               | 4 + 1         |
| 11 | test_clock_jumps.py         | faketime +1 day (mid-upload + restart, mid-commit), -1 hour   | 3 runs        |
| 12 | test_hostile_input.py       | hypothesis: names, prefixes, filenames, tags, metadata        | 300 + 100     |
| 13 | test_secrets_permissions.py | DEBUG runs with distinctive credentials; umask 000            | 1 run         |

Counts scale with `--iterations N` / `MLDASH_TEST_ITERATIONS`; `-m slow` (or MLDASH_TEST_SLOW=1) runs the long
versions of the kill loops (20× CI). See conftest.py.
"""
