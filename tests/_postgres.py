"""A real PostgreSQL server for the tests, in a temporary directory, on a Unix socket.

Debian's postgresql package (``./dev.sh test`` installs it) puts its programs under
/usr/lib/postgresql/VERSION/bin. initdb and postgres refuse to run as root, and CI runs as
root: then the server runs as ``nobody`` (setpriv, no Python between fork and exec), in a
directory of its own under /tmp (pytest's tmp_path is root's, mode 0700, unreachable for
nobody). It listens on a socket in that directory only, no TCP port; root connects
through the socket (trust authentication, superuser ``postgres``).

Nothing here skips: callers fail when ``missing()`` names something.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

VERSIONS = ("17", "16", "15")
USER = "nobody"  # the unprivileged user the server runs as when the tests run as root
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "TERM")


def bindir() -> Path | None:
    """The directory of initdb and postgres, or None."""
    for v in VERSIONS:
        d = Path(f"/usr/lib/postgresql/{v}/bin")
        if (d / "initdb").exists() and (d / "postgres").exists():
            return d
    return None


def missing() -> list[str]:
    """What is missing to start a server (empty: nothing)."""
    gone = [] if bindir() else ["postgresql (initdb, postgres)"]
    return gone + (["setpriv"] if shutil.which("setpriv") is None else [])


@dataclass
class Postgres:
    """A running server: ``url`` connects to its ``signerd`` database as the superuser."""

    dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/signerd?host={self.dir}"

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then the directory goes."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _as_server_user() -> tuple[str, ...]:
    """setpriv's options that drop to USER, when running as root (else none)."""
    if os.geteuid() != 0:
        return ()
    pw = pwd.getpwnam(USER)
    return (f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups")


def start(fsync: bool = False) -> Postgres:
    """initdb a fresh cluster and start it; returns once ``signerd`` accepts connections.

    ``fsync`` off (the default) makes the tests faster; the benchmark turns it on.
    Raises RuntimeError with the server's log when it does not come up.
    """
    bin_dir = bindir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="signerd-pg-"))
    data = base / "data"
    drop = _as_server_user()
    if drop:
        pw = pwd.getpwnam(USER)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
           "HOME": str(base)}
    init = subprocess.run(
        ["setpriv", *drop, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
         "--auth=trust", "-E", "UTF8", "--no-sync"],
        env=env, capture_output=True, cwd=base, check=False)
    if init.returncode:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {init.stderr.decode(errors='replace')[-800:]}")
    log = base / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            # One setpriv: a second one's change of user would clear the death signal.
            [*DIE_WITH_PARENT, *drop, str(bin_dir / "postgres"), "-D", str(data),
             "-k", str(base), "-c", "listen_addresses=", "-c", f"fsync={'on' if fsync else 'off'}",
             "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=base)
    server = Postgres(base, proc)
    deadline = time.monotonic() + 60
    while True:
        ready = subprocess.run(
            [str(bin_dir / "psql"), "-h", str(base), "-U", "postgres", "-d", "postgres", "-Atc",
             "CREATE DATABASE signerd"], env=env, capture_output=True, check=False)
        if ready.returncode == 0:
            return server
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-2000:]
            server.stop()
            raise RuntimeError(f"PostgreSQL did not start: {text}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One server per test session: a missing PostgreSQL fails under CI=true, else skips."""
    gone = missing()
    if gone:
        message = f"PostgreSQL is missing ({', '.join(gone)}); ./dev.sh test installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    server = start()
    yield server
    server.stop()
