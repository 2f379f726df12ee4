"""The real notary-server and the real notary client 0.7.0, with signerd as notary-signer.

Every stock flow of Docker Content Trust's server runs here end to end: the notary client
initialises, publishes, rotates and delegates; notary-server asks signerd (over mutual TLS,
with its own client certificate) to create and sign with the server-managed timestamp and
snapshot keys; the client fetches and verifies what was signed. Where the content checks
(issue 23 §2) exist in the signerd under test, they are switched on
(:func:`tests._replicas.content_tables`): these flows must pass with them.

What signerd signed is checked twice: the notary client verifies the metadata (``notary
list`` fails on a bad signature), and the timestamp's signature is verified here against the
key in root.json, the way notary-server's verifiers do (tests.test_notary.notary_verify).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from signerd import pki
from signerd.canonicaljson import encode_canonical
from tests import _notary
from tests._postgres import Postgres, postgres  # noqa: F401 - the fixture
from tests._replicas import content_tables
from tests.conftest import HSM, PKI, Daemon, daemon_config, start_daemon, unique_gun
from tests.test_notary import NOTARY, NOTARY_POLICY, notary_verify

pytestmark = pytest.mark.usefixtures("notary_installed")


@pytest.fixture(scope="session")
def notary_installed() -> None:
    _notary.require()


@pytest.fixture(scope="module")
def tls(certs: PKI) -> _notary.TlsFiles:
    """notary-server's HTTPS certificate (127.0.0.1) and its client certificate for signerd."""
    if "notary-server" not in certs.files:
        certs.add("notary-server",
                  pki.issue(certs.ca, "notary-server", server=False, uris=(NOTARY,)))
    server_cert, server_key = certs.files["server"]
    client_cert, client_key = certs.files["notary-server"]
    return _notary.TlsFiles(certs.ca_file, server_cert, server_key, client_cert, client_key)


@pytest.fixture(scope="module")
def signerd(hsm: HSM, certs: PKI, tls: _notary.TlsFiles,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One signerd for the module: notary-server's identity may create, read and sign
    timestamp and snapshot keys (examples/notary/policy.toml); checks on where they exist."""
    workdir = tmp_path_factory.mktemp("signerd-notary")
    cfg = daemon_config(hsm, certs, workdir, policy=NOTARY_POLICY)
    cfg.update(content_tables(cfg, workdir, f"sqlite:///{workdir / 'state.db'}"))
    d = start_daemon(cfg, certs, workdir)
    yield d
    d.stop()


def _server(signerd: Daemon, tls: _notary.TlsFiles, workdir: Path,
            **kw: Any) -> Iterator[_notary.NotaryServer]:
    server = _notary.start_server(workdir, tls, signerd.port, **kw)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(signerd: Daemon, tls: _notary.TlsFiles,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[_notary.NotaryServer]:
    yield from _server(signerd, tls, tmp_path_factory.mktemp("notary-server"))


@pytest.fixture
def client(server: _notary.NotaryServer, tmp_path: Path) -> _notary.NotaryClient:
    return _notary.NotaryClient(tmp_path / "client", server)


def _gun() -> str:
    return unique_gun("docker.io/notary")


def _target(client: _notary.NotaryClient, name: str, content: bytes) -> Path:
    path = client.dir / name
    path.write_bytes(content)
    return path


def _audit(d: Daemon) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (d.workdir / "audit.log").read_text().splitlines()]


def _signed_by_signerd(d: Daemon, key_id: str) -> int:
    """How many successful signatures signerd's audit log records with ``key_id``."""
    return sum(1 for line in _audit(d) if line.get("key_id") == key_id
               and line.get("operation") == "sign" and line.get("status") == "OK")


def _role_key(root: dict[str, Any], role: str) -> tuple[str, dict[str, Any]]:
    """(key ID, key) of the one key ``role`` has in a root.json."""
    (key_id,) = root["signed"]["roles"][role]["keyids"]
    return key_id, root["signed"]["keys"][key_id]


def _verify(root: dict[str, Any], doc: dict[str, Any], role: str) -> str:
    """Verify ``doc``'s signature by ``role``'s key from ``root`` the way notary does;
    return that key's algorithm (keytype)."""
    key_id, key = _role_key(root, role)
    (sig,) = [s for s in doc["signatures"] if s["keyid"] == key_id]
    notary_verify(key["keytype"], base64.b64decode(key["keyval"]["public"]), sig["method"],
                  base64.b64decode(sig["sig"]), encode_canonical(doc["signed"]))
    return str(key["keytype"])


def _init(client: _notary.NotaryClient, gun: str) -> None:
    client.run("init", gun, "-p")
    client.run("add", gun, "v1", str(_target(client, "v1", b"first release")), "-p")


# -- the flows ------------------------------------------------------------------------------

def test_init_and_publish(signerd: Daemon, server: _notary.NotaryServer,
                          client: _notary.NotaryClient) -> None:
    gun = _gun()
    _init(client, gun)
    client.run("add", gun, "v2", str(_target(client, "v2", b"second")), "-p")
    assert set(client.targets(gun)) == {"v1", "v2"}
    root = server.metadata(gun, "root")
    timestamp = server.metadata(gun, "timestamp")
    assert _verify(root, timestamp, "timestamp") == "ecdsa"
    # signerd made the timestamp key, and signed every timestamp notary-server published
    assert _signed_by_signerd(signerd, _role_key(root, "timestamp")[0]) >= timestamp[
        "signed"]["version"]
    # a second client, with nothing but the server, sees the same (and verifies it)
    other = _notary.NotaryClient(client.dir.parent / "other", server)
    assert other.targets(gun) == client.targets(gun)


def test_rotating_every_role(signerd: Daemon, server: _notary.NotaryServer,
                             client: _notary.NotaryClient) -> None:
    gun = _gun()
    _init(client, gun)
    # root and targets are the client's keys; snapshot moves to the server (-r), then
    # rotates again there; timestamp is always the server's (-r is required)
    steps = [("root", ()), ("targets", ()), ("snapshot", ("-r",)), ("snapshot", ("-r",)),
             ("timestamp", ("-r",)), ("timestamp", ("-r",))]
    for n, (role, flags) in enumerate(steps):
        before = _role_key(server.metadata(gun, "root"), role)[0]
        client.run("key", "rotate", gun, role, *flags, answer="yes\n")
        root = server.metadata(gun, "root")
        after = _role_key(root, role)[0]
        assert after != before, f"{role} did not rotate"
        name = f"after-{n}-{role}"
        client.run("add", gun, name, str(_target(client, name, name.encode())), "-p")
        assert name in client.targets(gun)
        _verify(root, server.metadata(gun, "timestamp"), "timestamp")
        if role in ("snapshot", "timestamp"):  # server-managed: signerd holds and uses it
            assert _signed_by_signerd(signerd, after) >= 1, f"signerd never signed {role}"
    _verify(server.metadata(gun, "root"), server.metadata(gun, "snapshot"), "snapshot")


def test_server_managed_snapshot_and_timestamp(signerd: Daemon, server: _notary.NotaryServer,
                                               client: _notary.NotaryClient) -> None:
    gun = _gun()
    _init(client, gun)
    client.run("key", "rotate", gun, "snapshot", "-r")
    versions = []
    for n in range(3):
        client.run("add", gun, f"t{n}", str(_target(client, f"t{n}", bytes([n]))), "-p")
        root = server.metadata(gun, "root")
        snapshot = server.metadata(gun, "snapshot")
        _verify(root, snapshot, "snapshot")
        _verify(root, server.metadata(gun, "timestamp"), "timestamp")
        versions.append(snapshot["signed"]["version"])
    assert versions == sorted(set(versions)), versions
    assert {f"t{n}" for n in range(3)} <= set(client.targets(gun))
    snapshot_key = _role_key(server.metadata(gun, "root"), "snapshot")[0]
    assert _signed_by_signerd(signerd, snapshot_key) >= 3


def _delegation_key(directory: Path) -> tuple[Path, Path]:
    """An ECDSA key (SEC1 PEM, what notary key import reads) and a self-signed
    certificate for it (what notary delegation add takes)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "releases")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    paths = directory / "releases.crt", directory / "releases-key.pem"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.write_private(paths[1], key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    return paths


def test_delegations(signerd: Daemon, server: _notary.NotaryServer,
                     client: _notary.NotaryClient) -> None:
    gun = _gun()
    _init(client, gun)
    client.run("key", "rotate", gun, "snapshot", "-r")
    cert, key = _delegation_key(client.dir)
    client.run("key", "import", str(key), "-r", "targets/releases")
    client.run("delegation", "add", gun, "targets/releases", str(cert), "--paths", "app/", "-p")
    client.run("add", gun, "app/v1", str(_target(client, "app-v1", b"delegated")),
               "-r", "targets/releases", "-p")
    assert "app/v1" in client.targets(gun, "targets/releases")
    listing = client.run("delegation", "list", gun).stdout
    assert "targets/releases" in listing and "app/" in listing
    # the server-managed snapshot now lists the delegation, signed by signerd's key
    root = server.metadata(gun, "root")
    snapshot = server.metadata(gun, "snapshot")
    assert "targets/releases" in snapshot["signed"]["meta"]
    _verify(root, snapshot, "snapshot")
    _verify(root, server.metadata(gun, "timestamp"), "timestamp")


@pytest.mark.parametrize("algorithm", _notary.KEY_ALGORITHMS)
def test_key_algorithms(algorithm: str, signerd: Daemon, tls: _notary.TlsFiles,
                        tmp_path: Path) -> None:
    """notary-server's trust_service.key_algorithm picks the algorithm of the keys it has
    signerd create: timestamp and snapshot keys of each, verified as notary verifies them.
    (The notary client 0.7.0 itself generates only ECDSA keys: keys.go allows "ecdsa".)"""
    for server in _server(signerd, tls, tmp_path / "server", key_algorithm=algorithm):
        client = _notary.NotaryClient(tmp_path / "client", server)
        gun = _gun()
        _init(client, gun)
        client.run("key", "rotate", gun, "snapshot", "-r")
        client.run("add", gun, "v2", str(_target(client, "v2", algorithm.encode())), "-p")
        root = server.metadata(gun, "root")
        assert _verify(root, server.metadata(gun, "timestamp"), "timestamp") == algorithm
        assert _verify(root, server.metadata(gun, "snapshot"), "snapshot") == algorithm
        assert {"v1", "v2"} <= set(client.targets(gun))


# -- an expired timestamp, fetched by many at once ---------------------------------------------

@pytest.fixture
def server_on_postgres(signerd: Daemon, tls: _notary.TlsFiles, postgres: Postgres,  # noqa: F811
                       tmp_path: Path) -> Iterator[tuple[_notary.NotaryServer, str]]:
    """notary-server storing in a database of its own in the test PostgreSQL; yields the
    server and a psycopg URL of that database."""
    name = f"notary_{tmp_path.name[-8:].lower().replace('-', '_')}_{id(tmp_path) % 10000}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # noqa: S608 - a name made here
    url = f"postgresql://postgres@/{name}?host={postgres.dir}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_notary.SERVER_SCHEMA)
    db_url = f"postgres://postgres@/{name}?host={postgres.dir}&sslmode=disable"
    for server in _server(signerd, tls, tmp_path / "server", db_url=db_url):
        yield server, url


def test_concurrent_fetches_of_an_expired_timestamp(
        signerd: Daemon, server_on_postgres: tuple[_notary.NotaryServer, str],
        tmp_path: Path) -> None:
    """notary-server re-signs an expired timestamp when it is fetched
    (server/timestamp/timestamp.go, GetOrCreateTimestamp); fetched by many at once, several
    requests sign the same next version with different content, and one of them is stored.

    notary-server's timestamp expiry is fixed (14 days, data.DefaultExpires; no config
    option), and Go reads the clock through the vDSO, out of libfaketime's reach. So the
    test ages the stored timestamp instead: in notary-server's PostgreSQL store, its
    ``expires`` is set to the past. notary-server does not re-verify its stored
    timestamp's signature before re-signing, only parses it.
    """
    server, db = server_on_postgres
    client = _notary.NotaryClient(tmp_path / "client", server)
    gun = _gun()
    _init(client, gun)
    old = server.metadata(gun, "timestamp")
    aged = {**old, "signed": {**old["signed"], "expires": "2001-01-01T00:00:00Z"}}
    with psycopg.connect(db, autocommit=True) as conn:
        changed = conn.execute(
            "UPDATE tuf_files SET data = %s WHERE gun = %s AND role = 'timestamp'"
            " AND version = %s", (json.dumps(aged).encode(), gun, old["signed"]["version"]))
        assert changed.rowcount == 1
    key_id = _role_key(server.metadata(gun, "root"), "timestamp")[0]
    signed_before = _signed_by_signerd(signerd, key_id)

    callers = 8
    barrier = threading.Barrier(callers)
    answers: list[tuple[int, bytes]] = []

    def fetch() -> None:
        barrier.wait()
        answers.append(server.get(f"/v2/{gun}/_trust/tuf/timestamp.json"))

    threads = [threading.Thread(target=fetch) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    root = server.metadata(gun, "root")
    fresh = [json.loads(body) for status, body in answers if status == 200]
    # notary-server answers a request whose store lost the race with an error; those that
    # won, and every later fetch, get a timestamp signerd signed, one version up, unexpired
    assert fresh, answers
    for doc in [*fresh, server.metadata(gun, "timestamp")]:
        _verify(root, doc, "timestamp")
        assert doc["signed"]["version"] == old["signed"]["version"] + 1
        assert doc["signed"]["expires"] > dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    signed = _signed_by_signerd(signerd, key_id) - signed_before
    assert 1 <= signed <= callers
    # signerd signed every one of those requests: the same version with different content
    # (different expires) is notary-server's normal race, and must not be refused
    refused = [line for line in _audit(signerd) if line.get("key_id") == key_id
               and line.get("operation") == "sign" and line.get("status") != "OK"]
    assert refused == []
    assert "v1" in client.targets(gun)  # the client verifies the chain and the new timestamp
