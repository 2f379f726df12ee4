"""KeyService: keys and signatures across every configured token (no gRPC here)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cryptography import x509

from signerd import certs, metrics, signing
from signerd.config import Config
from signerd.content import ContentGuard, StateUnavailable
from signerd.errors import (
    ConfigError,
    InvalidArgument,
    NoSuchKey,
    ResourceExhausted,
    SignerdError,
    Unavailable,
)
from signerd.keys import (
    METADATA,
    RAW,
    Algorithm,
    KeyID,
    parse_algorithm,
    validate_gun,
    validate_purpose,
    validate_role,
)
from signerd.service._catalog import KeyCatalog
from signerd.service._certificates import Certified, KeyCertificates
from signerd.service._checkpointkey import CHECKPOINT_ROLE
from signerd.service._guard import SigningGuard
from signerd.token import KeyEntry, Token

log = logging.getLogger("signerd.service")
_OPEN_ATTEMPTS = 4  # at start, see KeyService.open
_OPEN_BACKOFF = 0.1  # seconds, times the attempt number


@dataclass(frozen=True)
class Signature:
    """One signature made, and what its audit line records of the checks
    (``audit``: purpose and content outcome, see signerd.service._guard)."""

    key: KeyEntry
    signature: bytes
    method: str
    options: signing.SignOptions
    audit: dict[str, object] = field(default_factory=dict)


class KeyService:
    """Keys and signatures over a set of open tokens; ``guard`` decides what
    each key may sign (its purpose, the content checks) and owns the
    watermark store."""

    def __init__(self, tokens: Iterable[Token], guard: SigningGuard) -> None:
        self.tokens = {t.name: t for t in tokens}
        self.guard = guard
        self.catalog = KeyCatalog(self.tokens)  # lookups and listings
        self._certificates = KeyCertificates(
            self.tokens, self.catalog.refresh,
            lambda entry, data, options: self.sign_with(entry, data, options).signature)

    @classmethod
    def open(cls, config: Config) -> KeyService:
        """Open every configured token, trying a few times.

        SoftHSM 2.6.1 flushes an object file only after unlocking it, so a
        process that initialises the module or logs in while another process
        logs in (every login rewrites the token's own file) can read that file
        empty: the token is then missing, or the login fails with
        CKR_GENERAL_ERROR, until the module is initialised again. Two workers
        starting together do exactly this. Closing every token finalises the
        module, so the next attempt reads the token afresh. A refused PIN is
        a ConfigError and never retried. Then the watermark store
        (``[state]``) is opened, this process's own; StateUnavailable if it
        cannot be.
        """
        for attempt in range(1, _OPEN_ATTEMPTS + 1):
            opened: list[Token] = []
            try:
                for tc in config.tokens:
                    opened.append(Token(tc))
                if config.state is None:
                    raise ConfigError("the config has no [state] (load it with load_config)")
                return cls(opened, SigningGuard(ContentGuard.open(config.content,
                                                                  config.state)))
            except BaseException as e:
                for t in opened:
                    t.close()
                if not isinstance(e, Unavailable) or attempt == _OPEN_ATTEMPTS:
                    raise
                what = ("the state database" if isinstance(e, StateUnavailable)
                        else "the tokens")
                log.warning(f"cannot open {what} yet; trying again",
                            extra={"fields": {"attempt": attempt, "error": str(e)}})
                time.sleep(_OPEN_BACKOFF * attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        for t in self.tokens.values():
            t.close()
        self.guard.close()

    # -- lookups (KeyCatalog) -------------------------------------------------

    def signs_fast(self, key_id: str) -> bool:
        """Whether a signature with key ``key_id`` (lowercase hex) is a short
        computation in this process: the key is known without asking a
        token, its token is healthy, signs in process (Profile) and has a
        session free (a call that would wait for one must not wait on the
        aio engine's event loop), and the algorithm is not RSA (about 1.7 ms
        for RSA-2048 on SoftHSM here, 25 times P-256). Never raises; False
        for anything it cannot tell."""
        entry = self.catalog.lookup(KeyID(key_id)) if len(key_id) == 64 else None
        # A metadata key's signature waits for the watermark store (a disk or network
        # write): never on the loop.
        if entry is None or entry.algorithm.keytype == "rsa" or entry.purpose != RAW:
            return False
        token = self.tokens[entry.token]
        return token.profile.signs_in_process and token.healthy and token.session_idle

    def get_key(self, key_id: str, may_search: Callable[[], bool] | None = None) -> KeyEntry:
        """Key ``key_id`` (hex): see :meth:`KeyCatalog.get_key`."""
        return self.catalog.get_key(key_id, may_search)

    def token(self, name: str) -> Token:
        """The token named ``name``: see :meth:`KeyCatalog.token`."""
        return self.catalog.token(name)

    def token_for_role(self, role: str) -> Token:
        """The token for new ``role`` keys: see :meth:`KeyCatalog.token_for_role`."""
        return self.catalog.token_for_role(role)

    def list_keys(self, gun: str = "", role: str = "", token: str = "", page_size: int = 0,
                  page_token: str = "", readable: Callable[[KeyEntry], bool] = lambda k: True,
                  ) -> tuple[list[KeyEntry], str]:
        """One page of keys and the next page's token: see :meth:`KeyCatalog.list_keys`."""
        return self.catalog.list_keys(gun, role, token, page_size, page_token, readable)

    def find_unused(self, gun: str, role: str, algorithm: Algorithm,
                    purpose: str = METADATA) -> KeyEntry | None:
        """A key that never signed: see :meth:`KeyCatalog.find_unused`."""
        return self.catalog.find_unused(gun, role, algorithm, purpose)

    # -- operations ---------------------------------------------------------

    def create_key(self, gun: str, role: str, algorithm: str = "", token: str = "",
                   purpose: str = METADATA) -> KeyEntry:
        """Generate a key for ``gun`` and ``role`` whose purpose (``metadata`` or
        ``raw``) is fixed from now on. Raises InvalidArgument, NotFound (token),
        FailedPrecondition (algorithm), Unavailable."""
        alg = parse_algorithm(algorithm)
        gun, role = validate_gun(gun), validate_role(role)
        purpose = validate_purpose(purpose)
        tok = self.token(token) if token else self.token_for_role(role)
        return tok.generate(alg, gun, role, purpose)

    def set_purpose(self, entry: KeyEntry, purpose: str) -> KeyEntry:
        """Record a new purpose for key ``entry`` on its token (an operator's
        verb, for keys made before purposes). Raises InvalidArgument, NotFound,
        Unavailable."""
        purpose = validate_purpose(purpose)
        updated = self.tokens[entry.token].set_purpose(entry.key_id, purpose)
        log.info("key purpose set", extra={"fields": {
            "key_id": entry.key_id, "token": entry.token, "purpose": purpose,
            "was": entry.purpose}})
        return updated

    def delete_key(self, key_id: str) -> None:
        entry = self.get_key(key_id)
        self.tokens[entry.token].delete(entry.key_id)
        log.info("key deleted", extra={"fields": {"key_id": entry.key_id, "token": entry.token}})

    def sign(self, key_id: str, payload: bytes, options: signing.SignOptions) -> Signature:
        entry = self.get_key(key_id)
        return self.sign_with(entry, payload, options)

    def sign_with(self, entry: KeyEntry, payload: bytes, options: signing.SignOptions) -> Signature:
        """Sign ``payload`` with key ``entry`` on its token. Every signature
        signerd makes (either API, a certificate's issuer, ``trust --local``)
        passes here, and the key's first one marks it used (see mark_used),
        or is not returned at all.

        The guard decides first (signerd.service._guard): a metadata key's
        payload is checked before the token signs, then checked again and its
        version recorded (one durable transaction) before the signature is
        returned; a signature whose record is refused is dropped.

        Raises InvalidArgument (payload, options; ContentInvalid), NotFound,
        FailedPrecondition (ContentStale), ResourceExhausted, Unavailable
        (StateUnavailable)."""
        if entry.role == CHECKPOINT_ROLE:  # signs audit checkpoints only: sign_checkpoint
            raise NoSuchKey(entry.key_id)
        alg: Algorithm = entry.algorithm
        mechanism, data = signing.prepare(alg, payload, options)
        verdict = self.guard.before(entry, payload, options)
        token = self.tokens[entry.token]
        raw = token.sign(entry.key_id, mechanism, data, alg.signature_size)
        metrics.child(metrics.SIGNATURES, alg.name, entry.token).inc()
        signature, method = signing.encode(alg, raw, options), signing.method(alg, options)
        verdict = self.guard.after(entry, verdict, method, signature)
        if not entry.used:  # a stale entry costs one look at the token's cached one
            self.mark_used(entry)
        return Signature(entry, signature, method, options, verdict.audit)

    def sign_checkpoint(self, entry: KeyEntry, message: bytes) -> bytes:
        """Sign an audit checkpoint note with the checkpoint key ``entry``
        (:mod:`signerd.service._checkpointkey`): the one path that key signs
        through. Returns what the token returns: raw Ed25519, or ``r || s``
        (CKM_ECDSA over the note's SHA-256) for a P-256 key. Raises
        InvalidArgument, Unavailable."""
        if entry.role != CHECKPOINT_ROLE:
            raise InvalidArgument(f"key {entry.key_id} is not an audit checkpoint key")
        mechanism, data = signing.prepare(entry.algorithm, message, signing.SignOptions())
        return self.tokens[entry.token].sign(entry.key_id, mechanism, data,
                                             entry.algorithm.signature_size)

    def mark_used(self, entry: KeyEntry) -> None:
        """Record on the token that key ``entry`` has signed, unless its
        cached entry says so already: Notary's CreateKey no longer hands it
        out, and ``signerctl keys delete`` asks before deleting it.

        Unlike notary-signer (signer/keydbstore/keydbstore.go, which logs
        the failure), a signature whose mark cannot be written is withheld:
        after a restart the key would look unused, and be handed out again
        (issue 22 §4). Raises ResourceExhausted (the token is full),
        Unavailable."""
        try:
            self.tokens[entry.token].mark_used(entry.key_id)
        except SignerdError as e:
            log.warning("signature withheld: could not mark the key used", extra={
                "fields": {"key_id": entry.key_id, "token": entry.token, "error": str(e)}})
            kind = ResourceExhausted if isinstance(e, ResourceExhausted) else Unavailable
            raise kind(f"signature withheld: key {entry.key_id} could not be marked as "
                       f"having signed ({e})") from None


    # -- certificates ---------------------------------------------------------

    def certificate(self, entry: KeyEntry) -> x509.Certificate:
        """Key ``entry``'s X.509 certificate, from its token: see
        :meth:`KeyCertificates.certificate`."""
        return self._certificates.certificate(entry)

    def certificate_chain(self, entry: KeyEntry) -> list[bytes]:
        """Key ``entry``'s certificate chain, DER, leaf first: see
        :meth:`KeyCertificates.certificate_chain`."""
        return self._certificates.certificate_chain(entry)

    def certify(self, subject: KeyEntry, issuer: KeyEntry, subject_name: str,
                days: int = 0, profile: certs.Profile | None = None) -> Certified:
        """Issue and store a certificate for key ``subject``, signed by key
        ``issuer``: see :meth:`KeyCertificates.certify`."""
        return self._certificates.certify(subject, issuer, subject_name, days, profile)


    def healthy(self) -> bool:
        """Whether every token, and the watermark store, answered last."""
        return all(t.healthy for t in self.tokens.values()) and self.guard.state_ok

    def check(self) -> bool:
        """Probe every token (reconnecting where needed) and the watermark
        store; True if all are usable."""
        results = []
        for t in self.tokens.values():
            with metrics.PROBE_DURATION.labels(t.name).time():
                results.append(t.check())
        results.append(self.guard.probe())
        return all(results)

    def unusable(self) -> list[str]:
        """Names of the tokens that cannot sign now, and ``state`` when the
        watermark store does not answer (metadata keys cannot sign then)."""
        down = [t.name for t in self.tokens.values() if not t.healthy]
        return down if self.guard.state_ok else [*down, metrics.STATE_NAME]

    def export_gauges(self) -> None:
        """Set the token gauges of :mod:`signerd.metrics` to what is true now."""
        for t in self.tokens.values():
            metrics.TOKEN_HEALTHY.labels(t.name).set(1 if t.healthy else 0)
            metrics.SESSIONS.labels(t.name).set(t.config.sessions)
            metrics.SESSIONS_IN_USE.labels(t.name).set(t.sessions_in_use)
            counts: dict[str, int] = dict.fromkeys(
                (*metrics.BASE_ROLES, "delegation"), 0)
            for k in t.known_keys():
                counts[metrics.role_kind(k.role)] += 1
            for role, n in counts.items():
                metrics.KEYS.labels(t.name, role).set(n)
