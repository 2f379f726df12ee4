"""signerd.tuf_signer with the real securesystemslib and python-tuf: keys on
SoftHSM, signatures over real mTLS, a TUF repository served over HTTP and
read by python-tuf's ngclient.Updater."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from securesystemslib.exceptions import KeyMismatchError, UnverifiedSignatureError
from securesystemslib.signer import Signature, Signer, SSlibKey
from securesystemslib.signer._utils import compute_default_keyid
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.ngclient import Updater

from signerd.tuf_signer import SignerdSigner, SignerdSignerError, make_uri, parse_uri
from tests.adapter_helpers import RUNNER_READS_POLICY, closed_port, write_client_toml
from tests.conftest import Daemon, unique_gun

# What python-tuf signs: the OLPC canonical JSON of a targets "signed" object. signerd's
# keys for TUF are metadata keys, which sign only metadata that passes the content checks.
PAYLOAD = (
    b'{"_type":"targets","expires":"'
    + (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ").encode()
    + b'","spec_version":"1.0.31","targets":{},"version":7}'
)
EXPECTED = {  # signerd algorithm -> (keytype, scheme) of the imported SSlibKey
    "ecdsa-p256": ("ecdsa", "ecdsa-sha2-nistp256"),
    "ecdsa-p384": ("ecdsa", "ecdsa-sha2-nistp384"),
    "rsa-2048": ("rsa", "rsassa-pss-sha256"),
    "ed25519": ("ed25519", "ed25519"),
}


@pytest.fixture
def client_toml(daemon: Daemon, tmp_path: Path) -> Path:
    return write_client_toml(daemon.client_config(), tmp_path / "client dir" / "client.toml")


def _create(daemon: Daemon, algorithm: str, role: str = "targets", gun: str = "") -> str:
    with daemon.client() as c:
        return str(c.create_key(gun or unique_gun(), role, algorithm).key_id)


@pytest.mark.parametrize("algorithm", sorted(EXPECTED))
def test_import_gives_standard_sslib_keys_whose_signatures_verify(
    daemon: Daemon, client_toml: Path, algorithm: str
) -> None:
    key_id = _create(daemon, algorithm)
    uri, key = SignerdSigner.import_(key_id, client_toml)

    assert uri == make_uri(key_id, client_toml) and uri.startswith(f"signerd:{key_id}?config=")
    assert (key.keytype, key.scheme) == EXPECTED[algorithm]
    with daemon.client() as c:
        spki = c.get_key(key_id).public_key_der
    # Exactly what securesystemslib itself makes of the public key (keyval,
    # default scheme, default key ID), so verifiers need no signerd class.
    assert key == SSlibKey.from_crypto(serialization.load_der_public_key(spki))
    assert key.keyid == compute_default_keyid(key.keytype, key.scheme, key.keyval)
    assert key.keyid != key_id  # the URI carries signerd's key ID, metadata sslib's
    if key.keytype == "ed25519":
        assert len(bytes.fromhex(key.keyval["public"])) == 32
    else:
        assert key.keyval["public"].startswith("-----BEGIN PUBLIC KEY-----\n")

    signer = Signer.from_priv_key_uri(uri, key)  # dispatched through SIGNER_FOR_URI_SCHEME
    assert isinstance(signer, SignerdSigner) and signer.public_key == key
    sig = signer.sign(PAYLOAD)
    assert sig.keyid == key.keyid
    key.verify_signature(sig, PAYLOAD)  # raises if it does not verify
    with pytest.raises(UnverifiedSignatureError):
        key.verify_signature(sig, PAYLOAD + b" ")

    raw = bytes.fromhex(sig.signature)
    public = serialization.load_der_public_key(spki)
    if isinstance(public, ec.EllipticCurvePublicKey):
        r, s = utils.decode_dss_signature(raw)  # DER, not r||s
        assert r > 0 and s > 0
    elif isinstance(public, rsa.RSAPublicKey):
        # securesystemslib verified it above with salt_length=PSS.AUTO; the
        # salt is signerd's 32 (pinned, 32 verifies and 20 does not).
        for salt, verifies in ((32, True), (20, False)):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt)
            try:
                public.verify(raw, PAYLOAD, pss, hashes.SHA256())
                assert verifies, f"salt {salt} verified"
            except InvalidSignature:
                assert not verifies, f"salt {salt} did not verify"
    else:
        assert len(raw) == 64


def test_rsa_pkcs1v15_scheme_signs_pkcs1v15(daemon: Daemon, client_toml: Path) -> None:
    uri, pss_key = SignerdSigner.import_(_create(daemon, "rsa-2048"), client_toml)
    public = serialization.load_pem_public_key(pss_key.keyval["public"].encode())
    key = SSlibKey.from_crypto(public, scheme="rsa-pkcs1v15-sha256")
    sig = Signer.from_priv_key_uri(uri, key).sign(PAYLOAD)
    key.verify_signature(sig, PAYLOAD)
    with pytest.raises(UnverifiedSignatureError) as info:  # not a PSS signature
        pss_key.verify_signature(Signature(pss_key.keyid, sig.signature), PAYLOAD)
    assert type(info.value) is UnverifiedSignatureError  # a bad signature, not a failure


def test_import_round_trips_through_metadata_json_and_the_default_config(
    daemon: Daemon, client_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id = _create(daemon, "ecdsa-p256")
    monkeypatch.setenv("SIGNERCTL_CONFIG", str(client_toml))
    uri, key = SignerdSigner.import_(key_id)  # signerctl's config: $SIGNERCTL_CONFIG
    assert uri == f"signerd:{key_id}"
    # As a TUF repository stores it: the key in root.json, the URI in a custom field.
    stored = SSlibKey.from_dict(key.keyid, {**key.to_dict(), "x-signerd-uri": uri})
    signer = Signer.from_priv_key_uri(stored.unrecognized_fields["x-signerd-uri"], stored)
    stored.verify_signature(signer.sign(PAYLOAD), PAYLOAD)
    assert parse_uri(make_uri(key_id, "/a dir/c+1 %.toml")) == (key_id, Path("/a dir/c+1 %.toml"))


def test_unknown_key_is_a_clear_not_found(daemon: Daemon, client_toml: Path) -> None:
    missing = "ab" * 32
    with pytest.raises(SignerdSignerError) as info:
        SignerdSigner.import_(missing, client_toml)
    assert info.value.status == "NOT_FOUND"
    assert "NOT_FOUND" in str(info.value) and missing in str(info.value)
    assert f"127.0.0.1:{daemon.port}" in str(info.value)


def test_daemon_down_is_a_clear_unavailable(
    daemon: Daemon, client_toml: Path, tmp_path: Path
) -> None:
    uri, key = SignerdSigner.import_(_create(daemon, "ed25519"), client_toml)
    down = dataclasses.replace(daemon.client_config(), server=f"127.0.0.1:{closed_port()}")
    down_toml = write_client_toml(down, tmp_path / "down.toml")
    signer = Signer.from_priv_key_uri(make_uri(parse_uri(uri)[0], down_toml), key)
    for call in (lambda: signer.sign(PAYLOAD), lambda: SignerdSigner.import_("cd" * 32, down_toml)):
        with pytest.raises(SignerdSignerError) as info:
            call()
        assert info.value.status == "UNAVAILABLE"
        assert f"{down.server}" in str(info.value) and "UNAVAILABLE" in str(info.value)
        assert "is signerd running" in str(info.value)


def test_policy_denial_names_the_status(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(policy=RUNNER_READS_POLICY)
    runner_toml = write_client_toml(d.client_config("runner"), tmp_path / "runner.toml")
    uri, key = SignerdSigner.import_(_create(d, "ecdsa-p256"), runner_toml)  # read: allowed
    with pytest.raises(SignerdSignerError) as info:
        Signer.from_priv_key_uri(uri, key).sign(PAYLOAD)
    assert info.value.status == "PERMISSION_DENIED" and "Sign" in str(info.value)


def test_bad_uris_and_keys_are_value_errors(
    daemon: Daemon, client_toml: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    a_id, b_id = _create(daemon, "ecdsa-p256"), _create(daemon, "ecdsa-p384")
    uri_a, key_a = SignerdSigner.import_(a_id, client_toml)
    _, key_b = SignerdSigner.import_(b_id, client_toml)
    with pytest.raises(KeyMismatchError, match=f"is not signerd key {a_id}"):
        Signer.from_priv_key_uri(uri_a, key_b)
    for bad in (f"signerd://{a_id}", "signerd:not-a-key-id", f"signerd:{a_id}?config="):
        with pytest.raises(ValueError, match="signerd"):
            Signer.from_priv_key_uri(bad, key_a)
    with pytest.raises(ValueError, match="secrets never go in the URI") as info:
        Signer.from_priv_key_uri(f"signerd:{a_id}?passphrase=hunter2", key_a)
    assert "hunter2" not in str(info.value)
    p521 = SSlibKey.from_crypto(ec.generate_private_key(ec.SECP521R1()).public_key())
    with pytest.raises(ValueError, match="ecdsa-sha2-nistp521"):
        Signer.from_priv_key_uri(uri_a, p521)
    as_p256 = SSlibKey("k", "ecdsa", "ecdsa-sha2-nistp256", key_b.keyval)
    with pytest.raises(ValueError, match="secp256r1"):
        Signer.from_priv_key_uri(f"signerd:{b_id}", as_p256)
    monkeypatch.setenv("SIGNERCTL_CONFIG", str(tmp_path / "nowhere.toml"))
    with pytest.raises(SignerdSignerError, match="nowhere.toml") as missing:
        Signer.from_priv_key_uri(f"signerd:{a_id}", key_a)
    assert missing.value.status is None


# --- A whole TUF repository, end to end ----------------------------------------


@pytest.fixture
def repo_server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on 127.0.0.1 (http.server in a thread)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    root = tmp_path / "repo"
    (root / "metadata").mkdir(parents=True)
    (root / "targets" / "releases").mkdir(parents=True)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class Repo:
    """A TUF repository (consistent_snapshot off) whose every role signs through signerd."""

    def __init__(self, root: Path, signers: dict[str, Signer]) -> None:
        self.dir = root
        self.signers = signers
        expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=7)
        self.root = Metadata(Root(expires=expires, consistent_snapshot=False))
        for role in ("root", "targets", "snapshot", "timestamp"):
            self.root.signed.add_key(signers[role].public_key, role)
        self.targets = Metadata(Targets(expires=expires))
        releases_key = signers["releases"].public_key
        self.targets.signed.delegations = Delegations(
            keys={releases_key.keyid: releases_key},
            roles={"releases": DelegatedRole("releases", [releases_key.keyid], 1, True,
                                             paths=["releases/*"])},
        )
        self.releases = Metadata(Targets(expires=expires))
        self.snapshot = Metadata(Snapshot(expires=expires))
        self.timestamp = Metadata(Timestamp(expires=expires))

    def add_target(self, md: Metadata[Targets], path: str, data: bytes) -> None:
        (self.dir / "targets" / path).write_bytes(data)
        md.signed.targets[path] = TargetFile.from_data(path, data, ["sha256"])

    def publish_root(self) -> None:
        self.root.sign(self.signers["root"])
        self.root.to_file(str(self.dir / "metadata" / f"{self.root.signed.version}.root.json"))

    def publish(self, targets_signer: str = "targets") -> None:
        """Sign and write targets (with ``targets_signer``), releases, snapshot, timestamp."""
        self.targets.sign(self.signers[targets_signer])
        self.releases.sign(self.signers["releases"])
        self.snapshot.signed.meta = {
            "targets.json": MetaFile(self.targets.signed.version),
            "releases.json": MetaFile(self.releases.signed.version),
        }
        self.snapshot.sign(self.signers["snapshot"])
        self.timestamp.signed.snapshot_meta = MetaFile(self.snapshot.signed.version)
        self.timestamp.sign(self.signers["timestamp"])
        for name, md in (("targets", self.targets), ("releases", self.releases),
                         ("snapshot", self.snapshot), ("timestamp", self.timestamp)):
            md.to_file(str(self.dir / "metadata" / f"{name}.json"))

    def bump(self) -> None:
        for md in (self.targets, self.snapshot, self.timestamp):
            md.signed.version += 1


def test_tuf_repository_signed_through_signerd_refreshes_and_refuses_a_rotated_key(
    daemon: Daemon, client_toml: Path, repo_server: tuple[Path, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # ngclient honours *_proxy variables
    repo_dir, base = repo_server
    gun = unique_gun()
    algorithms = {  # role -> (signerd role, algorithm): ECDSA, RSA and Ed25519
        "root": ("root", "ecdsa-p256"),
        "targets": ("targets", "rsa-2048"),
        "snapshot": ("snapshot", "ed25519"),
        "timestamp": ("timestamp", "ecdsa-p384"),
        "releases": ("targets/releases", "ed25519"),
        "new-targets": ("targets", "ecdsa-p256"),
    }
    signers: dict[str, Signer] = {}
    with daemon.client() as c:
        for role, (signerd_role, algorithm) in algorithms.items():
            key = c.create_key(gun, signerd_role, algorithm)
            uri, public = SignerdSigner.import_(key.key_id, client_toml)
            signers[role] = Signer.from_priv_key_uri(uri, public)
    repo = Repo(repo_dir, signers)
    assert {k.keytype for k in repo.root.signed.keys.values()} == {"ecdsa", "rsa", "ed25519"}
    repo.add_target(repo.targets, "app.txt", b"app 1.0\n")
    repo.add_target(repo.releases, "releases/v1.txt", b"release v1\n")
    repo.publish_root()
    repo.publish()
    trusted_root = (repo_dir / "metadata" / "1.root.json").read_bytes()

    client_dir, downloads = tmp_path / "client", tmp_path / "downloads"
    client_dir.mkdir()
    downloads.mkdir()

    def updater(first: bool = False) -> Updater:
        return Updater(str(client_dir), f"{base}/metadata/", str(downloads), f"{base}/targets/",
                       bootstrap=trusted_root if first else None)

    first = updater(first=True)
    first.refresh()
    for path, data in (("app.txt", b"app 1.0\n"), ("releases/v1.txt", b"release v1\n")):
        info = first.get_targetinfo(path)
        assert info is not None, path
        assert Path(first.download_target(info)).read_bytes() == data

    # Rotate the targets key: a new key from signerd, root v2 signed by root.
    old, new = signers["targets"].public_key, signers["new-targets"].public_key
    repo.root.signed.version = 2
    repo.root.signed.revoke_key(old.keyid, "targets")
    repo.root.signed.add_key(new, "targets")
    repo.publish_root()
    repo.bump()
    repo.publish(targets_signer="new-targets")
    second = updater()
    second.refresh()
    assert Metadata[Root].from_file(str(client_dir / "root.json")).signed.version == 2
    info = second.get_targetinfo("app.txt")
    assert info is not None and Path(second.download_target(info)).read_bytes() == b"app 1.0\n"

    # Whoever still holds the old key publishes a target, signed by it alone
    # (snapshot and timestamp are honest): the client refuses it.
    repo.add_target(repo.targets, "evil.txt", b"evil\n")
    repo.bump()
    repo.publish(targets_signer="targets")
    signature = repo.targets.signatures[old.keyid]
    old.verify_signature(signature, repo.targets.signed_bytes)  # a valid old-key signature
    with pytest.raises(UnsignedMetadataError, match="targets"):
        updater().refresh()
    # The same targets signed by the new key is accepted: only the key was refused.
    repo.publish(targets_signer="new-targets")
    third = updater()
    third.refresh()
    assert third.get_targetinfo("evil.txt") is not None
