"""Content-aware signing: check TUF/Notary metadata before a metadata key signs it.

parse (``_parse``) → decide (``_checks``, pure) → record (``_store``: SQLite or PostgreSQL,
one compare-and-set). The signing paths call one object::

    guard = ContentGuard.open(parse_content(data.get("content")),
                              parse_state(data.get("state"), base))
    checked = guard.check(entry.gun, entry.role, payload)    # before signing; records nothing
    signature = sign(...)
    outcome = guard.record(checked, Signature(key_id, method, signature))  # before returning it

``check`` parses once and decides against what the store holds (read without its lock), so
a payload the checks refuse is not signed. ``record`` decides again under the GUN's lock and
records the version, and for a Notary payload the hash of the file the signature makes (the
freeze check's map), in one transaction: one durable commit per signature. A signature whose
``record`` raises is never returned (a replica recorded a higher version meanwhile).

Both raise ContentInvalid (INVALID_ARGUMENT), ContentStale (FAILED_PRECONDITION) or
StateUnavailable (UNAVAILABLE); a digest-only request for a key whose GUN is checked goes to
``refuse_digest`` instead. ``check_and_record`` is ``record`` without a signature.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from signerd.content._checks import Previous, Update, decide
from signerd.content._config import (
    ContentConfig,
    GunOverride,
    Limits,
    StateConfig,
    parse_content,
    parse_state,
)
from signerd.content._errors import ContentInvalid, ContentStale, StateUnavailable
from signerd.content._parse import Format, Parsed, parse_payload
from signerd.content._store import RoleState, WatermarkStore
from signerd.errors import quoted
from signerd.trust.metadata import Signature, file_bytes

__all__ = [
    "Checked", "ContentConfig", "ContentGuard", "ContentInvalid", "ContentStale", "Format",
    "GunOverride", "Limits", "Outcome", "RoleState", "StateConfig", "StateUnavailable",
    "WatermarkStore", "open_store", "parse_content", "parse_state",
]


@dataclass(frozen=True)
class Outcome:
    """What the checks decided about one payload, for the audit log.

    ``checked`` is False when ``[content]`` disables the checks for the GUN (nothing was
    parsed or recorded). ``same_version_changed``: the version equals the one already
    signed but the content differs (allowed; worth auditing). ``unchecked`` names checks
    that had nothing to compare with (``freeze:targets`` for a Notary meta hash signerd
    never saw signed; ``delegation`` when signerd did not sign the parent).
    """

    checked: bool
    format: Format | None = None
    type: str = ""
    version: int = 0
    previous_version: int | None = None
    same_version_changed: bool = False
    unchecked: tuple[str, ...] = ()
    digest: str = ""


def open_store(state: StateConfig, timeout: float | None = None) -> WatermarkStore:
    """The store ``[state] url`` names (SQLite file or PostgreSQL); raises StateUnavailable.
    ``timeout``: seconds PostgreSQL's pool waits for a connection (None: its default,
    :data:`signerd.content._postgres.POOL_TIMEOUT`)."""
    if state.is_postgres:
        from signerd.content._postgres import POOL_TIMEOUT, PostgresStore  # psycopg when used

        return PostgresStore(state.url, timeout=POOL_TIMEOUT if timeout is None else timeout)
    from signerd.content._sqlite import SqliteStore

    return SqliteStore(state.sqlite_path)


@dataclass(frozen=True)
class Checked:
    """A payload that passed :meth:`ContentGuard.check`, and what :meth:`ContentGuard.record`
    needs to check it again and record it: the GUN and role of the key, the payload, what
    it parsed to, the GUN's limits and the time it was checked at (aware UTC)."""

    gun: str
    role: str
    payload: bytes
    parsed: Parsed
    limits: Limits
    now: datetime

    @property
    def hashes(self) -> list[tuple[str, str]]:
        """(role, SHA-256 hex) of the meta entries referenced by hash only."""
        return [(m.role, m.sha256) for m in self.parsed.meta
                if m.version is None and m.sha256 is not None]


class ContentGuard:
    """The one entry point of the signing paths: checks and records before a signature."""

    def __init__(self, config: ContentConfig, store: WatermarkStore) -> None:
        self.config = config
        self.store = store

    @classmethod
    def open(cls, config: ContentConfig, state: StateConfig) -> ContentGuard:
        """Open the configured store (migrating its schema). Raises StateUnavailable."""
        return cls(config, open_store(state))

    def applies(self, gun: str) -> bool:
        """True if payloads signed for ``gun`` are checked (``[content] enabled``)."""
        return self.config.limits_for(gun).enabled

    def refuse_digest(self, gun: str, role: str) -> None:
        """For a digest-only (prehashed) request: raise ContentInvalid('digest') when the
        GUN is checked, since a digest cannot be; return when it is not."""
        if self.applies(gun):
            raise ContentInvalid(
                "digest", f"a {quoted(role)} key of {gun} signs only the metadata itself "
                          "(a digest cannot be checked): send the payload")

    def check(self, gun: str, role: str, payload: bytes,
              now: datetime | None = None) -> Checked | None:
        """Parse ``payload`` for a key of ``gun``/``role`` and run every check against the
        state recorded now, without recording anything (None: the GUN is not checked).

        ``now`` is aware UTC (default: the clock). Raises ContentInvalid, ContentStale or
        StateUnavailable. Passing is not enough to return a signature: :meth:`record` it.
        """
        limits = self.config.limits_for(gun)
        if not limits.enabled:
            return None
        parsed = parse_payload(payload, role)
        checked = Checked(gun, role, payload, parsed, limits, now or datetime.now(UTC))
        decide(parsed, gun, role, limits, checked.now,
               self.store.previous(gun, role, checked.hashes))
        return checked

    def record(self, checked: Checked, signature: Signature | None = None) -> Outcome:
        """Check ``checked`` again under the GUN's lock and record it: one transaction.

        With the ``signature`` made over a Notary payload, the same transaction remembers
        the SHA-256 of the file notary writes with that one signature (notary's json.Marshal
        of data.Signed), so that a snapshot or timestamp referencing that file by hash maps
        it to its version (freeze check). Best effort by nature: a file with other or more
        signatures has another hash. Once any replica returned a signature at version N, no
        replica records one below N. Raises ContentInvalid, ContentStale or
        StateUnavailable; nothing is recorded then.
        """
        parsed, gun, role = checked.parsed, checked.gun, checked.role
        file_sha256 = None
        if signature is not None and parsed.format is Format.NOTARY:
            # The payload is canonical (checked), so it is the file's "signed" as is.
            file_sha256 = hashlib.sha256(file_bytes(checked.payload, [signature])).hexdigest()

        def _decide(prev: Previous) -> Update:
            return decide(parsed, gun, role, checked.limits, checked.now, prev)

        update = self.store.compare_and_set(gun, role, checked.hashes, _decide, checked.now,
                                            file_sha256)
        return _outcome(parsed, update)

    def check_and_record(self, gun: str, role: str, payload: bytes,
                         now: datetime | None = None) -> Outcome:
        """Check ``payload`` for a key of ``gun``/``role`` and record it, in one
        transaction, as :meth:`record` does without a signature (no file hash).

        ``now`` is aware UTC (default: the clock). Raises ContentInvalid, ContentStale or
        StateUnavailable; nothing is recorded then.
        """
        limits = self.config.limits_for(gun)
        if not limits.enabled:
            return Outcome(checked=False)
        parsed = parse_payload(payload, role)
        return self.record(Checked(gun, role, payload, parsed, limits,
                                   now or datetime.now(UTC)))

    def note_signature(self, gun: str, role: str, payload: bytes, key_id: str, method: str,
                       signature: bytes) -> None:
        """Remember the SHA-256 of the file a signature over Notary ``payload`` makes, on
        its own (:meth:`record` does it in its transaction). Raises StateUnavailable. Does
        nothing for TUF payloads (their meta carry versions) or GUNs not checked.
        """
        if not self.applies(gun):
            return
        parsed = parse_payload(payload, role)
        if parsed.format is not Format.NOTARY:
            return
        file = file_bytes(payload, [Signature(key_id, method, signature)])
        self.store.record_file(gun, role, hashlib.sha256(file).hexdigest(), parsed.version)

    def versions(self, gun: str) -> list[RoleState]:
        """Recorded watermarks of ``gun`` (for ``signerctl state show GUN``)."""
        return self.store.versions(gun)

    def reset(self, gun: str) -> int:
        """Forget ``gun``'s watermarks (admin); returns the rows removed."""
        return self.store.reset(gun)

    def close(self) -> None:
        """Close the store."""
        self.store.close()


def _outcome(parsed: Parsed, update: Update) -> Outcome:
    return Outcome(True, parsed.format, parsed.type, parsed.version, update.previous_version,
                   update.same_version_changed, update.unchecked, parsed.digest)
