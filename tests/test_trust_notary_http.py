"""Publish and pull against a Notary-compatible HTTP(S) server started by the test."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from signerd.errors import InvalidArgument, NotFound
from signerd.trust import (
    Envelope,
    FileMeta,
    MetadataNotFound,
    NotaryClient,
    NotaryServerError,
    SoftwareSigner,
    TrustRepo,
    VerificationError,
    sign_envelope,
    signer_key,
    verify_repository,
)
from signerd.trust.notary_http import encode_multipart
from tests.notary_http_server import NotaryTestServer

GUN = "registry.example.com/acme/app"
DIGEST = hashlib.sha256(b"manifest").digest()


def _software_keys(gun: str, role: str) -> SoftwareSigner:
    return SoftwareSigner.generate()


@pytest.fixture
def server() -> Iterator[NotaryTestServer]:
    with NotaryTestServer(_software_keys) as srv:
        yield srv


class Publisher:
    """The client side of a repository: keys, a local trust dir, a Notary client."""

    def __init__(self, base: Path, client: NotaryClient, *, local_snapshot: bool = False) -> None:
        self.client = client
        self.repo = TrustRepo(base, GUN)
        self.root, self.targets, self.ci = (SoftwareSigner.generate() for _ in range(3))
        self.snapshot = SoftwareSigner.generate() if local_snapshot else None
        self.repo.init(
            self.root, self.targets,
            timestamp_key=client.get_key(GUN, "timestamp"),
            snapshot_key=None if local_snapshot else client.get_key(GUN, "snapshot"),
            snapshot_signer=self.snapshot,
        )

    def publish(self) -> dict[str, bytes]:
        if self.snapshot is not None:
            self.repo.sign_snapshot(self.snapshot)
        files = self.repo.pending()
        self.client.publish(GUN, files)
        self.repo.mark_published(files)
        return files


def test_publish_and_pull_with_server_managed_snapshot(server: NotaryTestServer,
                                                       tmp_path: Path) -> None:
    pub = Publisher(tmp_path / "publisher", NotaryClient(server.url))
    pub.repo.add_delegation("targets/releases", [signer_key(pub.ci)], pub.targets)
    pub.repo.add_target("v1", DIGEST, 8, pub.ci, role="targets/releases")
    sent = pub.publish()
    assert sorted(sent) == ["root", "targets", "targets/releases"]
    assert pub.repo.pending() == {}
    # The server made snapshot and timestamp with its own keys.
    assert sorted(server.store[GUN]) == ["root", "snapshot", "targets", "targets/releases",
                                         "timestamp"]
    assert sorted(server.keys) == [(GUN, "snapshot"), (GUN, "timestamp")]

    pulled = NotaryClient(server.url).pull(GUN)
    assert {k: pulled[k] for k in sent} == sent  # byte for byte what was published
    result = verify_repository(GUN, pulled)
    assert [(t.name, t.digest, t.size, t.role) for t in result.tags] == [
        ("v1", DIGEST.hex(), 8, "targets/releases")]

    consumer = TrustRepo(tmp_path / "consumer", GUN)
    consumer.store_pulled(pulled)
    assert consumer.files() == pulled
    assert consumer.pending() == {}

    # A CI runner with only its key signs and publishes the next tag.
    runner = TrustRepo(tmp_path / "consumer", GUN)
    runner.add_target("v2", DIGEST, 8, pub.ci, role="targets/releases")
    assert sorted(runner.pending()) == ["targets/releases"]
    NotaryClient(server.url).publish(GUN, runner.pending())
    again = verify_repository(GUN, NotaryClient(server.url).pull(GUN), trusted=result.state)
    assert [t.name for t in again.tags] == ["v1", "v2"]
    assert again.state.versions["snapshot"] == 2


def test_publish_with_local_snapshot(server: NotaryTestServer, tmp_path: Path) -> None:
    pub = Publisher(tmp_path, NotaryClient(server.url), local_snapshot=True)
    pub.repo.add_target("latest", DIGEST, 8, pub.targets)
    assert sorted(pub.publish()) == ["root", "snapshot", "targets"]
    assert (GUN, "snapshot") not in server.keys
    stored = server.current(GUN, "snapshot")
    assert stored == pub.repo.read("snapshot")
    result = verify_repository(GUN, NotaryClient(server.url).pull(GUN))
    assert result.tag("latest").role == "targets"


def test_multipart_body_is_what_go_writes() -> None:
    body, ctype = encode_multipart({"root": b"{}", "targets/releases": b"[1]"}, "XYZ")
    assert ctype == "multipart/form-data; boundary=XYZ"
    assert body == (
        b'--XYZ\r\nContent-Disposition: form-data; name="files"; filename="root"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n{}\r\n"
        b'--XYZ\r\nContent-Disposition: form-data; name="files"; filename="targets/releases"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n[1]\r\n"
        b"--XYZ--\r\n"
    )


def test_server_keys_are_stable_and_notary_shaped(server: NotaryTestServer) -> None:
    client = NotaryClient(server.url)
    first = client.get_key(GUN, "timestamp")
    assert client.get_key(GUN, "timestamp") == first
    assert first.to_dict()["keyval"]["private"] is None
    assert first.key_id == server.keys[(GUN, "timestamp")].key_id
    assert client.get_key(GUN, "snapshot") != first
    with pytest.raises(InvalidArgument, match="only timestamp and snapshot"):
        client.get_key(GUN, "targets")


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize(
    ("scenario", "fragment"),
    [
        pytest.param("republish", "targets version 2 is not new", id="same-version-twice"),
        pytest.param("tampered-targets", "targets.json: valid signatures from 0",
                     id="bad-targets-signature"),
        pytest.param("undelegated", "targets/qa is not delegated", id="undelegated-role"),
        pytest.param("wrong-delegation-key", "targets/releases.json: valid signatures from 0",
                     id="delegation-signed-by-other-key"),
        pytest.param("unapproved-root", "rotation not approved", id="root-without-old-key"),
        pytest.param("no-snapshot-key", "server does not hold current snapshot key",
                     id="snapshot-key-not-on-server"),
        pytest.param("first-without-root", "no pre-existing root", id="no-root"),
    ],
)
def test_server_rejects_invalid_updates(server: NotaryTestServer, tmp_path: Path,
                                        scenario: str, fragment: str) -> None:
    client = NotaryClient(server.url)
    if scenario == "no-snapshot-key":
        repo, s = TrustRepo(tmp_path, GUN), SoftwareSigner.generate()
        repo.init(s, s, timestamp_key=client.get_key(GUN, "timestamp"), snapshot_key=signer_key(s))
        upload = repo.pending()
    elif scenario == "first-without-root":
        pub = Publisher(tmp_path, client)
        upload = {"targets": pub.repo.read("targets") or b""}
    else:
        pub = Publisher(tmp_path, client)
        pub.repo.add_delegation("targets/releases", [signer_key(pub.ci)], pub.targets)
        pub.publish()
        if scenario == "republish":
            upload = {"targets": pub.repo.read("targets") or b""}
        elif scenario == "tampered-targets":
            pub.repo.add_target("v1", DIGEST, 1, pub.targets)
            upload = {"targets": (pub.repo.read("targets") or b"").replace(b'"length":1',
                                                                           b'"length":2')}
        elif scenario == "undelegated":
            pub.repo.add_delegation("targets/qa", [signer_key(pub.ci)], pub.targets)
            pub.repo.add_target("v1", DIGEST, 1, pub.ci, role="targets/qa")
            upload = {"targets/qa": pub.repo.read("targets/qa") or b""}
        elif scenario == "wrong-delegation-key":
            other = SoftwareSigner.generate()
            pub.repo.rotate_delegation_key("targets/releases", pub.targets, other)
            pub.repo.add_target("v1", DIGEST, 1, other, role="targets/releases")
            upload = {"targets/releases": pub.repo.read("targets/releases") or b""}
        else:  # unapproved-root: a new root key that the old one did not sign for
            new = SoftwareSigner.generate()
            pub.repo.rotate_root_key(pub.root, new)
            env = Envelope.from_bytes(pub.repo.read("root") or b"", "root")
            env.signatures = [s for s in env.signatures
                              if s.keyid == env.signed["roles"]["root"]["keyids"][0]]
            upload = {"root": env.to_bytes()}
    before = {role: list(v) for role, v in server.store.get(GUN, {}).items()}
    with pytest.raises(NotaryServerError, match=fragment) as err:
        client.publish(GUN, upload)
    assert err.value.status == 400
    assert "server rejected the update (HTTP 400)" in _one_line(err.value)
    assert {role: list(v) for role, v in server.store.get(GUN, {}).items()} == before


def test_rotations_publish_and_old_tags_still_verify(server: NotaryTestServer,
                                                     tmp_path: Path) -> None:
    client = NotaryClient(server.url)
    pub = Publisher(tmp_path, client)
    pub.repo.add_delegation("targets/releases", [signer_key(pub.ci)], pub.targets)
    pub.repo.add_target("v1", DIGEST, 8, pub.ci, role="targets/releases")
    pub.publish()
    first = verify_repository(GUN, client.pull(GUN))

    new_targets, new_ci = SoftwareSigner.generate(), SoftwareSigner.generate()
    pub.repo.rotate_targets_key(pub.root, new_targets)
    assert sorted(pub.publish()) == ["root", "targets"]
    pub.repo.rotate_delegation_key("targets/releases", new_targets, new_ci)
    assert sorted(pub.publish()) == ["targets", "targets/releases"]
    k2, k3 = SoftwareSigner.generate(), SoftwareSigner.generate()
    pub.repo.rotate_root_key(pub.root, k2)
    pub.publish()
    pub.repo.rotate_root_key(k2, k3)
    pub.publish()

    # A client that trusted the first root follows the chain through N.root files.
    pulled = client.pull(GUN, trusted_root_version=first.root.version)
    assert sorted(k for k in pulled if k.endswith(".root")) == ["2.root", "3.root"]
    result = verify_repository(GUN, pulled, trusted=first.state)
    assert result.root.version == 4
    assert result.tags == first.tags
    consumer = TrustRepo(tmp_path / "consumer", GUN)
    consumer.store_pulled(pulled)
    assert "2.root" not in consumer.files()
    assert verify_repository(GUN, consumer.files(), trusted=result.state).tags == first.tags
    assert ("GET", f"/v2/{GUN}/_trust/tuf/3.root.json") in server.requests


def test_checksum_and_version_urls(server: NotaryTestServer, tmp_path: Path) -> None:
    client = NotaryClient(server.url)
    Publisher(tmp_path, client).publish()
    snapshot = client.get(GUN, "snapshot")
    assert client.get(GUN, f"snapshot.{hashlib.sha256(snapshot).hexdigest()}") == snapshot
    assert client.get(GUN, "1.root") == client.get(GUN, "root")
    with pytest.raises(MetadataNotFound):
        client.get(GUN, "snapshot." + "0" * 64)


def test_pull_of_unknown_repository_is_not_found(server: NotaryTestServer) -> None:
    with pytest.raises(MetadataNotFound) as err:
        NotaryClient(server.url).pull("registry.example.com/nobody/here")
    assert isinstance(err.value, NotFound)
    assert err.value.status == 404
    assert _one_line(err.value).startswith("GET root.json: not found on the server (HTTP 404)")


def test_unreachable_server_is_one_line() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NotaryServerError, match="cannot reach notary server") as err:
        NotaryClient(f"http://127.0.0.1:{port}").get_key(GUN, "timestamp")
    _one_line(err.value)


@pytest.mark.parametrize("url", ["ftp://host", "file:///etc/passwd", "host:4443", "https://"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidArgument, match="must be http"):
        NotaryClient(url)


# --- auth and TLS ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_auth", "client_auth", "ok"),
    [
        pytest.param({"basic_auth": ("ci", "s3cret")}, {"username": "ci", "password": "s3cret"},
                     True, id="basic-ok"),
        pytest.param({"basic_auth": ("ci", "s3cret")}, {"username": "ci", "password": "nope"},
                     False, id="basic-wrong-password"),
        pytest.param({"basic_auth": ("ci", "s3cret")}, {}, False, id="basic-missing"),
        pytest.param({"bearer_token": "tok"}, {"token": "tok"}, True, id="bearer-ok"),
        pytest.param({"bearer_token": "tok"}, {"token": "other"}, False, id="bearer-wrong"),
    ],
)
def test_auth(tmp_path: Path, server_auth: dict[str, object], client_auth: dict[str, str],
              ok: bool) -> None:
    with NotaryTestServer(_software_keys, **server_auth) as srv:  # type: ignore[arg-type]
        client = NotaryClient(srv.url, **client_auth)  # type: ignore[arg-type]
        if ok:
            pub = Publisher(tmp_path, client)
            pub.publish()
            assert verify_repository(GUN, client.pull(GUN)).root.version == 1
        else:
            with pytest.raises(NotaryServerError, match=r"not authorized \(HTTP 401\)") as err:
                client.get_key(GUN, "timestamp")
            assert err.value.status == 401
            _one_line(err.value)


def test_basic_and_bearer_together_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="not both"):
        NotaryClient("https://notary", username="a", password="b", token="t")


def _tls_files(base: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1, written as PEM files."""
    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test notary CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = base / "ca.pem", base / "server.pem", base / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_https_with_ca_file(tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path)
    with NotaryTestServer(_software_keys, tls=(str(cert), str(key))) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        client = NotaryClient(srv.url, ca_file=str(ca))
        pub = Publisher(tmp_path / "trust", client)
        pub.repo.add_target("v1", DIGEST, 8, pub.targets)
        pub.publish()
        assert verify_repository(GUN, client.pull(GUN)).tag("v1").size == 8
        # Without the CA the server is not trusted.
        with pytest.raises(NotaryServerError, match="cannot reach notary server") as err:
            NotaryClient(srv.url).get(GUN, "root")
        assert "CERTIFICATE_VERIFY_FAILED" in _one_line(err.value)


# --- a hostile server (issue 22 §3) ---------------------------------------------------


class _Recorder:
    """A plain HTTP listener on loopback that records every request's header block and
    answers each with ``answer(path)``: raw bytes to send, or a list of (delay, bytes)
    chunks sent one after another."""

    def __init__(self, answer: Callable[[str], bytes | list[tuple[float, bytes]]],
                 tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.seen: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> _Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except OSError:
                    return
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.seen.append(head)
            path = head.split(b" ", 2)[1].decode()
            answer = self.answer(path)
            try:
                for delay, data in [(0.0, answer)] if isinstance(answer, bytes) else answer:
                    if self.stop.wait(delay):
                        return
                    conn.sendall(data)
            except OSError:
                return  # the client gave up: what these tests want


@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_regression_a_redirect_is_never_followed_and_the_token_stays(code: int) -> None:
    """Issue 22 §3: a 302 from the Notary server to http:// on another port was
    followed, and the bearer token went out in cleartext with it."""
    with _Recorder(lambda path: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}") as elsewhere, \
            _Recorder(lambda path: (f"HTTP/1.1 {code} Moved\r\nLocation: http://127.0.0.1:"
                                    f"{elsewhere.port}{path}\r\nContent-Length: 0\r\n\r\n"
                                    ).encode()) as hostile:
        client = NotaryClient(f"http://127.0.0.1:{hostile.port}", token="s3cret-token")
        for call in (lambda: client.get(GUN, "root"), lambda: client.pull(GUN),
                     lambda: client.publish(GUN, {"targets": b"{}"})):
            with pytest.raises(NotaryServerError, match=f"redirected \\(HTTP {code}\\)") as err:
                call()
            assert "follows no redirects" in str(err.value) and "s3cret" not in str(err.value)
        assert hostile.seen and all(b"Bearer s3cret-token" in h for h in hostile.seen)
        assert elsewhere.seen == []  # nothing, and so no token, reached the other origin


def test_regression_https_server_redirecting_to_http_keeps_the_token(tmp_path: Path) -> None:
    """The issue's own case: the HTTPS Notary server (pinned CA) answers 302 to
    http:// on another port."""
    ca, cert, key = _tls_files(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    with _Recorder(lambda path: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}") as plain, \
            _Recorder(lambda path: (f"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:"
                                    f"{plain.port}{path}\r\nContent-Length: 0\r\n\r\n"
                                    ).encode(), tls=tls) as hostile:
        client = NotaryClient(f"https://127.0.0.1:{hostile.port}", ca_file=str(ca),
                              token="s3cret-token")
        with pytest.raises(NotaryServerError, match="redirected \\(HTTP 302\\) to 'http://"):
            client.pull(GUN)
        assert len(hostile.seen) == 1 and plain.seen == []


def test_regression_a_trickling_server_cannot_hold_a_request_past_its_deadline() -> None:
    """Issue 22 §3: headers, then one byte every 10 s, kept `trust pull` running for
    more than 120 s (the timeout applied per read). Here, one byte every 0.2 s with a
    1 s per-read timeout: the 1.5 s request deadline ends it."""
    body = [(0.0, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")]
    body += [(0.2, b"x")] * 1000
    with _Recorder(lambda path: body) as slow:
        client = NotaryClient(f"http://127.0.0.1:{slow.port}", timeout=1, request_deadline=1.5)
        t0 = time.monotonic()
        with pytest.raises(NotaryServerError, match="no complete answer within 1.5 s"):
            client.get(GUN, "root")
        assert time.monotonic() - t0 < 5


def test_trickled_headers_meet_the_deadline_too_and_the_command_has_one() -> None:
    header = [(0.0, b"HTTP/1.1 200 OK\r\n")] + [(0.2, b"X-Slow: 1\r\n")] * 1000
    with _Recorder(lambda path: header) as slow:
        client = NotaryClient(f"http://127.0.0.1:{slow.port}", timeout=1, request_deadline=1,
                              command_deadline=1.5)
        with pytest.raises(NotaryServerError, match="no complete answer within 1 s"):
            client.get(GUN, "root")
        # What is left of the command's 1.5 s is this request's deadline ...
        with pytest.raises(NotaryServerError, match=r"no complete answer within 0\.\d+ s"):
            client.get(GUN, "root")
        # ... and once it has passed, nothing more is sent.
        with pytest.raises(NotaryServerError, match="ran past its 1.5 s deadline"):
            client.get(GUN, "timestamp")


@pytest.mark.parametrize("bad", [0, -1, float("nan"), 1e9])
def test_deadlines_are_bounded(bad: float) -> None:
    with pytest.raises(InvalidArgument, match="request_deadline must be in"):
        NotaryClient("https://notary", request_deadline=bad)


def _published(server: NotaryTestServer, tmp_path: Path) -> Publisher:
    pub = Publisher(tmp_path / "trust", NotaryClient(server.url))
    pub.repo.add_target("v1", DIGEST, 8, pub.targets)
    pub.publish()
    return pub


def test_an_unverified_snapshot_steers_no_download(server: NotaryTestServer,
                                                     tmp_path: Path) -> None:
    """Issue 22 §3: an unverified snapshot could make the client fetch far more than
    the files it names. A snapshot and timestamp re-signed by a key the root does not
    list, naming 500 delegations, are refused before any targets file is fetched."""
    _published(server, tmp_path)
    attacker = SoftwareSigner.generate()
    snapshot = Envelope.from_bytes(server.current(GUN, "snapshot") or b"", "snapshot").signed
    meta = {f"targets/r{i}": {"length": 90 << 20, "hashes": {"sha256": "AA=="}}
            for i in range(500)}
    forged_snapshot = sign_envelope({**snapshot, "version": 99,
                                     "meta": {**snapshot["meta"], **meta}},
                                    {signer_key(attacker).key_id: attacker}).to_bytes()
    stamp = Envelope.from_bytes(server.current(GUN, "timestamp") or b"", "timestamp").signed
    declared = {"snapshot": FileMeta.for_bytes(forged_snapshot).to_dict()}
    forged_stamp = sign_envelope({**stamp, "version": 99, "meta": declared},
                                 {signer_key(attacker).key_id: attacker}).to_bytes()
    server.store[GUN]["snapshot"].append((99, forged_snapshot))
    server.store[GUN]["timestamp"].append((99, forged_stamp))
    server.requests.clear()
    with pytest.raises(VerificationError, match="timestamp.json: .*signature"):
        NotaryClient(server.url).pull(GUN)
    assert [p for _, p in server.requests if "/targets" in p or "/snapshot" in p] == []
    # A timestamp that verifies, over a snapshot that does not: refused at the snapshot.
    server.store[GUN]["timestamp"].pop()
    server.store[GUN]["snapshot"].pop()
    good_stamp = server.current(GUN, "timestamp") or b""
    server.store[GUN]["snapshot"].append((99, forged_snapshot))
    server.requests.clear()
    with pytest.raises(VerificationError, match="snapshot.json: the server sent more than"):
        NotaryClient(server.url).pull(GUN)
    assert [p for _, p in server.requests if "/targets" in p] == []
    assert server.current(GUN, "timestamp") == good_stamp


def test_a_targets_file_longer_than_the_snapshot_declares_is_refused(
        server: NotaryTestServer, tmp_path: Path) -> None:
    _published(server, tmp_path)
    targets = server.current(GUN, "targets") or b""
    server.store[GUN]["targets"].append((2, targets + b" " * (1 << 20)))
    with pytest.raises(VerificationError,
                       match=f"targets.json: the server sent more than the {len(targets)} bytes"):
        NotaryClient(server.url).pull(GUN)


# --- notary-server's error bodies as words (issue 21 §6) -------------------------------


def _answering(status: int, doc: object) -> Callable[[str], bytes]:
    body = json.dumps(doc).encode()
    return lambda path: (f"HTTP/1.1 {status} Bad Request\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@pytest.mark.parametrize(("detail", "expected"), [
    pytest.param(
        # notary-server, its signer (signerd) down: server/handlers/validation.go's
        # generateSnapshot turns "insufficient signatures" into ErrBadHierarchy.
        {"Name": "ErrBadHierarchy", "Error": {
            "Missing": "snapshot", "Msg": "no snapshot was included in update and server "
                                          "does not hold current snapshot key for repository"}},
        "publish GUN: server rejected the update (HTTP 400): Update sent by the client is "
        "invalid.: ErrBadHierarchy: no snapshot was included in update and server does not "
        "hold current snapshot key for repository; the Notary server could not sign the "
        "snapshot or timestamp: check that its signer (signerd, notary-server's "
        "trust_service) runs and that notary-server reaches it, then publish again",
        id="signer-down"),
    pytest.param(
        {"Name": "ErrBadRoot", "Error": {
            "Msg": "Root modifications must increment the version. Current 5, new 1"}},
        "publish GUN: server rejected the update (HTTP 400): Update sent by the client is "
        "invalid.: ErrBadRoot: Root modifications must increment the version. Current 5, new 1",
        id="bad-root"),
    pytest.param({}, "publish GUN: server rejected the update (HTTP 400): Update sent by the "
                     "client is invalid.", id="go-error-as-empty-object"),
])
def test_regression_an_error_detail_object_is_words_not_a_python_dict(
        detail: object, expected: str) -> None:
    """Issue 21 §6: a publish while signerd was down showed notary's error
    detail as a Python dict ({'Name': 'ErrBadHierarchy', 'Error': {...}})."""
    doc = {"errors": [{"code": "INVALID_UPDATE", "message": "Update sent by the client is "
                       "invalid.", "detail": detail}]}
    with _Recorder(_answering(400, doc)) as notary:
        client = NotaryClient(f"http://127.0.0.1:{notary.port}")
        with pytest.raises(NotaryServerError) as err:
            client.publish(GUN, {"targets": b"{}"})
    assert str(err.value) == expected.replace("GUN", GUN)
    assert "{" not in str(err.value) and "'Name'" not in str(err.value)
