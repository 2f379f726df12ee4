"""Content-aware signing through the real daemon: gRPC over mTLS, SoftHSM, the SQLite
watermark store in the daemon's directory (issue "Content-aware signing" §1-§3).

Every refusal the issue names is made on each signing path (v1 Sign, SignBatch,
SignStream, Notary Sign), with the right status code and an audit line that names the
check; each has a legitimate twin that signs. Rollback protection survives a restart;
digest-only is refused for metadata keys and signed by raw keys; keys have purposes,
an audited verb changes one, and the recorded versions can be shown and reset.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from securesystemslib.formats import encode_canonical as olpc_canonical

from signerd import signing
from signerd.canonicaljson import encode_canonical as notary_canonical
from signerd.client import channel
from signerd.keys import parse_algorithm
from signerd.notary import signer_pb2 as npb
from signerd.notary import signer_pb2_grpc as npb_grpc
from signerd.trust import x509
from signerd.trust.keysource import RemoteSigner
from signerd.v1 import signer_pb2 as pb
from tests.conftest import ADMIN, Daemon, daemon_config, rpc_error, start_daemon, unique_gun

POLICY = f"""
[[rule]]
name = "admin"
identities = ["{ADMIN}"]
operations = ["*", "purpose", "reset"]
roles = ["*", "root"]

[[rule]]
name = "ci"
identities = ["spiffe://test/ci"]
operations = ["*"]
roles = ["*", "root"]
"""
PATHS = ("sign", "batch", "stream", "notary")


def _when(days: float) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


def notary_meta(gun: str, role: str, version: int, days: float = 7,
                **extra: Any) -> bytes:
    """Notary's canonical JSON of a ``signed`` object of ``role`` (``_type`` Timestamp...)."""
    body: dict[str, Any] = {"_type": role.capitalize(), "version": version,
                            "expires": _when(days).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if role in ("timestamp", "snapshot"):
        names = ("snapshot",) if role == "timestamp" else ("root", "targets")
        body["meta"] = {n: {"length": 10, "hashes": {"sha256": base64.b64encode(
            hashlib.sha256(f"{gun}{n}".encode()).digest()).decode()}} for n in names}
    if role == "targets":
        body["targets"] = {}
    body.update(extra)
    return notary_canonical(body)


def tuf_meta(role: str, version: int, days: float = 7, **extra: Any) -> bytes:
    """python-tuf's (OLPC) canonical JSON of a TUF 1.0 ``signed`` object."""
    body: dict[str, Any] = {"_type": role, "spec_version": "1.0.31", "version": version,
                            "expires": _when(days).strftime("%Y-%m-%dT%H:%M:%SZ")}
    body.update(extra)
    text = olpc_canonical(body)
    assert isinstance(text, str)
    return text.encode()


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    signature: bytes = b""


class Signer:
    """Signs one payload through one of the four paths, as the admin identity."""

    def __init__(self, d: Daemon) -> None:
        self.d = d

    def __call__(self, path: str, key_id: str, payload: bytes,
                 digest: bool = False) -> Outcome:
        req = pb.SignRequest(key_id=key_id)
        if digest:
            req.digest = hashlib.sha256(payload).digest()
        else:
            req.message = payload
        with self.d.client() as c:
            if path == "sign":
                try:
                    return Outcome(grpc.StatusCode.OK, "", c.stub.Sign(req, timeout=20).signature)
                except grpc.RpcError as e:
                    return Outcome(e.code(), e.details())  # type: ignore[attr-defined]
            if path in ("batch", "stream"):
                item = (c.stub.SignBatch(pb.SignBatchRequest(requests=[req]), timeout=20).items[0]
                        if path == "batch" else next(iter(c.sign_stream([req], timeout=20))))
                return Outcome(_code(item.code), item.error, item.response.signature)
        assert path == "notary" and not digest  # Notary's Sign takes the content only
        ch = channel(self.d.client_config())
        try:
            stub = npb_grpc.SignerStub(ch)
            sig = stub.Sign(npb.SignatureRequest(keyID=npb.KeyID(ID=key_id), content=payload),
                            timeout=20)
            return Outcome(grpc.StatusCode.OK, "", sig.content)
        except grpc.RpcError as e:
            return Outcome(e.code(), e.details())  # type: ignore[attr-defined]
        finally:
            ch.close()


def _code(value: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == value)


def audit(d: Daemon) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (d.workdir / "audit.log").read_text().splitlines()]


def refusals(d: Daemon, key_id: str) -> list[dict[str, Any]]:
    """The refused checks audited for ``key_id``: the line's own, or a batch item's."""
    found = []
    for line in audit(d):
        if line.get("key_id") != key_id:
            continue
        if "refused" in line:
            found.append(line["refused"])
        found += [i["refused"] for i in line.get("items", []) if "refused" in i]
    return found


@pytest.fixture
def daemon(daemon_factory: Any) -> Daemon:
    d: Daemon = daemon_factory(policy=POLICY)
    return d


@pytest.fixture
def sign(daemon: Daemon) -> Signer:
    return Signer(daemon)


def key(d: Daemon, gun: str, role: str, purpose: str = "metadata",
        algorithm: str = "ecdsa-p256") -> pb.Key:
    with d.client() as c:
        return c.create_key(gun, role, algorithm, purpose=purpose)


def _verifies(k: pb.Key, payload: bytes, signature: bytes) -> None:
    signing.verify(k.public_key_der, parse_algorithm(k.algorithm), signature, payload,
                   signing.SignOptions())


# -- each refusal of the issue, and its legitimate twin, on every path --------------------

Case = Callable[[str], tuple[str, bytes, bytes]]  # gun -> (role, refused payload, twin)

CASES: dict[str, tuple[Case, grpc.StatusCode, str]] = {
    # A timestamp key asked to sign targets metadata.
    "role": (lambda g: ("timestamp", notary_meta(g, "targets", 1), notary_meta(g, "timestamp", 1)),
             grpc.StatusCode.INVALID_ARGUMENT, "does not sign targets metadata"),
    # The bytes are not what a verifier re-canonicalises.
    "canonical": (lambda g: ("timestamp", notary_meta(g, "timestamp", 1) + b" ",
                             notary_meta(g, "timestamp", 1)),
                  grpc.StatusCode.INVALID_ARGUMENT, "not canonical JSON"),
    # A timestamp valid for years: a freeze attack waiting to happen.
    "expiry": (lambda g: ("timestamp", notary_meta(g, "timestamp", 1, days=5 * 365),
                          notary_meta(g, "timestamp", 1, days=14)),
               grpc.StatusCode.INVALID_ARGUMENT, "more than 31 days ahead"),
    "expired": (lambda g: ("snapshot", notary_meta(g, "snapshot", 1, days=-1),
                           notary_meta(g, "snapshot", 1, days=30)),
                grpc.StatusCode.INVALID_ARGUMENT, "expired at"),
    # Opaque bytes for a metadata key.
    "json": (lambda g: ("targets", b"not metadata at all", notary_meta(g, "targets", 1)),
             grpc.StatusCode.INVALID_ARGUMENT, "not JSON metadata"),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_with_its_check_and_audited_and_the_twin_signs(
        daemon: Daemon, sign: Signer, case: str, path: str) -> None:
    make, code, words = CASES[case]
    gun = unique_gun()
    role, bad, good = make(gun)
    k = key(daemon, gun, role)
    refused = sign(path, k.key_id, bad)
    assert refused.code == code, refused
    assert words in refused.details and "\n" not in refused.details
    assert [r["reason"] for r in refusals(daemon, k.key_id)] == [refused.details]
    ok = sign(path, k.key_id, good)
    assert ok.code == grpc.StatusCode.OK, ok
    _verifies(k, good, ok.signature)


@pytest.mark.parametrize("path", PATHS)
def test_rollback_is_refused_and_an_equal_version_with_new_content_is_audited(
        daemon: Daemon, sign: Signer, path: str) -> None:
    gun = unique_gun()
    k = key(daemon, gun, "timestamp")
    assert sign(path, k.key_id, notary_meta(gun, "timestamp", 5)).code == grpc.StatusCode.OK
    old = sign(path, k.key_id, notary_meta(gun, "timestamp", 3))
    assert old.code == grpc.StatusCode.FAILED_PRECONDITION
    assert old.details == f"timestamp version 3 is below version 5 already signed for {gun}"
    assert refusals(daemon, k.key_id) == [{"check": "rollback", "reason": old.details}]
    # notary-server signs one timestamp version twice (concurrency, a failed store):
    # allowed, and audited as such.
    again = notary_meta(gun, "timestamp", 5, days=8)
    assert sign(path, k.key_id, again).code == grpc.StatusCode.OK
    lines = [line for line in audit(daemon) if line.get("key_id") == k.key_id
             and line["operation"] == "sign" and line["status"] == "OK"]
    contents = [c for line in lines
                for c in [line.get("content"), *(i.get("content") for i in line.get("items", []))]
                if c]
    assert [(c["version"], c["same_version_changed"]) for c in contents] == [
        (5, False), (5, True)]
    assert sign(path, k.key_id, notary_meta(gun, "timestamp", 6)).code == grpc.StatusCode.OK


@pytest.mark.parametrize("path", ("sign", "batch", "stream"))
def test_a_tuf_timestamp_may_not_freeze_the_snapshot_it_references(
        daemon: Daemon, sign: Signer, path: str) -> None:
    gun = unique_gun()
    k = key(daemon, gun, "timestamp")
    v3 = tuf_meta("timestamp", 1, meta={"snapshot.json": {"version": 3}})
    assert sign(path, k.key_id, v3).code == grpc.StatusCode.OK
    frozen = sign(path, k.key_id, tuf_meta("timestamp", 2, meta={"snapshot.json": {"version": 2}}))
    assert frozen.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "snapshot.json version 2, below version 3" in frozen.details
    assert refusals(daemon, k.key_id)[0]["check"] == "freeze"
    fresh = tuf_meta("timestamp", 2, meta={"snapshot.json": {"version": 4}})
    assert sign(path, k.key_id, fresh).code == grpc.StatusCode.OK


@pytest.mark.parametrize("path", PATHS)
def test_a_delegation_signs_only_inside_the_paths_its_parent_gave_it(
        daemon: Daemon, sign: Signer, path: str) -> None:
    gun = unique_gun()
    parent, child = key(daemon, gun, "targets"), key(daemon, gun, "targets/releases")
    delegations = {"keys": {}, "roles": [{"name": "targets/releases", "keyids": [],
                                          "threshold": 1, "paths": ["releases/"]}]}
    top = notary_meta(gun, "targets", 1, delegations=delegations)
    assert sign(path, parent.key_id, top).code == grpc.StatusCode.OK
    target = {"length": 1, "hashes": {"sha256": base64.b64encode(b"\0" * 32).decode()}}
    outside = notary_meta(gun, "targets", 1, targets={"other/app": target})
    refused = sign(path, child.key_id, outside)
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "outside the paths its parent delegated" in refused.details
    assert refusals(daemon, child.key_id)[0]["check"] == "delegation"
    inside = notary_meta(gun, "targets", 1, targets={"releases/app": target})
    assert sign(path, child.key_id, inside).code == grpc.StatusCode.OK


# -- digests, raw keys and certificates ---------------------------------------------

@pytest.mark.parametrize("path", ("sign", "batch", "stream"))
def test_a_digest_is_refused_for_a_metadata_key_and_signed_by_a_raw_key(
        daemon: Daemon, sign: Signer, path: str) -> None:
    gun = unique_gun()
    meta, raw = key(daemon, gun, "targets"), key(daemon, gun, "targets", "raw")
    payload = notary_meta(gun, "targets", 1)
    refused = sign(path, meta.key_id, payload, digest=True)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "a digest cannot be checked" in refused.details
    assert refusals(daemon, meta.key_id)[0]["check"] == "digest"
    ok = sign(path, raw.key_id, b"an opaque cosign payload", digest=True)
    assert ok.code == grpc.StatusCode.OK
    _verifies(raw, b"an opaque cosign payload", ok.signature)


@pytest.mark.parametrize("path", PATHS)
def test_a_raw_key_never_signs_metadata(daemon: Daemon, sign: Signer, path: str) -> None:
    gun = unique_gun()
    raw = key(daemon, gun, "timestamp", "raw")
    refused = sign(path, raw.key_id, notary_meta(gun, "timestamp", 1))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "is a raw key: it does not sign TUF or Notary metadata" in refused.details
    assert refusals(daemon, raw.key_id)[0]["check"] == "purpose"
    assert sign(path, raw.key_id, b'{"payload": "not metadata"}').code == grpc.StatusCode.OK


def test_a_root_key_signs_its_own_root_certificate_and_nothing_else_x509(
        daemon: Daemon) -> None:
    gun = unique_gun()
    root = key(daemon, gun, "root")
    with daemon.client() as c:
        pem = x509.build_root_certificate(RemoteSigner(c, root), gun)  # Sign, TBS as payload
        x509.check_root_certificate(pem, gun)
        other = RemoteSigner(c, key(daemon, unique_gun(), "root"))
        err = rpc_error(lambda: x509.build_root_certificate(other, gun))  # CN of another GUN
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "subject CN must be the GUN" in err.details()
        targets = RemoteSigner(c, key(daemon, gun, "targets"))
        err = rpc_error(lambda: x509.build_root_certificate(targets, gun))
        assert "not a root key" in err.details()
    # Certifying another key is a raw key's job (keys certify, Notation's chains).
    leaf = key(daemon, gun, "targets/notation", "raw")
    with daemon.client() as c:
        err = rpc_error(lambda: c.certify_key(leaf.key_id, "CN=leaf", root.key_id))
        ca = key(daemon, gun, "root", "raw")
        c.certify_key(ca.key_id, "CN=acme CA", "", profile="ca")
        chain = c.certify_key(leaf.key_id, "CN=leaf", ca.key_id, profile="code-signing")
    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert len(chain) == 2


# -- durability, purposes, state -------------------------------------------------------

def test_the_rollback_is_still_refused_after_a_restart(
        daemon: Daemon, sign: Signer, hsm: Any, certs: Any) -> None:
    gun = unique_gun()
    k = key(daemon, gun, "snapshot")
    assert sign("sign", k.key_id, notary_meta(gun, "snapshot", 7)).code == grpc.StatusCode.OK
    daemon.stop()
    again = start_daemon(daemon_config(hsm, certs, daemon.workdir, policy=POLICY), certs,
                         daemon.workdir)
    try:
        refused = Signer(again)("notary", k.key_id, notary_meta(gun, "snapshot", 6))
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "snapshot version 6 is below version 7" in refused.details
        assert Signer(again)("sign", k.key_id, notary_meta(gun, "snapshot", 8)).code \
            == grpc.StatusCode.OK
    finally:
        again.stop()
    assert (daemon.workdir / "signerd-state.db").exists()


def test_keys_show_their_purpose_and_set_purpose_is_an_audited_admin_right(
        daemon: Daemon, sign: Signer, certs: Any) -> None:
    gun = unique_gun()
    k = key(daemon, gun, "targets/cosign")
    assert k.purpose == pb.KEY_PURPOSE_METADATA
    with daemon.client() as c:
        listed = {x.key_id: x.purpose for x in c.list_keys(gun=gun)}
        assert listed == {k.key_id: pb.KEY_PURPOSE_METADATA}
        assert sign("sign", k.key_id, b"cosign payload").code == grpc.StatusCode.INVALID_ARGUMENT
        changed = c.set_key_purpose(k.key_id, "raw")
        assert changed.purpose == pb.KEY_PURPOSE_RAW
        assert c.get_key(k.key_id).purpose == pb.KEY_PURPOSE_RAW
        err = rpc_error(lambda: c.set_key_purpose(k.key_id, "sideways"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sign("sign", k.key_id, b"cosign payload").code == grpc.StatusCode.OK
    line = [a for a in audit(daemon) if a["operation"] == "purpose"][0]
    assert (line["key_id"], line["purpose"], line["previous_purpose"], line["status"]) == (
        k.key_id, "raw", "metadata", "OK")
    # "*" does not grant the admin operations.
    if "ci" not in certs.files:
        from signerd import pki
        certs.add("ci", pki.issue(certs.ca, "ci", server=False, uris=("spiffe://test/ci",)))
    with daemon.client("ci") as c:
        err = rpc_error(lambda: c.set_key_purpose(k.key_id, "metadata"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        err = rpc_error(lambda: c.reset_state(gun))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [(a["decision"], a["status"]) for a in audit(daemon)
            if a["operation"] in ("purpose", "reset")] == [
        # "sideways" is refused before the policy is asked: decision "none" (issue 21 §7)
        ("allow", "OK"), ("none", "INVALID_ARGUMENT"), ("deny", "PERMISSION_DENIED"),
        ("deny", "PERMISSION_DENIED")]
    refused = [a for a in audit(daemon) if a["operation"] == "purpose"][1]
    assert refused["key_id"] == k.key_id


def test_the_purpose_survives_a_fresh_listing_of_the_token(daemon: Daemon) -> None:
    gun = unique_gun()
    raw, meta = key(daemon, gun, "targets", "raw"), key(daemon, gun, "targets")
    with daemon.client() as c:
        c.set_key_purpose(meta.key_id, "raw")
        c.set_key_purpose(meta.key_id, "metadata")  # a second purpose object replaces the first
    token = daemon.servers.service.tokens[raw.token]
    token.refresh()
    assert token.get(raw.key_id).purpose == "raw"  # type: ignore[union-attr]
    assert token.get(meta.key_id).purpose == "metadata"  # type: ignore[union-attr]


def test_state_show_lists_versions_and_reset_is_audited(daemon: Daemon, sign: Signer) -> None:
    gun = unique_gun()
    ts = key(daemon, gun, "timestamp")
    payload = tuf_meta("timestamp", 4, meta={"snapshot.json": {"version": 9}})
    assert sign("sign", ts.key_id, payload).code == grpc.StatusCode.OK
    with daemon.client() as c:
        state = c.get_state(gun)
        assert [(r.role, r.version, r.sha256) for r in state.roles] == [
            ("timestamp", 4, hashlib.sha256(payload).hexdigest())]
        assert [(m.name, m.version) for m in state.roles[0].meta] == [("snapshot.json", 9)]
        # A Notary repository deleted and re-created on the server starts at version 1.
        assert sign("sign", ts.key_id, tuf_meta("timestamp", 1, meta={
            "snapshot.json": {"version": 1}})).code == grpc.StatusCode.FAILED_PRECONDITION
        assert c.reset_state(gun) == 2
        assert list(c.get_state(gun).roles) == []
    assert sign("sign", ts.key_id, tuf_meta("timestamp", 1, meta={
        "snapshot.json": {"version": 1}})).code == grpc.StatusCode.OK
    line = [a for a in audit(daemon) if a["operation"] == "reset"][0]
    assert (line["gun"], line["removed"], line["status"]) == (gun, 2, "OK")


def test_notary_create_key_makes_metadata_keys(daemon: Daemon) -> None:
    gun = unique_gun()
    ch = channel(daemon.client_config())
    try:
        pub = npb_grpc.KeyManagementStub(ch).CreateKey(
            npb.CreateKeyRequest(algorithm="ecdsa", gun=gun, role="timestamp"), timeout=60)
    finally:
        ch.close()
    with daemon.client() as c:
        assert c.get_key(pub.keyInfo.keyID.ID).purpose == pb.KEY_PURPOSE_METADATA


def test_signing_fails_closed_while_the_state_database_cannot_be_written(
        daemon: Daemon, sign: Signer) -> None:
    gun = unique_gun()
    meta, raw = key(daemon, gun, "timestamp"), key(daemon, gun, "targets", "raw")
    db = Path(daemon.workdir / "signerd-state.db")
    store = daemon.servers.service.guard.content.store
    store.close()  # type: ignore[attr-defined]  # as if the disk went away under it
    try:
        down = sign("sign", meta.key_id, notary_meta(gun, "timestamp", 1))
        assert down.code == grpc.StatusCode.UNAVAILABLE
        assert refusals(daemon, meta.key_id)[0]["check"] == "state"
        assert "state" in daemon.servers.service.unusable()
        assert sign("sign", raw.key_id, b"raw keys need no state").code == grpc.StatusCode.OK
    finally:
        from signerd.content._sqlite import SqliteStore

        daemon.servers.service.guard.content.store = SqliteStore(db)
    assert daemon.servers.service.check() is True
    assert "state" not in daemon.servers.service.unusable()
    assert sign("sign", meta.key_id, notary_meta(gun, "timestamp", 1)).code == grpc.StatusCode.OK
    assert os.path.getsize(db) > 0


def test_large_tuf_metadata_signs_through_the_python_tuf_adapter(
        daemon: Daemon, tmp_path: Path) -> None:
    """Metadata keys need the whole payload: targets metadata of 3,000 targets with SHA-256
    and SHA-512 hashes (0.81 MB, under the default 1 MiB max_message_bytes) signs through
    SignerdSigner and verifies; 6,000 (1.6 MB) is refused with a message naming the setting.
    Run with -s to see the time (the README's python-tuf section quotes it)."""
    import time

    from securesystemslib.signer import Signer as SslibSigner

    from signerd.tuf_signer import SignerdSigner, SignerdSignerError
    from tests.adapter_helpers import write_client_toml

    toml = write_client_toml(daemon.client_config(), tmp_path / "client.toml")
    k = key(daemon, unique_gun(), "targets")
    uri, public = SignerdSigner.import_(k.key_id, toml)
    signer = SslibSigner.from_priv_key_uri(uri, public)

    def targets(n: int) -> bytes:
        files = {f"releases/app-{i}.tar.gz": {"length": i, "hashes": {
            "sha256": hashlib.sha256(b"%d" % i).hexdigest(),
            "sha512": hashlib.sha512(b"%d" % i).hexdigest()}} for i in range(n)}
        return tuf_meta("targets", n, targets=files)

    payload = targets(3_000)
    start = time.perf_counter()
    sig = signer.sign(payload)
    took = time.perf_counter() - start
    public.verify_signature(sig, payload)
    print(f"\nsigned {len(payload)} bytes of TUF targets metadata in {took * 1000:.0f} ms")
    with pytest.raises(SignerdSignerError, match="server.max_message_bytes"):
        signer.sign(targets(6_000))


def test_a_purpose_set_later_survives_the_first_signature_and_leaves_with_its_key(
        daemon: Daemon, sign: Signer) -> None:
    """The first signature rewrites a key's metadata (its used mark), which then
    records the purpose set with set-purpose; deleting the key leaves no purpose
    object behind for the sweep (found by merging the layout and purpose work)."""
    gun = unique_gun()
    k = key(daemon, gun, "targets")
    with daemon.client() as c:
        c.set_key_purpose(k.key_id, "raw")
    assert sign("sign", k.key_id, b"opaque bytes").code == grpc.StatusCode.OK
    token = daemon.servers.service.tokens[k.token]
    token.refresh()
    entry = token.get(k.key_id)
    assert entry is not None and entry.used and entry.purpose == "raw"
    assert entry.meta is not None and entry.meta.purpose == "raw"
    with daemon.client() as c:
        c.delete_key(k.key_id)
    junk, _ = token.sweep()
    assert not [j for j in junk if k.key_id[:24] in j.label], junk


def test_signerctl_state_and_set_purpose_from_the_command_line(
        daemon: Daemon, sign: Signer, tmp_path: Path) -> None:
    """The operator's verbs as a person types them: `state show` (text and
    --json), `state reset` (refused without --yes when not at a terminal,
    then done), `keys set-purpose`."""
    from tests.test_signerctl import client_toml, ctl

    config = client_toml(daemon, tmp_path / "client.toml")
    gun = unique_gun()
    ts = key(daemon, gun, "timestamp")
    empty, _ = ctl(config, "state", "show", gun)
    assert empty.returncode == 0 and empty.stdout.strip() == f"no versions recorded for {gun}"
    payload = tuf_meta("timestamp", 3, meta={"snapshot.json": {"version": 2}})
    assert sign("sign", ts.key_id, payload).code == grpc.StatusCode.OK
    shown, _ = ctl(config, "state", "show", gun)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == f"{gun}:"
    assert "timestamp: version 3" in shown.stdout and "snapshot.json v2" in shown.stdout
    as_json, _ = ctl(config, "state", "show", gun, "--json")
    [role] = json.loads(as_json.stdout)["roles"]
    assert (role["role"], role["version"], role["meta"]) == ("timestamp", 3,
                                                            {"snapshot.json": 2})
    refused, _ = ctl(config, "state", "reset", gun)
    assert refused.returncode != 0 and "--yes" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    done, _ = ctl(config, "state", "reset", gun, "--yes")
    assert done.returncode == 0, done.stderr
    again, _ = ctl(config, "state", "show", gun)
    assert again.stdout.strip() == f"no versions recorded for {gun}"
    changed, _ = ctl(config, "keys", "set-purpose", ts.key_id, "raw")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.strip().endswith("is now a raw key (was metadata)")
