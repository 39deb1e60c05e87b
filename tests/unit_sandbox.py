"""Run a command under the seccomp/prctl part of a systemd unit's sandbox — no systemd needed.

PID 1 here is not systemd, so units cannot be started. But the sandbox settings most likely to
break the daemon at run time (a refused system call, a refused socket family, no W+X memory) are
seccomp filters and prctl flags that any process can put on itself before exec. This reads them
from the unit file and applies them as systemd 252 does, then execs the command:

- ``NoNewPrivileges=yes`` → PR_SET_NO_NEW_PRIVS; ``UMask=`` → umask;
- ``SystemCallFilter=`` (+ ``SystemCallErrorNumber=``): an allow list, groups expanded by
  ``systemd-analyze syscall-filter`` (so the lists are systemd's own), ``~`` entries removed,
  ``@default`` implied as systemd does; anything else fails with the configured errno;
  ``SystemCallArchitectures=native`` is libseccomp's default (other ABIs are killed);
- ``RestrictAddressFamilies=``: socket() with any other family fails with EAFNOSUPPORT;
- ``MemoryDenyWriteExecute=yes``: systemd 252's seccomp rules (no PROT_WRITE|PROT_EXEC mmap, no
  mprotect/pkey_mprotect to PROT_EXEC, no SHM_EXEC), plus the kernel's PR_SET_MDWE where available
  (what newer systemd uses).

Not emulated: the mount, user and IPC namespaces (ProtectSystem=, PrivateTmp=, ProtectHome=, …),
the capability bounding set and the service user; the tests cover the paths those affect by
checking the spool lies inside StateDirectory= instead.

    python tests/unit_sandbox.py UNIT_FILE -- COMMAND [ARG...]

Exit status 77 means this host cannot apply the sandbox (no libseccomp); otherwise the command's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

UNSUPPORTED = 77

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_LT, SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 2, 4, 6, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 1


def scmp_act_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


class SandboxUnavailable(OSError):
    """This host cannot apply the sandbox at all (as opposed to a sandbox that breaks the command)."""


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: systemd keys repeat, so no configparser."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            raise ValueError(f"{path.name}: keep unit lines unwrapped for this parser: {line}")
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        if current is None:
            raise ValueError(f"{path.name}: {line!r} outside a section")
        current.append((key.strip(), value.strip()))
    return sections


def expand_syscalls(name: str, seen: set[str] | None = None) -> set[str]:
    """System call names of `name` (a @group, recursively, via systemd-analyze) or the name itself."""
    if not name.startswith("@"):
        return {name}
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    listing = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                             check=True, timeout=60).stdout.splitlines()
    names: set[str] = set()
    for line in listing[1:]:  # the first line repeats the group name
        token = line.strip()
        if token and not token.startswith("#"):
            names |= expand_syscalls(token, seen)
    return names


def allowed_syscalls(filters: list[str]) -> set[str] | None:
    """The allow list systemd builds from SystemCallFilter= lines (None: no filter)."""
    allowed: set[str] | None = None
    for line in filters:
        deny = line.startswith("~")
        names = line.lstrip("~").split()
        if allowed is None:
            if deny:
                raise ValueError("a deny-list-first SystemCallFilter= is not emulated")
            allowed = expand_syscalls("@default")  # systemd implies @default for allow lists
        for name in names:
            group = expand_syscalls(name)
            allowed = allowed - group if deny else allowed | group
    return allowed


class Seccomp:
    def __init__(self) -> None:
        name = ctypes.util.find_library("seccomp")
        if name is None:
            raise SandboxUnavailable("libseccomp not found")
        self.lib = ctypes.CDLL(name, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                                    ctypes.POINTER(ArgCmp)]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]

    def number(self, name: str) -> int | None:
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        return None if nr < 0 else nr

    def load(self, default: int, rules: list[tuple[int, str, list[tuple[int, int, int, int]]]]) -> None:
        """One filter: `default` action, then (action, syscall, [(arg, op, a, b)…]) rules."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        for action, syscall, conditions in rules:
            nr = self.number(syscall)
            if nr is None:
                continue  # not a system call of this architecture/libseccomp
            array = (ArgCmp * max(1, len(conditions)))(*[ArgCmp(*c) for c in conditions])
            rc = self.lib.seccomp_rule_add_array(ctx, action, nr, len(conditions), array)
            if rc < 0:
                raise OSError(-rc, f"seccomp rule for {syscall}: {os.strerror(-rc)}")
        rc = self.lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def family_gaps(families: list[int]) -> list[list[tuple[int, int, int, int]]]:
    """Conditions on socket()'s first argument matching every family NOT in `families`.

    As systemd does it: below the lowest, above the highest, and each value in between one by one
    (libseccomp allows one comparison per argument and rule, so no ranges).
    """
    low, high = min(families), max(families)
    gaps = [[(0, SCMP_CMP_LT, low, 0)], [(0, SCMP_CMP_GT, high, 0)]]
    gaps += [[(0, SCMP_CMP_EQ, family, 0)] for family in range(low + 1, high) if family not in families]
    return gaps


def apply(unit: Path) -> None:
    service = parse_unit(unit).get("Service", [])

    def last(key: str) -> str | None:
        found = [v for k, v in service if k == key]
        return found[-1] if found else None

    if last("UMask"):
        os.umask(int(last("UMask"), 8))
    libc = ctypes.CDLL(None, use_errno=True)
    if last("NoNewPrivileges") == "yes" and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    seccomp = Seccomp()
    if last("MemoryDenyWriteExecute") == "yes":
        libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)  # best effort: Linux >= 6.3
        refuse = scmp_act_errno(errno.EPERM)
        seccomp.load(SCMP_ACT_ALLOW, [
            (refuse, "mmap", [(2, SCMP_CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC)]),
            (refuse, "mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (refuse, "pkey_mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (refuse, "shmat", [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
        ])
    families = last("RestrictAddressFamilies")
    if families:
        allowed = [int(getattr(socket, name)) for name in families.split()]
        refuse = scmp_act_errno(errno.EAFNOSUPPORT)
        seccomp.load(SCMP_ACT_ALLOW, [(refuse, "socket", gap) for gap in family_gaps(allowed)])
    syscalls = allowed_syscalls([v for k, v in service if k == "SystemCallFilter"])
    if syscalls is not None:
        error = getattr(errno, last("SystemCallErrorNumber") or "", None)
        # Without SystemCallErrorNumber= systemd kills the process on a refused call.
        default = scmp_act_errno(error) if error is not None else 0x80000000  # SCMP_ACT_KILL_PROCESS
        seccomp.load(default, [(SCMP_ACT_ALLOW, name, []) for name in sorted(syscalls)])


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    try:
        apply(Path(argv[0]))
    except SandboxUnavailable as exc:
        print(f"unit_sandbox: cannot apply the sandbox here: {exc}", file=sys.stderr)
        return UNSUPPORTED
    os.execvp(argv[2], argv[2:])
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
