"""The servers a benchmark needs, each in its own process on 127.0.0.1: moto's S3 server and SecantusDB.

Own processes, not threads of the harness: an in-process server would share the GIL with the code being
measured (the in-process daemon, boto3), and a restart would not give its memory back. moto keeps every
uploaded byte in RAM (2.4–4.9 GB per GiB uploaded, see FIELD-NOTES): `MotoServer.rss_mib()` lets a scenario
restart it before it grows too large.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import psutil

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


def use_fake_aws_credentials() -> None:
    """moto accepts any credentials; make sure nothing real (a profile, instance metadata) is ever used."""
    os.environ.update(FAKE_AWS_ENV)
    os.environ.pop("AWS_PROFILE", None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} while starting; log:\n"
                               f"{_tail(log_file)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {timeout}s; log:\n{_tail(log_file)}")


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except OSError:
        return "(no log)"


class _ServerProcess:
    command: list[str]

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_file = workdir / f"{name}.log"
        self.port = 0
        self.process: subprocess.Popen | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> _ServerProcess:
        self.port = free_port()
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.workdir)
        wait_for_port(self.port, self.process, 60.0, self.log_file)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def rss_mib(self) -> float:
        if self.process is None or self.process.poll() is not None:
            return 0.0
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.process.pid).memory_info().rss / 2**20
        return 0.0

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MotoServer(_ServerProcess):
    """`python -m moto.server` (werkzeug, threaded) on a free port."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, "moto")

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def empty_bucket(self, bucket: str) -> None:
        """Delete every object and abort every multipart upload (moto frees their memory, mostly)."""
        client = self.client()
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            for start in range(0, len(keys), 1000):
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys[start:start + 1000], "Quiet": True})

    def restart(self) -> MotoServer:
        """A fresh server (empty, all memory returned); buckets must be created again."""
        self.stop()
        self.start()
        return self


class MongoServer(_ServerProcess):
    """SecantusDB (a MongoDB wire-protocol server on WiredTiger) as `python -m secantus`."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, "secantus")
        # An explicit empty config: otherwise it reads ./secantusd.toml, ~/.secantus/… and /etc/secantus/….
        self.config_file = workdir / "secantusd.toml"
        self.config_file.touch()

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "secantus", "--config", str(self.config_file), "--host", "127.0.0.1",
                "--port", str(self.port), "--storage-path", str(self.workdir / "db"), "--log-level", "WARNING"]

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"
