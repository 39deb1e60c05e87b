"""mldash benchmarks: the stall on the training side and the drain on the daemon side, against baselines.

    python -m benchmarks                  # full run (~10 min on 2 cores), results in benchmarks/results/
    python -m benchmarks --quick          # smoke run (~1 min), small sizes and few repeats
    python -m benchmarks --only stall_torch --only drain_large

Every scenario runs in its own child process (no state leaks from one to the next), starts what it needs
(moto's S3 server, a SecantusDB MongoDB wire server, the daemon) and interleaves subject and baseline.
See docs/benchmarks.md for the methodology.
"""
