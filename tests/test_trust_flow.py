"""Trust data end to end with software keys: init, delegate, sign, verify, tamper, rotate."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from signerd.errors import InvalidArgument, NotFound
from signerd.trust import (
    DEFAULT_EXPIRY,
    Envelope,
    NotAuthorized,
    Root,
    SignedTag,
    SoftwareSigner,
    Targets,
    TrustedState,
    TrustRepo,
    UnsignedTag,
    VerificationError,
    VerifiedRepository,
    build_root_certificate,
    certificate_key,
    key_from_pem,
    sign_envelope,
    signer_key,
    verify_repository,
    x509_key_id,
)
from tests.test_trust_x509 import PlainSigner

GUN = "docker.io/acme/app"
MANIFEST = b'{"schemaVersion":2}'
DIGEST = hashlib.sha256(MANIFEST).digest()
NOW = datetime.now(UTC)


@dataclass
class World:
    """A repository with local snapshot and timestamp keys, so no server is needed."""

    repo: TrustRepo
    root: SoftwareSigner = field(default_factory=SoftwareSigner.generate)
    targets: SoftwareSigner = field(default_factory=SoftwareSigner.generate)
    snapshot: SoftwareSigner = field(default_factory=SoftwareSigner.generate)
    timestamp: SoftwareSigner = field(default_factory=SoftwareSigner.generate)
    ci: SoftwareSigner = field(default_factory=lambda: SoftwareSigner.generate("ed25519"))

    def refresh(self, now: datetime | None = None) -> None:
        """Re-sign snapshot and timestamp, as the server would after an upload."""
        self.repo.sign_snapshot(self.snapshot, now=now)
        self.repo.sign_timestamp(self.timestamp, now=now)

    def verify(self, **kw: object) -> VerifiedRepository:
        return verify_repository(GUN, self.repo.files(), **kw)  # type: ignore[arg-type]


def make_world(base: Path) -> World:
    w = World(TrustRepo(base, GUN))
    w.repo.init(w.root, w.targets, timestamp_key=signer_key(w.timestamp),
                snapshot_signer=w.snapshot)
    w.repo.add_delegation("targets/releases", [signer_key(w.ci)], w.targets)
    w.repo.add_target("v1", DIGEST, len(MANIFEST), w.ci, role="targets/releases")
    w.refresh()
    return w


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def _forge(w: World, role: str, signer: SoftwareSigner, keyid: str | None = None,
           bump: int = 1) -> None:
    """Write ``role`` again with its version bumped, signed by ``signer`` only."""
    env = Envelope.from_bytes(w.repo.read(role) or b"", role)
    env.signed["version"] += bump
    w.repo.write(role, sign_envelope(env.signed, {keyid or signer.key_id: signer}).to_bytes())


# --- the whole flow -----------------------------------------------------------


def test_init_delegate_sign_verify(world: World, tmp_path: Path) -> None:
    result = world.verify()
    assert result.tags == (SignedTag("v1", DIGEST.hex(), len(MANIFEST), "targets/releases"),)
    assert result.tag("v1").role == "targets/releases"
    assert result.state.versions == {"root": 1, "timestamp": 1, "snapshot": 2,
                                     "targets": 2, "targets/releases": 1}
    # Notary's layout: one directory per GUN, delegations under targets/.
    base = tmp_path / GUN
    assert sorted(p.relative_to(base).as_posix() for p in base.rglob("*.json")
                  if not p.name.startswith(".")) == [
        "root.json", "snapshot.json", "targets.json", "targets/releases.json", "timestamp.json"]
    root = world.repo.root()
    root_key = root.keys[root.roles["root"].keyids[0]]
    assert root.roles["root"].keyids == [x509_key_id(root_key.public)]
    assert root_key.keytype == "ecdsa-x509"
    assert root.roles["targets"].keyids == [world.targets.key_id]
    assert root.roles["timestamp"].keyids == [world.timestamp.key_id]


def test_unsigned_tag_is_an_error(world: World) -> None:
    with pytest.raises(UnsignedTag, match="docker.io/acme/app:v2 is not signed"):
        world.verify().tag("v2")


def test_tag_in_several_roles_resolves_to_releases_first(world: World) -> None:
    other = hashlib.sha256(b"other").digest()
    world.repo.add_target("v1", other, 5, world.targets)
    world.refresh()
    result = world.verify()
    assert [(t.name, t.role) for t in result.tags] == [("v1", "targets/releases"),
                                                       ("v1", "targets")]
    assert result.tag("v1").digest == DIGEST.hex()


def test_delegation_signs_with_only_its_key(world: World) -> None:
    targets_before = world.repo.read("targets")
    root_before = world.repo.read("root")
    world.repo.add_target("v2", DIGEST, 10, world.ci, role="targets/releases")
    assert world.repo.read("targets") == targets_before
    assert world.repo.read("root") == root_before
    world.refresh()
    assert [t.name for t in world.verify().tags] == ["v1", "v2"]


@pytest.mark.parametrize(
    ("signer", "role"),
    [("ci", "targets"), ("targets", "targets/releases"), ("root", "targets"),
     ("snapshot", "targets/releases")],
)
def test_wrong_key_cannot_sign_a_role(world: World, signer: str, role: str) -> None:
    before = world.repo.files()
    with pytest.raises(NotAuthorized, match=f"not a signing key of {role}"):
        world.repo.add_target("v9", DIGEST, 1, getattr(world, signer), role=role)
    assert world.repo.files() == before


def test_unknown_delegation_cannot_be_signed(world: World) -> None:
    with pytest.raises(NotFound, match="targets/ci is not a delegation"):
        world.repo.add_target("v1", DIGEST, 1, world.ci, role="targets/ci")


def test_delegation_paths_limit_what_it_may_sign(world: World) -> None:
    limited = SoftwareSigner.generate()
    world.repo.add_delegation("targets/nightly", [signer_key(limited)], world.targets,
                              paths=["nightly-"])
    world.repo.add_target("nightly-1", DIGEST, 1, limited, role="targets/nightly")
    with pytest.raises(NotAuthorized, match="may not sign 'v1'"):
        world.repo.add_target("v1", DIGEST, 1, limited, role="targets/nightly")
    # A file that claims a tag outside its paths anyway: the tag stays invisible.
    env = Envelope.from_bytes(world.repo.read("targets/nightly") or b"", "targets/nightly")
    env.signed["targets"]["latest"] = env.signed["targets"]["nightly-1"]
    env.signed["version"] += 1
    forged = sign_envelope(env.signed, {limited.key_id: limited})
    world.repo.write("targets/nightly", forged.to_bytes())
    world.refresh()
    result = world.verify()
    assert [(t.name, t.role) for t in result.tags] == [("nightly-1", "targets/nightly"),
                                                       ("v1", "targets/releases")]


def test_delegation_key_from_public_key_pem_and_certificate(world: World) -> None:
    by_pem, by_cert = SoftwareSigner.generate(), SoftwareSigner.generate()
    pem = by_pem.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert_key = key_from_pem(build_root_certificate(by_cert, "ci-runner"))
    assert cert_key.keytype == "ecdsa-x509"
    world.repo.add_delegation("targets/a", [key_from_pem(pem)], world.targets)
    world.repo.add_delegation("targets/b", [cert_key], world.targets)
    world.repo.add_target("a1", DIGEST, 1, by_pem, role="targets/a")
    world.repo.add_target("b1", DIGEST, 1, by_cert, role="targets/b")
    world.refresh()
    assert {(t.name, t.role) for t in world.verify().tags} >= {("a1", "targets/a"),
                                                               ("b1", "targets/b")}


def test_nested_delegation(world: World) -> None:
    team = SoftwareSigner.generate()
    world.repo.add_delegation("targets/releases/team", [signer_key(team)], world.ci)
    world.repo.add_target("t1", DIGEST, 3, team, role="targets/releases/team")
    world.refresh()
    assert world.verify().tag("t1").role == "targets/releases/team"


def test_unsign_removes_the_tag(world: World) -> None:
    world.repo.remove_target("v1", world.ci, role="targets/releases")
    world.refresh()
    result = world.verify()
    assert result.tags == ()
    with pytest.raises(UnsignedTag):
        result.tag("v1")
    with pytest.raises(NotFound, match="'v1' is not signed in targets/releases"):
        world.repo.remove_target("v1", world.ci, role="targets/releases")


def test_remove_delegation(world: World) -> None:
    world.repo.remove_delegation("targets/releases", world.targets, snapshot_signer=world.snapshot)
    world.repo.sign_timestamp(world.timestamp)
    result = world.verify()
    assert result.tags == ()
    assert world.repo.read("targets/releases") is None
    assert world.repo.targets().delegation_keys == {}
    snap = Envelope.from_bytes(world.repo.read("snapshot") or b"", "snapshot")
    assert "targets/releases" not in snap.signed["meta"]


def test_remove_one_key_of_a_delegation(world: World) -> None:
    second = SoftwareSigner.generate()
    world.repo.add_delegation("targets/releases", [signer_key(second)], world.targets)
    assert world.repo.targets().delegation("targets/releases").keyids == [  # type: ignore[union-attr]
        world.ci.key_id, second.key_id]
    world.repo.remove_delegation("targets/releases", world.targets, key_ids=[world.ci.key_id])
    world.refresh()
    with pytest.raises(VerificationError, match="valid signatures from 0") as err:
        world.verify()
    assert err.value.file == "targets/releases.json"
    with pytest.raises(NotAuthorized):
        world.repo.add_target("v2", DIGEST, 1, world.ci, role="targets/releases")


def test_threshold_two_needs_two_signatures(world: World) -> None:
    second = SoftwareSigner.generate()
    world.repo.add_delegation("targets/releases", [signer_key(second)], world.targets, threshold=2)
    world.refresh()
    with pytest.raises(VerificationError, match="from 1 of the role's keys, 2 required") as err:
        world.verify()
    assert err.value.file == "targets/releases.json"
    env = Envelope.from_bytes(world.repo.read("targets/releases") or b"", "targets/releases")
    both = sign_envelope(env.signed, {world.ci.key_id: world.ci, second.key_id: second})
    world.repo.write("targets/releases", both.to_bytes())
    world.refresh()
    assert world.verify().tag("v1").role == "targets/releases"


def test_init_twice_is_refused(world: World) -> None:
    with pytest.raises(InvalidArgument, match="already initialised"):
        world.repo.init(world.root, world.targets, timestamp_key=signer_key(world.timestamp),
                        snapshot_signer=world.snapshot)


def test_init_needs_exactly_one_snapshot_choice(tmp_path: Path) -> None:
    repo, s = TrustRepo(tmp_path, GUN), SoftwareSigner.generate()
    with pytest.raises(InvalidArgument, match="exactly one"):
        repo.init(s, s, timestamp_key=signer_key(s))
    assert repo.files() == {}


def test_init_with_an_existing_certificate(tmp_path: Path) -> None:
    root, other = SoftwareSigner.generate(), SoftwareSigner.generate()
    repo = TrustRepo(tmp_path, GUN)
    with pytest.raises(InvalidArgument, match="does not hold the root signer's key"):
        repo.init(root, other, timestamp_key=signer_key(other), snapshot_key=signer_key(other),
                  root_certificate=build_root_certificate(other, GUN))
    cert = build_root_certificate(root, GUN)
    repo.init(root, other, timestamp_key=signer_key(other), snapshot_key=signer_key(other),
              root_certificate=cert)
    assert repo.root().roles["root"].keyids == [x509_key_id(cert)]
    assert sorted(repo.pending()) == ["root", "targets"]


# --- tampering ------------------------------------------------------------------

FILES = ["root", "timestamp", "snapshot", "targets", "targets/releases"]


@pytest.mark.parametrize("role", FILES)
def test_changing_any_byte_fails_and_names_the_file(world: World, role: str) -> None:
    files = world.repo.files()
    original = files[role]
    world.verify()  # sanity: untouched data verifies
    for i in range(len(original)):
        tampered = bytearray(original)
        # Replace with a printable byte that differs, so the JSON often still parses
        # and the signature or hash check (not just the parser) has to catch it.
        tampered[i] = ord("A") if original[i] != ord("A") else ord("B")
        with pytest.raises(VerificationError) as err:
            verify_repository(GUN, {**files, role: bytes(tampered)})
        assert err.value.file == f"{role}.json", f"byte {i} of {role}.json: {err.value}"


@pytest.mark.parametrize("role", FILES[1:])
def test_missing_file_is_named(world: World, role: str) -> None:
    files = world.repo.files()
    del files[role]
    with pytest.raises(VerificationError, match="missing") as err:
        verify_repository(GUN, files)
    assert err.value.file == f"{role}.json"


# --- expiry --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "age"),
    [("timestamp", timedelta(days=15)), ("snapshot", timedelta(days=3 * 365 + 1)),
     ("targets", timedelta(days=3 * 365 + 1)), ("targets/releases", timedelta(days=3 * 365 + 1))],
)
def test_expired_metadata_fails(world: World, role: str, age: timedelta) -> None:
    past = NOW - age
    if role == "targets":
        world.repo.add_target("base", DIGEST, 1, world.targets, now=past)
    elif role == "targets/releases":
        world.repo.add_target("v2", DIGEST, 1, world.ci, role=role, now=past)
    if role == "snapshot":
        world.repo.sign_snapshot(world.snapshot, now=past)
    elif role != "timestamp":
        world.repo.sign_snapshot(world.snapshot)
    world.repo.sign_timestamp(world.timestamp, now=past if role == "timestamp" else None)
    with pytest.raises(VerificationError, match="expired") as err:
        world.verify()
    assert err.value.file == f"{role}.json"
    assert f"expired at {(past + DEFAULT_EXPIRY[role.split('/')[0]]).date()}" in str(err.value)


def test_expired_root_fails(world: World) -> None:
    with pytest.raises(VerificationError, match="expired") as err:
        world.verify(now=NOW + timedelta(days=3651))
    assert err.value.file == "root.json"


# --- rollback ------------------------------------------------------------------


@pytest.mark.parametrize("role", FILES)
def test_version_lower_than_trusted_fails(world: World, role: str) -> None:
    versions = dict(world.verify().state.versions)
    versions[role] += 1
    with pytest.raises(VerificationError, match="lower than trusted version") as err:
        world.verify(trusted=TrustedState(versions))
    assert err.value.file == f"{role}.json"


def test_replayed_older_repository_fails(world: World) -> None:
    old_files = world.repo.files()
    world.repo.add_target("v2", DIGEST, 1, world.ci, role="targets/releases")
    world.refresh()
    state = world.verify().state
    # A mirror serving the old (validly signed, unexpired) set is caught.
    with pytest.raises(VerificationError, match="version 1 is lower than trusted version 2") as err:
        verify_repository(GUN, old_files, trusted=state)
    assert err.value.file == "timestamp.json"
    # Without memory of the newer state the old set is still valid: that is why
    # callers must keep TrustedState.
    assert verify_repository(GUN, old_files).tags
    assert TrustedState.from_json(state.to_json()) == state


# --- rotation -------------------------------------------------------------------


def test_rotate_targets_key(world: World) -> None:
    world.repo.add_target("base", DIGEST, 1, world.targets)
    world.refresh()
    before = world.verify()
    old = world.targets
    new = SoftwareSigner.generate()
    world.repo.rotate_targets_key(world.root, new)
    world.targets = new
    world.refresh()
    after = world.verify(trusted=before.state)
    assert after.tags == before.tags
    assert after.root.version == 2
    assert after.root.roles["targets"].keyids == [new.key_id]
    assert old.key_id not in after.root.keys
    # The old key's signatures no longer count…
    with pytest.raises(NotAuthorized):
        world.repo.add_target("v3", DIGEST, 1, old)
    _forge(world, "targets", old)
    world.refresh()
    with pytest.raises(VerificationError, match="valid signatures from 0") as err:
        world.verify()
    assert err.value.file == "targets.json"


def test_rotate_delegation_key(world: World) -> None:
    before = world.verify()
    old, new = world.ci, SoftwareSigner.generate()
    world.repo.rotate_delegation_key("targets/releases", world.targets, new,
                                     old_key_id=old.key_id)
    world.refresh()
    after = world.verify(trusted=before.state)
    assert after.tags == before.tags
    assert world.repo.targets().delegation("targets/releases").keyids == [new.key_id]  # type: ignore[union-attr]
    assert old.key_id not in world.repo.targets().delegation_keys
    world.repo.add_target("v2", DIGEST, 1, new, role="targets/releases")
    with pytest.raises(NotAuthorized):
        world.repo.add_target("v3", DIGEST, 1, old, role="targets/releases")
    _forge(world, "targets/releases", old)
    world.refresh()
    with pytest.raises(VerificationError, match="valid signatures from 0") as err:
        world.verify()
    assert err.value.file == "targets/releases.json"


def test_rotate_delegation_to_a_bare_public_key_hides_tags_until_resigned(world: World) -> None:
    new = SoftwareSigner.generate()
    world.repo.rotate_delegation_key("targets/releases", world.targets, signer_key(new))
    world.refresh()
    with pytest.raises(VerificationError) as err:
        world.verify()
    assert err.value.file == "targets/releases.json"
    world.repo.add_target("v2", DIGEST, 1, new, role="targets/releases")
    world.refresh()
    assert [t.name for t in world.verify().tags] == ["v1", "v2"]


def test_rotate_root_key(world: World) -> None:
    before = world.verify()
    old, new = world.root, SoftwareSigner.generate()
    old_id = before.root.roles["root"].keyids[0]
    world.repo.rotate_root_key(old, new, snapshot_signer=world.snapshot)
    world.repo.sign_timestamp(world.timestamp)
    world.root = new
    after = world.verify(trusted=before.state)
    assert after.tags == before.tags
    assert after.root.version == 2
    new_id = after.root.roles["root"].keyids[0]
    assert new_id != old_id and old_id not in after.root.keys
    env = Envelope.from_bytes(world.repo.read("root") or b"", "root")
    assert sorted(s.keyid for s in env.signatures) == sorted([old_id, new_id])

    # Tags signed before the rotation are still there, and new ones can be added.
    world.repo.add_target("v2", DIGEST, 1, world.ci, role="targets/releases")
    world.refresh()
    assert [t.name for t in world.verify(trusted=after.state).tags] == ["v1", "v2"]

    # The old root key's signatures no longer count: a root v3 signed by it alone fails…
    env.signed["version"] = 3
    world.repo.write("root", sign_envelope(env.signed, {old_id: old}).to_bytes())
    world.refresh()
    for trusted, reason in ((None, "valid signatures from 0"),
                            (after.state, "rotation not approved")):
        with pytest.raises(VerificationError, match=reason) as err:
            world.verify(trusted=trusted)
        assert err.value.file == "root.json"
    # …while the same root signed by the new key is accepted.
    world.repo.write("root", sign_envelope(env.signed, {new_id: new}).to_bytes())
    world.refresh()
    assert world.verify(trusted=after.state).root.version == 3
    with pytest.raises(NotAuthorized):
        world.repo.rotate_targets_key(old, SoftwareSigner.generate())


def test_root_rotation_without_the_old_key_is_not_trusted(world: World) -> None:
    before = world.verify()
    new = SoftwareSigner.generate()
    root = world.repo.root()
    cert = build_root_certificate(new, GUN)
    key = certificate_key(cert)
    root.keys = {k: v for k, v in root.keys.items() if k not in root.roles["root"].keyids}
    root.keys[key.key_id] = key
    root.roles["root"].keyids = [key.key_id]
    root.version += 1
    world.repo.write("root", sign_envelope(root, {key.key_id: new}).to_bytes())
    world.refresh()
    # Self-consistent, so a first-time client would accept it…
    assert world.verify().root.version == 2
    # …but a client that trusted version 1 refuses it.
    with pytest.raises(VerificationError, match="rotation not approved") as err:
        world.verify(trusted=before.state)
    assert err.value.file == "root.json"


def test_two_root_rotations_follow_the_chain(world: World) -> None:
    first = world.verify()
    k2, k3 = SoftwareSigner.generate(), SoftwareSigner.generate()
    world.repo.rotate_root_key(world.root, k2)
    v2 = world.repo.read("root") or b""
    world.repo.rotate_root_key(k2, k3)
    world.refresh()
    files = world.repo.files()
    # Version 3 is signed by k2 and k3; a client that trusts v1 (k1) needs v2 to get there.
    with pytest.raises(VerificationError, match="rotation not approved"):
        verify_repository(GUN, files, trusted=first.state)
    result = verify_repository(GUN, {**files, "2.root": v2}, trusted=first.state)
    assert result.root.version == 3
    assert Root.from_dict(Envelope.from_bytes(v2, "root").signed).version == 2
    # A broken intermediate is named as such.
    with pytest.raises(VerificationError) as err:
        verify_repository(GUN, {**files, "2.root": v2.replace(b'"version":2', b'"version":5')},
                          trusted=first.state)
    assert err.value.file == "2.root.json"


def test_targets_parse_of_local_files(world: World) -> None:
    t = world.repo.targets("targets/releases")
    assert isinstance(t, Targets)
    assert t.targets["v1"].hashes["sha256"] == DIGEST
    assert world.repo.roles() == ["root", "snapshot", "targets", "targets/releases", "timestamp"]


@pytest.mark.parametrize("kind", ["ecdsa", "rsa-pkcs1v15", "rsa-pss-only"])
def test_root_key_types(tmp_path: Path, kind: str) -> None:
    inner = SoftwareSigner.generate("ecdsa" if kind == "ecdsa" else "rsa")
    root = PlainSigner(inner) if kind == "rsa-pss-only" else inner
    w = World(TrustRepo(tmp_path, GUN))
    w.repo.init(root, w.targets, timestamp_key=signer_key(w.timestamp), snapshot_signer=w.snapshot)
    w.repo.add_target("v1", DIGEST, 1, w.targets)
    w.refresh()
    result = w.verify()
    (root_id,) = result.root.roles["root"].keyids
    assert result.root.keys[root_id].keytype == ("ecdsa-x509" if kind == "ecdsa" else "rsa-x509")
    assert result.tag("v1").role == "targets"


def test_trusted_state_round_trip_and_errors(world: World) -> None:
    state = world.verify().state
    assert TrustedState.from_json(state.to_json()) == state
    with pytest.raises(InvalidArgument, match="not a saved trust state"):
        TrustedState.from_json(b'{"root": null}')


@pytest.mark.parametrize("role", ["../escape", "targets/../../x", "/etc/passwd", "snapshot.bak"])
def test_role_names_cannot_leave_the_directory(world: World, role: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid role"):
        world.repo.read(role)
    with pytest.raises(InvalidArgument, match="invalid role"):
        world.repo.write(role, b"{}")


def test_trust_library_does_not_import_grpc() -> None:
    code = ("import sys, signerd.trust, signerd.trust.notary_http; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'grpc' "
            "or m.startswith(('signerd.server', 'signerd.cli'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
