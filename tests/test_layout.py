"""The on-token key layout (signerd.token._layout) and token capabilities (signerd.token.profiles).

CKA_EC_POINT vectors are real public keys made with ``cryptography``, in both
forms modules return them: the bare point and the DER OCTET STRING.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given
from hypothesis import strategies as st

from signerd.config import ConfigError, parse_config
from signerd.keys import ALGORITHMS, KeyID
from signerd.token import _layout
from signerd.token.profiles import (
    CKM_EC_KEY_PAIR_GEN,
    CKM_ECDSA,
    CKM_RSA_PKCS,
    CKM_RSA_PKCS_KEY_PAIR_GEN,
    PROFILES,
    MechanismInfo,
    detect,
    supported_algorithms,
)


def _der_octets(raw: bytes) -> bytes:
    assert len(raw) < 128
    return bytes([0x04, len(raw)]) + raw


def _point(name: str) -> tuple[bytes, bytes]:
    """(raw point, DER SubjectPublicKeyInfo) of a fresh key of algorithm ``name``."""
    if name == "ed25519":
        pub = ed25519.Ed25519PrivateKey.generate().public_key()
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        curve = ec.SECP256R1() if name == "ecdsa-p256" else ec.SECP384R1()
        pub = ec.generate_private_key(curve).public_key()  # type: ignore[assignment]
        raw = pub.public_bytes(serialization.Encoding.X962,
                               serialization.PublicFormat.UncompressedPoint)
    spki = pub.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return raw, spki


@pytest.mark.parametrize("form", ["raw", "der"])
@pytest.mark.parametrize("name,size", [("ecdsa-p256", 65), ("ecdsa-p384", 97), ("ed25519", 32)])
def test_ec_point_in_either_form_gives_the_key(name: str, size: int, form: str) -> None:
    """Regression: a raw point starts with 0x04 like a DER OCTET STRING, and
    was read as one (truncated), so every EC key on such a token was skipped."""
    raw, spki = _point(name)
    value = raw if form == "raw" else _der_octets(raw)
    assert len(value) == size + (2 if form == "der" else 0)
    alg = ALGORITHMS[name]
    assert _layout.ec_point(value, _layout.point_size(alg)) == raw
    assert _layout.spki(alg, value, None, None) == spki


def test_a_raw_p256_point_whose_bytes_look_like_der_is_still_raw() -> None:
    """04 41 04 ...: a bare point whose second byte happens to be 0x41 (65)."""
    raw, spki = _point("ecdsa-p256")
    while raw[1] != 0x41:
        raw, spki = _point("ecdsa-p256")
    assert _layout.spki(ALGORITHMS["ecdsa-p256"], raw, None, None) == spki


@pytest.mark.parametrize("value", [
    b"",
    b"\x04",
    b"\x04\x41" + b"\x04" * 10,  # DER header promising more than there is
    b"\x04\x41" + b"\x04" * 65 + b"\x00",  # trailing byte after the OCTET STRING
    b"\x03\x41" + b"\x04" * 65,  # not an OCTET STRING
    b"\x04\x20" + b"\x01" * 32,  # an OCTET STRING of the wrong size for P-256
    b"\x02" + b"\x01" * 64,  # 65 bytes, but not an uncompressed point
], ids=["empty", "tag-only", "short", "trailing", "bit-string", "wrong-size", "compressed-tag"])
def test_malformed_ec_points_are_refused(value: bytes) -> None:
    with pytest.raises(ValueError):
        _layout.ec_point(value, 65)


@given(st.binary(max_size=200))
def test_any_bytes_as_ec_point_give_a_point_or_value_error(value: bytes) -> None:
    for size in (32, 65, 97):
        try:
            point = _layout.ec_point(value, size)
        except ValueError:
            continue
        assert len(point) == size


def test_layout_2_labels_fit_a_yubihsm() -> None:
    kid = KeyID("ab" * 32)
    labels = [_layout.meta_label(kid), _layout.used_label(kid)]
    labels += [_layout.key_label(a) for a in ALGORITHMS.values()]
    assert max(len(label) for label in labels) <= 40
    assert all(len(_layout.new_object_id()) == 2 for _ in range(100))
    assert b"\x00\x00" not in {_layout.new_object_id() for _ in range(1000)}
    assert _layout.used_prefix(_layout.used_label(kid)) == kid[:_layout.USED_KID_HEX]
    for alg in ALGORITHMS.values():
        assert _layout.parse_key_label(_layout.key_label(alg)) == alg


def test_metadata_round_trips_and_junk_is_not_metadata() -> None:
    meta = _layout.KeyMeta(ALGORITHMS["rsa-3072"], "docker.io/a/b", "targets/releases",
                           KeyID("cd" * 32), b"\x12\x34")
    assert _layout.parse_meta_value(_layout.meta_value(meta)) == meta
    for junk in (None, b"", b"\xff", b"[]", b'{"signerd":1}', b'{"signerd":2,"alg":"rsa-3072"}',
                 _layout.meta_value(meta).replace(b'"id":"1234"', b'"id":"zz"')):
        assert _layout.parse_meta_value(junk) is None
    v1 = _layout.v1_label(ALGORITHMS["ed25519"], "docker.io/a/b", "root", True)
    parsed = _layout.parse_v1_label(v1)
    assert parsed is not None and parsed[1] is True and parsed[0].role == "root"
    assert _layout.parse_v1_label(b'{"signerd":1,"alg":"nope"}') is None


# Mechanisms and key sizes as tpm2-pkcs11 1.9 reports them over swtpm
# (C_GetMechanismList/C_GetMechanismInfo, read off the test suite's TPM).
TPM_MECHANISMS = {
    CKM_RSA_PKCS_KEY_PAIR_GEN: MechanismInfo(1024, 3072, 0x10001),
    CKM_RSA_PKCS: MechanismInfo(1024, 3072, 0x2B01),
    CKM_EC_KEY_PAIR_GEN: MechanismInfo(192, 638, 0x10001),
    CKM_ECDSA: MechanismInfo(192, 638, 0x2801),
}


def test_capabilities_follow_the_mechanism_list() -> None:
    assert supported_algorithms(TPM_MECHANISMS, PROFILES["tpm"]) == (
        "ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072")
    no_rsa_sign = {k: v for k, v in TPM_MECHANISMS.items() if k != CKM_RSA_PKCS}
    assert supported_algorithms(no_rsa_sign, PROFILES["generic"]) == ("ecdsa-p256", "ecdsa-p384")
    # tpm2-pkcs11 signs PSS without listing it
    assert "rsa-2048" in supported_algorithms(no_rsa_sign, PROFILES["tpm"])
    assert supported_algorithms({}, PROFILES["generic"]) == ()


def test_profiles_are_detected_from_the_module_and_the_token_info() -> None:
    assert detect("/usr/lib/softhsm/libsofthsm2.so", "SoftHSM project").name == "softhsm"
    assert detect("/opt/lib/pkcs11/yubihsm_pkcs11.so", "Yubico (www.yubico.com)").name == "yubihsm"
    assert detect("/usr/local/lib/vendor.so", "Yubico (www.yubico.com)").name == "yubihsm"
    # tpm2-pkcs11 over swtpm reports manufacturer "IBM", model "SW   TPM"
    assert detect("/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so", "IBM").name == "tpm"
    assert detect("/usr/lib/acme.so", "Acme").name == "generic"


def test_a_yubihsm_session_budget_is_checked_at_config_load() -> None:
    token = {"name": "root", "module": "/m.so", "uri": "pkcs11:token=r", "pin_env": "P",
             "profile": "yubihsm", "sessions": 6}
    with pytest.raises(ConfigError, match=r"yubihsm tokens allow 16 sessions .* need 18"):
        parse_config({"server": {"workers": 3}, "tokens": [token]}, base=Path("/"))
    assert parse_config({"server": {"workers": 2}, "tokens": [token]},
                        base=Path("/")).tokens[0].processes == 2
    with pytest.raises(ConfigError, match="profile must be one of"):
        parse_config({"tokens": [{**token, "profile": "hsm9000"}]},
                     base=Path("/"))


def test_metadata_keeps_fields_it_does_not_know_and_the_used_mark() -> None:
    """Another version's fields (e.g. a ``purpose``) survive a rewrite: marking
    a key used writes its metadata again."""
    from dataclasses import replace

    raw = (b'{"alg":"ecdsa-p256","gun":"g","id":"0102","kid":"' + b"ab" * 32
           + b'","purpose":{"x":[1,2]},"role":"targets","signerd":2}')
    meta = _layout.parse_meta_value(raw)
    assert meta is not None and not meta.used and meta.extra == (("purpose", {"x": [1, 2]}),)
    used = _layout.parse_meta_value(_layout.meta_value(replace(meta, used=True)))
    assert used == replace(meta, used=True)
    assert _layout.meta_value(meta) == raw  # unchanged when nothing changed
    assert all(len(_layout.new_object_id(16)) == 16 for _ in range(10))
