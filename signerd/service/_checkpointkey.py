"""The audit log's checkpoint key (see Transparency in :mod:`signerd.audit`):
an Ed25519 key on a token that signs audit checkpoints and nothing else.

It is a signerd key with gun ``signerd`` and role :data:`CHECKPOINT_ROLE`, a
role no caller can name (not a TUF role), so no CreateKey makes one, and
:class:`~signerd.service.KeyService` hides it from every lookup by ID and
every listing and refuses it in ``sign_with``: every Sign, certify, delete
and GetKey path answers NOT_FOUND for it. Only
:meth:`KeyService.sign_checkpoint` signs with it.

The key is made once, on ``[audit] checkpoint_token`` (default: the first
token), by the first process that needs it: a lock file in the audit
directory keeps a daemon's workers from making two. ``[audit]
checkpoint_key`` names an existing one instead (it must be a checkpoint key).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from signerd.errors import ConfigError, FailedPrecondition, SignerdError, Unavailable
from signerd.keys import ALGORITHMS, KeyID

if TYPE_CHECKING:
    from signerd.audit import CheckpointKey, TlogConfig
    from signerd.service._keyservice import KeyService
    from signerd.token import KeyEntry

CHECKPOINT_GUN: Final = "signerd"
CHECKPOINT_ROLE: Final = "signerd/audit-checkpoint"


SIGN_PATIENCE: Final = 15.0  # seconds a checkpoint signature waits for its token


class NoCheckpointToken(ConfigError):
    """No token can make the checkpoint key (Ed25519): signerd's signed notes
    are Ed25519 only (ECDSA checkpoints, type 0x02, are not implemented)."""


def checkpoint_key(service: KeyService, config: TlogConfig, audit_dir: Path) -> CheckpointKey:
    """The checkpoint key for ``config``, made now if there is none. Raises
    ConfigError (a named key that is missing or not a checkpoint key, a
    token that cannot make Ed25519 keys), Unavailable."""
    from signerd.audit import CheckpointKey
    from signerd.keys import tuf_public_bytes

    entry = _find_or_make(service, config, audit_dir)
    public = tuf_public_bytes("ed25519", entry.spki_der)

    def sign(message: bytes) -> bytes:
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

    return CheckpointKey(public, sign, entry.key_id)


def _candidates(service: KeyService, token: str | None) -> list[KeyEntry]:
    tokens = [service.token(token)] if token else list(service.tokens.values())
    found = []
    for t in tokens:
        t.refresh()
        found += [k for k in t.keys() if k.role == CHECKPOINT_ROLE
                  and k.algorithm.name == "ed25519"]
    return sorted(found, key=lambda k: k.key_id)


def _find_or_make(service: KeyService, config: TlogConfig, audit_dir: Path) -> KeyEntry:
    if config.key_id is not None:
        for t in service.tokens.values():
            entry = t.get(KeyID(config.key_id)) or t.lookup(KeyID(config.key_id))
            if entry is not None:
                if entry.role != CHECKPOINT_ROLE or entry.algorithm.name != "ed25519":
                    raise ConfigError(f"audit.checkpoint_key {config.key_id} is not an audit "
                                      "checkpoint key (one signerd made for checkpoints)")
                return entry
        raise ConfigError(f"audit.checkpoint_key {config.key_id} is on no token")
    lock = os.open(audit_dir / ".checkpoint-key.lock",
                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the workers of one daemon make one key
        found = _candidates(service, config.token)
        if found:
            return found[0]
        if config.token:
            token = service.token(config.token)
        else:  # the first token that offers Ed25519 (tokens list: what it really makes)
            able = [t for t in service.tokens.values() if "ed25519" in t.algorithms]
            if not able:
                raise NoCheckpointToken(
                    "audit checkpoints need an Ed25519 key and no token can make one; set "
                    "[audit] checkpoint_token to a token that can, or checkpoints = false")
            token = able[0]
        try:
            return token.generate(ALGORITHMS["ed25519"], CHECKPOINT_GUN, CHECKPOINT_ROLE)
        except FailedPrecondition as e:
            raise NoCheckpointToken(f"audit checkpoints need an Ed25519 key and {e}; set "
                                    "[audit] checkpoint_token to a token that can, or "
                                    "checkpoints = false") from None
        except SignerdError:
            raise
    finally:
        os.close(lock)
