#!/usr/bin/env bash
# Set up (first run) and run the test suite: `ruff check .`, then pytest. Safe to re-run: an existing
# .venv is reused and pip only checks what is already installed. Arguments go to pytest:
#   ./scripts/test.sh                                   # everything (what CI runs)
#   ./scripts/test.sh -x tests/test_systemd_units.py    # one file, stop at the first failure
# Environment: PYTHON=python3.12 picks the interpreter for a new .venv (>= 3.11).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "==> creating .venv with $("$python" --version 2>&1)"
    "$python" -m venv .venv
fi

# The dev extra pins torch==2.13.0 (CPU), moto[server], SecantusDB, pytest and ruff; the S3 trio
# aioboto3/aiobotocore/boto3+botocore is pinned exactly in pyproject.toml, so pip has nothing to
# backtrack over (an open range there costs >10 minutes of resolver time).
echo "==> pip install -e '.[dev]'"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'

# systemd-analyze checks the systemd units; Debian ships it in the `systemd` package (which also
# brings libseccomp, used to run the daemon inside the units' sandbox). Installing it does not need
# systemd to be PID 1.
if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "==> apt-get install systemd (for systemd-analyze)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends systemd >/dev/null \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null; }
    else
        echo "note: systemd-analyze is missing and this is not root: the systemd unit tests will be skipped" \
             "(install the 'systemd' package to run them)"
    fi
fi

echo "==> ruff check ."
.venv/bin/ruff check .

echo "==> pytest -q $*"
exec .venv/bin/python -m pytest -q "$@"
