"""The systemd units in systemd/: systemd's own checks, our consistency rules, and the sandbox's fit.

PID 1 here is not systemd, so units are checked, not started:

* ``systemd-analyze verify`` must exit 0 with empty output: it exits 0 on unknown keys and bad
  values (it only prints them), so any output counts as a failure.
* verify also requires ExecStart='s binary to exist. The system units name the production path
  ``/usr/local/bin/mldash-syncd`` (docs/operations.md); the test verifies a temporary copy in which
  exactly that path is replaced by an executable that exists here — the venv's console script when
  installed, else a stub (verify only checks that the file is executable). The user unit is
  verified unmodified, with $HOME pointed at a directory holding ``.local/bin/mldash-syncd``.
* ``systemd-analyze security --offline=true --threshold=N``: N is the exposure × 10, and the exit
  status is non-zero when the exposure is *above* N/10, so N=20 means "at most 2.0".

What systemd cannot check is tested here too: every MLDASH_* name in the units and the env example
is a real setting, the spool lies inside the state directory the sandbox lets us write, the stop
timeout fits the daemon's stop grace — and the daemon really syncs to S3 and MongoDB inside each
unit's seccomp sandbox (SystemCallFilter=, RestrictAddressFamilies=, MemoryDenyWriteExecute=),
applied to a child process by tests/unit_sandbox.py exactly as systemd would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mldash.config import FIELDS, Settings
from tests.unit_sandbox import parse_unit

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SYSTEM_UNIT = UNITS / "mldash-syncd.service"
TEMPLATE_UNIT = UNITS / "mldash-syncd@.service"
USER_UNIT = UNITS / "mldash-syncd-user.service"
ENV_EXAMPLE = UNITS / "mldash-syncd.env.example"
INSTALLED_EXEC = "/usr/local/bin/mldash-syncd"
MAX_EXPOSURE = 2.0
KNOWN_ENV = {field.env for field in FIELDS}
SYSTEM_UNITS = [SYSTEM_UNIT, TEMPLATE_UNIT]
ALL_UNITS = [SYSTEM_UNIT, TEMPLATE_UNIT, USER_UNIT]


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for k, v in parse_unit(path).get(section, []) if k == key]


def value(path: Path, section: str, key: str) -> str:
    found = values(path, section, key)
    assert len(found) == 1, f"{path.name}: expected one {key}= in [{section}], found {found}"
    return found[0]


def environment(path: Path) -> dict[str, str]:
    """Environment= assignments (several per line, later ones win, as in systemd)."""
    env = {}
    for line in values(path, "Service", "Environment"):
        for assignment in line.split():
            name, _, val = assignment.partition("=")
            env[name] = val
    return env


# --- systemd-analyze -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian: `apt-get install systemd`); ./scripts/test.sh "
                    "installs it when run as root")
    return path


@pytest.fixture(scope="module")
def daemon_executable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    installed = Path(sys.executable).parent / "mldash-syncd"
    if installed.is_file() and os.access(installed, os.X_OK):
        return installed
    stub = tmp_path_factory.mktemp("bin") / "mldash-syncd"
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    return stub


def run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


def with_executable(unit: Path, directory: Path, executable: Path) -> Path:
    """A copy of `unit` in `directory` with only the ExecStart= binary replaced by `executable`."""
    assert value(unit, "Service", "ExecStart") == f"{INSTALLED_EXEC} run"
    text = unit.read_text(encoding="utf-8")
    copy = directory / unit.name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={executable} "), encoding="utf-8")
    return copy


def verify_target(copy: Path) -> Path:
    # A template is verified as an instance: that is what gets loaded (and %i resolved).
    return copy.with_name(copy.name.replace("@.", "@alice.")) if "@." in copy.name else copy


@pytest.mark.parametrize("unit", SYSTEM_UNITS, ids=lambda p: p.name)
def test_system_units_verify_cleanly(analyze: str, daemon_executable: Path, tmp_path: Path, unit: Path) -> None:
    result = run(analyze, "verify", verify_target(with_executable(unit, tmp_path, daemon_executable)))
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_user_unit_verifies_cleanly_unmodified(analyze: str, daemon_executable: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "mldash-syncd").symlink_to(daemon_executable)
    # A short runtime directory of our own (mode 0700): systemd resolves the installed user units' sockets under
    # it (%t/gnupg/S.gpg-agent.browser …), AF_UNIX paths are limited to 107 bytes, and tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="mldash-rt-") as runtime:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_RUNTIME_DIR": runtime}
        result = run(analyze, "--user", "verify", USER_UNIT, env=env)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_verify_output_is_what_catches_mistakes(analyze: str, daemon_executable: Path, tmp_path: Path) -> None:
    """The premise of the checks above: a misspelt key exits 0 and is reported only on stderr."""
    copy = with_executable(SYSTEM_UNIT, tmp_path, daemon_executable)
    copy.write_text(copy.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    result = run(analyze, "verify", copy)
    assert result.returncode == 0
    assert "ProtectSytem" in result.stderr


def exposure(analyze: str, unit: Path, threshold: int) -> tuple[int, float]:
    result = run(analyze, "security", "--offline=true", f"--threshold={threshold}", unit)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, f"no score in systemd-analyze output:\n{result.stdout}\n{result.stderr}"
    return result.returncode, float(match.group(1))


@pytest.mark.parametrize("unit", SYSTEM_UNITS, ids=lambda p: p.name)
def test_system_units_expose_at_most_2_0(analyze: str, tmp_path: Path, unit: Path) -> None:
    target = unit
    if "@." in unit.name:
        target = tmp_path / unit.name
        shutil.copy(unit, target)
        target = verify_target(target)
    status, score = exposure(analyze, target, threshold=round(MAX_EXPOSURE * 10))
    assert score <= MAX_EXPOSURE
    assert status == 0
    # The threshold means what we think: one tenth below the score must fail.
    status_below, _ = exposure(analyze, target, threshold=round(score * 10) - 1)
    assert status_below != 0


# --- what systemd does not check -------------------------------------------------------------------

@pytest.mark.parametrize("unit", ALL_UNITS, ids=lambda p: p.name)
def test_common_service_policy(unit: Path) -> None:
    # Imported here, not at module level: a broken daemon import must not hide the unit checks.
    from mldash.config import FIELDS
    from mldash_syncd.cli import EXIT_USAGE

    stop_grace = next(f for f in FIELDS if f.name == "stop_grace").default()

    assert value(unit, "Service", "Type") == "notify"  # READY=1 and watchdog pings: mldash_syncd/sdnotify.py
    assert value(unit, "Service", "NotifyAccess") == "main"
    assert value(unit, "Service", "WatchdogSec") == "2min"
    assert value(unit, "Service", "Restart") == "on-failure"
    assert value(unit, "Service", "KillSignal") == "SIGTERM"
    assert value(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"  # SIGHUP: mldash_syncd/reload.py
    # After SIGTERM the daemon gives in-flight work stop_grace seconds (default), then cancels it (recording
    # finished parts) and closes the index: SIGKILL must come well after that.
    assert value(unit, "Service", "TimeoutStopSec") == "60"
    assert int(value(unit, "Service", "TimeoutStopSec")) >= stop_grace + 30
    # A configuration error exits EXIT_USAGE: restarting cannot fix it. Everything else restarts.
    assert value(unit, "Service", "RestartPreventExitStatus") == str(EXIT_USAGE)
    assert value(unit, "Unit", "StartLimitIntervalSec") == "0"
    assert value(unit, "Service", "UMask") == "0077"
    assert value(unit, "Service", "NoNewPrivileges") == "yes"
    assert value(unit, "Service", "MemoryDenyWriteExecute") == "yes"
    assert value(unit, "Service", "RestrictAddressFamilies") == "AF_INET AF_INET6 AF_UNIX"


@pytest.mark.parametrize("unit", ALL_UNITS, ids=lambda p: p.name)
def test_units_only_set_real_settings(unit: Path) -> None:
    # systemd passes any variable through: a misspelt MLDASH_* name would be silently ignored.
    unknown = {name for name in environment(unit) if name.startswith("MLDASH_")} - KNOWN_ENV
    assert not unknown


@pytest.mark.parametrize("unit", SYSTEM_UNITS, ids=lambda p: p.name)
def test_system_unit_sandbox_leaves_exactly_the_state_directory_writable(unit: Path) -> None:
    assert value(unit, "Service", "ProtectSystem") == "strict"
    assert value(unit, "Service", "ProtectHome") == "yes"
    assert value(unit, "Service", "CapabilityBoundingSet") == ""
    assert values(unit, "Service", "ReadWritePaths") == []
    state = value(unit, "Service", "StateDirectory")
    assert value(unit, "Service", "StateDirectoryMode") == "0700"
    env = environment(unit)
    assert env["MLDASH_SPOOL"].startswith(f"%S/{state}/")
    assert env["XDG_DATA_HOME"] == "%S" or env["XDG_DATA_HOME"].startswith(f"%S/{state}")


@pytest.mark.parametrize("unit", SYSTEM_UNITS, ids=lambda p: p.name)
def test_aws_credentials_come_from_load_credential(unit: Path) -> None:
    (credential,) = values(unit, "Service", "LoadCredential")
    name, _, source = credential.partition(":")
    assert source.startswith("/etc/mldash/")
    assert environment(unit)["AWS_SHARED_CREDENTIALS_FILE"] == f"%d/{name}"
    assert not any(k.startswith("AWS_") and k != "AWS_SHARED_CREDENTIALS_FILE" for k in environment(unit))


def test_per_user_template_keeps_the_users_ipc() -> None:
    # RemoveIPC=yes on a real user's unit deletes that user's /dev/shm segments (their training
    # jobs' DataLoader/NCCL memory) whenever the daemon stops.
    assert value(TEMPLATE_UNIT, "Service", "User") == "%i"
    assert value(TEMPLATE_UNIT, "Service", "RemoveIPC") == "no"
    assert values(TEMPLATE_UNIT, "Service", "DynamicUser") == []


def test_env_example_names_real_settings_with_valid_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    example = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"#?(MLDASH_[A-Z0-9_]+)=(.*)", line.strip())
        if match:
            example[match.group(1)] = match.group(2)
    assert {"MLDASH_STORE", "MLDASH_CATALOG", "MLDASH_S3_ENDPOINT_URL"} <= set(example)
    assert set(example) <= KNOWN_ENV
    Settings.load(env=example)  # raises ConfigError naming the key on a bad value
    assert "AWS_SECRET_ACCESS_KEY=" not in ENV_EXAMPLE.read_text()


# --- the sandbox at run time ------------------------------------------------------------------------
# tests/unit_sandbox.py applies a unit's seccomp/prctl settings (SystemCallFilter=,
# RestrictAddressFamilies=, MemoryDenyWriteExecute=, NoNewPrivileges=, UMask=) to a child process as
# systemd does, then execs the command: the daemon must do its whole job inside them.

SANDBOX = Path(__file__).resolve().parent / "unit_sandbox.py"

PROBE = textwrap.dedent("""
    import errno, mmap, os, socket
    def refused(call):
        try:
            call()
        except OSError as exc:
            return errno.errorcode[exc.errno]
        return "allowed"
    print(refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)),
          refused(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)),
          refused(lambda: os.sched_setaffinity(0, {0})),
          refused(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()),
          oct(os.umask(0)))
""")


def sandboxed(unit: Path, *command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, str(SANDBOX), str(unit), "--", *command], capture_output=True,
                            text=True, timeout=120, env=env, cwd=ROOT, check=False)
    if result.returncode == 77:
        pytest.skip(f"cannot emulate the unit sandbox here: {result.stderr.strip()}")
    return result


@pytest.mark.usefixtures("analyze")
@pytest.mark.parametrize("unit", ALL_UNITS, ids=lambda p: p.name)
def test_sandbox_emulation_is_in_force(unit: Path) -> None:
    result = sandboxed(unit, sys.executable, "-c", PROBE)
    assert result.returncode == 0, result.stderr
    # netlink socket, W+X memory, an @resources call: refused; IPv6 allowed; umask from the unit.
    assert result.stdout.split() == ["EAFNOSUPPORT", "EPERM", "EPERM", "allowed", "0o77"]


@pytest.mark.usefixtures("analyze")
@pytest.mark.parametrize("unit", ALL_UNITS, ids=lambda p: p.name)
def test_daemon_syncs_to_s3_and_mongodb_inside_the_unit_sandbox(
        unit: Path, s3_settings: Settings, mongo_uri: str, mongo_db_name: str, mongo_admin: Any) -> None:
    from tests.fixtures.daemon import enqueue_bytes, settings_env
    from tests.fixtures.s3 import s3_client

    settings = s3_settings.replace(catalog=mongo_uri, mongo_database=mongo_db_name)
    payload = os.urandom(20 * 2**20)  # above the multipart threshold: parts, checksums, threads
    manifest = enqueue_bytes(settings, payload, filename="weights.bin")
    # --max-wait: a sandbox that blocks the network makes the daemon retry; fail with its log, not a timeout.
    result = sandboxed(unit, sys.executable, "-m", "mldash_syncd", "run", "--once", "--quiet", "--max-wait", "60",
                       env=settings_env(settings))
    assert result.returncode == 0, result.stderr
    endpoint, bucket = settings.s3_endpoint_url, settings.store.removeprefix("s3://").split("/")[0]
    client = s3_client(endpoint)
    try:
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert len(keys) == 1 and keys[0].endswith(f"/{manifest.id}/weights.bin")
        assert client.get_object(Bucket=bucket, Key=keys[0])["Body"].read() == payload
    finally:
        client.close()
    assert mongo_admin[mongo_db_name]["files"].count_documents({}) == 1
