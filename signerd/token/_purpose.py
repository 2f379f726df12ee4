"""Setting the purpose of an existing key: a purpose object on the token
(:mod:`signerd.token._layout` says how it sits there and why it is not a
rewrite of the key's metadata object)."""

from __future__ import annotations

from typing import Any

from pkcs11 import Attribute, ObjectClass

from signerd.keys import KeyID
from signerd.token import _layout


def write(s: Any, private: bool, kid: KeyID, purpose: str) -> tuple[int, set[int]]:
    """Through session ``s``: make key ``kid``'s next purpose object, then
    destroy the older ones. The new one is made first, so that a crash
    between the two leaves the highest ``n``, the new purpose, in force.
    ``private`` is the profile's CKA_PRIVATE for data objects. Returns the
    new object's handle and the handles destroyed. Raises python-pkcs11's
    PKCS11Error."""
    label = _layout.purpose_label(kid).decode()
    older = list(s.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label}))
    highest = -1
    for obj in older:
        parsed = _layout.parse_purpose_value(label.encode(), bytes(obj[Attribute.VALUE]))
        if parsed is not None and parsed[0] == kid:
            highest = max(highest, parsed[1])
    made = s.create_object({
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: private,
        Attribute.LABEL: label,
        Attribute.APPLICATION: _layout.APPLICATION.decode(),
        Attribute.VALUE: _layout.purpose_value(kid, purpose, highest + 1),
    })
    for obj in older:
        obj.destroy()
    return made.handle, {obj.handle for obj in older}
