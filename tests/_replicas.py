"""signerd replicas for the tests: separate processes sharing one SoftHSM token directory and
one watermark database, each with its own audit log.

The content checks and their shared ``[state] url`` (issue 23 §2, §3) are wired into signerd
on another branch. Until the signerd under test accepts those sections, the replicas start
without them (:func:`content_tables` returns nothing), and the harness still runs: three
daemons on one token, Notary Sign on each, audit lines read back. Once it does, the same
harness starts them with the checks on and one PostgreSQL database shared.
"""

from __future__ import annotations

import base64
import hashlib
import json
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from signerd.canonicaljson import encode_canonical
from signerd.client import ClientConfig, channel
from signerd.config import parse_config
from signerd.errors import ConfigError
from signerd.notary import signer_pb2 as pb
from signerd.notary import signer_pb2_grpc as pb_grpc
from tests.conftest import HSM, PKI, Process, daemon_config, spawn_daemon, write_toml


def content_tables(cfg: dict[str, Any], workdir: Path, state_url: str) -> dict[str, Any]:
    """The ``[state]`` and ``[content]`` tables to add to ``cfg`` for the checks on with
    watermarks at ``state_url``: each one only if this signerd's config accepts it (so
    none before the content checks are wired in)."""
    tables: dict[str, Any] = {}
    for name, table in (("state", {"url": state_url}), ("content", {"enabled": True})):
        try:
            parse_config({**cfg, **tables, name: table}, workdir)
        except ConfigError as e:
            if "unknown config sections" in str(e):
                continue
            raise
        tables[name] = table
    return tables


def checks_available() -> bool:
    """Whether this signerd takes ``[state]``: the content checks are wired in (issue 23)."""
    probe = {"tokens": [{"name": "t", "module": "/usr/lib/softhsm/libsofthsm2.so",
                         "uri": "pkcs11:token=probe", "pin_file": "/nonexistent.pin"}],
             "state": {"url": "sqlite:////nonexistent/state.db"}}
    try:
        parse_config(probe, Path("/"))
    except ConfigError as e:
        if "unknown config sections" in str(e):
            return False
        raise
    return True


def timestamp_payload(gun: str, version: int, salt: str = "") -> bytes:
    """The canonical JSON of a Notary timestamp's ``signed`` object at ``version``
    (what notary-server sends to Sign): expires in 7 days, a snapshot hash made from
    ``gun``, ``version`` and ``salt`` (so two salts are two contents of one version)."""
    digest = hashlib.sha256(f"{gun}/{version}/{salt}".encode()).digest()
    expires = (datetime.now(UTC) + timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return encode_canonical({
        "_type": "Timestamp", "expires": expires, "version": version,
        "meta": {"snapshot": {"length": 1234,
                              "hashes": {"sha256": base64.b64encode(digest).decode()}}},
    })


def version_of(payload: bytes) -> int:
    """The ``version`` of a payload made by :func:`timestamp_payload`."""
    return int(json.loads(payload)["version"])


@dataclass
class Replica:
    """One signerd process, its Notary stubs (as notary-server, over mutual TLS)."""

    name: str
    workdir: Path
    process: Process
    channel: grpc.Channel
    km: pb_grpc.KeyManagementStub
    signer: pb_grpc.SignerStub

    @property
    def audit_file(self) -> Path:
        return self.workdir / "audit.log"

    def sign(self, key_id: str, payload: bytes, timeout: float = 20) -> pb.Signature:
        """Notary Sign; raises grpc.RpcError as notary-server would see it."""
        return self.signer.Sign(pb.SignatureRequest(keyID=pb.KeyID(ID=key_id), content=payload),
                                timeout=timeout)

    def audit(self) -> list[dict[str, Any]]:
        """The request lines written so far (a torn last line of a killed process is left
        out, and so are the daemon's own ``audit.*`` records)."""
        lines = []
        for text in self.audit_file.read_text().splitlines():
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue
            if not str(line.get("operation", "")).startswith("audit."):  # not a request's
                lines.append(line)
        return lines

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush."""
        self.process.proc.send_signal(signal.SIGKILL)
        self.process.proc.wait(30)


@dataclass
class Replicas:
    """Replicas started by :func:`start_replicas`; ``shared_state`` says whether they
    were given the shared ``[state] url`` (False before the content checks exist)."""

    members: list[Replica]
    shared_state: bool
    stack: ExitStack = field(default_factory=ExitStack)

    def __getitem__(self, i: int) -> Replica:
        return self.members[i]

    def close(self) -> None:
        self.stack.close()


def start_replicas(hsm: HSM, certs: PKI, base: Path, policy: str, who: str,
                   state_url: str, count: int = 3) -> Replicas:
    """Start ``count`` signerd processes on the ``hsm`` token directory, each in
    ``base/NAME`` with its own audit log, with the checks on and ``state_url`` shared
    where this signerd has them; clients hold ``who``'s certificate."""
    stack = ExitStack()
    members = []
    shared = False
    try:
        for i in range(count):
            name = "abcdefgh"[i]
            workdir = base / name
            cfg = daemon_config(hsm, certs, workdir, policy=policy, tokens=("online",))
            extra = content_tables(cfg, workdir, state_url)
            shared = "state" in extra
            proc = spawn_daemon(write_toml(workdir / "signerd.toml", {**cfg, **extra}), workdir,
                                env={"SOFTHSM2_CONF": str(hsm.conf)})
            stack.callback(_stop, proc)
            cert, key = certs.files[who]
            ch = channel(ClientConfig(f"127.0.0.1:{proc.info['tcp']}", certs.ca_file, cert, key,
                                      "localhost", timeout=20))
            stack.callback(ch.close)
            members.append(Replica(name, workdir, proc, ch, pb_grpc.KeyManagementStub(ch),
                                   pb_grpc.SignerStub(ch)))
    except BaseException:
        stack.close()
        raise
    return Replicas(members, shared, stack)


def _stop(proc: Process) -> None:
    if proc.proc.poll() is None:
        proc.stop(signal.SIGTERM)


def iter_signatures(replicas: list[Replica], key_id: str) -> Iterator[dict[str, Any]]:
    """Every successful Notary Sign with ``key_id`` in the replicas' audit logs, each line
    with ``replica`` set to the name of the replica that wrote it."""
    for r in replicas:
        for line in r.audit():
            if (line.get("operation"), line.get("status"), line.get("key_id")) == (
                    "sign", "OK", key_id):
                yield {**line, "replica": r.name}
