"""Scenario 13: secrets and permissions — after runs with debug logging, no credential, key id or
signature in any log or spool file; spool directories 0700 and files 0600 whatever the umask.

Distinctive fake credentials (moto accepts any; SecantusDB gets a real user with a password) make a
leak easy to find. The runs go through the paths that tend to print what they hold:
- a training process (umask 000) saves through the public API and autostarts the daemon, which logs at
  DEBUG to {spool}/daemon.log, while the proxy answers SignatureDoesNotMatch for some keys (error
  messages about signatures) — then `mldash-syncd retry --all` and `run --once` (DEBUG, stderr kept);
- a daemon whose MongoDB password is wrong (the authentication error is logged and recorded);
- `status`, `status --json` and `ls` output.
Everything they wrote — stdout/stderr, daemon.log, and every file of the spool (index.sqlite with its
events table, manifests, blobs of failed entries) — is searched for the secrets, in plain text and
URL-encoded, and for signature material.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.parse
import uuid
from pathlib import Path

import pymongo

from mldash.config import Settings
from mldash.spool import SpoolLayout
from mldash.spool.lock import is_held
from tests.faults import FaultProxy
from tests.faults import http_faults as H
from tests.fixtures.daemon import settings_env
from tests.reliability.helpers import wait_for
from tests.reliability.invariants import acks, check_invariants
from tests.spool_helpers import assert_private_modes

KEY_ID = "AKIAMLDASHTESTKEY123"
SECRET = "mldash-secret-value"
TOKEN = "mldash-session-token-value"
MONGO_PASSWORD = "mldash-mongo-p@ss/word"  # characters that need URL-encoding in a URI
WRONG_PASSWORD = "mldash-wrong-mongo-pass"
# Signature material (computed values we cannot list, unlike the secrets) that is not redacted.
SIGNATURE_MARKS = re.compile(r"(?:Signature|Credential|X-Amz-Signature|X-Amz-Credential)=(?!<redacted>)", re.I)

WRITER = textwrap.dedent("""
    import json, sys
    from mldash import Experiment
    exp = Experiment(prefix="ns/proj/secret-test")
    results = [exp.files("ok").save_blob(b"fine %d" % i, to=f"ok-{i}.bin") for i in range(3)]
    results += [exp.files("denied").save_json({"i": i}, to=f"denied-{i}.json") for i in range(2)]
    print(json.dumps([{k: r[k] for k in ("id", "sizeBytes", "checksum")} for r in results]))
""")


def secrets() -> list[str]:
    values = [KEY_ID, SECRET, TOKEN, MONGO_PASSWORD, WRONG_PASSWORD]
    return values + [urllib.parse.quote(v, safe="") for v in values if urllib.parse.quote(v, safe="") != v]


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    env = settings_env(settings)
    env.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN,
               MLDASH_LOG_LEVEL="DEBUG", **extra)
    return env


def run(args: list[str], env: dict[str, str], umask: int = 0o022, stdin: str | None = None) -> str:
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, input=stdin,
                            preexec_fn=lambda: os.umask(umask))
    return f"$ {' '.join(args)} → {result.returncode}\n{result.stdout}\n{result.stderr}"


def mongo_user(mongo_admin: pymongo.MongoClient, database: str) -> str:
    user = f"mldash-{uuid.uuid4().hex[:8]}"
    mongo_admin.admin.command("createUser", user, pwd=MONGO_PASSWORD, roles=[{"role": "readWrite", "db": database}])
    return user


def with_credentials(uri: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    netloc = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@{parts.netloc}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def assert_no_secrets(texts: dict[str, str]) -> None:
    leaks = [f"{where}: {secret!r}" for where, text in texts.items() for secret in secrets() if secret in text]
    leaks += [f"{where}: {match.group(0)!r}" for where, text in texts.items()
              for match in SIGNATURE_MARKS.finditer(text)]
    assert not leaks, "secrets in logs or spool files:\n  " + "\n  ".join(leaks)


def spool_texts(spool: Path) -> dict[str, str]:
    return {str(p): p.read_bytes().decode("latin-1") for p in spool.rglob("*") if p.is_file()}


def test_no_secrets_in_logs_or_spool_and_private_modes(s3_via_proxy: tuple[Settings, Settings, FaultProxy],
                                                      mongo_uri: str, mongo_db_name: str,
                                                      mongo_admin: pymongo.MongoClient) -> None:
    settings, direct, proxy = s3_via_proxy
    user = mongo_user(mongo_admin, mongo_db_name)
    catalog = with_credentials(mongo_uri, user, MONGO_PASSWORD)
    settings = settings.replace(catalog=catalog, mongo_database=mongo_db_name, autostart=True, idle_exit=1.0)
    view = direct.replace(catalog=catalog, mongo_database=mongo_db_name)
    layout = SpoolLayout(settings.spool)
    denied = proxy.respond(H.SIGNATURE_DOES_NOT_MATCH.response(H.next_request_id()), match=rb"\APUT [^ ]*/denied/")
    outputs: dict[str, str] = {}

    # A training process with umask 000 saves and autostarts the daemon (DEBUG, into daemon.log).
    outputs["writer"] = run([sys.executable, "-c", WRITER], env_for(settings), umask=0o000)
    saved = [line for line in outputs["writer"].splitlines() if line.startswith("[")]
    assert saved, outputs["writer"]
    results = json.loads(saved[0])
    wait_for(lambda: layout.daemon_log_path.exists() and not is_held(layout) and denied.injected >= 2,
             timeout=60, what="the autostarted daemon to drain and idle out")
    assert "SignatureDoesNotMatch" in layout.daemon_log_path.read_text(), "the error path was not exercised"

    denied.remove()
    cli = [sys.executable, "-m", "mldash_syncd"]
    outputs["retry"] = run([*cli, "retry", "--all"], env_for(settings))
    outputs["run --once"] = run([*cli, "run", "--once"], env_for(settings))
    for command in (["status"], ["status", "--json"], ["ls"], ["ls", "--json"]):
        outputs[" ".join(command)] = run([*cli, *command], env_for(settings))
    check_invariants(settings, acks(results), view=view)

    # A wrong MongoDB password: the authentication failure is logged and recorded — without the password.
    wrong = settings.replace(catalog=with_credentials(mongo_uri, user, WRONG_PASSWORD), autostart=False)
    outputs["writer (wrong password)"] = run([sys.executable, "-c", WRITER], env_for(wrong))
    outputs["run --once (wrong password)"] = run([*cli, "run", "--once", "--max-wait", "20"], env_for(wrong))
    outputs["ls (wrong password)"] = run([*cli, "ls"], env_for(wrong))
    assert "Authentication" in outputs["run --once (wrong password)"], outputs["run --once (wrong password)"]

    time.sleep(0.2)
    assert_no_secrets({**outputs, **spool_texts(Path(settings.spool))})
    checked = assert_private_modes(Path(settings.spool))
    assert {"daemon.log", "index.sqlite", "daemon.lock"} <= {Path(p).name for p in checked}, checked


def test_the_log_filter_hides_every_url_password_the_way_errors_do() -> None:
    """The daemon's log filter is the last line of defence for a URI that reaches a log line unredacted. It hides
    the whole password (also one holding an unescaped "@"), in any scheme, as `***` — the form mldash.redact gives the
    same URI in errors and `status` — and leaves URLs without a password, and the host, as they are."""
    from mldash.redact import redact_uri
    from mldash_syncd.logs import redact

    encoded = urllib.parse.quote_plus(MONGO_PASSWORD)
    uris = {
        f"mongodb://mldash:{encoded}@db.example:27017/mldash?authSource=admin": encoded,
        "mongodb://mldash:un@escaped@db.example/mldash": "un@escaped",
        "http://me:hunter2@proxy.example:3128": "hunter2",
    }
    for uri, password in uris.items():
        logged = redact(f"commit failed: cannot reach {uri} (timeout)")
        assert password not in logged and password.split("@")[-1] not in logged and "%40" not in logged, logged
        assert logged == f"commit failed: cannot reach {redact_uri(uri)} (timeout)", logged
    for harmless in ("https://s3.example/bucket/key?x=a@b", "mongodb://reader@db.example/mldash",
                     "http://[::1]:9000/bucket", "mongodb://u:***@db.example/mldash"):
        assert redact(harmless) == harmless


def test_a_catalog_error_hides_the_password_and_stays_readable_when_the_password_is_short() -> None:
    """The catalog scrubs its URI's password from every error it raises, as written and percent-decoded. A long
    password goes wherever it appears; a short one ("a", "1234") only where it stands alone — replacing every
    "a" of a driver's message would leave the user nothing to read."""
    from mldash.redact import scrub_secrets, uri_password

    long_secret = uri_password("mongodb://mldash:s3cr%40t-passw0rd@db.example/mldash")
    assert long_secret == {"s3cr%40t-passw0rd", "s3cr@t-passw0rd"}
    message = "auth failed for s3cr@t-passw0rd (sent as s3cr%40t-passw0rd, xs3cr@t-passw0rdx)"
    assert scrub_secrets(message, long_secret) == "auth failed for *** (sent as ***, x***x)"

    short = uri_password("mongodb://mldash:a@db.example/mldash")
    message = "Authentication failed: password a rejected by db.example (bad auth: a)"
    assert scrub_secrets(message, short) == "Authentication failed: password *** rejected by db.example (bad auth: ***)"
    digits = uri_password("mongodb://u:1234@db.example:27017/mldash")
    assert scrub_secrets("port 27017, password 1234; id 912345", digits) == "port 27017, password ***; id 912345"
    assert scrub_secrets("no password here", set()) == "no password here"
