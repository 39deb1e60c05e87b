"""Importing the client stays light: every training process (every DDP rank) pays for it at start-up."""

from __future__ import annotations

import subprocess
import sys


def test_import_mldash_does_not_load_the_daemons_sqlite_or_numpy() -> None:
    code = ("import sys, mldash; from mldash import Experiment, dxp; "
            "print(sorted(m for m in ('sqlite_utils', 'numpy', 'aioboto3', 'pymongo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
