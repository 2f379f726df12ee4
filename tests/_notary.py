"""Real notary-server and the real notary client, with signerd as their trust service.

Debian's ``notary`` package (``./dev.sh test`` installs it) ships notary-server and the
notary client 0.7.0. notary-server runs here on loopback over TLS, with memory storage (or
PostgreSQL, see :func:`notary_database`) and ``trust_service`` of type ``remote`` pointed at
a signerd's mutual-TLS listener; its configuration follows notary's
``cmd/notary-server/config.go`` (``server.http_addr``, ``server.tls_cert_file``,
``trust_service.{hostname,port,key_algorithm,tls_ca_file,tls_client_cert,tls_client_key}``,
``storage.{backend,db_url}``). The client gets a config file of its own (``trust_dir``,
``remote_server.url``, ``remote_server.root_ca``) and its passphrases through the
``NOTARY_*_PASSPHRASE`` environment variables, never argv.

Nothing here skips under ``CI=true``: :func:`require` fails when a binary is missing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests._tpm import DIE_WITH_PARENT

BINARIES = ("notary-server", "notary")
# What a notary-server 0.7.0 takes for trust_service.key_algorithm (config.go,
# getTrustService): the algorithm of the keys it asks signerd to create.
KEY_ALGORITHMS = ("ecdsa", "rsa", "ed25519")
# notary's own PostgreSQL schema for notary-server, from its repository:
# migrations/server/postgresql/0001_initial.up.sql and 0002_changefeed.up.sql (v0.7.0).
# Debian's package does not ship the migrations, and notary-server does not create them.
SERVER_SCHEMA = """
CREATE TABLE "tuf_files" (
  "id" serial PRIMARY KEY,
  "created_at" timestamp NULL DEFAULT NULL,
  "updated_at" timestamp NULL DEFAULT NULL,
  "deleted_at" timestamp NULL DEFAULT NULL,
  "gun" varchar(255) NOT NULL,
  "role" varchar(255) NOT NULL,
  "version" integer NOT NULL,
  "data" bytea NOT NULL,
  "sha256" char(64) DEFAULT NULL,
  UNIQUE ("gun","role","version")
);
CREATE INDEX tuf_files_sha256_idx ON tuf_files(sha256);
CREATE TABLE "change_category" ("category" VARCHAR(20) PRIMARY KEY);
INSERT INTO "change_category" VALUES ('update'), ('deletion');
CREATE TABLE "changefeed" (
    "id" serial PRIMARY KEY,
    "created_at" timestamp DEFAULT CURRENT_TIMESTAMP,
    "gun" varchar(255) NOT NULL,
    "version" integer NOT NULL,
    "sha256" CHAR(64) DEFAULT NULL,
    "category" VARCHAR(20) NOT NULL DEFAULT 'update' REFERENCES "change_category"
);
CREATE INDEX "idx_changefeed_gun" ON "changefeed" ("gun");
"""


def missing() -> list[str]:
    """The notary programs that are not on PATH (empty: none)."""
    return [b for b in BINARIES if shutil.which(b) is None]


def require() -> None:
    """Fail (under CI=true) or skip when notary-server or the notary client is missing."""
    gone = missing()
    if gone:
        message = f"notary is missing ({', '.join(gone)}); ./dev.sh test installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA both sides trust, notary-server's HTTPS certificate for
    127.0.0.1, and the client certificate it presents to signerd."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NotaryServer:
    """A running notary-server: ``url`` is its https://127.0.0.1:PORT base."""

    proc: subprocess.Popen[bytes]
    port: int
    dir: Path
    ca: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.dir / "notary-server.log").read_text(errors="replace")

    def get(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        """GET ``path`` over TLS (verified against the test CA): (status, body)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout,
                                        context=context) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())

    def metadata(self, gun: str, role: str) -> dict[str, Any]:
        """The current ``role`` metadata of ``gun`` (asserting a 200)."""
        status, body = self.get(f"/v2/{gun}/_trust/tuf/{role}.json")
        assert status == 200, (status, body[:300], self.log()[-2000:])
        doc: dict[str, Any] = json.loads(body)
        return doc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(workdir: Path, tls: TlsFiles, signerd_port: int, key_algorithm: str = "ecdsa",
                 db_url: str | None = None, timeout: float = 30) -> NotaryServer:
    """Start notary-server with signerd (``localhost:signerd_port``) as its trust service.

    Storage is memory unless ``db_url`` names a PostgreSQL database holding
    :data:`SERVER_SCHEMA`. Returns once its health endpoint answers 200; raises
    AssertionError with its log when it does not.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):  # a free port can be taken between the probe and the bind
        port = _free_port()
        config = {
            "server": {"http_addr": f"127.0.0.1:{port}", "tls_cert_file": str(tls.server_cert),
                       "tls_key_file": str(tls.server_key)},
            "trust_service": {
                "type": "remote", "hostname": "localhost", "port": str(signerd_port),
                "key_algorithm": key_algorithm, "tls_ca_file": str(tls.ca),
                "tls_client_cert": str(tls.client_cert), "tls_client_key": str(tls.client_key)},
            "storage": ({"backend": "postgres", "db_url": db_url} if db_url
                        else {"backend": "memory"}),
            "logging": {"level": "info"},
        }
        path = workdir / "server.json"
        path.write_text(json.dumps(config, indent=1))
        with open(workdir / "notary-server.log", "wb") as out:
            proc = subprocess.Popen(
                [*DIE_WITH_PARENT, "notary-server", "-config", str(path), "-logf", "logfmt"],
                stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
        server = NotaryServer(proc, port, workdir, tls.ca)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if server.get("/_notary_server/health", timeout=5)[0] == 200:
                    return server
            except OSError:
                pass
            time.sleep(0.1)
        server.stop()
        if "address already in use" not in server.log() or attempt == 2:
            raise AssertionError(f"notary-server did not start: {server.log()[-3000:]}")
    raise AssertionError("unreachable")


@dataclass
class NotaryClient:
    """The notary CLI with its own config and trust directory, and its passphrases
    in the environment."""

    dir: Path
    server: NotaryServer

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "config.json"
        self.config.write_text(json.dumps({
            "trust_dir": str(self.dir / "trust"),
            "remote_server": {"url": self.server.url, "root_ca": str(self.server.ca)},
        }))
        passphrase = secrets.token_hex(12)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir),
            **{f"NOTARY_{role}_PASSPHRASE": passphrase
               for role in ("ROOT", "TARGETS", "SNAPSHOT", "DELEGATION")},
        }

    def run(self, *args: str, answer: str = "", check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        """``notary -c CONFIG ARGS``, ``answer`` on its standard input (root rotation asks
        yes/no there); with ``check``, a non-zero exit fails the test with the client's
        output and the end of notary-server's log."""
        done = subprocess.run(["notary", "-c", str(self.config), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout,
                              input=answer, check=False)
        if check and done.returncode:
            raise AssertionError(
                f"notary {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n"
                f"{done.stderr}\n-- notary-server --\n{self.server.log()[-3000:]}")
        return done

    def targets(self, gun: str, *roles: str) -> dict[str, str]:
        """``notary list GUN``: {target name: sha256 hex}, fetched and verified by the client."""
        args = ["list", gun] + [a for r in roles for a in ("-r", r)]
        out = self.run(*args).stdout
        found = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 3 and len(parts[1]) == 64:
                found[parts[0]] = parts[1]
        return found
