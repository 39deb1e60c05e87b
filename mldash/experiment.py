"""`Experiment`: who an artifact belongs to (namespace/project/experiment) and the entry point to `files`.

    with Experiment(prefix="alice/vision/resnet-01").run as exp:
        exp.files("checkpoints").save_torch(model, to="model.pt")

Creating an experiment does no I/O; the spool is created on the first save. Nothing here waits for the
network: leaving the `with` block does not wait for uploads either (the daemon owns them). Call
`exp.flush(timeout)` to block until this object's files are committed.

Namespace default: `Experiment(name=..., project=...)` without `namespace=` uses the namespace of the
configured default experiment (MLDASH_EXPERIMENT, "local/default/dxp" unless set), so one setting decides it
for a whole cluster; the OS user name is deliberately not used (jobs often run as a shared service user).
"""

from __future__ import annotations

import logging
import os
import threading
from array import array
from pathlib import Path
from typing import Any

from mldash import names
from mldash.autostart import ensure_daemon, ensure_while_waiting
from mldash.config import Settings
from mldash.errors import InvalidInputError
from mldash.files import FilesHandle
from mldash.reader import ExperimentId, Reader
from mldash.serializers import Payload
from mldash.spool.enqueue import Enqueuer, EntrySpec
from mldash.spool.layout import SpoolLayout
from mldash.spool.manifest import Manifest

log = logging.getLogger("mldash")


class Experiment:
    """An experiment's artifacts. Thread-safe: several threads may save through one object."""

    def __init__(self, prefix: str | None = None, *, name: str | None = None, project: str | None = None,
                 namespace: str | None = None, settings: Settings | None = None,
                 local_path: str | os.PathLike[str] | None = None) -> None:
        """`prefix="namespace/project/experiment"`, or `name=` (+ `project=`, `namespace=`), or neither for the
        configured default experiment. `settings` defaults to `Settings.load()` (environment, then config file).
        `local_path` (ML-Dash's local mode): keep spool, store and catalog under that directory instead of the
        configured ones."""
        if settings is not None and not isinstance(settings, Settings):
            raise InvalidInputError(f"settings must be a mldash.config.Settings (e.g. Settings.load(spool=...)), got "
                                    f"{type(settings).__name__}")
        self.settings = settings if settings is not None else Settings.load()
        if local_path is not None:
            if not isinstance(local_path, (str, os.PathLike)):
                raise InvalidInputError(f"local_path must be a directory path, got {type(local_path).__name__} "
                                        f"{local_path!r}")
            root = Path(os.path.expanduser(os.fspath(local_path))).absolute()
            self.settings = self.settings.replace(spool=root / "spool", store=(root / "store").as_uri(),
                                                  catalog="sqlite://" + str(root / "catalog.sqlite"))
        default_ns, default_project, default_name = self.settings.experiment_parts
        if prefix is not None:
            if name is not None or project is not None or namespace is not None:
                raise InvalidInputError("give either prefix='namespace/project/experiment' or name=/project=/"
                                        "namespace=, not both")
            if not isinstance(prefix, str):
                raise InvalidInputError(f"prefix must be a str 'namespace/project/experiment', got "
                                        f"{type(prefix).__name__}")
            parts = prefix.strip("/").split("/")
            if len(parts) != 3:
                raise InvalidInputError(f"prefix {prefix!r} must have three parts: 'namespace/project/experiment'")
            namespace, project, name = parts
        self.namespace = names.validate_segment(namespace if namespace is not None else default_ns, "namespace")
        self.project = names.validate_segment(project if project is not None else default_project, "project")
        self.name = names.validate_segment(name if name is not None else default_name, "experiment name")
        self.identity = ExperimentId(self.namespace, self.project, self.name)
        self._lock = threading.Lock()
        self._enqueuer: Enqueuer | None = None
        self._reader_instance: Reader | None = None
        # Ids saved through this object and not yet seen committed by a wait, per prefix; 8 bytes per id, so a
        # run that saves millions of small files does not grow much.
        self._saved: dict[str, array[int]] = {}
        self.files = FilesHandle(self)

    @property
    def path(self) -> str:
        """"namespace/project/experiment"."""
        return f"{self.namespace}/{self.project}/{self.name}"

    @property
    def prefix(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"Experiment({self.path!r})"

    # ---- context managers --------------------------------------------------------------------------------
    @property
    def run(self) -> RunContext:
        """`with exp.run as exp:` (ML-Dash's form); same as `with exp:`."""
        return RunContext(self)

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc: object) -> None:
        pending = sum(len(ids) for ids in self._saved.values())
        if pending:
            log.debug("mldash: leaving %s with %d file(s) saved; the daemon uploads them", self.path, pending)

    # ---- the older single-call form -------------------------------------------------------------------
    def file(self, path: str | os.PathLike[str], *, prefix: str | None = None, to: str | None = None,
             description: str | None = None, tags: list[str] | None = None,
             metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload a local file right away (DreamLake's `experiment.file("model.pth", prefix="/models")`)."""
        handle = self.files(prefix=prefix if prefix is not None else "/")
        return handle.upload(path, to, description=description, tags=tags, metadata=metadata)

    def flush(self, timeout: float | None = None) -> dict[str, str]:
        """Block until every file saved through this object is committed; see `FilesHandle.wait`."""
        return self._wait(timeout, prefix="")

    # ---- used by FilesHandle ------------------------------------------------------------------------------
    def _get_enqueuer(self) -> Enqueuer:
        with self._lock:
            if self._enqueuer is None:
                layout = SpoolLayout(self.settings.spool)
                # A save waiting for spool space starts a daemon if none drains it (one that died, say).
                self._enqueuer = Enqueuer(self.settings, layout,
                                          on_wait=lambda: ensure_while_waiting(self.settings, layout))
            return self._enqueuer

    def _spool_tmp(self) -> Path:
        return self._get_enqueuer().layout.tmp_dir

    def _enqueue(self, spec: EntrySpec, payload: Payload) -> Manifest:
        enqueuer = self._get_enqueuer()
        manifest = enqueuer.enqueue(spec, payload.write, expected_size=payload.size, size_hint=payload.size_hint)
        with self._lock:
            self._saved.setdefault(manifest.prefix, array("q")).append(manifest.id)
        ensure_daemon(self.settings, enqueuer.layout)
        return manifest

    def _reader(self) -> Reader:
        with self._lock:
            if self._reader_instance is None:
                self._reader_instance = Reader(self.settings)
            return self._reader_instance

    def _wait(self, timeout: float | None, *, prefix: str) -> dict[str, str]:
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout >= 0):  # also NaN, which compares false to everything
            raise InvalidInputError(f"timeout must be None or a number of seconds ≥ 0, got {timeout!r}")
        with self._lock:
            ids = [i for p, saved in self._saved.items() if not prefix or p == prefix or p.startswith(prefix + "/")
                   for i in saved]
        if not ids:
            return {}
        layout = self._get_enqueuer().layout
        # A daemon that died (or was killed) while files were pending is started again while we wait.
        done = self._reader().wait(ids, timeout, on_poll=lambda: ensure_daemon(self.settings, layout))
        with self._lock:  # committed is final: later waits need not look at these again
            finished = {int(i) for i in done}
            for p, saved in list(self._saved.items()):
                kept = array("q", (i for i in saved if i not in finished))
                if kept:
                    self._saved[p] = kept
                else:
                    del self._saved[p]
        return done


class RunContext:
    """What `exp.run` returns: a context manager yielding the experiment (ML-Dash's `with exp.run as exp:`)."""

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment

    def start(self) -> Experiment:
        return self.experiment

    def complete(self) -> None:
        """Nothing to do: uploads continue in the daemon after the run ends."""

    def __enter__(self) -> Experiment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.experiment.__exit__(*exc)


class _DefaultExperiment:
    """`dxp`: the experiment named by MLDASH_EXPERIMENT, created on first use (importing mldash reads no config)."""

    def __init__(self) -> None:
        self._experiment: Experiment | None = None
        self._lock = threading.Lock()

    def _get(self) -> Experiment:
        with self._lock:
            if self._experiment is None:
                self._experiment = Experiment()
            return self._experiment

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._get(), name)

    def __enter__(self) -> Experiment:
        return self._get()

    def __exit__(self, *exc: object) -> None:
        self._get().__exit__(*exc)

    def __repr__(self) -> str:
        return repr(self._experiment) if self._experiment is not None else "dxp (not configured yet)"

    def _reset(self) -> None:
        """Forget the configured experiment (tests; or after changing MLDASH_* variables)."""
        with self._lock:
            self._experiment = None


dxp = _DefaultExperiment()
