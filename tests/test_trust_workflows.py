"""The Content Trust workflows (signerd.trust.workflows) without argv or printing.

Keys are real: on SoftHSM tokens through :class:`TokenKeys` (what ``signerctl
trust --local`` uses), or :class:`SoftwareSigner` keys for a party that holds
only its own key. The Notary server is ``tests/notary_http_server.py`` over
loopback HTTP, signing the server-managed roles with its own software keys.
The same flows through argv and a daemon are in tests/test_trust_e2e.py.
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from signerd.config import parse_config
from signerd.errors import FailedPrecondition, InvalidArgument, NotFound
from signerd.service import KeyService
from signerd.trust import NotaryClient, SoftwareSigner, TrustRepo, TrustSigner, workflows
from signerd.trust.errors import NotAuthorized
from signerd.trust.keysource import KeySource, TokenKeys
from signerd.trust.state import Settings, changes, load_settings
from signerd.trust.workflows import KeysOpener, NotaryOpener
from tests.conftest import HSM, PKI, daemon_config, unique_gun
from tests.notary_http_server import NotaryTestServer

DIGEST = hashlib.sha256(b"manifest").digest()
OTHER = hashlib.sha256(b"other manifest").digest()
TRUST = Path(__file__).parent.parent / "signerd" / "trust"


# --- key sources and servers -------------------------------------------------------


@pytest.fixture(scope="module")
def service(hsm: HSM, certs: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyService]:
    """signerd's KeyService straight on the test SoftHSM tokens (root and online)."""
    work = tmp_path_factory.mktemp("workflows")
    svc = KeyService.open(parse_config(daemon_config(hsm, certs, work), work))
    yield svc
    svc.close()


@pytest.fixture
def tokens(service: KeyService) -> KeysOpener:
    """The key source opener of ``signerctl trust --local``: every key on the tokens."""
    return lambda: nullcontext(TokenKeys(service))


class SoftwareKeys:
    """A KeySource over in-memory keys: a party that holds only the keys given to it."""

    def __init__(self, *signers: TrustSigner) -> None:
        self.keys = {s.key_id: s for s in signers}

    def create(self, gun: str, role: str) -> TrustSigner:
        signer = SoftwareSigner.generate()
        self.keys[signer.key_id] = signer
        return signer

    def get(self, key_id: str) -> TrustSigner:
        if key_id not in self.keys:
            raise NotFound(f"no key {key_id}")
        return self.keys[key_id]

    def find(self, key_id: str) -> TrustSigner | None:
        return self.keys.get(key_id)

    def delete(self, key_id: str) -> None:
        del self.keys[key_id]


class FailingAt:
    """Real token keys (TokenKeys), but the create of ``role`` fails, as a policy
    that refuses it or a full token would; ``deletable`` False: the caller may
    not delete keys either."""

    def __init__(self, inner: KeySource, role: str, deletable: bool = True) -> None:
        self.inner, self.role, self.deletable = inner, role, deletable

    def create(self, gun: str, role: str) -> TrustSigner:
        if role == self.role:
            raise FailedPrecondition(f"no room for a {role} key")
        return self.inner.create(gun, role)

    def get(self, key_id: str) -> TrustSigner:
        return self.inner.get(key_id)

    def find(self, key_id: str) -> TrustSigner | None:
        return self.inner.find(key_id)

    def delete(self, key_id: str) -> None:
        if not self.deletable:
            raise PermissionError("may not delete")
        self.inner.delete(key_id)


def holding(source: KeySource) -> KeysOpener:
    return lambda: nullcontext(source)


def refused() -> AbstractContextManager[KeySource]:
    pytest.fail("the key source was opened before the workflow's local checks")


@pytest.fixture
def server() -> Iterator[NotaryTestServer]:
    with NotaryTestServer(lambda gun, role: SoftwareSigner.generate()) as srv:
        yield srv


def notary_at(srv: NotaryTestServer) -> NotaryOpener:
    """What signerctl does without --server: the URL the directory recorded, else srv's."""

    def make(settings: Settings | None) -> NotaryClient:
        return NotaryClient(settings.server if settings and settings.server else srv.url)

    return make


def no_notary(settings: Settings | None) -> NotaryClient:
    pytest.fail("the Notary client was made before the workflow's local checks")


def pem_file(path: Path, signer: SoftwareSigner) -> Path:
    path.write_bytes(signer.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


# --- offline: signerd holds all four keys ------------------------------------------------


def test_offline_init_sign_inspect_on_the_tokens(
    tokens: KeysOpener, service: KeyService, tmp_path: Path
) -> None:
    gun = unique_gun()
    init = workflows.init(tmp_path, gun, tokens)
    assert init.signed_locally == ("snapshot", "timestamp") and init.server is None
    assert init.files == ("root", "snapshot", "targets", "timestamp")
    assert init.path == tmp_path / gun
    assert service.get_key(init.root_key_id).token == "root"  # root keys on the root token
    assert service.get_key(init.targets_key_id).token == "online"
    assert load_settings(TrustRepo(tmp_path, gun)) == Settings(None, ("snapshot", "timestamp"))
    with pytest.raises(InvalidArgument, match="already initialised"):
        workflows.init(tmp_path, gun, refused)

    signed = workflows.sign(tmp_path, gun, "v1", DIGEST, 8, tokens)
    assert (signed.role, signed.key_id, signed.digest) == ("targets", init.targets_key_id, DIGEST)
    assert signed.files == ("snapshot", "targets", "timestamp")

    shown = workflows.inspect(tmp_path, gun)
    assert [(t.name, t.digest, t.size, t.role) for t in shown.tags] == [
        ("v1", DIGEST.hex(), 8, "targets")]
    assert shown.signers == {"targets": [init.targets_key_id]}
    assert shown.versions["targets"] == 2 and shown.retrust is None
    assert workflows.inspect(tmp_path, gun, "v1").tags[0].role == "targets"

    unsigned = workflows.unsign(tmp_path, gun, "v1", tokens)
    assert (unsigned.role, unsigned.files) == ("targets", ("snapshot", "targets", "timestamp"))
    assert workflows.inspect(tmp_path, gun).tags == ()


def test_local_checks_come_before_keys_and_the_server(tmp_path: Path) -> None:
    """A missing trust directory is reported before any token, daemon or server is reached."""
    gun = unique_gun()
    missing = f"no trust data for {gun} in {tmp_path}:"
    for run in (
        lambda: workflows.sign(tmp_path, gun, "v1", DIGEST, 1, refused),
        lambda: workflows.unsign(tmp_path, gun, "v1", refused),
        lambda: workflows.add_delegation(tmp_path, gun, "targets/ci", refused, key_ids=["a"]),
        lambda: workflows.remove_delegation(tmp_path, gun, "targets/ci", refused),
        lambda: workflows.rotate(tmp_path, gun, "timestamp", refused, no_notary),
        lambda: workflows.publish(tmp_path, gun, no_notary),
        lambda: workflows.inspect(tmp_path, gun),
    ):
        with pytest.raises(NotFound, match=missing):
            run()
    with pytest.raises(InvalidArgument, match="not a delegation role"):
        workflows.remove_delegation(tmp_path, gun, "targets", refused)


def test_delegation_rotation_and_removal(
    tokens: KeysOpener, service: KeyService, tmp_path: Path
) -> None:
    gun = unique_gun()
    workflows.init(tmp_path, gun, tokens)
    releases = service.create_key(gun, "targets/releases", "ecdsa-p256")
    outside = pem_file(tmp_path / "outside.pem", SoftwareSigner.generate())
    added = workflows.add_delegation(tmp_path, gun, "targets/releases", tokens,
                                     key_ids=[releases.key_id], pubkey_files=[outside])
    assert added.key_ids[0] == releases.key_id and len(added.key_ids) == 2
    assert added.paths == ("",) and added.files == ("snapshot", "targets", "timestamp")

    # The default role follows targets/releases once it is delegated.
    signed = workflows.sign(tmp_path, gun, "v1", DIGEST, 3, tokens)
    assert (signed.role, signed.key_id) == ("targets/releases", releases.key_id)
    assert workflows.inspect(tmp_path, gun).signers["targets/releases"] == sorted(added.key_ids)

    rotated = workflows.rotate(tmp_path, gun, "targets/releases", tokens, no_notary)
    assert rotated.old_key_ids == tuple(sorted(added.key_ids)) and rotated.published is None
    assert service.get_key(rotated.new_key_id).role == "targets/releases"
    assert workflows.inspect(tmp_path, gun, "v1").tags[0].role == "targets/releases"
    with pytest.raises(InvalidArgument, match="already signs"):
        workflows.rotate(tmp_path, gun, "targets/releases", tokens, no_notary,
                         key_id=rotated.new_key_id)

    removed = workflows.remove_delegation(tmp_path, gun, "targets/releases", tokens)
    assert "targets/releases" in removed.files
    assert workflows.inspect(tmp_path, gun).tags == ()
    with pytest.raises(NotFound, match="not a delegation of targets"):
        workflows.sign(tmp_path, gun, "v2", DIGEST, 1, tokens, role="targets/releases")


def test_a_second_root_rotation_waits_for_verification(
    tokens: KeysOpener, service: KeyService, tmp_path: Path
) -> None:
    gun = unique_gun()
    init = workflows.init(tmp_path, gun, tokens)
    workflows.inspect(tmp_path, gun)  # pins root v1
    first = workflows.rotate(tmp_path, gun, "root", tokens, no_notary)
    assert first.old_key_ids == (init.root_key_id,)
    assert first.files == ("root", "snapshot", "timestamp")
    assert service.get_key(first.new_key_id).token == "root"
    with pytest.raises(FailedPrecondition, match="already rotated since it was last verified"):
        workflows.rotate(tmp_path, gun, "root", tokens, no_notary)
    assert workflows.inspect(tmp_path, gun).versions["root"] == 2  # verified: v1 signed v2
    second = workflows.rotate(tmp_path, gun, "root", tokens, no_notary)
    assert second.old_key_ids == (first.new_key_id,)
    # A re-trust reports the old and the new root keys as root.json lists them.
    retrust = workflows.inspect(tmp_path, gun, reset_trust=True).retrust
    assert retrust is not None and retrust.old_root_key_ids != retrust.new_root_key_ids


def test_a_failed_change_leaves_every_file_as_it_was(tokens: KeysOpener, tmp_path: Path) -> None:
    gun = unique_gun()
    workflows.init(tmp_path, gun, tokens)
    repo = TrustRepo(tmp_path, gun)
    before = repo.files()
    with pytest.raises(RuntimeError), changes(repo):
        repo.write("targets", b"half a change")
        repo.write("targets/new", b"{}")
        raise RuntimeError("refused half-way")
    assert repo.files() == before
    # A party that may not sign targets changes nothing either.
    with pytest.raises(NotFound, match="holds no key of targets"):
        workflows.sign(tmp_path, gun, "v1", DIGEST, 1, holding(SoftwareKeys()))
    assert repo.files() == before


# --- with a Notary server --------------------------------------------------------------


def test_publish_pull_and_a_runner_that_holds_only_its_key(
    tokens: KeysOpener, server: NotaryTestServer, tmp_path: Path
) -> None:
    gun, team, consumer = unique_gun(), tmp_path / "team", tmp_path / "consumer"
    init = workflows.init(team, gun, tokens, notary_at(server))
    assert init.signed_locally == () and init.server == server.url
    assert init.files == ("root", "targets")
    assert sorted(server.keys) == [(gun, "snapshot"), (gun, "timestamp")]
    assert init.timestamp_key_id == server.keys[(gun, "timestamp")].key_id

    runner_key = SoftwareSigner.generate()
    workflows.add_delegation(team, gun, "targets/releases", tokens,
                             pubkey_files=[pem_file(tmp_path / "ci.pem", runner_key)],
                             paths=["v"])
    published = workflows.publish(team, gun, notary_at(server))
    assert published.published == ("root", "targets")
    assert published.versions is not None and published.versions["targets"] == 2
    nothing = workflows.publish(team, gun, notary_at(server))
    assert (nothing.published, nothing.versions) == ((), None)

    # The runner pulls, then signs with the only key it has; the server signs the snapshot.
    pulled = workflows.pull(consumer, gun, notary_at(server))
    assert pulled.verified.tags == () and pulled.retrust is None
    assert load_settings(TrustRepo(consumer, gun)).server == server.url
    runner = holding(SoftwareKeys(runner_key))
    signed = workflows.sign(consumer, gun, "v1", DIGEST, 8, runner)
    assert (signed.role, signed.files) == ("targets/releases", ("targets/releases",))
    with pytest.raises(NotAuthorized, match="may not sign 'latest'"):
        workflows.sign(consumer, gun, "latest", DIGEST, 8, runner)
    with pytest.raises(NotFound, match="holds no key of targets"):
        workflows.sign(consumer, gun, "v2", DIGEST, 8, runner, role="targets")
    with pytest.raises(FailedPrecondition, match=r"unpublished changes \(targets/releases\)"):
        workflows.pull(consumer, gun, notary_at(server))
    assert workflows.publish(consumer, gun, notary_at(server)).published == ("targets/releases",)

    again = workflows.pull(team, gun, notary_at(server), reset_trust=True)
    assert [(t.name, t.role) for t in again.verified.tags] == [("v1", "targets/releases")]
    assert again.retrust is not None
    assert again.retrust.old_root_key_ids == again.retrust.new_root_key_ids
    shown = workflows.inspect(team, gun, "v1")
    assert shown.signers["targets/releases"] == [runner_key.key_id]


def test_init_of_a_repository_the_server_has_creates_nothing(
    tokens: KeysOpener, server: NotaryTestServer, tmp_path: Path
) -> None:
    """Regression (issue 21 §4): 'trust init' of a repository that already
    existed on the Notary server made a root and a targets key on the tokens and
    wrote local metadata, then failed at publish (ErrBadRoot: "Root
    modifications must increment the version. Current 5, new 1"). Now the server
    is asked first, and nothing is made: no key, no file, no server key."""
    gun = unique_gun()
    workflows.init(tmp_path / "first", gun, tokens, notary_at(server))
    workflows.publish(tmp_path / "first", gun, notary_at(server))
    server_keys = dict(server.keys)
    with pytest.raises(FailedPrecondition) as info:
        workflows.init(tmp_path / "second", gun, refused, notary_at(server))
    assert str(info.value) == (
        f"{gun} already exists on the Notary server {server.url} (root version 1); 'trust "
        f"init' makes a new repository only. To sign its tags, fetch it: 'signerctl trust "
        f"pull {gun} --server {server.url}'; nothing was created")
    assert not (tmp_path / "second").exists() and server.keys == server_keys


@pytest.mark.parametrize("deletable", [True, False], ids=["deleted", "named"])
def test_a_failed_init_leaves_no_orphan_key(
    service: KeyService, tmp_path: Path, deletable: bool
) -> None:
    """Regression (issue 21 §4): keys made before a failure were left on the
    tokens with nothing referring to them. Now they are destroyed, or, where
    they cannot be, the error names them and how to delete them."""
    gun = unique_gun()
    before = {k.key_id for k in service.list_keys(gun, "", "", 1000, "", lambda k: True)[0]}
    source = FailingAt(TokenKeys(service), "targets", deletable)
    with pytest.raises(Exception) as info:
        workflows.init(tmp_path, gun, holding(source))
    made = {k.key_id for k in service.list_keys(gun, "", "", 1000, "", lambda k: True)[0]}
    assert not (tmp_path / gun / "root.json").exists()
    if deletable:
        assert type(info.value) is FailedPrecondition
        assert str(info.value) == "no room for a targets key"
        assert made == before == set()
    else:
        [root] = made - before
        assert type(info.value) is workflows.KeysLeft
        assert str(info.value) == (
            f"no room for a targets key; the new key(s) {root} could not be deleted: "
            "delete them with 'signerctl keys delete KEYID'")
        service.delete_key(root)


def test_rotating_server_keys_publishes_at_once(
    tokens: KeysOpener, server: NotaryTestServer, tmp_path: Path
) -> None:
    gun = unique_gun()
    workflows.init(tmp_path, gun, tokens, notary_at(server))
    workflows.sign(tmp_path, gun, "v1", DIGEST, 1, tokens)
    workflows.publish(tmp_path, gun, notary_at(server))
    old = server.keys[(gun, "timestamp")].key_id
    with pytest.raises(InvalidArgument, match="--key does not apply to timestamp"):
        workflows.rotate(tmp_path, gun, "timestamp", refused, no_notary, key_id=old)

    rotated = workflows.rotate(tmp_path, gun, "timestamp", tokens, notary_at(server))
    assert rotated.old_key_ids == (old,) and rotated.published == ("root",)
    assert rotated.new_key_id == server.keys[(gun, "timestamp")].key_id != old
    shown = workflows.inspect(tmp_path, gun)
    assert shown.versions["root"] == 2 and [t.name for t in shown.tags] == ["v1"]

    # Unpublished work is published before a server key is rotated, never mixed in.
    workflows.sign(tmp_path, gun, "v2", OTHER, 2, tokens)
    with pytest.raises(FailedPrecondition, match=r"unpublished changes \(targets\)"):
        workflows.rotate(tmp_path, gun, "snapshot", tokens, no_notary)


def test_a_local_snapshot_is_rotated_in_signerd(
    tokens: KeysOpener, service: KeyService, server: NotaryTestServer, tmp_path: Path
) -> None:
    gun = unique_gun()
    init = workflows.init(tmp_path, gun, tokens, notary_at(server), local_snapshot=True)
    assert init.signed_locally == ("snapshot",)
    assert (gun, "snapshot") not in server.keys  # the server was never asked for one
    rotated = workflows.rotate(tmp_path, gun, "snapshot", tokens, no_notary)
    assert rotated.published == () and rotated.files == ("root", "snapshot")
    assert service.get_key(rotated.new_key_id).role == "snapshot"
    assert workflows.publish(tmp_path, gun, notary_at(server)).published == (
        "root", "snapshot", "targets")


# --- layering ---------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", sorted(p.name for p in TRUST.glob("*.py")))
def test_the_trust_layer_knows_no_argv_and_no_grpc(module: str) -> None:
    forbidden = {"argparse", "grpc", "signerd.cli", "signerd.server", "signerd.daemon"}
    found = {name for name in _imports(TRUST / module)
             if any(name == f or name.startswith(f + ".") for f in forbidden)}
    assert found == set(), f"signerd/trust/{module} imports {sorted(found)}"


def test_importing_the_workflows_loads_no_grpc() -> None:
    code = ("import sys, signerd.trust.workflows, signerd.trust.keysource; "
            "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('signerd.cli')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]"

