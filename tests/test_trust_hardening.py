"""Issue 10: verification at least as strict as Notary's, and local state that cannot get stuck.

Each test names the section of the issue it pins.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from signerd.errors import InvalidArgument
from signerd.keys import validate_gun, validate_role, validate_tag
from signerd.trust import (
    Envelope,
    NotaryClient,
    NotaryServerError,
    SoftwareSigner,
    TrustedState,
    TrustRepo,
    TufKey,
    UnwritableValue,
    VerificationError,
    check_root_certificate,
    sign_envelope,
    signer_key,
    verify_repository,
)
from tests.conftest import Daemon, unique_gun
from tests.notary_http_server import NotaryTestServer, TokenServer
from tests.test_trust_e2e import daemon, in_process
from tests.test_trust_flow import GUN, World, make_world

DIGEST = hashlib.sha256(b"manifest").digest()
__all__ = ["daemon"]  # test_trust_e2e's daemon fixture, with its trust policy


def _software_keys(gun: str, role: str) -> SoftwareSigner:
    return SoftwareSigner.generate()


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path / "world")


@pytest.fixture
def server() -> Iterator[NotaryTestServer]:
    with NotaryTestServer(_software_keys) as srv:
        yield srv


# --- 1. trust on first use holds at every version -------------------------------------


def _fresh_root_at(version: int, base: Path) -> World:
    """Someone else's repository for the same GUN, its root at ``version``."""
    other = make_world(base)
    if version > 1:
        env = Envelope.from_bytes(other.repo.read("root") or b"", "root")
        env.signed["version"] = version
        kid = env.signatures[0].keyid
        other.repo.write("root", sign_envelope(env.signed, {kid: other.root}).to_bytes())
        other.refresh()
    return other


@pytest.mark.parametrize("version", [1, 2, 5], ids=["same-version", "next-version", "higher"])
def test_regression_new_root_with_other_keys_is_refused_at_any_version(
    world: World, tmp_path: Path, version: int
) -> None:
    """Issue 10 §1: a re-initialised GUN with a new root key was accepted at version 1."""
    pinned = world.verify().state
    attacker = _fresh_root_at(version, tmp_path / "attacker")
    assert attacker.verify().root.version == version  # self-consistent: TOFU would take it
    with pytest.raises(VerificationError, match="could not rotate trust to a new trusted root"
                       ) as err:
        verify_repository(GUN, attacker.repo.files(), trusted=pinned)
    assert err.value.file == "root.json"


def test_same_version_with_other_content_is_refused_even_by_the_same_key(world: World) -> None:
    pinned = world.verify().state
    env = Envelope.from_bytes(world.repo.read("root") or b"", "root")
    env.signed["expires"] = "2099-01-01T00:00:00Z"  # same key, same version, other content
    world.repo.write("root", sign_envelope(
        env.signed, {env.signatures[0].keyid: world.root}).to_bytes())
    world.refresh()
    with pytest.raises(VerificationError, match="differs from the trusted root at the same "
                       "version 1"):
        world.verify(trusted=pinned)
    # The identical root is of course still fine.
    assert world.verify(trusted=TrustedState(pinned.versions, world.repo.read("root"))
                        ).root.version == 1


def _publish_new(server: NotaryTestServer, base: Path, tag: str) -> TrustRepo:
    return _publish_new_with(NotaryClient(server.url), base, tag)


def _publish_new_with(client: NotaryClient, base: Path, tag: str) -> TrustRepo:
    repo = TrustRepo(base, GUN)
    root, targets = SoftwareSigner.generate(), SoftwareSigner.generate()
    repo.init(root, targets, timestamp_key=client.get_key(GUN, "timestamp"),
              snapshot_key=client.get_key(GUN, "snapshot"))
    repo.add_target(tag, DIGEST, 8, targets)
    files = repo.pending()
    client.publish(GUN, files)
    repo.mark_published(files)
    return repo


def test_regression_pull_refuses_a_reinitialised_repository_and_reset_trust_reports_keys(
    server: NotaryTestServer, tmp_path: Path
) -> None:
    """Issue 10 §1: `trust pull` took the attacker's root and pinned it."""
    owner = _publish_new(server, tmp_path / "owner", "good")
    consumer = in_process(None, "", tmp_path / "consumer")
    consumer.ok("pull", GUN, "--server", server.url)
    pinned = (consumer.trust_dir / GUN / ".trusted.json").read_bytes()
    old_ids = owner.root().roles["root"].keyids

    server.store.pop(GUN)  # the server's data is deleted…
    server.keys.clear()
    attacker = _publish_new(server, tmp_path / "attacker", "evil")  # …and re-initialised
    line = consumer.fails("pull", GUN)
    assert "root.json" in line and "could not rotate trust to a new trusted root" in line
    assert f"'signerctl trust pull {GUN} --reset-trust'" in line
    assert (consumer.trust_dir / GUN / ".trusted.json").read_bytes() == pinned
    assert [t["name"] for t in consumer.ok("inspect", GUN)["tags"]] == ["good"]

    # Re-trusting is explicit, and says which root keys were swapped for which.
    new_ids = attacker.root().roles["root"].keyids
    text = consumer.text("pull", GUN, "--reset-trust")
    assert f"root keys {', '.join(old_ids)} -> {', '.join(new_ids)}" in text
    assert [t["name"] for t in consumer.ok("inspect", GUN)["tags"]] == ["evil"]
    again = consumer.ok("pull", GUN, "--reset-trust")
    assert again["old_root_key_ids"] == again["new_root_key_ids"] == new_ids


# --- 2. root certificates as notary checks them ------------------------------------------


def _cert(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    cn: str | tuple[str, ...] = GUN,
    ca: bool | None = False,
    start: timedelta = timedelta(0),
    days: int = 3650,
    algorithm: hashes.HashAlgorithm | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    issuer_cn: str | None = None,
) -> bytes:
    """A certificate as `openssl req -x509` would make it, with the knobs the tests need."""
    now = datetime.now(UTC) + start
    cns = (cn,) if isinstance(cn, str) else cn
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, c) for c in cns])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]) if issuer_cn else (
        subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=days))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    cert = builder.sign(issuer_key or key, algorithm or hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


def _with_root_certificate(w: World, key: SoftwareSigner, pem: bytes) -> None:
    """Make ``pem`` the root key of the world's repository, signed by ``key`` (no old key)."""
    root = w.repo.root()
    new = TufKey("ecdsa-x509" if key.keytype == "ecdsa" else "rsa-x509", pem)
    for kid in root.roles["root"].keyids:
        del root.keys[kid]
    root.keys[new.key_id] = new
    root.roles["root"].keyids = [new.key_id]
    w.repo.write("root", sign_envelope(root, {new.key_id: key}).to_bytes())
    w.refresh()


def _ec() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_regression_ca_root_certificate_is_refused(world: World) -> None:
    """Issue 10 §2: a CA:TRUE root certificate (openssl req -x509's default) was accepted."""
    private = _ec()
    signer = SoftwareSigner(private)
    _with_root_certificate(world, signer, _cert(private, ca=False))
    assert world.verify().tags  # the same key as a leaf is fine
    _with_root_certificate(world, signer, _cert(private, ca=True))
    with pytest.raises(VerificationError, match="CA certificate, not a leaf") as err:
        world.verify()
    assert err.value.file == "root.json"
    with pytest.raises(VerificationError, match="CA certificate, not a leaf"):
        TrustRepo(world.repo.path.parent / "other", GUN).init(
            signer, SoftwareSigner.generate(), timestamp_key=signer_key(world.timestamp),
            snapshot_signer=world.snapshot, root_certificate=_cert(private, ca=True))


def _relabel(pem: bytes, *, algorithm: str | None = None,
             validity: tuple[datetime, datetime] | None = None) -> bytes:
    """Rewrite fields this OpenSSL will not sign (SHA-1, an inverted window).

    Notary checks the label and the dates, not the certificate's own signature.
    """
    cert = asn1x509.Certificate.load(x509.load_pem_x509_certificate(pem).public_bytes(
        serialization.Encoding.DER))
    tbs = cert["tbs_certificate"]
    if algorithm is not None:
        tbs["signature"] = {"algorithm": algorithm}
        cert["signature_algorithm"] = {"algorithm": algorithm}
    if validity is not None:
        tbs["validity"] = {"not_before": asn1x509.Time({"utc_time": validity[0]}),
                           "not_after": asn1x509.Time({"utc_time": validity[1]})}
    cert["tbs_certificate"] = tbs
    der = cert.dump(force=True)
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def _bundle(*pems: bytes) -> bytes:
    return b"".join(pems)


def _case(name: str) -> tuple[ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, bytes]:
    """(root private key, its certificate bundle) for a named case."""
    key = _ec()
    ca_key = _ec()
    inter = _cert(ca_key, cn="Intermediate CA", ca=True)
    leaf_by_ca = _cert(key, issuer_key=ca_key, issuer_cn="Intermediate CA")
    expired_inter = _cert(ca_key, cn="Old CA", ca=True, start=timedelta(days=-30), days=1)
    cases: dict[str, Callable[[], bytes]] = {
        "leaf": lambda: _cert(key),
        "no-basic-constraints": lambda: _cert(key, ca=None),
        "wildcard-cn": lambda: _cert(key, cn=GUN.rsplit("/", 1)[0] + "/*"),
        "starts-within-a-day": lambda: _cert(key, start=timedelta(hours=23)),
        "leaf-then-intermediate": lambda: _bundle(leaf_by_ca, inter),
        "expired-intermediate-dropped": lambda: _bundle(leaf_by_ca, expired_inter),
        "ca": lambda: _cert(key, ca=True),
        "intermediate-first": lambda: _bundle(inter, leaf_by_ca),
        "two-leaves": lambda: _bundle(_cert(key), _cert(_ec())),
        "other-cn": lambda: _cert(key, cn="docker.io/acme/other"),
        "cn-prefix-without-wildcard": lambda: _cert(key, cn=GUN.rsplit("/", 1)[0]),
        "expired": lambda: _cert(key, start=timedelta(days=-30), days=1),
        "starts-in-two-days": lambda: _cert(key, start=timedelta(days=2)),
        "sha1": lambda: _relabel(_cert(key), algorithm="sha1_ecdsa"),
        "two-cns-gun-last": lambda: _cert(key, cn=("docker.io/acme/other", GUN)),
        "two-cns-gun-first": lambda: _cert(key, cn=(GUN, "docker.io/acme/other")),
        "not-a-certificate-block": lambda: _cert(key) + key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    }
    if name == "rsa-1024":
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the refused case
        return small, _cert(small)
    if name == "rsa-2048":
        big = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return big, _cert(big)
    return key, cases[name]()


ACCEPTED = ["leaf", "no-basic-constraints", "wildcard-cn", "starts-within-a-day",
            "leaf-then-intermediate", "rsa-2048", "two-cns-gun-last"]
REFUSED = {
    "ca": "CA certificate, not a leaf",
    "intermediate-first": "leaf certificate must come first",
    "two-leaves": "2 leaf certificates",
    "other-cn": "does not match GUN",
    "two-cns-gun-first": "does not match GUN",  # Go reads the last CN
    "cn-prefix-without-wildcard": "does not match GUN",
    "expired": "expired or not valid yet",
    "starts-in-two-days": "expired or not valid yet",
    "sha1": "SHA-1",
    "rsa-1024": "shorter than 2048 bits",
    "not-a-certificate-block": "invalid PEM block type 'PUBLIC KEY'",
    # notary drops the invalid intermediate and rebuilds the key without it, so the
    # key ID the signatures use no longer exists.
    "expired-intermediate-dropped": "valid signatures from 0",
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_root_certificates_notary_accepts(world: World, name: str) -> None:
    private, pem = _case(name)
    _with_root_certificate(world, SoftwareSigner(private), pem)
    assert [t.name for t in world.verify().tags] == ["v1"]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_root_certificates_notary_refuses(world: World, name: str) -> None:
    private, pem = _case(name)
    _with_root_certificate(world, SoftwareSigner(private), pem)
    with pytest.raises(VerificationError, match=re.escape(REFUSED[name])) as err:
        world.verify()
    assert err.value.file == "root.json"


def test_signatures_must_use_the_key_id_notary_rebuilds(world: World) -> None:
    """notary verifies with keys rebuilt from re-encoded PEM: a PEM written differently
    (here with CRLF line ends) gets another key ID, so its signatures do not count."""
    private = _ec()
    pem = _cert(private).replace(b"\n", b"\r\n")
    _with_root_certificate(world, SoftwareSigner(private), pem)
    with pytest.raises(VerificationError, match="valid signatures from 0"):
        world.verify()


def test_inverted_validity_window_is_refused_even_in_the_previously_trusted_root() -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    pem = _relabel(_cert(_ec()), validity=(now, now - timedelta(days=1)))
    with pytest.raises(VerificationError, match="invalid validity window"):
        check_root_certificate(pem, GUN, check_expiry=False)


# --- 3. names: one grammar, the one Docker and Notary use -------------------------------

GUNS_ACCEPTED = [
    "docker.io/acme/app",
    "docker.io/library/app",
    "xn--bcher-kva.example/app",  # punycode: "--" inside a domain component (issue 10 §3)
    "a--b.example.com/x",
    "localhost/app",
    "localhost:5000/acme/app",
    "registry.example.com:5000/acme/app_1",
    "Registry.Example.com/acme/app",  # host names are case-insensitive; Docker allows this
    "REGISTRY/acme/app",  # upper case makes the first component a host
    "127.0.0.1:5000/app",
    "[::1]:5000/app",
    "[fe80::1]/a/b",
    "example.com/a__b/c-d/e.f/g---h",
    "example.com/" + "a" * 243,  # 255 characters in all
    "1.example/0",
]
GUNS_REFUSED = [
    "",
    "acme/app",  # Docker reads acme as a path on docker.io, not as a host
    "app",
    "docker.io/app",  # Docker's name is docker.io/library/app
    "index.docker.io/acme/app",  # canonicalised to docker.io by Docker
    "-bad.example/app",
    "bad-.example/app",
    "bad.-example/app",
    "example..com/app",
    "example.com:/app",
    "example.com:port/app",
    "[::1/app",
    "[g::1]/app",
    "example.com/App",
    "example.com/app/",
    "example.com//app",
    "example.com/-app",
    "example.com/app-",
    "example.com/a..b",
    "example.com/a___b",
    "example.com/a._b",
    "example.com/app\n",  # "$" in a Python regex would let the newline through
    "example.com/app\t",
    "example.com/app:v1",
    "example.com/app@sha256:" + "0" * 64,
    "exämple.com/app",
    "example.com/" + "a" * 244,  # 256 characters: notary-server's column is varchar(255)
]


@pytest.mark.parametrize("gun", GUNS_ACCEPTED)
def test_gun_grammar_accepts(gun: str) -> None:
    assert validate_gun(gun) == gun


@pytest.mark.parametrize("gun", GUNS_REFUSED)
def test_gun_grammar_refuses(gun: str) -> None:
    with pytest.raises(InvalidArgument, match="gun"):
        validate_gun(gun)


TAGS_ACCEPTED = ["v1", "V1.2.3", "_x", "0", "a-b_c.d", "A" * 128, "latest"]
TAGS_REFUSED = ["", ".v1", "-v1", "v1/x", "v1:x", "v1\n", "ü", "A" * 129, "v 1", "v1@x"]


@pytest.mark.parametrize("tag", TAGS_ACCEPTED)
def test_tag_grammar_accepts(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", TAGS_REFUSED)
def test_tag_grammar_refuses(tag: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid tag"):
        validate_tag(tag)


ROLES_ACCEPTED = ["root", "targets", "snapshot", "timestamp", "targets/releases",
                  "targets/ci-linux_2", "targets/a/b", "targets/-", "targets/_",
                  "targets/" + "a" * 247]
ROLES_REFUSED = [
    "targets/CI",  # issue 10 §3: notary-server and Docker reject upper case
    "targets/team.a",  # …and dots
    "targets/",
    "targets//a",
    "targets/a/",
    "targets/.",
    "targets/..",
    "targets/../root",
    "targets/a b",
    "targets/a\n",
    "targets/ä",
    "targets/*",
    "Targets/a",
    "targetsx/a",
    "root/a",
    "delegation",
    "",
    "targets/" + "a" * 248,  # 256 characters
]


@pytest.mark.parametrize("role", ROLES_ACCEPTED)
def test_role_grammar_accepts(role: str) -> None:
    assert validate_role(role) == role


@pytest.mark.parametrize("role", ROLES_REFUSED)
def test_role_grammar_refuses(role: str) -> None:
    with pytest.raises(InvalidArgument, match="role"):
        validate_role(role)


def test_one_validator_serves_daemon_cli_and_trust_library() -> None:
    from signerd.server import notary, v1
    from signerd.service import _keyservice as service
    from signerd.trust import notary_http, repo

    for module in (service, notary, v1, notary_http, repo):
        assert module.validate_gun is validate_gun, module
        assert module.validate_role is validate_role, module


@pytest.mark.parametrize("name", ["targets/CI", "targets/team.a"])
def test_regression_delegation_names_notary_refuses_are_refused_everywhere(
    world: World, name: str, tmp_path: Path
) -> None:
    """Issue 10 §3: signerd created, signed and verified targets/CI and targets/team.a."""
    with pytest.raises(InvalidArgument, match="invalid role"):
        world.repo.add_delegation(name, [signer_key(world.ci)], world.targets)
    assert "invalid role" in in_process(None, "", tmp_path).usage(
        "delegation", "add", GUN, name, "--key", "0" * 64)
    # Trust data that delegates to it anyway (another client's) does not verify.
    env = Envelope.from_bytes(world.repo.read("targets") or b"", "targets")
    env.signed["delegations"]["roles"][0]["name"] = name
    world.repo.write("targets", sign_envelope(env.signed, {world.targets.key_id: world.targets}
                                              ).to_bytes())
    world.refresh()
    with pytest.raises(VerificationError, match="not a valid Notary role name") as err:
        world.verify()
    assert err.value.file == "targets.json"


@pytest.mark.parametrize(("ref", "message"), [
    ("acme/app:v1", "would not read 'acme' as a registry host"),
    ("xn--bcher-kva.example/app:.v1", "invalid tag"),
    ("docker.io/app:v1", "canonical name is 'docker.io/library/app'"),
])
def test_cli_references_use_the_same_grammar(tmp_path: Path, ref: str, message: str) -> None:
    line = in_process(None, "", tmp_path).usage("sign", ref, "--digest", "0" * 64, "--size", "1")
    assert message in line


# --- 4. strings that end up in metadata ---------------------------------------------------

BAD_STRINGS = [pytest.param("a\tb", id="tab"), pytest.param("a\nb", id="newline"),
               pytest.param("\x00", id="nul"), pytest.param("x\x1f", id="unit-separator"),
               pytest.param("\ud800", id="lone-surrogate")]


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", BAD_STRINGS)
def test_regression_control_characters_in_delegation_paths_are_refused_before_writing(
    tmp_path: Path, bad: str
) -> None:
    """Issue 10 §4: a TAB in --paths went raw into targets.json, and the directory was stuck."""
    w = make_world(tmp_path / "w")
    before = _tree(w.repo.path)
    with pytest.raises(UnwritableValue, match=r"targets\.json: delegation path .* contains"):
        w.repo.add_delegation("targets/qa", [signer_key(w.ci)], w.targets, paths=["ok", bad])
    with pytest.raises(UnwritableValue, match=r"targets/releases\.json: target name"):
        w.repo.add_target(f"v{bad}", DIGEST, 1, w.ci, role="targets/releases")
    assert _tree(w.repo.path) == before
    # The CLI refuses before it needs any key or daemon.
    pem = tmp_path / "ci.pem"
    pem.write_bytes(serialization.load_der_public_key(w.targets.public).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    line = in_process(None, "", tmp_path / "w").fails(
        "delegation", "add", GUN, "targets/qa", "--pubkey", str(pem), "--paths", "ok", bad)
    assert "targets.json: delegation path" in line and "nothing was written" in line
    assert _tree(w.repo.path) == before
    assert [t.name for t in w.verify().tags] == ["v1"]  # not stuck


def test_custom_data_with_control_characters_is_never_signed(world: World) -> None:
    targets = world.repo.targets("targets/releases")
    targets.targets["v1"].custom = {"note": "a\x07b"}
    with pytest.raises(UnwritableValue, match="U\\+0007"):
        world.repo._save("targets/releases", targets, {world.ci.key_id: world.ci})


# --- 5. hostile or malformed metadata: one line naming the file ----------------------------


def _set_expires(w: World, role: str, expires: str, signer: SoftwareSigner) -> None:
    env = Envelope.from_bytes(w.repo.read(role) or b"", role)
    env.signed["expires"] = expires
    w.repo.write(role, sign_envelope(env.signed, {signer.key_id: signer}).to_bytes())
    w.refresh()


def _serve(server: NotaryTestServer, w: World) -> None:
    """Put a repository's files on the server as they are (a hostile or odd server)."""
    server.store[GUN] = {role: [(1, data)] for role, data in w.repo.files().items()}


def test_regression_expiry_in_the_year_10000_verifies_like_notary(
    world: World, server: NotaryTestServer, tmp_path: Path
) -> None:
    """Issue 10 §5: expires 9999-12-31T23:59:59-01:00 (the year 10000 in UTC) made
    `trust pull` exit with an OverflowError traceback. It is valid RFC 3339 and in the
    future; Go's time holds it, so notary accepts the file, and so does signerd."""
    _set_expires(world, "targets", "9999-12-31T23:59:59-01:00", world.targets)
    assert [t.name for t in world.verify().tags] == ["v1"]
    _serve(server, world)
    consumer = in_process(None, "", tmp_path / "consumer")
    assert consumer.ok("pull", GUN, "--server", server.url)["versions"]["targets"] == 2
    # Its mirror image, the year 0 in UTC, is long expired.
    _set_expires(world, "targets", "0001-01-01T00:00:00+01:00", world.targets)
    with pytest.raises(VerificationError, match="targets.json: expired at 0001-01-01"):
        world.verify()


@pytest.mark.parametrize(("role", "data", "message"), [
    ("timestamp", b'{"signed": [', "timestamp.json: not valid JSON"),
    ("timestamp", b"[" * 100_000 + b"]" * 100_000, "timestamp.json: not valid JSON"),
    # Refused before it is parsed: the verified timestamp declares another length
    # (issue 22 §3: nothing unverified steers a download).
    ("snapshot", b"\xff\xfe", "snapshot.json: length 2 is not the expected"),
    ("root", b'{"signed": {"_type": "Root", "version": 1e999}, "signatures": []}',
     "root.json: "),
    ("root", b'{"signed": {"x": "\\ud800"}, "signatures": []}', "root.json: "),
])
def test_hostile_server_data_is_one_line_naming_the_file(
    world: World, server: NotaryTestServer, tmp_path: Path, role: str, data: bytes, message: str
) -> None:
    _serve(server, world)
    server.store[GUN][role] = [(1, data)]
    line = in_process(None, "", tmp_path / "consumer").fails("pull", GUN, "--server", server.url)
    assert message in line and "Traceback" not in line


# --- 6. local state that cannot get stuck -----------------------------------------------------


def test_regression_second_unverified_root_rotation_is_refused_with_what_to_do(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Issue 10 §6: two `trust rotate GUN root` in a row both returned 0, and then every
    `trust inspect` failed with "not signed by the previously trusted root keys"."""
    gun = unique_gun()
    team = in_process(daemon, "admin", tmp_path / "team")
    team.ok("init", gun)
    team.ok("sign", f"{gun}:v1", "--digest", DIGEST.hex(), "--size", "8")
    team.ok("inspect", gun)  # pins root version 1
    team.ok("rotate", gun, "root")
    with daemon.client() as c:
        keys_before = len(list(c.list_keys(gun)))
    line = team.fails("rotate", gun, "root")
    assert "would not chain" in line and f"'signerctl trust inspect {gun}'" in line
    with daemon.client() as c:
        assert len(list(c.list_keys(gun))) == keys_before  # refused before any key was made
    # Doing what it says works, and the rotations chain.
    assert team.ok("inspect", gun)["versions"]["root"] == 2
    team.ok("rotate", gun, "root")
    assert team.ok("inspect", f"{gun}:v1")["versions"]["root"] == 3
    # A targets rotation also makes a new root, signed by the new root key only.
    team.ok("rotate", gun, "root")
    assert "would not chain" in team.fails("rotate", gun, "targets")
    team.ok("inspect", gun)
    team.ok("rotate", gun, "targets")
    assert team.ok("inspect", gun)["versions"]["root"] == 5


def test_damaged_local_state_names_its_recovery_command(
    server: NotaryTestServer, tmp_path: Path
) -> None:
    _publish_new(server, tmp_path / "owner", "good")
    consumer = in_process(None, "", tmp_path / "consumer")
    consumer.ok("pull", GUN, "--server", server.url)
    base = consumer.trust_dir / GUN

    (base / ".trusted.json").write_text("{not json")
    line = consumer.fails("inspect", GUN)
    assert ".trusted.json is damaged" in line and f"trust pull {GUN} --reset-trust" in line
    assert consumer.ok("inspect", GUN, "--reset-trust")["old_root_key_ids"] == []
    assert consumer.ok("inspect", GUN)["tags"][0]["name"] == "good"
    (base / ".trusted.json").write_text('{"versions": {}, "root": "{\\"signed\\": 1}"}')
    assert consumer.fails("inspect", GUN).startswith("signerctl: .trusted.json: ")
    consumer.ok("inspect", GUN, "--reset-trust")

    (base / ".published.json").write_bytes(b"\xff")
    line = consumer.fails("pull", GUN)
    assert ".published.json is damaged" in line and f"trust pull {GUN} --force" in line
    consumer.ok("pull", GUN, "--force")
    consumer.ok("pull", GUN)

    (base / "targets.json").write_bytes(b'{"signed": {"targets": {"a\tb": 1}}}')  # stuck?
    line = consumer.fails("inspect", GUN)
    assert "targets.json: " in line and f"'signerctl trust pull {GUN} --force'" in line
    consumer.ok("pull", GUN, "--force")  # the server's copy comes back
    assert consumer.ok("inspect", GUN)["tags"][0]["name"] == "good"

    (base / ".signerctl.json").write_text("[1]")
    line = consumer.fails("pull", GUN)
    assert ".signerctl.json is damaged" in line and "give --server" in line
    (base / ".signerctl.json").unlink()
    consumer.ok("pull", GUN, "--server", server.url)


# --- 7. server-managed key rotation, and registry token auth ------------------------------


def _timestamp_signer(data: bytes) -> str:
    return Envelope.from_bytes(data, "timestamp").signatures[0].keyid


@pytest.mark.parametrize("role", ["timestamp", "snapshot"])
def test_rotate_server_managed_key_through_the_notary_api(
    daemon: Daemon, server: NotaryTestServer, tmp_path: Path, role: str
) -> None:
    """Issue 10 §7: `trust rotate GUN timestamp|snapshot` asks the server for a new key
    (POST .../ROLE.key), lists it in a root.json signed by the root key, and publishes;
    the server signs with it from then on, and clients that trusted the old root follow."""
    gun = unique_gun()
    team = in_process(daemon, "admin", tmp_path / "team")
    team.ok("init", gun, "--server", server.url)
    team.ok("sign", f"{gun}:v1", "--digest", DIGEST.hex(), "--size", "8")
    team.ok("publish", gun)
    consumer = in_process(None, "", tmp_path / "consumer")
    consumer.ok("pull", gun, "--server", server.url)
    old_key = signer_key(server.keys[(gun, role)]).key_id

    rotated = team.ok("rotate", gun, role)
    assert ("POST", f"/v2/{gun}/_trust/tuf/{role}.key") in server.requests
    assert rotated["old_key_ids"] == [old_key] and rotated["new_key_id"] != old_key
    assert rotated["published"] == ["root"]
    new_key = signer_key(server.keys[(gun, role)]).key_id
    assert new_key == rotated["new_key_id"]  # the server adopted the pending key
    served = Envelope.from_bytes(server.current(gun, role) or b"", role)
    assert [s.keyid for s in served.signatures] == [new_key]
    assert team.repo(gun).root().roles[role].keyids == [new_key]
    pulled = consumer.ok("pull", gun)
    assert pulled["versions"]["root"] == 2 and pulled["tags"][0]["name"] == "v1"
    team.ok("sign", f"{gun}:v2", "--digest", DIGEST.hex(), "--size", "8")
    team.ok("publish", gun)
    assert [t["name"] for t in consumer.ok("pull", gun)["tags"]] == ["v1", "v2"]


def test_rotate_timestamp_of_an_offline_repository_makes_the_key_in_signerd(
    daemon: Daemon, tmp_path: Path
) -> None:
    gun = unique_gun()
    team = in_process(daemon, "admin", tmp_path / "team")
    init = team.ok("init", gun)
    team.ok("inspect", gun)
    rotated = team.ok("rotate", gun, "timestamp")
    assert rotated["old_key_ids"] == [init["timestamp_key_id"]]
    assert rotated["published"] == [] and "timestamp" in rotated["files"]
    with daemon.client() as c:
        assert c.get_key(rotated["new_key_id"]).role == "timestamp"
    assert _timestamp_signer(team.repo(gun).read("timestamp") or b"") == rotated["new_key_id"]
    assert team.ok("inspect", gun)["versions"]["root"] == 2


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    with TokenServer(basic_auth=("ci", "s3cret")) as ts:
        yield ts


def test_registry_token_auth_scopes_as_docker_asks_them(
    token_server: TokenServer, tmp_path: Path
) -> None:
    """Issue 10 §7: a 401 with a Bearer challenge is retried with a token from the realm,
    fetched with the basic credentials, for repository:GUN:pull (pull),
    repository:GUN:push,pull (publish) and repository:GUN:* (key rotation)."""
    with NotaryTestServer(_software_keys, token_auth=token_server) as srv:
        anonymous = NotaryClient(srv.url)
        with pytest.raises(NotaryServerError, match="HTTP 401"):
            anonymous.get_key(GUN, "timestamp")
        client = NotaryClient(srv.url, username="ci", password="s3cret")
        repo = TrustRepo(tmp_path / "owner", GUN)
        root, targets = SoftwareSigner.generate(), SoftwareSigner.generate()
        repo.init(root, targets, timestamp_key=client.get_key(GUN, "timestamp"),
                  snapshot_key=client.get_key(GUN, "snapshot"))
        client.publish(GUN, repo.pending())
        reader = NotaryClient(srv.url, username="ci", password="s3cret")
        verify_repository(GUN, reader.pull(GUN))
        client.rotate_key(GUN, "timestamp")
        basic = "Basic " + base64.b64encode(b"ci:s3cret").decode()
        scopes = [scope for scope, header in token_server.requests if header == basic]
        assert scopes == [f"repository:{GUN}:push,pull", f"repository:{GUN}:pull",
                          f"repository:{GUN}:*"]
        assert all(header == basic for _, header in token_server.requests[1:])
        # A token only for pull does not publish.
        pull_only = token_server.issue(f"repository:{GUN}:pull")
        with pytest.raises(NotaryServerError, match="HTTP 401"):
            NotaryClient(srv.url, token=pull_only).publish(GUN, {"targets": b"{}"})


def test_registry_token_auth_from_the_cli_with_secrets_from_the_environment(
    token_server: TokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with NotaryTestServer(_software_keys, token_auth=token_server) as srv:
        _publish_new_with(NotaryClient(srv.url, username="ci", password="s3cret"),
                          tmp_path / "owner", "good")
        consumer = in_process(None, "", tmp_path / "consumer")
        monkeypatch.setenv("SIGNERD_NOTARY_USERNAME", "ci")
        monkeypatch.setenv("SIGNERD_NOTARY_PASSWORD", "wrong")
        line = consumer.fails("pull", GUN, "--server", srv.url)
        assert "token for repository:" in line and "HTTP 401" in line and "wrong" not in line
        monkeypatch.setenv("SIGNERD_NOTARY_PASSWORD", "s3cret")
        assert consumer.ok("pull", GUN, "--server", srv.url)["tags"][0]["name"] == "good"


def test_hostile_root_version_does_not_make_a_million_requests(
    world: World, server: NotaryTestServer, tmp_path: Path
) -> None:
    _serve(server, world)
    consumer = in_process(None, "", tmp_path / "consumer")
    consumer.ok("pull", GUN, "--server", server.url)
    env = Envelope.from_bytes(world.repo.read("root") or b"", "root")
    env.signed["version"] = 10**6
    server.store[GUN]["root"] = [(10**6, sign_envelope(
        env.signed, {env.signatures[0].keyid: world.root}).to_bytes())]
    before = len(server.requests)
    line = consumer.fails("pull", GUN)
    assert "root.json: version 1000000 is more than 1000 rotations ahead" in line
    assert len(server.requests) - before < 10


def test_hostile_snapshot_cannot_steer_paths(
    world: World, server: NotaryTestServer, tmp_path: Path
) -> None:
    env = Envelope.from_bytes(world.repo.read("snapshot") or b"", "snapshot")
    env.signed["meta"]["targets/../../escape"] = env.signed["meta"]["targets"]
    world.repo.write("snapshot", sign_envelope(
        env.signed, {world.snapshot.key_id: world.snapshot}).to_bytes())
    world.repo.sign_timestamp(world.timestamp)
    _serve(server, world)
    line = in_process(None, "", tmp_path / "c").fails("pull", GUN, "--server", server.url)
    assert "snapshot.json: lists 'targets/../../escape', not a valid Notary role name" in line
    assert not (tmp_path / "escape.json").exists()
