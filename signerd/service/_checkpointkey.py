"""The audit log's checkpoint key (see Transparency in :mod:`signerd.audit`):
a key on a token that signs audit checkpoints and nothing else.

It is a signerd key with gun ``signerd`` and role :data:`CHECKPOINT_ROLE`, a
role no caller can name (not a TUF role), so no CreateKey makes one, and
:class:`~signerd.service.KeyService` hides it from every lookup by ID and
every listing and refuses it in ``sign_with``: every Sign, certify, delete
and GetKey path answers NOT_FOUND for it. Only
:meth:`KeyService.sign_checkpoint` signs with it.

Its algorithm (c2sp.org/signed-note, Signature types): Ed25519 (type 0x01)
where a token can make it, otherwise ECDSA P-256 (type 0x02, as
github.com/transparency-dev/witness implements it: see
:mod:`signerd.tlog.note`), so that a daemon on a TPM (tpm2-pkcs11 makes no
Ed25519 key) or any token without CKM_EDDSA still keeps checkpoints.
``[audit] checkpoint_algorithm`` chooses one instead. An ECDSA checkpoint
is signed as the token signs any P-256 key here
(:func:`signerd.signing.prepare`): SHA-256 of the note text computed in this
process, then ``C_Sign`` with the mechanism named explicitly, CKM_ECDSA
(PKCS#11 v2.40 §2.3.6: the raw digest in, ``r || s`` out); the ``r || s``
becomes the DER ``ECDSA-Sig-Value`` the note carries through
:func:`signerd.signing.encode` (cryptography's ``encode_dss_signature``).

The key is made once, on ``[audit] checkpoint_token`` (default: the first
token that can make Ed25519 keys, else the first that can make P-256 ones),
by the first process that needs it: a lock file in the audit directory
keeps a daemon's workers from making two. A checkpoint key already on a
token is used before any is made (Ed25519 first, then by key ID), so a key
once chosen stays chosen when tokens are added. ``[audit] checkpoint_key``
names an existing one instead (it must be a checkpoint key).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)

from signerd import signing
from signerd.errors import ConfigError, FailedPrecondition, InvalidArgument, Unavailable
from signerd.keys import ALGORITHMS, KeyID, validate_key_id
from signerd.tlog.note import ECDSA_SHA256, ED25519

if TYPE_CHECKING:
    from signerd.audit import CheckpointKey, TlogConfig
    from signerd.service._keyservice import KeyService
    from signerd.token import KeyEntry, Token

CHECKPOINT_GUN: Final = "signerd"
CHECKPOINT_ROLE: Final = "signerd/audit-checkpoint"


REMEMBERED: Final = ".checkpoint-key"  # in the audit directory: the key ID used last
SIGN_PATIENCE: Final = 15.0  # seconds a checkpoint signature waits for its token
# The checkpoint key's algorithms, best first, and their signed-note types.
NOTE_TYPES: Final = {"ed25519": ED25519, "ecdsa-p256": ECDSA_SHA256}
_DESCRIBED: Final = {"ed25519": "an Ed25519", "ecdsa-p256": "an ECDSA P-256"}


class NoCheckpointToken(ConfigError):
    """No token can make the checkpoint key: neither an Ed25519 nor an ECDSA
    P-256 key (or not the one ``[audit] checkpoint_algorithm`` names)."""


def checkpoint_key(service: KeyService, config: TlogConfig, audit_dir: Path) -> CheckpointKey:
    """The checkpoint key for ``config``, made now if there is none. Raises
    ConfigError (a named key that is missing or not a checkpoint key, or not
    of ``checkpoint_algorithm``), NoCheckpointToken (no token can make one),
    Unavailable."""
    from signerd.audit import CheckpointKey
    from signerd.keys import tuf_public_bytes

    entry = _find_or_make(service, config, audit_dir)
    alg = entry.algorithm
    if alg.name == "ed25519":
        public = tuf_public_bytes("ed25519", entry.spki_der)
    else:  # the SPKI in DER's one form: the note's key ID hashes these bytes
        public = load_der_public_key(entry.spki_der).public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    der = signing.SignOptions(encoding=signing.Encoding.DER)

    def sign(message: bytes) -> bytes:
        # Ed25519: the raw 64 bytes. ECDSA: the token's r || s, as DER.
        return signing.encode(alg, _sign_patiently(message), der)

    def _sign_patiently(message: bytes) -> bytes:
        # A checkpoint waits out a token that is away, up to SIGN_PATIENCE seconds;
        # the health loop's own probe brings it back (probing here as well made
        # reconnects more frequent than the probe's). Seen at a first start with
        # two workers on SoftHSM: the worker that found the key another had just made
        # got CKR_GENERAL_ERROR at its first signature (SoftHSM 2.6.1 shows an object
        # file half-written to other processes), and a start fails on that signature.
        deadline = time.monotonic() + SIGN_PATIENCE
        while True:
            try:
                return service.sign_checkpoint(entry, message)
            except Unavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    return CheckpointKey(public, sign, entry.key_id, NOTE_TYPES[alg.name])


def _tokens(service: KeyService, config: TlogConfig) -> list[Token]:
    """The tokens the checkpoint key may be on: ``checkpoint_token``, else every one.
    Raises NotFound for a checkpoint_token that is not configured."""
    return [service.token(config.token)] if config.token else list(service.tokens.values())


def _algorithms(config: TlogConfig) -> tuple[str, ...]:
    """The algorithms the checkpoint key may have, best first."""
    return (config.algorithm,) if config.algorithm else tuple(NOTE_TYPES)


def _candidates(service: KeyService, config: TlogConfig) -> list[KeyEntry]:
    """Checkpoint keys already made, on ``checkpoint_token`` or any token:
    Ed25519 first, then by key ID (the same order in every worker)."""
    tokens = _tokens(service, config)
    allowed = _algorithms(config)
    found = []
    for t in tokens:
        t.refresh()
        found += [k for k in t.keys() if k.role == CHECKPOINT_ROLE
                  and k.algorithm.name in allowed]
    return sorted(found, key=lambda k: (allowed.index(k.algorithm.name), k.key_id))


def _find_or_make(service: KeyService, config: TlogConfig, audit_dir: Path) -> KeyEntry:
    allowed = _algorithms(config)
    if config.key_id is not None:
        for t in service.tokens.values():
            entry = t.get(KeyID(config.key_id)) or t.lookup(KeyID(config.key_id))
            if entry is not None:
                if entry.role != CHECKPOINT_ROLE or entry.algorithm.name not in NOTE_TYPES:
                    raise ConfigError(f"audit.checkpoint_key {config.key_id} is not an audit "
                                      "checkpoint key (one signerd made for checkpoints)")
                if entry.algorithm.name not in allowed:
                    raise ConfigError(f"audit.checkpoint_key {config.key_id} is an "
                                      f"{entry.algorithm.name} key, not the "
                                      f"audit.checkpoint_algorithm {config.algorithm}")
                return entry
        raise ConfigError(f"audit.checkpoint_key {config.key_id} is on no token")
    lock = os.open(audit_dir / ".checkpoint-key.lock",
                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the workers of one daemon make one key
        entry = _remembered(service, config, audit_dir)
        if entry is None:
            found = _candidates(service, config)
            entry = found[0] if found else _make(service, config, allowed)
            _remember(audit_dir, entry)
        return entry
    finally:
        os.close(lock)


def _remembered(service: KeyService, config: TlogConfig, audit_dir: Path) -> KeyEntry | None:
    """The checkpoint key this audit directory used last (its ID in REMEMBERED), found
    with one search by ID rather than a listing of every key: on a token of 10,000 keys
    the listing takes seconds, and the daemon serves only once the key is found. None if
    there is no record, or its key is gone or no longer allowed (then the key is chosen
    again). The record is only a hint: a record pointing at another checkpoint key
    fails the start-up check against the log's last checkpoint, as a changed key would."""
    try:
        kid = validate_key_id((audit_dir / REMEMBERED).read_text().strip())
    except (OSError, UnicodeDecodeError, InvalidArgument):
        return None
    tokens = _tokens(service, config)
    for t in tokens:
        try:
            entry = t.get(kid) or t.lookup(kid, wait_listing=False)
        except (InvalidArgument, Unavailable):
            return None
        if entry is not None:
            ok = entry.role == CHECKPOINT_ROLE and entry.algorithm.name in _algorithms(config)
            return entry if ok else None
    return None


def _remember(audit_dir: Path, entry: KeyEntry) -> None:
    """Record the chosen checkpoint key's ID for the next start (best effort)."""
    with contextlib.suppress(OSError):  # a torn record is a bad key ID: chosen again
        (audit_dir / REMEMBERED).write_text(entry.key_id + "\n")


def _make(service: KeyService, config: TlogConfig, allowed: tuple[str, ...]) -> KeyEntry:
    """A new checkpoint key: the first algorithm of ``allowed`` that a token
    (``checkpoint_token``, else the first able one) really makes. A token that
    lists Ed25519 but refuses to make it (FailedPrecondition: it then stops
    listing it) falls back to ECDSA P-256. Raises NoCheckpointToken."""
    tokens = _tokens(service, config)
    why: list[str] = []
    for name in allowed:
        for token in tokens:
            if name not in token.algorithms:
                continue
            try:
                return token.generate(ALGORITHMS[name], CHECKPOINT_GUN, CHECKPOINT_ROLE)
            except FailedPrecondition as e:
                why.append(str(e))
    need = " or ".join(_DESCRIBED[a] for a in allowed)
    where = f"token {config.token} cannot" if config.token else "no token can"
    detail = f" ({'; '.join(why)})" if why else ""
    raise NoCheckpointToken(
        f"audit checkpoints need {need} key and {where} make one{detail}; set [audit] "
        "checkpoint_token to a token that can, or checkpoints = false")
