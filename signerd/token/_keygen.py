"""Generating one key pair on a token, in layout 2, with its metadata object
(:mod:`signerd.token._layout`).

The writes are ordered so that a process killed at any point leaves
something the sweep (:mod:`signerd.token._sweep`) recognises: first the key
pair (labelled ``signerd:<algorithm>``, so a pair with no metadata is known
as signerd's and as abandoned), then its metadata object, which makes it a
key. Nothing is searched on the way where the profile's IDs are long enough
that no two keys draw the same (:attr:`Profile.id_bytes`)."""

from __future__ import annotations

from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from signerd.errors import ResourceExhausted, Unavailable
from signerd.keys import Algorithm, key_id, tuf_public_bytes
from signerd.token import _layout, _p11
from signerd.token._listing import KeyEntry, material
from signerd.token.profiles import Profile

ID_ATTEMPTS = 8  # tries at a free 2-byte CKA_ID before giving up
CKR_DEVICE_MEMORY = 0x31


class _Collision(Exception):
    """Another process took the CKA_ID of a key being generated."""


def full(e: BaseException, token: str, what: str) -> ResourceExhausted | None:
    """The error for a token that has no room left (CKR_DEVICE_MEMORY: a
    YubiHSM 2 holds 256 objects), or None for any other failure."""
    if isinstance(e, _p11.P11Error | pkcs11.PKCS11Error) and _p11.failure_rv(e) == \
            CKR_DEVICE_MEMORY:
        return ResourceExhausted(
            f"token {token} is full (CKR_DEVICE_MEMORY): {what} needs room for another "
            "object; delete unused keys (signerctl keys delete) or run `signerd sweep --remove`")
    return None


def _free_object_id(module: _p11.Module, s: Any, token: str) -> bytes:
    """A 2-byte CKA_ID that no key on the token has (one search each; a
    YubiHSM lists its at most 256 objects). Raises Unavailable."""
    for _ in range(ID_ATTEMPTS):
        candidate = _layout.new_object_id(2)
        if not module.find_objects(s.handle, {_p11.CKA_ID: candidate}):
            return candidate
    raise Unavailable(f"token {token}: found no free 2-byte CKA_ID; is it full?")


def _templates(profile: Profile, alg: Algorithm, object_id: bytes,
               ed25519_params: bytes) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """The public and private key templates of a new key pair. The private
    key is a sensitive, non-extractable token object that can only sign."""
    label = _layout.key_label(alg).decode()  # python-pkcs11 takes str labels
    # CKA_ID and CKA_LABEL are the same on both halves and set here,
    # never afterwards: a YubiHSM would need a meta object for either.
    pub: dict[Any, Any] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
        Attribute.DERIVE: False,
        Attribute.ID: object_id,
        Attribute.LABEL: label,
    }
    priv: dict[Any, Any] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
        Attribute.ID: object_id,
        Attribute.LABEL: label,
    }
    if profile.ties_sign_to_decrypt:
        # DEFAULT drops the attribute from python-pkcs11's own template too.
        pub[Attribute.ENCRYPT] = priv[Attribute.DECRYPT] = pkcs11.DEFAULT
    if not profile.sets_unwrap:
        priv[Attribute.UNWRAP] = pkcs11.DEFAULT
    if alg.keytype == "rsa":
        pub[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
        pub[Attribute.MODULUS_BITS] = alg.bits
    elif alg.keytype == "ed25519":
        pub[Attribute.EC_PARAMS] = ed25519_params
    else:
        pub[Attribute.EC_PARAMS] = _layout.CURVE_OIDS[alg.curve or ""]
    return pub, priv


def generate_pair(module: _p11.Module, profile: Profile, token: str, s: Any,
                  alg: Algorithm, gun: str, role: str,
                  ed25519_params: bytes, purpose: str) -> KeyEntry | None:
    """Generate one key pair of ``alg`` for ``gun`` and ``role`` (whose
    purpose, ``metadata`` or ``raw``, its metadata records) through session
    ``s``, with its metadata object, under a new random CKA_ID
    (``ed25519_params``: the CKA_EC_PARAMS naming Ed25519 to this token).
    Returns None, with nothing left behind, when another process took the
    same 2-byte CKA_ID meanwhile (try again). Raises ResourceExhausted (the
    token is full), Unavailable, P11Error or python-pkcs11's PKCS11Error."""
    if alg.keytype == "rsa":
        key_type, bits, mech = KeyType.RSA, alg.bits, Mechanism.RSA_PKCS_KEY_PAIR_GEN
    elif alg.keytype == "ed25519":
        key_type, bits, mech = KeyType.EC_EDWARDS, None, Mechanism.EC_EDWARDS_KEY_PAIR_GEN
    else:
        key_type, bits, mech = KeyType.EC, None, Mechanism.EC_KEY_PAIR_GEN
    short = profile.id_bytes <= 2
    # Long IDs need no search: no two keys ever draw the same one.
    object_id = (_free_object_id(module, s, token) if short
                 else _layout.new_object_id(profile.id_bytes))
    pub_tpl, priv_tpl = _templates(profile, alg, object_id, ed25519_params)
    try:
        pub, priv = s.generate_keypair(
            key_type, bits, store=True, mechanism=mech, capabilities=0,
            public_template=pub_tpl, private_template=priv_tpl,
        )
    except (pkcs11.PKCS11Error, _p11.P11Error) as e:
        error = full(e, token, "a new key")
        if error is not None:
            raise error from None
        raise
    made = [priv, pub]
    try:
        attrs = material(module, s.handle, pub.handle, alg)
        spki = _layout.spki(alg, attrs[_p11.CKA_EC_POINT], attrs[_p11.CKA_MODULUS],
                            attrs[_p11.CKA_PUBLIC_EXPONENT])
        kid = key_id(alg.keytype, tuf_public_bytes(alg.keytype, spki))
        meta = _layout.KeyMeta(alg, gun, role, kid, object_id, purpose)
        meta_obj = s.create_object({
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: profile.private_data,
            Attribute.LABEL: _layout.meta_label(kid).decode(),
            Attribute.APPLICATION: _layout.APPLICATION.decode(),
            Attribute.VALUE: _layout.meta_value(meta),
        })
        made.append(meta_obj)
        # With 2-byte IDs another process may have taken the same one
        # meanwhile: then ours is undone and made again with another.
        if short and len(module.find_objects(s.handle, {_p11.CKA_ID: object_id})) != 2:
            raise _Collision()
    except BaseException as e:
        for obj in reversed(made):  # metadata first: a half-undone key is never a key
            try:
                obj.destroy()
            except (pkcs11.PKCS11Error, _p11.P11Error):
                pass  # best effort; what is left is the sweep's
        if isinstance(e, _Collision):
            return None
        error = full(e, token, "a new key's metadata")
        if error is not None:
            raise error from None
        raise
    return KeyEntry(kid, alg, gun, role, token, spki, False, priv.handle, object_id, 2,
                    pub.handle, meta_obj.handle, (), meta, purpose)
