"""A description of the machine a run happened on, captured automatically (numbers mean little without it)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

PACKAGES = ("mldash", "torch", "numpy", "aioboto3", "aiobotocore", "boto3", "botocore", "aiohttp", "moto",
            "pymongo", "secantusdb", "sqlite-utils", "msgpack", "watchfiles", "psutil", "matplotlib")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    """The flags that change our numbers: SHA extensions (hashlib SHA256 speed), AVX2."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(flags & {"sha_ni", "avx2", "avx512f", "aes"})
    return []


def _mount_of(path: Path) -> dict[str, str]:
    """Device, filesystem type and mount point holding `path` (longest matching mount point wins)."""
    best: dict[str, str] = {}
    target = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype, *_ = line.split()
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(
                    best.get("mount", "")):
                best = {"device": device, "mount": mount, "fstype": fstype}
    return best


def _disk(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(path), **_mount_of(path)}
    with contextlib.suppress(OSError):
        usage = psutil.disk_usage(str(path))
        info["total_gib"] = round(usage.total / 2**30, 1)
        info["free_gib"] = round(usage.free / 2**30, 1)
    device = Path(info.get("device", "")).name
    block = Path("/sys/block") / device
    if device and block.exists():
        with contextlib.suppress(OSError):
            info["rotational"] = (block / "queue" / "rotational").read_text().strip() == "1"
        with contextlib.suppress(OSError):
            info["model"] = (block / "device" / "model").read_text().strip()
    return info


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_commit(repo: Path) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": bool(dirty)}


def describe(workdir: Path, repo: Path) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(memory.total / 2**30, 1),
        "ram_available_gib": round(memory.available / 2**30, 1),
        "disk": _disk(workdir),
        "os": platform.platform(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": _versions(),
        "git": _git_commit(repo),
        "load_average_at_start": list(os.getloadavg()),
    }


def one_line(machine: dict[str, Any]) -> str:
    disk = machine.get("disk", {})
    return (f"{machine.get('cpu_model')} ({machine.get('logical_cores')} logical cores), "
            f"{machine.get('ram_gib')} GiB RAM, {disk.get('fstype', '?')} on {disk.get('device', '?')}"
            f"{' (SSD)' if disk.get('rotational') is False else ''}, Python {machine.get('python')}, "
            f"{machine.get('os')}")
