"""What a key may sign: its purpose, then, for a metadata key, the content checks.

Every signature signerd makes passes :meth:`SigningGuard.before` first and
:meth:`SigningGuard.after` once made, before it is returned (from
:meth:`KeyService.sign_with`, the one signing path of both APIs, SignBatch and SignStream
items, the python-tuf adapter through Sign, a certificate's issuer and ``signerctl trust
--local``). The rules:

- A **metadata** key signs only TUF/Notary metadata of its own role: ``before`` runs
  :meth:`signerd.content.ContentGuard.check` (role, canonical form, expiry, rollback,
  freeze, delegation paths) against the recorded state, so a payload the checks refuse is
  not signed; ``after`` runs :meth:`signerd.content.ContentGuard.record`, the
  compare-and-set that checks again under the GUN's lock and records the version (and a
  Notary file's hash) in one durable transaction. If that refuses (another replica or
  worker recorded a higher version in between) or fails, the signature is dropped and the
  refusal raised: no signature is returned whose version is not recorded.
  A digest is refused: there is nothing to check. The one exception: a **root** key
  signs the TBSCertificate of its own root certificate (``trust/x509.py``, Notary's
  ``ecdsa-x509``/``rsa-x509`` root keys), when that TBSCertificate certifies the key
  itself, is self-issued and names the key's GUN as its only subject CN. Certifying
  another key is a raw key's job.
- A **raw** key signs opaque messages and digests (cosign, Notation, certificates of
  other keys), but never a payload that is a TUF or Notary ``signed`` object: what a key
  is not for, it does not sign, whichever way round.

With ``[content] enabled = false`` for a GUN, its metadata keys sign any payload as
before (nothing is parsed or recorded); the raw-key rule still holds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from asn1crypto import x509 as asn1x509

from signerd import metrics, signing
from signerd.content import Checked, ContentGuard, ContentInvalid, Outcome, StateUnavailable
from signerd.content._parse import NOTARY_TYPES, TUF_TYPES
from signerd.errors import quoted
from signerd.keys import RAW
from signerd.token import KeyEntry
from signerd.trust.metadata import Signature

log = logging.getLogger("signerd.service")
_CERTIFICATE = Outcome(checked=False, type="certificate")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Verdict:
    """What :meth:`SigningGuard.before` decided for one payload: the content outcome
    (None for a raw key), the fields the audit line records and, for a checked payload,
    what :meth:`SigningGuard.after` must record before the signature is returned."""

    outcome: Outcome | None
    audit: dict[str, object]
    pending: Checked | None = None


def is_metadata(payload: bytes) -> bool:
    """Whether ``payload`` is a JSON object whose ``_type`` names a TUF or Notary role.

    Cheap for what is not JSON: only a payload that starts with ``{`` and holds
    ``"_type"`` is parsed.
    """
    if not payload.lstrip()[:1] == b"{" or b'"_type"' not in payload.lower():
        return False
    try:  # as leniently as the content checks parse (TUF's canonical form leaves
        # control characters such as a PEM key's newlines unescaped inside strings)
        value = json.loads(payload, strict=False)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    if not isinstance(value, dict):
        return False
    # Any spelling Go's encoding/json reads as "_type" ("_TYPE", "_Type"...) counts: notary
    # and go-tuf clients match keys without regard to case (signerd.content._parse).
    kinds = [v for k, v in value.items() if k.casefold() == "_type"]
    return any(isinstance(kind, str) and (kind in NOTARY_TYPES or kind in TUF_TYPES)
               for kind in kinds)


def _tbs_certificate(payload: bytes) -> asn1x509.TbsCertificate | None:
    """``payload`` as a DER TBSCertificate, or None if it is not one."""
    if payload[:1] != b"\x30":
        return None
    try:
        tbs = asn1x509.TbsCertificate.load(payload, strict=True)
        tbs.native  # noqa: B018 - asn1crypto parses lazily: force every field now
    except (ValueError, TypeError, KeyError):
        return None
    return tbs


def _common_names(name: asn1x509.Name) -> list[str]:
    return [str(v) for k, v in name.native.items() if k == "common_name"] \
        if isinstance(name.native, dict) else []


def check_root_certificate(entry: KeyEntry, tbs: asn1x509.TbsCertificate,
                           payload: bytes) -> None:
    """Raise ContentInvalid('certificate') unless metadata key ``entry`` may sign ``tbs``
    (parsed from ``payload``): a root key's own, self-issued certificate whose subject CN
    is exactly its GUN, in DER, with no extension but a signing leaf's (_ROOT_EXTENSIONS)."""
    def refuse(why: str) -> ContentInvalid:
        return ContentInvalid("certificate", f"a metadata key signs only its own root "
                                             f"certificate: {why}")

    if entry.role != "root":
        raise refuse(f"key {entry.key_id} is a {quoted(entry.role)} key, not a root key")
    if tbs["subject_public_key_info"].dump() != entry.spki_der:
        raise refuse("the TBSCertificate certifies another key (certify keys with a raw key)")
    if tbs["issuer"].dump() != tbs["subject"].dump():
        raise refuse("issuer and subject differ")
    cns = _common_names(tbs["subject"])
    if cns != [entry.gun]:
        raise refuse(f"its subject CN must be the GUN {quoted(entry.gun)}")
    if tbs.dump(force=True) != payload:
        raise refuse("the TBSCertificate is not in DER")
    for ext in tbs["extensions"] or []:
        name = ext["extn_id"].native
        allowed = _ROOT_EXTENSIONS.get(name)
        if allowed is None or not allowed(ext["extn_value"].parsed.native):
            raise refuse(f"a root certificate (a signing leaf) does not carry "
                         f"{str(name)[:64]} as asked")


# The extensions of a root certificate as Notary and signerd make them (notary
# tuf/utils/x509.go NewCertificate; signerd.trust.x509): a leaf, for signing only. Nothing
# else is signed, above all no CA certificate and no names that could pass for a TLS
# identity.
_ROOT_EXTENSIONS: dict[str, Callable[[Any], bool]] = {
    "key_usage": lambda v: set(v) <= {"digital_signature", "key_encipherment"},
    "extended_key_usage": lambda v: set(v) <= {"code_signing"},
    "basic_constraints": lambda v: not v.get("ca") and v.get("path_len_constraint") is None,
    "key_identifier": lambda v: True,
    "authority_key_identifier": lambda v: True,
}


class SigningGuard:
    """The purpose rules and content checks around every signature (see the module).

    ``content`` is the opened ContentGuard (its store is this process's own); the
    guard keeps whether that store answered last (:attr:`state_ok`), for readiness.
    """

    def __init__(self, content: ContentGuard) -> None:
        self.content = content
        self.state_ok = True
        kind = "postgresql" if type(content.store).__name__.startswith("Postgres") else "sqlite"
        self._gauge = metrics.STATE_HEALTHY.labels(kind)
        self._gauge.set(1)

    def before(self, entry: KeyEntry, payload: bytes, options: signing.SignOptions) -> Verdict:
        """Decide whether ``entry`` may sign ``payload``; for a metadata key, check it
        against the recorded state (recording nothing). Raises ContentInvalid
        (INVALID_ARGUMENT), ContentStale (FAILED_PRECONDITION) or StateUnavailable
        (UNAVAILABLE), each naming its check."""
        if entry.purpose == RAW:
            if not options.prehashed and is_metadata(payload):
                raise ContentInvalid(
                    "purpose", f"key {entry.key_id} is a raw key: it does not sign TUF or "
                               "Notary metadata (sign that with a metadata key of the role)")
            return Verdict(None, {"purpose": RAW})
        if options.prehashed:
            try:
                self.content.refuse_digest(entry.gun, entry.role)
            except ContentInvalid as e:
                raise ContentInvalid(e.check, f"{e}; key {entry.key_id} is a metadata key "
                                              "(a key for digests is a raw key)") from None
            return Verdict(Outcome(checked=False), {"purpose": "metadata",
                                                    "content": {"checked": False}})
        tbs = _tbs_certificate(payload)
        if tbs is not None and self.content.applies(entry.gun):
            check_root_certificate(entry, tbs, payload)
            return Verdict(_CERTIFICATE, {"purpose": "metadata",
                                          "content": {"type": "certificate"}})
        checked = self._store_call(self.content.check, entry.gun, entry.role, payload)
        if checked is None:  # [content] enabled = false for the GUN
            return Verdict(Outcome(checked=False), {"purpose": "metadata",
                                                    "content": {"checked": False}})
        return Verdict(None, {}, checked)

    def after(self, entry: KeyEntry, verdict: Verdict, method: str,
              signature: bytes) -> Verdict:
        """Once signed, before the signature is returned: for a checked payload, check it
        again and record its version (and a Notary file's hash) in one transaction, and
        return the final verdict (its outcome and audit fields). Raises as
        :meth:`before` does; the signature must then be dropped."""
        if verdict.pending is None:
            return verdict
        outcome = self._store_call(self.content.record, verdict.pending,
                                   Signature(entry.key_id, method, signature))
        return Verdict(outcome, {"purpose": "metadata", "content": audit_fields(outcome)})

    def _store_call(self, call: Callable[..., _T], *args: object) -> _T:
        """``call(*args)``, keeping :attr:`state_ok` to whether the store answered."""
        try:
            result = call(*args)
        except StateUnavailable:
            self._state(False)
            raise
        self._state(True)
        return result

    def probe(self) -> bool:
        """Ask the store for something (the health loop); whether it answered."""
        try:
            self.content.versions("")
        except StateUnavailable as e:
            if self.state_ok:
                log.error("the state database is unavailable: metadata keys cannot sign",
                          extra={"fields": {"error": str(e)}})
            self._state(False)
            return False
        self._state(True)
        return True

    def _state(self, ok: bool) -> None:
        self.state_ok = ok
        self._gauge.set(1 if ok else 0)

    def close(self) -> None:
        """Close the store."""
        self.content.close()


def audit_fields(outcome: Outcome) -> dict[str, object]:
    """What an audit line records of a content check that passed."""
    if not outcome.checked:
        return {"checked": False}
    fields: dict[str, object] = {
        "type": outcome.type, "version": outcome.version,
        "previous_version": outcome.previous_version,
        "same_version_changed": outcome.same_version_changed,
    }
    if outcome.unchecked:
        fields["unchecked"] = list(outcome.unchecked)
    return fields
