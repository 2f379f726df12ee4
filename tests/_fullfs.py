"""A real file system that can be filled: a small tmpfs mounted for one test.

Disk-full tests once pointed the audit log at ``/dev/full`` through a
symbolic link; the log now refuses to follow one (issue 22 §5), and a full
disk is more than a device that fails every write: space comes back. So a
test mounts a tmpfs of a few hundred KB (the tests run as root), fills it
with a filler file until ``ENOSPC``, and frees it again by removing the
filler. Mount failure is a test failure, never a skip.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class SmallFs:
    """A mounted tmpfs at ``path`` (mode 0700, owned by root)."""

    path: Path

    @property
    def filler(self) -> Path:
        return self.path / ".filler"

    def fill(self) -> None:
        """Write the filler until the file system has no byte left."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            chunk = b"\0" * 4096
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        break
                    chunk = chunk[: len(chunk) // 2]
        finally:
            os.close(fd)

    def free(self) -> None:
        """Remove the filler: the space is there again."""
        self.filler.unlink(missing_ok=True)


@contextmanager
def small_fs(where: Path, size_kb: int = 256) -> Iterator[SmallFs]:
    """Mount a tmpfs of ``size_kb`` KB at ``where`` (created), unmount it after
    (lazily: a daemon may still hold a file open there)."""
    where.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700",
                          "tmpfs", str(where)], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {where} (the tests run as root): "
                    f"{run.stderr.strip()}")
    try:
        yield SmallFs(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
