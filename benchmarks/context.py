"""What every scenario gets: a scratch directory, isolated settings, the servers it asks for, a logger.

Isolation: settings are built from explicit arguments only (`Settings.load(env={}, …)`), XDG_CONFIG_HOME
points into the scratch directory (no user config file is read), and daemon subprocesses get an
environment rebuilt from the same Settings (`settings_env`).
"""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.services import MongoServer, MotoServer, use_fake_aws_credentials
from mldash.config import FIELDS, Settings

MIB = 2**20
GIB = 2**30


def settings_env(settings: Settings) -> dict[str, str]:
    """An environment that makes a subprocess (daemon or client) use exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLDASH_")}
    for field in FIELDS:
        value = getattr(settings, field.name)
        if value is None:
            continue
        env[field.env] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return env


class Context:
    def __init__(self, workdir: Path, *, quick: bool, log: Callable[[str], None] | None = None) -> None:
        self.workdir = workdir
        self.quick = quick
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._counter = itertools.count()
        self._moto: MotoServer | None = None
        self._mongo: MongoServer | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        os.environ["XDG_CONFIG_HOME"] = str(workdir / "xdg-config")  # no stray user config file
        os.environ["XDG_DATA_HOME"] = str(workdir / "xdg-data")
        use_fake_aws_credentials()

    # ---- scratch space ----------------------------------------------------------------------------------
    def fresh_dir(self, name: str) -> Path:
        path = self.workdir / f"{name}-{next(self._counter)}"
        path.mkdir(parents=True)
        return path

    @staticmethod
    def remove(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def settle(pause: float = 0.2) -> None:
        """Between samples: flush dirty pages so one sample's writeback does not land in the next one, and
        collect garbage so that one sample's allocations are not collected on the next one's clock (samples
        of both sides run in this process)."""
        os.sync()
        gc.collect()
        time.sleep(pause)

    # ---- settings --------------------------------------------------------------------------------------
    def settings(self, name: str, *, store: str = "file", catalog: str = "sqlite", bucket: str | None = None,
                 endpoint_url: str | None = None, mongo_database: str | None = None, **overrides: Any) -> Settings:
        """Isolated settings under a fresh directory: a local or S3 store, a SQLite or MongoDB catalog.

        `store="s3"` needs `bucket` and `endpoint_url`; `catalog="mongo"` uses the context's MongoDB server.
        Everything else keeps the defaults users get, unless overridden.
        """
        root = self.fresh_dir(name)
        values: dict[str, Any] = {"spool": root / "spool", "autostart": False}
        if store == "file":
            values["store"] = (root / "store").as_uri()
        else:
            values["store"] = f"s3://{bucket}/root"
            values["s3_endpoint_url"] = endpoint_url
        if catalog == "sqlite":
            values["catalog"] = "sqlite://" + str(root / "catalog.sqlite")
        else:
            values["catalog"] = self.mongo().uri
            values["mongo_database"] = mongo_database or f"bench_{root.name.replace('-', '_')}"
        values.update(overrides)
        return Settings.load(env={}, **values)

    # ---- servers ---------------------------------------------------------------------------------------
    def moto(self) -> MotoServer:
        if self._moto is None:
            self._moto = MotoServer(self.workdir / "moto").start()
            self.log(f"  moto server on {self._moto.url}")
        return self._moto

    def mongo(self) -> MongoServer:
        if self._mongo is None:
            self._mongo = MongoServer(self.workdir / "secantus").start()
            self.log(f"  SecantusDB on {self._mongo.uri}")
        return self._mongo

    def daemon_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mldash_syncd", *args]

    def run_daemon(self, settings: Settings, *args: str, timeout: float = 900.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.daemon_command(*args), env=settings_env(settings), capture_output=True,
                              text=True, timeout=timeout)

    def close(self) -> None:
        for server in (self._moto, self._mongo):
            if server is not None:
                server.stop()
        self._moto = self._mongo = None


def clear_spool(settings: Settings) -> None:
    """Remove every spooled entry (no daemon runs on this spool): keeps stall samples independent."""
    from mldash.spool.layout import SpoolLayout

    layout = SpoolLayout(settings.spool)
    for directory in (layout.blobs_dir, layout.manifests_dir, layout.tmp_dir):
        if directory.exists():
            for entry in os.scandir(directory):
                os.unlink(entry.path)
