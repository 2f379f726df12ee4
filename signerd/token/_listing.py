"""Reading signerd's keys off a token: :class:`KeyEntry` and :func:`read_keys`.

How keys and their metadata sit on the token is :mod:`signerd.token._layout`'s
business; this module makes the searches and attribute reads, in either
layout, and believes a result only if the token still answers afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from signerd.keys import METADATA, Algorithm, KeyID, key_id, purpose_by_rule, tuf_public_bytes
from signerd.token import _layout, _p11
from signerd.token.profiles import Profile

log = logging.getLogger("signerd.token")

# Attributes holding a public key, with the buffer sizes to try first.
_EC_MATERIAL = {_p11.CKA_EC_POINT: 128}
_RSA_MATERIAL = {_p11.CKA_MODULUS: 512, _p11.CKA_PUBLIC_EXPONENT: 8}


@dataclass(frozen=True)
class KeyEntry:
    """A key pair on a token, as the daemon knows it.

    ``spki_der`` is the DER SubjectPublicKeyInfo; ``handle`` the private key's
    object handle, valid in every session of the process; ``object_id`` its
    CKA_ID (2 or 16 bytes in layout 2, the 32-byte key ID in layout 1).
    ``public_handle`` and ``meta_handle`` are the public key's and the
    metadata object's handles, and ``marks`` those of the key's other
    objects (a legacy "has signed" object, a second metadata object left by
    a crash), so that the key is marked used and deleted with no search
    (0 and () where unknown). ``meta`` is its layout 2 metadata as read.
    ``purpose``: ``metadata`` or ``raw`` (see :mod:`signerd.token._layout`:
    a purpose object, else the metadata's field, else
    :func:`signerd.keys.purpose_by_rule`)."""

    key_id: KeyID
    algorithm: Algorithm
    gun: str
    role: str
    token: str
    spki_der: bytes
    used: bool
    handle: int
    object_id: bytes = b""
    layout: int = 2
    public_handle: int = 0
    meta_handle: int = 0
    marks: tuple[int, ...] = ()
    meta: _layout.KeyMeta | None = None
    purpose: str = METADATA

    @property
    def tuf_public(self) -> bytes:
        return tuf_public_bytes(self.algorithm.keytype, self.spki_der)


def read_keys(module: _p11.Module, profile: Profile, token: str, s: Any,
              answers: Callable[[Any], bool], only: KeyID | None = None) -> dict[KeyID, KeyEntry]:
    """Read signerd's keys on token ``token`` through session ``s``, in either
    layout (:mod:`signerd.token._layout`): every key, or only key ``only``.

    One pass over the private keys (handles, CKA_ID, CKA_LABEL), one over
    the data objects (metadata), one over the public keys (key material),
    through the ctypes calls of :mod:`signerd.token._p11`, with one
    C_GetAttributeValue per object: with SoftHSM's file store each call
    costs about 70 µs whatever it reads, and python-pkcs11's
    ``get_objects`` makes several calls per object. A result is believed
    only if the token still answers afterwards (``answers(s)``): a token
    that went away answers searches with nothing (SoftHSM does), which is
    not "no keys".

    Raises P11Error."""
    m, h = module, s.handle
    if not m.logged_in(h):
        # Logged out behind our back, the search would find no private
        # key and the daemon would forget every key: log in again first.
        raise _p11.P11Error("C_GetSessionInfo", _p11.CKR_USER_NOT_LOGGED_IN)
    data_class = {_p11.CKA_CLASS: _p11.ulong(_p11.CKO_DATA)}
    read_data = m.attribute_reader({_p11.CKA_LABEL: 40, _p11.CKA_VALUE: 512}).read
    metas: dict[KeyID, list[tuple[int, _layout.KeyMeta]]] = {}
    used: dict[str, list[int]] = {}
    purposes: dict[KeyID, tuple[int, str]] = {}  # key ID -> (n, purpose) of its purpose object
    purpose_objects: dict[KeyID, list[int]] = {}  # key ID -> handles of its purpose objects

    def read_data_objects(template: dict[int, bytes]) -> None:
        for handle in m.find_objects(h, {**data_class, **template}):
            attrs = read_data(h, handle)
            prefix = _layout.used_prefix(attrs[_p11.CKA_LABEL])
            meta = _layout.parse_meta_value(attrs[_p11.CKA_VALUE])
            purpose = _layout.parse_purpose_value(attrs[_p11.CKA_LABEL], attrs[_p11.CKA_VALUE])
            if prefix is not None:
                used.setdefault(prefix, []).append(handle)
            elif purpose is not None:
                purpose_objects.setdefault(purpose[0], []).append(handle)
                if purpose[1] >= purposes.get(purpose[0], (-1, ""))[0]:
                    purposes[purpose[0]] = purpose[1:]
            elif meta is not None and meta.key_id is not None:
                metas.setdefault(meta.key_id, []).append((handle, meta))

    if only is None:
        scopes: list[dict[int, bytes]] = [{}]
        read_data_objects({})
    else:
        # Layout 2 keys are found through their metadata object's label;
        # a key without one can only be a layout 1 key, whose CKA_ID is
        # the key ID. Every search scans the token (SoftHSM's file store:
        # about 35 µs an object), so only the searches one layout needs run.
        read_data_objects({_p11.CKA_LABEL: _layout.meta_label(only)})
        read_data_objects({_p11.CKA_LABEL: _layout.purpose_label(only)})
        if metas:
            read_data_objects({_p11.CKA_LABEL: _layout.used_label(only)})
            ids = [meta.object_id for found in metas.values() for _, meta in found]
        else:
            ids = [bytes.fromhex(only)]
        scopes = [{_p11.CKA_ID: i} for i in ids if i]
    privates: dict[bytes, tuple[int, bytes | None]] = {}
    publics: dict[bytes, tuple[int, dict[int, bytes | None]]] = {}
    read_priv = m.attribute_reader({_p11.CKA_ID: 32, _p11.CKA_LABEL: 128}).read
    # Ask every public key for EC and RSA material at once: the attributes
    # a key does not have come back as None, and a second call would cost
    # more than the unused attributes.
    read_pub = m.attribute_reader({_p11.CKA_ID: 32, **_EC_MATERIAL, **_RSA_MATERIAL}).read
    read_id = m.attribute_reader({_p11.CKA_ID: 32}).read
    for scope in scopes:
        for handle in m.find_objects(h, {_p11.CKA_CLASS: _p11.ulong(_p11.CKO_PRIVATE_KEY),
                                         **scope}):
            attrs = read_priv(h, handle)
            if attrs[_p11.CKA_ID]:
                privates[attrs[_p11.CKA_ID] or b""] = (handle, attrs[_p11.CKA_LABEL])
    for scope in scopes:
        for handle in m.find_objects(h, {_p11.CKA_CLASS: _p11.ulong(_p11.CKO_PUBLIC_KEY),
                                         **scope}):
            if profile.reads_mixed_attributes:
                pub = read_pub(h, handle)
            else:  # one call for the CKA_ID, one for the key's own material
                pub = read_id(h, handle)
                found = privates.get(pub[_p11.CKA_ID] or b"")
                alg = _layout.algorithm_of(pub[_p11.CKA_ID] or b"", found[1]) \
                    if found else None
                if alg is None:
                    continue
                pub.update(material(m, h, handle, alg))
            if pub[_p11.CKA_ID] in privates:
                publics[pub[_p11.CKA_ID] or b""] = (handle, pub)
    if not answers(s):
        raise _p11.P11Error("C_GetTokenInfo", _p11.CKR_DEVICE_REMOVED)
    keys: dict[KeyID, KeyEntry] = {}
    for object_id, (private, label) in privates.items():
        entry = _entry(token, object_id, private, label, publics.get(object_id), metas, used)
        if entry is not None and (only is None or entry.key_id == only):
            entry = _with_purpose(entry, purposes.get(entry.key_id))
            extra = tuple(purpose_objects.get(entry.key_id, ()))
            keys[entry.key_id] = replace(entry, marks=entry.marks + extra) if extra else entry
    return keys


def _with_purpose(entry: KeyEntry, override: tuple[int, str] | None) -> KeyEntry:
    """``entry`` with its purpose: the purpose object's, else the metadata's, else the rule's."""
    meta = entry.meta
    purpose = (override[1] if override is not None
               else meta.purpose if meta is not None and meta.purpose
               else purpose_by_rule(entry.role))
    return entry if purpose == entry.purpose else replace(entry, purpose=purpose)


def material(module: _p11.Module, session: int, handle: int,
             alg: Algorithm) -> dict[int, bytes | None]:
    """A public key object's key material, by its algorithm: CKA_EC_POINT,
    or CKA_MODULUS and CKA_PUBLIC_EXPONENT; the others as None. ``session``
    is a session handle. Raises P11Error."""
    wanted = _RSA_MATERIAL if alg.keytype == "rsa" else _EC_MATERIAL
    got = module.get_attributes(session, handle, wanted)
    return {t: got.get(t) for t in (*_EC_MATERIAL, *_RSA_MATERIAL)}


def _entry(token: str, object_id: bytes, private: int, label: bytes | None,
           public: tuple[int, dict[int, bytes | None]] | None,
           metas: dict[KeyID, list[tuple[int, _layout.KeyMeta]]],
           used: dict[str, list[int]]) -> KeyEntry | None:
    """The KeyEntry of one key pair read off the token, or None when it
    is not a well-formed signerd key (with a warning if it claims to be)."""
    v1 = _layout.parse_v1_label(label) if len(object_id) == 32 else None
    alg = v1[0].algorithm if v1 is not None else _layout.parse_key_label(label)
    if alg is None or public is None:
        return None  # not signerd's, or half a key pair
    public_handle, pub = public
    try:
        spki = _layout.spki(alg, pub[_p11.CKA_EC_POINT], pub[_p11.CKA_MODULUS],
                            pub[_p11.CKA_PUBLIC_EXPONENT])
        kid = key_id(alg.keytype, tuf_public_bytes(alg.keytype, spki))
    except ValueError as e:
        log.warning("skipping a key whose public key cannot be read", extra={"fields": {
            "token": token, "cka_id": object_id.hex(), "error": str(e)}})
        return None
    if v1 is not None:
        if bytes.fromhex(kid) == object_id:
            meta = v1[0]
            return KeyEntry(kid, alg, meta.gun, meta.role, token, spki, v1[1],
                            private, object_id, 1, public_handle)
    else:
        mine = [(handle, meta) for handle, meta in metas.get(kid, ())
                if meta.object_id == object_id and meta.algorithm == alg]
        if mine:
            # Several metadata objects: a crash while the key was marked used.
            # The one that says "used" wins; the others are the key's too.
            mine.sort(key=lambda found: not found[1].used)
            (meta_handle, meta), rest = mine[0], mine[1:]
            legacy = used.get(kid[:_layout.USED_KID_HEX], [])
            return KeyEntry(kid, alg, meta.gun, meta.role, token, spki,
                            meta.used or bool(legacy), private, object_id, 2, public_handle,
                            meta_handle, tuple(h for h, _ in rest) + tuple(legacy), meta)
        if kid not in metas:
            return None  # generation under way in another process, or abandoned
    log.warning("skipping a key whose public key does not match its metadata",
                extra={"fields": {"token": token, "cka_id": object_id.hex()}})
    return None
