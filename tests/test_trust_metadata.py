"""Notary's role shapes, expiry format, envelopes and signature checks."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signerd.canonicaljson import encode_canonical
from signerd.trust import (
    DelegatedRole,
    Envelope,
    FileMeta,
    RoleKeys,
    Root,
    Snapshot,
    SoftwareSigner,
    Targets,
    Timestamp,
    TufKey,
    VerificationError,
    format_expires,
    parse_expires,
    sign_envelope,
    signer_key,
)
from signerd.trust.metadata import DEFAULT_EXPIRY, default_expires

EXPIRES = datetime(2036, 11, 28, 16, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("2036-11-28T16:00:00Z", EXPIRES, id="utc-seconds"),
        pytest.param("2036-11-28T16:00:00.5Z", EXPIRES + timedelta(microseconds=500000),
                     id="fraction"),
        pytest.param("2036-11-28T08:00:00.123456789-08:00",
                     EXPIRES + timedelta(microseconds=123456), id="go-nanos-and-offset"),
        pytest.param("2036-11-28T17:30:00+01:30", EXPIRES, id="positive-offset"),
    ],
)
def test_parse_expires_accepts_go_rfc3339(text: str, expected: datetime) -> None:
    assert parse_expires(text) == expected


@pytest.mark.parametrize("text", ["2036-11-28 16:00:00Z", "2036-11-28T16:00:00", "tomorrow"])
def test_parse_expires_rejects_other_formats(text: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_expires(text)


def test_format_expires_is_utc_whole_seconds() -> None:
    local = datetime(2036, 11, 28, 17, 0, 0, 999999, tzinfo=UTC).astimezone(
        datetime.now().astimezone().tzinfo)
    assert format_expires(local) == "2036-11-28T17:00:00Z"


@pytest.mark.parametrize(
    ("role", "days"),
    [("root", 3650), ("targets", 1095), ("targets/releases", 1095), ("snapshot", 1095),
     ("timestamp", 14)],
)
def test_default_expiries_are_notarys(role: str, days: int) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert default_expires(role, now) - now == timedelta(days=days)
    assert DEFAULT_EXPIRY["targets" if "/" in role else role] == timedelta(days=days)


def _key(signer: SoftwareSigner) -> TufKey:
    return signer_key(signer)


def test_root_shape() -> None:
    k = _key(SoftwareSigner.generate())
    roles = {r: RoleKeys([k.key_id]) for r in ("root", "targets", "snapshot", "timestamp")}
    root = Root(version=1, expires=EXPIRES, keys={k.key_id: k}, roles=roles)
    doc = root.to_dict()
    assert doc == {
        "_type": "Root",
        "consistent_snapshot": False,
        "expires": "2036-11-28T16:00:00Z",
        "keys": {k.key_id: {"keytype": "ecdsa",
                            "keyval": {"private": None,
                                       "public": base64.b64encode(k.public).decode()}}},
        "roles": {r: {"keyids": [k.key_id], "threshold": 1}
                  for r in ("root", "targets", "snapshot", "timestamp")},
        "version": 1,
    }
    assert Root.from_dict(doc).to_dict() == doc


def test_targets_shape_with_delegation_and_target() -> None:
    k = _key(SoftwareSigner.generate("ed25519"))
    digest = hashlib.sha256(b"manifest").digest()
    t = Targets(version=3, expires=EXPIRES, targets={"v1.0": FileMeta(8, {"sha256": digest})},
                delegation_keys={k.key_id: k},
                delegations=[DelegatedRole("targets/releases", [k.key_id])])
    doc = t.to_dict()
    assert doc == {
        "_type": "Targets",
        "delegations": {
            "keys": {k.key_id: k.to_dict()},
            "roles": [{"keyids": [k.key_id], "name": "targets/releases", "paths": [""],
                       "threshold": 1}],
        },
        "expires": "2036-11-28T16:00:00Z",
        "targets": {"v1.0": {"hashes": {"sha256": base64.b64encode(digest).decode()},
                             "length": 8}},
        "version": 3,
    }
    assert Targets.from_dict(doc).to_dict() == doc


def test_empty_targets_shape() -> None:
    doc = Targets(version=1, expires=EXPIRES).to_dict()
    assert doc["delegations"] == {"keys": {}, "roles": []}
    assert doc["targets"] == {}


def test_snapshot_and_timestamp_meta_shape() -> None:
    data = b'{"signed":{}}'
    meta = FileMeta.for_bytes(data).to_dict()
    assert meta == {
        "hashes": {"sha256": base64.b64encode(hashlib.sha256(data).digest()).decode(),
                   "sha512": base64.b64encode(hashlib.sha512(data).digest()).decode()},
        "length": len(data),
    }
    snap = Snapshot(version=2, expires=EXPIRES,
                    meta={"root": FileMeta.for_bytes(data), "targets": FileMeta.for_bytes(data)})
    assert snap.to_dict()["_type"] == "Snapshot"
    assert set(snap.to_dict()) == {"_type", "expires", "meta", "version"}
    ts = Timestamp(version=1, expires=EXPIRES, meta={"snapshot": FileMeta.for_bytes(data)})
    assert ts.to_dict()["meta"] == {"snapshot": meta}
    assert Timestamp.from_dict(ts.to_dict()).meta["snapshot"].length == len(data)


def test_unknown_fields_survive_a_round_trip() -> None:
    doc = Targets(version=1, expires=EXPIRES).to_dict()
    doc["x-extension"] = {"kept": True}
    doc["targets"]["t"] = {"hashes": {"sha256": base64.b64encode(b"\x01" * 32).decode()},
                           "length": 1, "custom": {"note": "é"}}
    assert Targets.from_dict(doc).to_dict() == doc


def _valid_root_doc() -> dict[str, Any]:
    k = _key(SoftwareSigner.generate())
    return Root(version=1, expires=EXPIRES, keys={k.key_id: k},
                roles={r: RoleKeys([k.key_id])
                       for r in ("root", "targets", "snapshot", "timestamp")}).to_dict()


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        pytest.param(lambda d: d.update(_type="Targets"), "_type is 'Targets'", id="wrong-type"),
        pytest.param(lambda d: d.update(version=0), "at least 1", id="version-zero"),
        pytest.param(lambda d: d.update(version=True), "must be int", id="version-bool"),
        pytest.param(lambda d: d.update(expires="soon"), "RFC 3339", id="bad-expires"),
        pytest.param(lambda d: d["roles"].pop("timestamp"), "missing timestamp", id="no-role"),
        pytest.param(lambda d: d["roles"]["root"].update(threshold=0), "threshold",
                     id="zero-threshold"),
        pytest.param(lambda d: d["roles"]["root"]["keyids"].append("f" * 64), "not in 'keys'",
                     id="unknown-keyid"),
    ],
)
def test_root_structure_errors(mutate: Any, fragment: str) -> None:
    doc = _valid_root_doc()
    mutate(doc)
    with pytest.raises(VerificationError, match=fragment) as err:
        Root.from_dict(doc)
    assert err.value.file == "root.json"


def test_delegation_must_be_a_direct_child() -> None:
    doc = Targets(version=1, expires=EXPIRES,
                  delegations=[DelegatedRole("targets/a/b", [])]).to_dict()
    with pytest.raises(VerificationError, match="not a child of targets"):
        Targets.from_dict(doc, "targets")
    assert Targets.from_dict(doc, "targets/a").delegations[0].name == "targets/a/b"


SIGNERS = {
    "ecdsa-p256": lambda: SoftwareSigner.generate("ecdsa"),
    "ecdsa-p384": lambda: SoftwareSigner(ec.generate_private_key(ec.SECP384R1())),
    "rsa": lambda: SoftwareSigner.generate("rsa"),
    "ed25519": lambda: SoftwareSigner.generate("ed25519"),
}


@pytest.mark.parametrize("kind", list(SIGNERS))
def test_sign_and_verify_each_key_type(kind: str) -> None:
    signer = SIGNERS[kind]()
    key = _key(signer)
    assert key.key_id == signer.key_id
    env = sign_envelope(Targets(version=1, expires=EXPIRES), {key.key_id: signer})
    assert [s.method for s in env.signatures] == [{"ecdsa-p256": "ecdsa", "ecdsa-p384": "ecdsa",
                                                   "rsa": "rsapss", "ed25519": "eddsa"}[kind]]
    assert env.message() == encode_canonical(env.signed)
    assert env.valid_keyids({key.key_id: key}) == {key.key_id}
    # Verification goes through the file bytes, as a client does.
    parsed = Envelope.from_bytes(env.to_bytes(), "targets")
    assert parsed.valid_keyids({key.key_id: key}) == {key.key_id}
    # Any change to the signed content invalidates it.
    parsed.signed["version"] = 2
    assert parsed.valid_keyids({key.key_id: key}) == set()


def test_ecdsa_signature_is_raw_r_s_over_sha256() -> None:
    signer = SoftwareSigner(ec.generate_private_key(ec.SECP384R1()))
    sig = signer.sign(b"message")
    assert len(sig) == 96
    key = _key(signer)
    assert key.verify("ecdsa", sig, b"message")
    assert not key.verify("ecdsa", sig[:-1], b"message")  # wrong length is refused


def test_rsa_pkcs1v15_method_is_accepted_as_notary_does() -> None:
    signer = SoftwareSigner.generate("rsa")
    assert _key(signer).verify("rsapkcs1v15", signer.sign_pkcs1v15(b"m"), b"m")


def test_small_rsa_keys_are_refused() -> None:
    # Deliberately weak: the point is that notary's verifier refuses it.
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    signer = SoftwareSigner(weak)
    assert not _key(signer).verify("rsapss", signer.sign(b"m"), b"m")


@pytest.mark.parametrize(
    ("case", "valid"),
    [
        pytest.param("good", 1, id="good"),
        pytest.param("wrong-method", 0, id="method-of-other-algorithm"),
        pytest.param("unlisted-key", 0, id="signature-by-unlisted-key"),
        pytest.param("keyid-mismatch", 0, id="listed-id-not-the-keys-id"),
        pytest.param("duplicate", 1, id="same-key-twice-counts-once"),
    ],
)
def test_signature_counting(case: str, valid: int) -> None:
    signer, other = SoftwareSigner.generate(), SoftwareSigner.generate()
    key = _key(signer)
    env = sign_envelope({"_type": "Targets"}, {key.key_id: signer})
    keys = {key.key_id: key}
    if case == "wrong-method":
        env.signatures[0] = type(env.signatures[0])(key.key_id, "eddsa", env.signatures[0].sig)
    elif case == "unlisted-key":
        env = sign_envelope({"_type": "Targets"}, {other.key_id: other})
    elif case == "keyid-mismatch":
        keys = {key.key_id: _key(other)}
    elif case == "duplicate":
        env.signatures.append(env.signatures[0])
    assert len(env.valid_keyids(keys)) == valid
    if valid < 2:
        with pytest.raises(VerificationError, match="2 required"):
            env.check_threshold(keys, 2, "targets")


def test_envelope_file_is_json_notary_can_read() -> None:
    signer = SoftwareSigner.generate()
    env = sign_envelope(Timestamp(version=1, expires=EXPIRES,
                                  meta={"snapshot": FileMeta.for_bytes(b"x")}),
                        {signer.key_id: signer})
    doc = json.loads(env.to_bytes())
    assert list(doc) == ["signed", "signatures"]
    assert list(doc["signatures"][0]) == ["keyid", "method", "sig"]
    assert base64.b64decode(doc["signatures"][0]["sig"]) == env.signatures[0].sig
