"""A fork server for kill -9 loops: one Python that imported mldash, the daemon and the backends once,
then forks a fresh process per daemon run or training writer (~10 ms instead of ~0.7 s of imports).

The server is single-threaded and forks before any event loop or thread exists in it, so each child
starts clean. A child applies the environment it is given (the settings of its run), redirects its
stdout/stderr to a log file, runs one function of `tests.reliability.children`, and exits with its
return value. The test kills children by pid (they are the server's children, not ours) and asks
the server to reap them.

    server = ForkServer().start()
    child = server.spawn("run_daemon", env=settings_env(s), log=path, args=["run"], kill_at="after_part")
    ...
    child.kill(); child.wait()
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

SERVER = textwrap.dedent(r'''
    import json, os, sys, traceback
    sys.path.insert(0, sys.argv[1])
    # Everything a child needs, imported once here (children inherit it through fork).
    import aioboto3, aiobotocore, botocore, pymongo, watchfiles  # noqa: F401
    import mldash, mldash.store.s3, mldash.catalog.mongo, mldash.catalog.sqlite  # noqa: F401
    import mldash_syncd.cli, mldash_syncd.service  # noqa: F401
    import tests.reliability.children as children

    out = sys.stdout
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                code = 70
                try:
                    os.setsid()
                    fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    os.close(fd)
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    os.environ.clear()
                    os.environ.update(cmd["env"])
                    code = getattr(children, cmd["func"])(**cmd["kwargs"]) or 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                    code = 70
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            out.write(json.dumps({"pid": pid}) + "\n")
        elif cmd["op"] == "wait":
            _, status = os.waitpid(cmd["pid"], 0)
            out.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        elif cmd["op"] == "poll":
            pid, status = os.waitpid(cmd["pid"], os.WNOHANG)
            out.write(json.dumps({"code": os.waitstatus_to_exitcode(status) if pid else None}) + "\n")
        out.flush()
''')


class Child:
    """One forked process: a daemon run or a writer."""

    def __init__(self, server: ForkServer, pid: int, log: Path) -> None:
        self.server = server
        self.pid = pid
        self.log_path = log
        self.code: int | None = None

    def signal(self, sig: int) -> None:
        if self.code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL (no-op if it already exited; the zombie is reaped by `wait`)."""
        self.signal(signal.SIGKILL)

    def wait(self, timeout: float = 120.0) -> int:
        """Reap the child; returns its exit code (negative: killed by that signal)."""
        if self.code is not None:
            return self.code
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"child {self.pid} still running after {timeout}s; log:\n{self.log()[-3000:]}")
            time.sleep(0.01)
        return code

    def poll(self) -> int | None:
        if self.code is None:
            self.code = self.server.request({"op": "poll", "pid": self.pid})["code"]
        return self.code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class ForkServer:
    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.children: list[Child] = []

    def start(self) -> ForkServer:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(REPO)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        return self

    def request(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (exit {self.proc.poll()})")
        return json.loads(line)

    def spawn(self, func: str, *, env: dict[str, str], log: Path, **kwargs: Any) -> Child:
        pid = self.request({"op": "spawn", "func": func, "env": env, "log": str(log), "kwargs": kwargs})["pid"]
        child = Child(self, pid, log)
        self.children.append(child)
        return child

    def stop(self) -> None:
        for child in self.children:
            child.kill()
            if child.code is None:
                with contextlib.suppress(Exception):  # best effort at teardown
                    child.wait(timeout=10)
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
