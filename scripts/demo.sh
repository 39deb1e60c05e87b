#!/usr/bin/env bash
# Set up (first run) and run the demo: a small training loop whose checkpoints, config and loss plot
# are saved without waiting, then shown synced — on the embedded default, no services needed.
# Safe to re-run: an existing .venv is reused. Arguments go to examples/train_demo.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "==> creating .venv with $("$python" --version 2>&1)"
    "$python" -m venv .venv
fi
# torch is pinned to 2.13.0 (the CPU build); any other version pulls a multi-GB CUDA download.
echo "==> pip install -e '.[torch,media]'"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[torch,media]'

echo "==> python examples/train_demo.py $*"
export PATH="$PWD/.venv/bin:$PATH"   # so the autostarted mldash-syncd and `mldash-syncd status` resolve
exec .venv/bin/python examples/train_demo.py "$@"
