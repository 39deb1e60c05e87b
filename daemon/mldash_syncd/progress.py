"""The `run --once` progress line: files and bytes done, rate, ETA — drawn from daemon events."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


def human_duration(seconds: float) -> str:
    """'4:05', '2:00:00', '3d 0:00:05' (a backlog on an offline node can be days old)."""
    seconds = int(max(0, seconds))
    days, seconds = divmod(seconds, 86400)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}" if hours or days else f"{minutes}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


class ProgressBar:
    """Fed by `Daemon(on_event=bar.event)`; redraws at most 5×/s on a TTY, else prints every 10 s."""

    def __init__(self, total_files: int, total_bytes: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total_files, self.total_bytes = total_files, total_bytes
        self.files = self.failed = self.quarantined = 0
        self.bytes = 0  # sent by this run
        # Sizes of the files committed: more than the bytes sent when a resumed upload found parts in the store
        # (or an entry uploaded by an earlier run only needed its commit).
        self.committed_bytes = 0
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._lock = threading.Lock()

    def event(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            if kind == "queued":  # a manifest the daemon indexed in this run: its bytes join the total
                self.total_files += 1
                self.total_bytes += data.get("size", 0)
            elif kind == "bytes":
                self.bytes += data["amount"]
                self.total_bytes = max(self.total_bytes, self.bytes)
            elif kind == "committed":
                self.files += 1
                self.committed_bytes += data.get("size", 0)
            elif kind == "failed":
                self.failed += 1
            elif kind == "quarantined":
                self.quarantined += 1
            self.draw()

    def show(self, *, files: int, pending_files: int, pending_bytes: int) -> None:
        """Progress of another daemon, read from the index (`run --once` following it): no events to count,
        so bytes done are the bytes no longer pending."""
        with self._lock:
            self.files = files
            self.total_files = max(self.total_files, files + pending_files)
            self.total_bytes = max(self.total_bytes, self.bytes + pending_bytes)
            self.bytes = self.total_bytes - pending_bytes
            self.draw()

    def line(self) -> str:
        elapsed = max(1e-3, time.monotonic() - self.started)
        rate = self.bytes / elapsed
        done_bytes = min(self.total_bytes, max(self.bytes, self.committed_bytes))
        left = max(0, self.total_bytes - done_bytes)
        # Many small files take their time per file, not per byte: the later of the two estimates.
        files_left = self.total_files - self.files - self.failed - self.quarantined
        estimates = [left / rate] if rate > 0 and left else []
        if self.files and files_left > 0:
            estimates.append(files_left * elapsed / self.files)
        eta = human_duration(max(estimates)) if estimates else "-"
        done = (self.files + self.failed + self.quarantined) / self.total_files if self.total_files else 1.0
        bar = "#" * int(min(1.0, done) * 20)
        failed = (f"  {self.failed} failed" if self.failed else "") + (
            f"  {self.quarantined} quarantined" if self.quarantined else "")
        return (f"[{bar:<20}] {self.files}/{self.total_files} files  {human_bytes(done_bytes)}/"
                f"{human_bytes(self.total_bytes)}  {human_bytes(rate)}/s  ETA {eta}{failed}")

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        interval = 0.2 if self.tty else 10.0
        if not force and now - self._last_draw < interval:
            return
        self._last_draw = now
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self.draw(force=True)
        if self.tty:
            self.stream.write("\n")
