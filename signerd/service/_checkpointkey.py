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

A first start chooses the key after serving has begun, in the background
(:func:`choose_after_serving`): choosing needs the tokens' first listing.
The key is made once, on ``[audit] checkpoint_token`` (default: the first
token that can make Ed25519 keys, else the first that can make P-256 ones),
by the first process that needs it: a lock file in the audit directory
keeps a daemon's workers from making two. A checkpoint key already on a
token is used before any is made (Ed25519 first, then by key ID), so a key
once chosen stays chosen when tokens are added. ``[audit] checkpoint_key``
names an existing one instead (it must be a checkpoint key).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)

from signerd import signing
from signerd.audit._tree import tree_dir, write_atomic
from signerd.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    SignerdError,
    Unavailable,
)
from signerd.keys import ALGORITHMS, Algorithm, KeyID, key_id, tuf_public_bytes, validate_key_id
from signerd.tlog.note import ECDSA_SHA256, ED25519, NoteError, Verifier

if TYPE_CHECKING:
    from signerd.audit import CheckpointKey, TlogConfig
    from signerd.service._keyservice import KeyService
    from signerd.token import KeyEntry, Token

log = logging.getLogger("signerd.audit")

CHECKPOINT_GUN: Final = "signerd"
CHECKPOINT_ROLE: Final = "signerd/audit-checkpoint"


REMEMBERED: Final = ".checkpoint-key"  # in the audit directory: the key used last
SIGN_PATIENCE: Final = 15.0  # seconds a checkpoint signature waits for its token
# The checkpoint key's algorithms, best first, and their signed-note types.
NOTE_TYPES: Final = {"ed25519": ED25519, "ecdsa-p256": ECDSA_SHA256}
_DESCRIBED: Final = {"ed25519": "an Ed25519", "ecdsa-p256": "an ECDSA P-256"}


class NoCheckpointToken(ConfigError):
    """No token can make the checkpoint key: neither an Ed25519 nor an ECDSA
    P-256 key (or not the one ``[audit] checkpoint_algorithm`` names)."""


def checkpoint_key(service: KeyService, config: TlogConfig, audit_file: Path) -> CheckpointKey:
    """The checkpoint key of the audit log ``audit_file`` for ``config``, made
    now if there is none. Raises ConfigError (a named key that is missing or
    not a checkpoint key, or not of ``checkpoint_algorithm``), NoCheckpointToken
    (no token can make one), Unavailable.

    A start whose audit directory recorded the key (:data:`REMEMBERED`, see
    :func:`_trusted_record`) builds it from the record and touches no token:
    on SoftHSM's file store every search passes over every object (about 1 s
    at 10,000 keys), and issue 24 asks a daemon of 10,000 keys to serve
    within 0.5 s of its module's ``C_Initialize``. The key's entry on the
    token is then found in the background, from the first listing
    (:class:`_RecordedKey`), before its first checkpoint."""
    from signerd.audit import CheckpointKey

    audit_dir = audit_file.parent
    record = _trusted_record(service, config, audit_file)
    failure: Callable[[], str | None] = lambda: None  # noqa: E731
    if record is not None:
        recorded = _RecordedKey(service, record, audit_dir,
                                [t.name for t in _tokens(service, config)])
        entry_of: Callable[[], KeyEntry] = recorded
        failure = recorded.failure
        alg, spki, kid = record.algorithm, record.spki_der, record.key_id
    else:
        entry = _find_or_make(service, config, audit_dir)
        alg, spki, kid = entry.algorithm, entry.spki_der, entry.key_id

        def entry_of() -> KeyEntry:
            return entry
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
                return service.sign_checkpoint(entry_of(), message)
            except Unavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    return CheckpointKey(_note_public(alg, spki), sign, kid, NOTE_TYPES[alg.name], failure)


def choose_after_serving(service: KeyService, config: TlogConfig, audit_file: Path) -> bool:
    """Whether the daemon may serve before the checkpoint key of the log
    ``audit_file`` is chosen (see :class:`~signerd.audit.Checkpointer`):
    a first start, whose log has no tree, so nothing to check before
    serving, and whose key is chosen among those on the tokens (no
    ``checkpoint_key``), with no witnesses (they are asked before serving
    whether they hold a larger tree of this log), checkpoints not asked
    for explicitly (``checkpoints`` or ``checkpoint_algorithm``: a start
    that cannot meet them is refused, as before), and a token that can
    make the key, so that choosing fails only as a restart's signing can."""
    if (config.key_id is not None or config.witnesses or config.explicit
            or os.path.lexists(tree_dir(audit_file))):
        return False
    allowed = _algorithms(config)
    return any(a in t.algorithms for t in _tokens(service, config) for a in allowed)


def _note_public(alg: Algorithm, spki_der: bytes) -> bytes:
    """The public key as a signed note's verifier key holds it: Ed25519's raw
    32 bytes, or the SPKI in DER's one form (the note's key ID hashes these bytes)."""
    if alg.name == "ed25519":
        return tuf_public_bytes("ed25519", spki_der)
    return load_der_public_key(spki_der).public_bytes(Encoding.DER,
                                                      PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class _Record:
    """The checkpoint key as :data:`REMEMBERED` records it."""

    key_id: KeyID
    algorithm: Algorithm
    token: str
    spki_der: bytes


def _read_record(audit_dir: Path) -> tuple[KeyID, _Record | None] | None:
    """What :data:`REMEMBERED` says: the key ID, and the whole record when it
    is one (``{"alg","kid","spki","token"}``, written since issue 24; before,
    the key ID alone). None when there is no record or it is unreadable."""
    try:
        text = (audit_dir / REMEMBERED).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        if not text.lstrip().startswith("{"):
            return validate_key_id(text.strip()), None
        doc = json.loads(text)
        kid = validate_key_id(doc["kid"])
        alg, token, spki = ALGORITHMS[doc["alg"]], doc["token"], base64.b64decode(
            doc["spki"], validate=True)
    except (ValueError, KeyError, TypeError, InvalidArgument, RecursionError):
        return None  # json's and base64's errors are ValueErrors; deep nesting recurses
    if not isinstance(token, str):
        return None
    return kid, _Record(kid, alg, token, spki)


def _trusted_record(service: KeyService, config: TlogConfig,
                    audit_file: Path) -> _Record | None:
    """The recorded checkpoint key, if the record can stand in for the token
    until the key's entry is found: it names a key of an allowed algorithm on
    a token it may be on (and ``checkpoint_key``, if that is set), its public
    key hashes to its key ID (so the key found by that ID later is this
    one), and it is the key of the log's published verifier key (the tree's
    ``vkey``): the log has a tree whose checkpoints the key signs. Otherwise
    None: the key is found on the token as before (:func:`_find_or_make`),
    and a record that points at another key is a hint only, as it always
    was."""
    read = _read_record(audit_file.parent)
    record = read[1] if read is not None else None
    if record is None:
        return None
    alg = record.algorithm
    if (alg.name not in _algorithms(config)
            or (config.key_id is not None and config.key_id != record.key_id)
            or record.token not in {t.name for t in _tokens(service, config)}):
        return None
    try:
        public = _note_public(alg, record.spki_der)
        if key_id(alg.keytype, tuf_public_bytes(alg.keytype, record.spki_der)) != record.key_id:
            return None
    except ValueError:
        return None
    try:
        published = Verifier.from_vkey((tree_dir(audit_file) / "vkey").read_text())
    except (OSError, UnicodeDecodeError, NoteError):
        # No tree yet (a first start, or a tree moved aside): nothing holds the record
        # to the log, and a first start lists the keys anyway to choose one.
        return None
    same = (published.sig_type, published.public_key) == (NOTE_TYPES[alg.name], public)
    return record if same else None


class _RecordedKey:
    """The recorded checkpoint key's entry on its token, found once: started
    in the background at once, and awaited by the first checkpoint. It is
    taken from the token's first listing (which reads every key anyway),
    else found by one search for its ID. A key that is not there, or is not
    a checkpoint key, is never signed with: every checkpoint fails, with
    FailedPrecondition, and the daemon is not ready (:meth:`failure`), until
    the record is removed and the daemon restarted (as a start that found
    no such key was refused before the record held the whole key)."""

    def __init__(self, service: KeyService, record: _Record, audit_dir: Path,
                 tokens: list[str]) -> None:
        self._service = service
        self._record = record
        # The record's token first, then the others the key may be on (token names
        # swapped in the config leave the key where it was).
        self._tokens = [record.token] + [t for t in tokens if t != record.token]
        self._where = audit_dir / REMEMBERED
        self._entry: KeyEntry | None = None
        self._failure: str | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._warm, name="checkpoint-key", daemon=True).start()

    def __call__(self) -> KeyEntry:
        """The key's entry. Raises FailedPrecondition, Unavailable."""
        entry = self._entry
        if entry is None:
            with self._lock:
                if self._entry is None:
                    self._entry = self._find()
                entry = self._entry
        return entry

    def _find(self) -> KeyEntry:
        r = self._record
        tokens = self._service.tokens
        entry = _find_key((tokens[n] for n in self._tokens if n in tokens), r.key_id)
        if entry is None or entry.role != CHECKPOINT_ROLE or entry.algorithm != r.algorithm:
            self._failure = (
                f"the audit checkpoint key {r.key_id} that {self._where} names is not a "
                f"checkpoint key on token {', '.join(self._tokens)}; no checkpoint is signed "
                "until it is back. If it is gone for good, the log's tree cannot go on: "
                f"remove {self._where.name} and start a new tree with [audit] reset (the "
                "refused start names the value)")
            raise FailedPrecondition(self._failure)
        self._failure = None
        return entry

    def failure(self) -> str | None:
        """Why the key cannot sign, once a look at the token found it missing."""
        return self._failure

    def _warm(self) -> None:
        try:
            self()
        except FailedPrecondition as e:
            log.error("audit checkpoints will fail", extra={"fields": {"error": str(e)}})
        except SignerdError as e:  # the token is away or closing: the first checkpoint retries
            log.debug("checkpoint key not found yet", extra={"fields": {"error": str(e)}})


def _find_key(tokens: Iterable[Token], kid: KeyID, wait_listing: bool = True) -> KeyEntry | None:
    """Key ``kid`` on the first of ``tokens`` that holds it: from its index,
    else by one search for its ID (:meth:`Token.lookup`, after the first
    listing unless ``wait_listing`` is False). Raises Unavailable,
    InvalidArgument."""
    for t in tokens:
        entry = t.get(kid) or t.lookup(kid, wait_listing)
        if entry is not None:
            return entry
    return None


def _tokens(service: KeyService, config: TlogConfig) -> list[Token]:
    """The tokens the checkpoint key may be on: ``checkpoint_token``, else every one.
    Raises NotFound for a checkpoint_token that is not configured."""
    return [service.token(config.token)] if config.token else list(service.tokens.values())


def _algorithms(config: TlogConfig) -> tuple[str, ...]:
    """The algorithms the checkpoint key may have, best first."""
    return (config.algorithm,) if config.algorithm else tuple(NOTE_TYPES)


def _candidates(service: KeyService, config: TlogConfig) -> list[KeyEntry]:
    """Checkpoint keys already made, on ``checkpoint_token`` or any token:
    Ed25519 first, then by key ID (the same order in every worker). Taken
    from each token's first listing (a second listing beside it doubled a
    first start's wait at 10,000 keys); a key another worker made since is
    found through the record it wrote first (:func:`_remembered`)."""
    tokens = _tokens(service, config)
    allowed = _algorithms(config)
    found = []
    for t in tokens:
        keys = t.keys()
        if not t.listed:  # the first listing failed: list now (Unavailable if it cannot)
            t.refresh()
            keys = t.keys()
        found += [k for k in keys if k.role == CHECKPOINT_ROLE
                  and k.algorithm.name in allowed]
    return sorted(found, key=lambda k: (allowed.index(k.algorithm.name), k.key_id))


def _find_or_make(service: KeyService, config: TlogConfig, audit_dir: Path) -> KeyEntry:
    allowed = _algorithms(config)
    if config.key_id is not None:
        entry = _find_key(service.tokens.values(), KeyID(config.key_id))
        if entry is None:
            raise ConfigError(f"audit.checkpoint_key {config.key_id} is on no token")
        if entry.role != CHECKPOINT_ROLE or entry.algorithm.name not in NOTE_TYPES:
            raise ConfigError(f"audit.checkpoint_key {config.key_id} is not an audit "
                              "checkpoint key (one signerd made for checkpoints)")
        if entry.algorithm.name not in allowed:
            raise ConfigError(f"audit.checkpoint_key {config.key_id} is an "
                              f"{entry.algorithm.name} key, not the "
                              f"audit.checkpoint_algorithm {config.algorithm}")
        return entry
    lock = os.open(audit_dir / ".checkpoint-key.lock",
                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the workers of one daemon make one key
        entry = _remembered(service, config, audit_dir)
        if entry is None:
            found = _candidates(service, config)
            entry = found[0] if found else _make(service, config, allowed)
        _remember(audit_dir, entry)  # the whole record, also where it held only the ID
        return entry
    finally:
        os.close(lock)


def _remembered(service: KeyService, config: TlogConfig, audit_dir: Path) -> KeyEntry | None:
    """The checkpoint key this audit directory used last (its ID in REMEMBERED), found
    with one search by ID rather than a listing of every key: on a token of 10,000 keys
    the listing takes seconds. None if there is no record, or its key is gone or no
    longer allowed (then the key is chosen again). The record is only a hint: a record
    pointing at another checkpoint key fails the start-up check against the log's last
    checkpoint, as a changed key would."""
    read = _read_record(audit_dir)
    if read is None:
        return None
    try:
        entry = _find_key(_tokens(service, config), read[0], wait_listing=False)
    except (InvalidArgument, Unavailable):
        return None
    ok = (entry is not None and entry.role == CHECKPOINT_ROLE
          and entry.algorithm.name in _algorithms(config))
    return entry if ok else None


def _remember(audit_dir: Path, entry: KeyEntry) -> None:
    """Record the chosen checkpoint key for the next start (best effort; see
    :func:`_trusted_record`)."""
    doc = {"alg": entry.algorithm.name, "kid": entry.key_id, "token": entry.token,
           "spki": base64.b64encode(entry.spki_der).decode()}
    text = json.dumps(doc, sort_keys=True) + "\n"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if (audit_dir / REMEMBERED).read_text() == text:
            return
    with contextlib.suppress(OSError):  # a record that is not written is chosen again
        write_atomic(audit_dir / REMEMBERED, text.encode())  # never through a symlink


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
