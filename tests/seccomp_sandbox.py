"""Run a command under the seccomp rules of deploy/systemd/signerd.service.

    python -m tests.seccomp_sandbox -- COMMAND ARGS...

systemd cannot run as PID 1 in a test container, so the unit's seccomp-based
settings are rebuilt here with libseccomp (through ctypes) and the command
is exec'd under them:

* ``SystemCallFilter=@system-service`` then ``SystemCallFilter=~@privileged``
  with ``SystemCallErrorNumber=EPERM``: every other system call fails with
  EPERM. The groups are expanded with ``systemd-analyze syscall-filter``, so
  the list is the installed systemd's own.
* ``MemoryDenyWriteExecute=yes``: the rules of systemd's
  ``seccomp_memory_deny_write_execute()`` (src/shared/seccomp-util.c):
  ``mmap`` with PROT_WRITE and PROT_EXEC, ``mprotect``/``pkey_mprotect``
  adding PROT_EXEC, and ``shmat`` with SHM_EXEC fail with EPERM.
* ``RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6``: ``socket()`` of any
  other family fails with EAFNOSUPPORT, as systemd does it.
* ``NoNewPrivileges=yes``: libseccomp sets it when it loads a filter.

The namespace and mount settings (ProtectSystem, PrivateTmp, ...) and the
capability bounding set are not rebuilt here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from collections.abc import Iterable
from functools import cache

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_GE = 5
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
AF_MAX = 64  # larger than any family Linux defines (46 in 6.x)


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


@cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def expand(group: str, seen: set[str] | None = None) -> set[str]:
    """System call names in a systemd group such as ``@system-service``,
    nested groups included, as the installed systemd defines them."""
    seen = set() if seen is None else seen
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True,
                         text=True, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name.startswith("@"):
            if name not in seen:
                seen.add(name)
                calls |= expand(name, seen)
        else:
            calls.add(name)
    return calls


def _filter(default: int, rules: Iterable[tuple[int, str, list[_ArgCmp]]]) -> None:
    lib = _lib()
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        for action, name, args in rules:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a system call on this architecture
                continue
            array = (_ArgCmp * len(args))(*args) if args else None
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(args), array)
            if rc < 0:
                raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)


def apply() -> None:
    """Load the unit's seccomp rules into this process (inherited across exec)."""
    eperm = scmp_act_errno(errno.EPERM)
    allowed = sorted(expand("@system-service") - expand("@privileged"))
    _filter(SCMP_ACT_ALLOW, [
        (eperm, "mmap", [_ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC,
                                 PROT_WRITE | PROT_EXEC)]),
        (eperm, "mprotect", [_ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
        (eperm, "pkey_mprotect", [_ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
        (eperm, "shmat", [_ArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
    ])
    noafs = scmp_act_errno(errno.EAFNOSUPPORT)
    _filter(SCMP_ACT_ALLOW, [
        *((noafs, "socket", [_ArgCmp(0, SCMP_CMP_EQ, family, 0)])
          for family in range(AF_MAX) if family not in (AF_UNIX, AF_INET, AF_INET6)),
        (noafs, "socket", [_ArgCmp(0, SCMP_CMP_GE, AF_MAX, 0)]),
    ])
    # Last: the allow-list refuses seccomp() itself.
    _filter(eperm, [(SCMP_ACT_ALLOW, name, []) for name in allowed])


def main(argv: list[str]) -> None:
    if argv[:1] != ["--"] or len(argv) < 2:
        raise SystemExit("usage: python -m tests.seccomp_sandbox -- COMMAND ARGS...")
    apply()
    os.execvp(argv[1], argv[1:])  # noqa: S606 - exec is the point: the filters carry over


if __name__ == "__main__":
    main(sys.argv[1:])
