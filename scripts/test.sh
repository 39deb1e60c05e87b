#!/usr/bin/env bash
# Set up (first run) and run the test suite: `ruff check .`, then pytest. Safe to re-run: an existing
# .venv is reused and pip only checks what is already installed. Arguments go to pytest:
#   ./scripts/test.sh                                   # everything (what CI runs)
#   ./scripts/test.sh -x tests/test_systemd_units.py    # one file, stop at the first failure
#   ./scripts/test.sh -n 0 tests/test_ids.py            # in this process, no worker processes
# Environment: PYTHON=python3.12 picks the interpreter for a new .venv (>= 3.11).
#
# pytest runs the tests in 2 worker processes (pytest-xdist), each with its own moto server, SecantusDB and
# temp dirs: most of the suite waits (on deadlines, backoffs, subprocesses), so 2 workers on 2 cores take
# about half the time of one. `--dist worksteal`: a worker that runs out of tests takes some of the other's.
# An external MongoDB ($MLDASH_TEST_MONGO_URI) would be shared by the workers, and the failpoints some tests
# set on it are server-wide: the tests then run in one process.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "==> creating .venv with $("$python" --version 2>&1)"
    "$python" -m venv .venv
fi

# The dev extra pins torch==2.13.0 (CPU), moto[server], SecantusDB, pytest (+ pytest-xdist) and ruff; the S3 trio
# aioboto3/aiobotocore/boto3+botocore is pinned exactly in pyproject.toml, so pip has nothing to
# backtrack over (an open range there costs >10 minutes of resolver time).
echo "==> pip install -e '.[dev]'"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'

# Debian tools some tests use: systemd-analyze (package `systemd`, which also brings libseccomp) checks
# the systemd units and runs the daemon inside their sandbox — installing it does not need systemd to be
# PID 1; libfaketime (package `faketime`) steps the wall clock under the daemon in the clock-jump tests.
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
[[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 || -e /usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1 ]] \
    || missing+=(faketime)
if (( ${#missing[@]} )); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "==> apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
    else
        echo "note: ${missing[*]} missing and this is not root: the tests that need them will be skipped"
    fi
fi

echo "==> ruff check ."
.venv/bin/ruff check .

workers=2
[[ -n ${MLDASH_TEST_MONGO_URI:-} ]] && workers=0
echo "==> pytest -q -n $workers --dist worksteal $*"
exec .venv/bin/python -m pytest -q -n "$workers" --dist worksteal "$@"
