"""``signerctl trust`` end to end: real SoftHSM, real signerd over mTLS, a Notary server.

Three parties, as in production: the security team (the admin identity, which
holds root and targets keys), a CI runner (its own client certificate and a
policy that covers only its delegation key) and a consumer (no signerd at all,
only the Notary server). The Notary server is ``tests/notary_http_server.py``;
it signs the server-managed snapshot and timestamp through signerd's
Notary-compatible gRPC API with its own client certificate.

The main flow and the offline root ceremony run signerctl as a subprocess;
the other tests call ``signerd.cli.main`` in-process, which is the same code
without an interpreter start per command.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from signerd import pki
from signerd.cli import signerctl as cli
from signerd.cli.trust import RemoteSigner, split_reference
from signerd.client import channel
from signerd.config import parse_config
from signerd.notary import signer_pb2 as npb
from signerd.notary import signer_pb2_grpc as npb_grpc
from signerd.service import KeyService
from signerd.trust import (
    Envelope,
    NotaryClient,
    Root,
    TrustRepo,
    VerificationError,
    check_root_certificate,
    sign_envelope,
    verify_repository,
    verify_role,
    x509_key_id,
)
from tests.conftest import (
    ADMIN,
    HSM,
    PKI,
    RUNNER,
    Daemon,
    daemon_config,
    unique_gun,
    write_toml,
)
from tests.notary_http_server import NotaryTestServer

NOTARY = "spiffe://test/notary-server"
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}'
DIGEST = hashlib.sha256(MANIFEST).hexdigest()
SIZE = len(MANIFEST)

# The runner may create, read and sign only targets/releases keys on the
# online token; notary-server only timestamp and snapshot keys; the security
# team anything, root included.
TRUST_POLICY = f"""
[[rule]]
name = "security-team"
identities = ["{ADMIN}"]
operations = ["*"]
roles = ["*", "root"]

[[rule]]
name = "ci-runner"
identities = ["{RUNNER}"]
operations = ["create", "read", "sign"]
guns = ["docker.io/test/*"]
roles = ["targets/releases"]
tokens = ["online"]
transports = ["tcp"]

[[rule]]
name = "notary-server"
identities = ["{NOTARY}"]
operations = ["create", "read", "sign"]
roles = ["timestamp", "snapshot"]
tokens = ["online"]
transports = ["tcp"]
"""


# --- parties --------------------------------------------------------------------


@dataclass
class Ctl:
    """signerctl for one party: its signerd connection options and its trust directory."""

    trust_dir: Path
    connection: list[str] = field(default_factory=list)  # options before `trust`
    env: dict[str, str] = field(default_factory=dict)
    subprocess: bool = True

    def run(self, *argv: str) -> tuple[int, str, str]:
        """Run ``signerctl [connection] trust ARGV --trust-dir DIR``: (exit code, out, err)."""
        full = [*self.connection, "trust", *argv, "--trust-dir", str(self.trust_dir)]
        if self.subprocess:
            # No default client config: every signerd connection must be explicit. (A
            # $SIGNERCTL_CONFIG naming a missing file is an error of its own now, even
            # with --server: a config someone named must exist.)
            env = {k: v for k, v in os.environ.items() if k != "SIGNERCTL_CONFIG"}
            env = {**env, "SIGNERD_STATE_DIR": str(self.trust_dir / "no-state"), **self.env}
            done = subprocess.run([sys.executable, "-m", "signerd.cli", *full], env=env,
                                  capture_output=True, text=True, timeout=120)
            return done.returncode, done.stdout, done.stderr
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(full)
        return code, out.getvalue(), err.getvalue()

    def ok(self, *argv: str) -> Any:
        """Run with --json; assert success and return the parsed output."""
        code, out, err = self.run(*argv, "--json")
        assert code == 0, err
        return json.loads(out)

    def text(self, *argv: str) -> str:
        code, out, err = self.run(*argv)
        assert code == 0, err
        return out

    def fails(self, *argv: str) -> str:
        """Assert exit 1 with exactly one line on stderr; return that line."""
        code, out, err = self.run(*argv)
        lines = err.strip().splitlines()
        assert code == 1 and out == "", (code, out, err)
        assert len(lines) == 1 and lines[0].startswith("signerctl: "), err
        return lines[0]

    def usage(self, *argv: str) -> str:
        """Assert a usage error (issue 21 §6): exit 2, nothing on stdout, one line on
        stderr ending with where --help is; return that line. In-process only."""
        out, err = io.StringIO(), io.StringIO()
        full = [*self.connection, "trust", *argv, "--trust-dir", str(self.trust_dir)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(full)
            except SystemExit as e:  # argparse's own usage errors
                code = e.code  # type: ignore[assignment]
        lines = err.getvalue().splitlines()
        assert (code, out.getvalue(), len(lines)) == (2, "", 1), (code, out.getvalue(), lines)
        assert lines[0].startswith("signerctl trust ") and lines[0].endswith("--help')"), lines
        return lines[0]

    def repo(self, gun: str) -> TrustRepo:
        return TrustRepo(self.trust_dir, gun)


def tls_options(d: Daemon, who: str) -> list[str]:
    cert, key = d.certs.files[who]
    return ["--server", f"127.0.0.1:{d.port}", "--tls-ca", str(d.certs.ca_file),
            "--tls-cert", str(cert), "--tls-key", str(key), "--server-name", "localhost"]


def client_config_file(d: Daemon, who: str, path: Path) -> Path:
    """A signerctl client config, as a CI runner would have one."""
    cert, key = d.certs.files[who]
    path.write_text(f'server = "127.0.0.1:{d.port}"\nca = "{d.certs.ca_file}"\n'
                    f'cert = "{cert}"\nkey = "{key}"\nserver_name = "localhost"\n')
    return path


def audit(d: Daemon) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (d.workdir / "audit.log").read_text().splitlines()]


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


# --- notary-server, backed by signerd --------------------------------------------


class NotaryApiSigner:
    """notary-server's view of a key: made by KeyManagement.CreateKey, used through Signer.Sign."""

    def __init__(self, signer: npb_grpc.SignerStub, created: npb.PublicKey) -> None:
        self._signer = signer
        self.key_id = created.keyInfo.keyID.ID
        self.keytype = created.keyInfo.algorithm.algorithm
        self.public = bytes(created.publicKey)
        self.method = "ecdsa"

    def sign(self, message: bytes) -> bytes:
        req = npb.SignatureRequest(keyID=npb.KeyID(ID=self.key_id), content=message)
        resp = self._signer.Sign(req, timeout=30)
        assert resp.algorithm.algorithm == "ecdsa"
        return bytes(resp.content)


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon], certs: PKI) -> Daemon:
    if "notary-server" not in certs.files:
        certs.add("notary-server", pki.issue(certs.ca, "notary-server", server=False,
                                             uris=(NOTARY,)))
    return daemon_factory(policy=TRUST_POLICY)


@pytest.fixture
def notary_keys(daemon: Daemon) -> Iterator[Callable[[str, str], NotaryApiSigner]]:
    """A NotaryTestServer key provider that asks signerd, as notary-server would."""
    ch = channel(daemon.client_config("notary-server"))
    km, signer = npb_grpc.KeyManagementStub(ch), npb_grpc.SignerStub(ch)

    def provide(gun: str, role: str) -> NotaryApiSigner:
        created = km.CreateKey(npb.CreateKeyRequest(algorithm="ecdsa", gun=gun, role=role),
                               timeout=60)
        return NotaryApiSigner(signer, created)

    yield provide
    ch.close()


@pytest.fixture
def notary_server(notary_keys: Callable[[str, str], NotaryApiSigner]
                  ) -> Iterator[NotaryTestServer]:
    with NotaryTestServer(notary_keys) as srv:
        yield srv


def in_process(d: Daemon | None, who: str, trust_dir: Path) -> Ctl:
    return Ctl(trust_dir, tls_options(d, who) if d else [], subprocess=False)


# --- the whole flow ------------------------------------------------------------------


def test_init_delegate_ci_signs_publish_pull_inspect(
    daemon: Daemon, notary_server: NotaryTestServer, tmp_path: Path
) -> None:
    gun, url = unique_gun(), notary_server.url
    team = Ctl(tmp_path / "team", tls_options(daemon, "admin"))
    runner_config = client_config_file(daemon, "runner", tmp_path / "runner.toml")
    runner = Ctl(tmp_path / "runner", env={"SIGNERCTL_CONFIG": str(runner_config)})
    consumer = Ctl(tmp_path / "consumer")

    # 1. The security team creates the repository: root key on the root token,
    # targets key on the online token, timestamp and snapshot keys from the server.
    init = team.ok("init", gun, "--server", url)
    assert init["signed_locally"] == [] and init["files"] == ["root", "targets"]
    with daemon.client() as c:
        root_key, targets_key = c.get_key(init["root_key_id"]), c.get_key(init["targets_key_id"])
        assert (root_key.token, root_key.role, root_key.gun) == ("root", "root", gun)
        assert (targets_key.token, targets_key.role) == ("online", "targets")
        for role in ("timestamp", "snapshot"):
            # notary-server made these in signerd through proto.KeyManagement.CreateKey
            server_key = c.get_key(init[f"{role}_key_id"])
            assert (server_key.role, server_key.gun, server_key.token) == (role, gun, "online")
            assert notary_server.keys[(gun, role)].key_id == server_key.key_id
    root = team.repo(gun).root()
    cert_key = root.keys[root.roles["root"].keyids[0]]
    assert cert_key.keytype == "ecdsa-x509"
    assert x509_key_id(cert_key.public) == init["root_certificate_key_id"]
    assert cert_key.canonical_id == root_key.key_id  # the certificate holds the token's key
    cert = x509.load_pem_x509_certificate(cert_key.public)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == gun
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == root_key.public_key_der
    check_root_certificate(cert_key.public, gun)

    # 2. The runner makes its own key; the team delegates targets/releases to it.
    made = subprocess.run(
        [sys.executable, "-m", "signerd.cli", "keys", "create", "--gun", gun,
         "--role", "targets/releases", "--json"],
        env={**os.environ, "SIGNERCTL_CONFIG": str(runner_config)},
        capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    ci_key = json.loads(made.stdout)["key_id"]
    added = team.ok("delegation", "add", gun, "targets/releases", "--key", ci_key)
    assert added["files"] == ["targets"] and added["key_ids"] == [ci_key]
    published = team.ok("publish", gun)  # the server recorded by init
    assert published["published"] == ["root", "targets"]
    assert team.ok("inspect", gun)["tags"] == []

    # 3. CI signs a tag with only its delegation key, and publishes it.
    runner.ok("pull", gun, "--server", url)
    signed = runner.ok("sign", f"{gun}:v1", "--digest", f"sha256:{DIGEST}", "--size", str(SIZE))
    assert (signed["role"], signed["key_id"]) == ("targets/releases", ci_key)
    assert signed["files"] == ["targets/releases"]  # snapshot and timestamp are the server's
    before = tree(runner.trust_dir)
    refused = runner.fails("sign", f"{gun}:v2", "--digest", f"sha256:{DIGEST}",
                           "--size", "1", "--role", "targets")
    assert f"signerd holds no key of targets for {gun}" in refused
    assert tree(runner.trust_dir) == before  # a refusal changes nothing
    unpublished = runner.fails("inspect", gun)  # the server has not re-signed the snapshot
    assert "targets/releases.json" in unpublished and "publish them" in unpublished
    assert runner.ok("publish", gun)["published"] == ["targets/releases"]  # URL from pull
    runner_signs = [a for a in audit(daemon)
                    if a["identity"] == f"uri:{RUNNER}" and a["operation"] == "sign"]
    assert runner_signs and {(a["key_id"], a["decision"]) for a in runner_signs} == {
        (ci_key, "allow")}

    # 4. A consumer with no signerd pulls into a fresh trust dir and sees the tag.
    pulled = consumer.ok("pull", gun, "--server", url)
    assert [t["name"] for t in pulled["tags"]] == ["v1"]
    shown = consumer.ok("inspect", f"{gun}:v1")
    assert shown["tags"] == [{"name": "v1", "digest": f"sha256:{DIGEST}", "size": SIZE,
                              "role": "targets/releases"}]
    assert shown["signers"] == {"targets": [targets_key.key_id], "targets/releases": [ci_key]}
    table = consumer.text("inspect", gun)
    row = next(line for line in table.splitlines() if line.startswith("v1 "))
    assert row.split() == ["v1", f"sha256:{DIGEST}", str(SIZE), "targets/releases"]
    assert "is not signed by any trusted role" in consumer.fails("inspect", f"{gun}:v2")

    # What the consumer trusts is exactly what the server serves, and the
    # server's timestamp was signed by signerd's key through proto.Signer.
    files = NotaryClient(url).pull(gun)
    assert verify_repository(gun, files).tag("v1").role == "targets/releases"
    timestamp = Envelope.from_bytes(files["timestamp"], "timestamp")
    assert [s.keyid for s in timestamp.signatures] == [init["timestamp_key_id"]]
    notary_signs = {(a["role"], a["status"]) for a in audit(daemon)
                    if a["identity"] == f"uri:{NOTARY}" and a["operation"] == "sign"
                    and a["gun"] == gun}
    assert notary_signs == {("timestamp", "OK"), ("snapshot", "OK")}


# --- rotations --------------------------------------------------------------------------


def test_rotations_keep_old_tags_valid_and_retire_old_keys(
    daemon: Daemon, notary_server: NotaryTestServer, tmp_path: Path
) -> None:
    gun, url = unique_gun(), notary_server.url
    team = in_process(daemon, "admin", tmp_path / "team")
    consumer = in_process(None, "", tmp_path / "consumer")
    team.ok("init", gun, "--server", url)
    with daemon.client() as c:
        qa = c.create_key(gun, "targets/qa", "ed25519")
        rsa_root = c.create_key(gun, "root", "rsa-2048")
    (tmp_path / "qa.pem").write_text(qa.public_key_pem)
    team.ok("delegation", "add", gun, "targets/qa", "--pubkey", str(tmp_path / "qa.pem"),
            "--paths", "qa-")
    assert team.ok("sign", f"{gun}:v1", "--digest", DIGEST, "--size", "1")["role"] == "targets"
    team.ok("sign", f"{gun}:qa-1", "--digest", DIGEST, "--size", "2", "--role", "targets/qa")
    team.ok("publish", gun)
    first = consumer.ok("pull", gun, "--server", url)
    assert [(t["name"], t["role"]) for t in first["tags"]] == [("qa-1", "targets/qa"),
                                                                ("v1", "targets")]
    old_root = team.repo(gun).root()

    targets = team.ok("rotate", gun, "targets")
    assert targets["files"] == ["root", "targets"]
    # notary-server takes one root version at a time: publish before the next root change
    refused = team.fails("rotate", gun, "root", "--key", rsa_root.key_id)
    assert "already has an unpublished change" in refused
    assert team.ok("publish", gun)["published"] == ["root", "targets"]
    deleg = team.ok("rotate", gun, "targets/qa")
    assert deleg["old_key_ids"] == [qa.key_id] and deleg["files"] == ["targets", "targets/qa"]
    rooted = team.ok("rotate", gun, "root", "--key", rsa_root.key_id)
    assert rooted["files"] == ["root"] and rooted["new_key_id"] == rsa_root.key_id
    assert team.ok("publish", gun)["published"] == ["root", "targets", "targets/qa"]

    # The consumer, still trusting root v1, follows the rotations and sees the same tags.
    after = consumer.ok("pull", gun, "--server", url)
    assert after["tags"] == first["tags"]
    assert after["versions"]["root"] == old_root.version + 2
    assert consumer.ok("inspect", gun)["signers"] == {
        "targets": [targets["new_key_id"]], "targets/qa": [deleg["new_key_id"]]}

    repo = consumer.repo(gun)
    root = repo.root()
    assert root.roles["targets"].keyids == [targets["new_key_id"]]
    assert targets["old_key_ids"][0] not in root.keys
    new_cert = root.keys[root.roles["root"].keyids[0]]
    assert new_cert.keytype == "rsa-x509" and new_cert.canonical_id == rsa_root.key_id
    cert = x509.load_pem_x509_certificate(new_cert.public)
    # signed on the token with PKCS#1 v1.5, through RemoteSigner.sign_pkcs1v15
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.RSA_WITH_SHA256
    check_root_certificate(new_cert.public, gun)
    old_cert_id = old_root.roles["root"].keyids[0]
    root_sigs = {s.keyid for s in Envelope.from_bytes(repo.read("root") or b"", "root").signatures}
    assert root_sigs == {old_cert_id, root.roles["root"].keyids[0]}

    # The old targets key still exists in signerd, but its signatures no longer count.
    envelope = Envelope.from_bytes(repo.read("targets") or b"", "targets")
    envelope.signed["version"] += 1
    with daemon.client() as c:
        old_signer = RemoteSigner(c, c.get_key(targets["old_key_ids"][0]))
        forged = sign_envelope(envelope.signed, {old_signer.key_id: old_signer}).to_bytes()
    with pytest.raises(VerificationError, match=r"^targets\.json: .*valid signatures from 0"):
        verify_role("targets", forged, root.role_keys("targets"), 1)


def test_offline_root_ceremony_on_the_token_without_a_daemon(
    hsm: HSM, certs: PKI, tmp_path: Path
) -> None:
    gun = unique_gun()
    cfg_data = daemon_config(hsm, certs, tmp_path / "work")
    config = write_toml(tmp_path / "signerd.toml", cfg_data)
    local = ("--local", "--daemon-config", str(config))
    ctl = Ctl(tmp_path / "trust")  # no signerd connection at all

    init = ctl.ok("init", gun, *local)
    assert init["signed_locally"] == ["snapshot", "timestamp"]
    assert init["files"] == ["root", "snapshot", "targets", "timestamp"]
    signed = ctl.ok("sign", f"{gun}:v1", "--digest", DIGEST, "--size", str(SIZE), *local)
    assert signed["files"] == ["snapshot", "targets", "timestamp"]
    # Without --local this needs a daemon, and there is none.
    assert "no client config" in ctl.fails("sign", f"{gun}:v2", "--digest", DIGEST,
                                           "--size", "1")
    assert ctl.ok("inspect", gun)["versions"]["root"] == 1  # remembered as trusted
    old_root = ctl.repo(gun).root()

    rotated = ctl.ok("rotate", gun, "root", *local)
    assert rotated["files"] == ["root", "snapshot", "timestamp"]
    assert rotated["old_key_ids"] == [init["root_key_id"]]
    stale_client = tmp_path / "stale"  # a client that still trusts root v1
    shutil.copytree(ctl.trust_dir, stale_client)
    shown = ctl.ok("inspect", f"{gun}:v1")  # verified against the trusted root v1
    assert shown["tags"] == [{"name": "v1", "digest": f"sha256:{DIGEST}", "size": SIZE,
                              "role": "targets"}]
    assert shown["versions"]["root"] == 2

    root_file = ctl.repo(gun).read("root") or b""
    root = Root.from_dict(Envelope.from_bytes(root_file, "root").signed)
    new_id, old_id = root.roles["root"].keyids[0], old_root.roles["root"].keyids[0]
    assert root.keys[new_id].canonical_id == rotated["new_key_id"]
    assert old_id not in root.keys
    sigs = Envelope.from_bytes(root_file, "root").signatures
    assert {s.keyid for s in sigs} == {old_id, new_id}
    check_root_certificate(root.keys[new_id].public, gun)

    service = KeyService.open(parse_config(cfg_data, tmp_path))
    try:
        new_key = service.get_key(rotated["new_key_id"])
        assert (new_key.token, new_key.role, new_key.gun) == ("root", "root", gun)
    finally:
        service.close()

    # Without the old key's signature, a client that trusts root v1 refuses v2.
    env = Envelope.from_bytes(root_file, "root")
    env.signatures = [s for s in env.signatures if s.keyid == new_id]
    TrustRepo(stale_client, gun).write("root", env.to_bytes())
    refused = Ctl(stale_client).fails("inspect", gun)
    assert "root.json" in refused and "rotation not approved" in refused


# --- verification failures -----------------------------------------------------------


def test_tampering_replay_and_unpublished_changes(
    daemon: Daemon, notary_server: NotaryTestServer, tmp_path: Path
) -> None:
    gun, url = unique_gun(), notary_server.url
    team = in_process(daemon, "admin", tmp_path / "team")
    consumer = in_process(None, "", tmp_path / "consumer")
    team.ok("init", gun, "--server", url)
    team.ok("sign", f"{gun}:v1", "--digest", DIGEST, "--size", "1")
    team.ok("publish", gun)
    consumer.ok("pull", gun, "--server", url)
    old = consumer.repo(gun).files()
    team.ok("sign", f"{gun}:v2", "--digest", DIGEST, "--size", "2")
    team.ok("publish", gun)
    assert [t["name"] for t in consumer.ok("pull", gun, "--server", url)["tags"]] == ["v1", "v2"]

    repo = consumer.repo(gun)
    current = repo.files()
    for role, data in current.items():
        # one byte inside "signed", whatever the role
        at = data.index(b'"expires":"') + len(b'"expires":"') + 3
        repo.write(role, data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
        assert consumer.fails("inspect", gun).startswith(f"signerctl: {role}.json: ")
        repo.write(role, data)
    assert [t["name"] for t in consumer.ok("inspect", gun)["tags"]] == ["v1", "v2"]

    # A consistent but older set (v1 only) is a replay: the trusted state refuses it.
    for role, data in old.items():
        repo.write(role, data)
    replay = consumer.fails("inspect", gun)
    assert "timestamp.json" in replay and "rollback" in replay
    assert "rollback" in consumer.fails("inspect", f"{gun}:v1")

    # Pulling would overwrite unpublished local work; it is refused unless forced.
    team.ok("unsign", f"{gun}:v1")
    assert "unpublished changes (targets)" in team.fails("pull", gun, "--server", url)
    assert [t["name"] for t in team.ok("pull", gun, "--force")["tags"]] == ["v1", "v2"]


# --- Notary credentials ------------------------------------------------------------------


def test_notary_credentials_from_files_and_environment_never_argv(
    daemon: Daemon, notary_keys: Callable[[str, str], NotaryApiSigner], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    team = in_process(daemon, "admin", tmp_path / "team")
    (tmp_path / "token").write_text("t0ken\n")
    (tmp_path / "password").write_text("s3cret\n")
    (tmp_path / "wrong").write_text("nope\n")

    cert, key = daemon.certs.files["server"]  # valid for 127.0.0.1, issued by the test CA
    with NotaryTestServer(notary_keys, bearer_token="t0ken", tls=(str(cert), str(key))) as srv:
        gun = unique_gun()
        https = ("--server", srv.url, "--ca", str(daemon.certs.ca_file))
        assert "CERTIFICATE_VERIFY_FAILED" in team.fails("init", gun, "--server", srv.url)
        assert "not authorized (HTTP 401)" in team.fails("init", gun, *https)
        assert team.repo(gun).read("root") is None
        with daemon.client() as c:
            assert list(c.list_keys(gun=gun)) == []  # the server is asked before keys are made
        monkeypatch.setenv("SIGNERD_NOTARY_TOKEN", "t0ken")
        team.ok("init", gun, *https)
        monkeypatch.delenv("SIGNERD_NOTARY_TOKEN")
        assert "HTTP 401" in team.fails("publish", gun)  # URL and CA as recorded by init
        assert team.ok("publish", gun, "--token-file", str(tmp_path / "token"))["published"]

    with NotaryTestServer(notary_keys, basic_auth=("ci", "s3cret")) as srv:
        gun = unique_gun()
        basic = ("--server", srv.url, "--username", "ci")
        assert "--password-file" in team.fails("init", gun, *basic)
        team.ok("init", gun, *basic, "--password-file", str(tmp_path / "password"))
        assert "HTTP 401" in team.fails("publish", gun, *basic[2:], "--password-file",
                                        str(tmp_path / "wrong"))
        monkeypatch.setenv("SIGNERD_NOTARY_USERNAME", "ci")
        monkeypatch.setenv("SIGNERD_NOTARY_PASSWORD", "s3cret")
        assert team.ok("publish", gun)["published"] == ["root", "targets"]

    with pytest.raises(SystemExit) as exit_:  # there is no option that takes a password
        with contextlib.redirect_stderr(io.StringIO()):
            cli.main(["trust", "publish", "docker.io/test/app", "--password", "s3cret"])
    assert exit_.value.code == 2


# --- argument errors: one line, before any connection -----------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["inspect", "docker.io/test/nothing-here:v1"], "no trust data for",
                     id="not-initialised"),
        pytest.param(["rotate", "docker.io/test/app", "timestamp"],
                     "no trust data for", id="rotate-server-key"),
        pytest.param(["publish", "docker.io/test/app"], "no trust data",
                     id="publish-uninitialised"),
        pytest.param(["pull", "docker.io/test/app"], "no Notary server", id="pull-without-url"),
    ],
)
def test_argument_errors_are_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    assert message in in_process(None, "", tmp_path).fails(*argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["sign", "docker.io/test/app:v1", "--digest", "3f1c", "--size", "1"],
                     "signerctl trust sign: argument --digest: --digest must be "
                     "sha256:<64 hex digits>, not '3f1c' (see 'signerctl trust sign --help')",
                     id="short-digest"),
        pytest.param(["sign", "docker.io/test/app:v1", "--digest", "md5:00", "--size", "1"],
                     "--digest must be sha256:", id="bad-digest"),
        pytest.param(["inspect", "Not/A Gun"], "invalid gun", id="bad-gun"),
        pytest.param(["sign", "docker.io/test/app", "--digest", DIGEST, "--size", "1"],
                     "names no tag", id="sign-without-tag"),
        pytest.param(["sign", "docker.io/test/app:bad tag", "--digest", DIGEST, "--size", "1"],
                     "invalid tag", id="bad-tag"),
        pytest.param(["publish", "Not/A Gun"], "invalid gun", id="publish-bad-gun"),
        pytest.param(["unsign", "docker.io/test/app:v1", "--role", "nope"], "role",
                     id="bad-role"),
        pytest.param(["delegation", "add", "docker.io/test/app", "targets", "--key", "0" * 64],
                     "is not a delegation role", id="delegate-top-level"),
        pytest.param(["delegation", "add", "docker.io/test/app", "targets/ci"],
                     "signerctl trust delegation add: give the delegation's key: --key KEYID "
                     "or --pubkey FILE (see 'signerctl trust delegation add --help')",
                     id="delegate-without-key"),
    ],
)
def test_usage_errors_exit_2_in_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    """Regression (issue 21 §6): 'trust sign --digest 3f1c', a usage error,
    exited 1 as a failure does. A value of the wrong form, or options that
    need each other, exit 2 with one line, before any trust directory,
    daemon or server is touched."""
    assert message in in_process(None, "", tmp_path / "none").usage(*argv)
    assert not (tmp_path / "none").exists()


def test_missing_trust_data_names_the_trust_directory(tmp_path: Path) -> None:
    """Regression (second trial): the message named the GUN's parent directory
    (trust/docker.io/test), neither the trust directory nor the repository's."""
    message = in_process(None, "", tmp_path).fails("inspect", "docker.io/test/app:v1")
    assert f"no trust data for docker.io/test/app in {tmp_path}:" in message


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        pytest.param("docker.io/acme/app:v1", ("docker.io/acme/app", "v1"), id="tag"),
        pytest.param("docker.io/acme/app", ("docker.io/acme/app", None), id="no-tag"),
        pytest.param("localhost:5000/acme/app", ("localhost:5000/acme/app", None), id="port"),
        pytest.param("localhost:5000/app:1.0_rc-2", ("localhost:5000/app", "1.0_rc-2"),
                     id="port-and-tag"),
    ],
)
def test_references_split_at_the_tag_not_the_registry_port(
    ref: str, expected: tuple[str, str | None]
) -> None:
    assert split_reference(ref, tag_required=False) == expected


def test_offline_repository_default_role_unsign_and_delegation_removal(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Offline mode through the daemon: signerd holds all four keys, each change re-signs
    snapshot and timestamp, and the default role follows targets/releases once it exists."""
    gun = unique_gun()
    team = in_process(daemon, "admin", tmp_path / "team")
    init = team.ok("init", gun)
    assert init["signed_locally"] == ["snapshot", "timestamp"]
    assert team.ok("sign", f"{gun}:v1", "--digest", DIGEST, "--size", "1")["role"] == "targets"
    with daemon.client() as c:
        releases = c.create_key(gun, "targets/releases")
    team.ok("delegation", "add", gun, "targets/releases", "--key", releases.key_id)
    other = hashlib.sha256(b"other").hexdigest()
    signed = team.ok("sign", f"{gun}:v1", "--digest", other, "--size", "5")
    assert signed["role"] == "targets/releases"
    assert signed["files"] == ["snapshot", "targets/releases", "timestamp"]
    shown = team.ok("inspect", gun)
    assert [(t["name"], t["role"], t["digest"]) for t in shown["tags"]] == [
        ("v1", "targets/releases", f"sha256:{other}"), ("v1", "targets", f"sha256:{DIGEST}")]
    # what docker pulls; the JSON digest is the table's, and what --digest takes (issue 21 §6)
    assert team.ok("inspect", f"{gun}:v1")["tags"][0]["digest"] == f"sha256:{other}"
    assert f"v1   sha256:{other}  5" in team.text("inspect", f"{gun}:v1")
    assert signed["digest"] == f"sha256:{other}"
    team.ok("unsign", f"{gun}:v1")
    assert team.ok("inspect", f"{gun}:v1")["tags"][0]["role"] == "targets"
    removed = team.ok("delegation", "remove", gun, "targets/releases")
    assert "targets/releases" in removed["files"]
    assert [(t["name"], t["role"]) for t in team.ok("inspect", gun)["tags"]] == [
        ("v1", "targets")]
    assert "not a delegation" in team.fails("sign", f"{gun}:v2", "--digest", DIGEST,
                                            "--size", "1", "--role", "targets/releases")


def test_local_snapshot_is_signed_by_the_team_and_published(
    daemon: Daemon, notary_server: NotaryTestServer, tmp_path: Path
) -> None:
    gun, url = unique_gun(), notary_server.url
    team = in_process(daemon, "admin", tmp_path / "team")
    init = team.ok("init", gun, "--server", url, "--local-snapshot")
    assert init["signed_locally"] == ["snapshot"]
    assert init["files"] == ["root", "snapshot", "targets"]
    with daemon.client() as c:
        snapshot_key = c.get_key(init["snapshot_key_id"])
    assert (snapshot_key.role, snapshot_key.token) == ("snapshot", "online")
    assert (gun, "snapshot") not in notary_server.keys  # the server was never asked for one
    signed = team.ok("sign", f"{gun}:v1", "--digest", DIGEST, "--size", "3")
    assert signed["files"] == ["snapshot", "targets"]
    assert team.ok("publish", gun)["published"] == ["root", "snapshot", "targets"]
    assert notary_server.current(gun, "snapshot") == team.repo(gun).read("snapshot")
    consumer = in_process(None, "", tmp_path / "consumer")
    consumer.ok("pull", gun, "--server", url)
    assert consumer.ok("inspect", f"{gun}:v1")["tags"][0]["size"] == 3


def test_a_runner_signing_where_the_team_signs_the_snapshot_is_told_it_did_not(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A new user's finding: in an offline repository (the team's directory signs snapshot
    and timestamp), a CI runner's tag signed in targets/releases left snapshot.json without
    the new file and inspect failing, with no word of it. The runner is now warned on stderr
    (and in the JSON), and the team's next change repairs it."""
    gun = unique_gun()
    team = in_process(daemon, "admin", tmp_path / "team")
    team.ok("init", gun)
    with daemon.client() as c:
        releases = c.create_key(gun, "targets/releases")
    team.ok("delegation", "add", gun, "targets/releases", "--key", releases.key_id)
    runner = in_process(daemon, "runner", tmp_path / "team")
    code, out, err = runner.run("sign", f"{gun}:v1", "--digest", DIGEST, "--size", "1",
                                "--role", "targets/releases", "--json")
    assert code == 0, err
    assert json.loads(out)["warning"].startswith(f"snapshot.json of {gun} was not re-signed")
    assert err.startswith("signerctl: warning: snapshot.json of") and err.count("\n") == 1
    team.ok("sign", f"{gun}:v2", "--digest", DIGEST, "--size", "1", "--role", "targets")
    assert {t["name"] for t in team.ok("inspect", gun)["tags"]} == {"v1", "v2"}
