"""A verifier of ECDSA signed notes (c2sp.org/signed-note, type 0x02) written
from the spec and transparency-dev/formats ``note/note_verifier.go`` with
nothing of signerd's: the tests hold signerd's notes to it, so that a fault
shared by signerd's signer and signerd's verifier cannot pass unseen.

vkey ``NAME+HEX8+BASE64(0x02 || SPKI DER)``; key ID ``SHA-256(SPKI DER)[:4]``
(the name is not hashed for this type); a signature line ``— NAME
BASE64(KEYID || DER ECDSA-Sig-Value)`` over ``SHA-256(text)``, where the
text ends at the note's last blank line.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key


class Refused(Exception):
    """The note is not signed by the vkey's key."""


def parse_ecdsa_vkey(vkey: str) -> tuple[str, bytes, ec.EllipticCurvePublicKey, bytes]:
    """(name, key ID, public key, SPKI DER) of a type 0x02 vkey; Refused otherwise."""
    name, kid_hex, b64 = vkey.strip().split("+", 2)
    blob = base64.b64decode(b64, validate=True)
    if blob[0] != 0x02:
        raise Refused(f"type {blob[0]:#04x}, not 0x02")
    spki = blob[1:]
    kid = hashlib.sha256(spki).digest()[:4]
    if kid.hex() != kid_hex:
        raise Refused(f"key ID {kid_hex} is not SHA-256(SPKI)[:4] = {kid.hex()}")
    key = load_der_public_key(spki)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise Refused("not an EC key")
    return name, kid, key, spki


def open_ecdsa_note(note: bytes, vkey: str) -> str:
    """The text of ``note`` if the vkey's key signed it; Refused if no line of that
    name and key ID verifies (a line of both that fails refuses the whole note)."""
    name, kid, key, _ = parse_ecdsa_vkey(vkey)
    whole = note.decode("utf-8")
    cut = whole.rindex("\n\n")
    text, lines = whole[:cut + 1], whole[cut + 2:].splitlines()
    for line in lines:
        dash_name, b64 = line.rsplit(" ", 1)
        if dash_name != "\u2014 " + name:
            continue
        sig = base64.b64decode(b64, validate=True)
        if sig[:4] != kid:
            continue  # another key of the same name: ignored (the spec)
        try:
            key.verify(sig[4:], text.encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise Refused(f"the signature by {name} does not verify") from None
        return text
    raise Refused(f"no signature by {name} with key ID {kid.hex()}")
