"""Content-aware signing: check TUF/Notary metadata before a metadata key signs it.

parse (``_parse``) → decide (``_checks``, pure) → record (``_store``: SQLite or PostgreSQL,
one compare-and-set). The signing paths call one object::

    guard = ContentGuard.open(parse_content(data.get("content")),
                              parse_state(data.get("state"), base))
    outcome = guard.check_and_record(entry.gun, entry.role, payload)   # before signing
    signature = sign(...)
    guard.note_signature(entry.gun, entry.role, payload, key_id, method, signature)

``check_and_record`` raises ContentInvalid (INVALID_ARGUMENT), ContentStale
(FAILED_PRECONDITION) or StateUnavailable (UNAVAILABLE); a digest-only request for a key
whose GUN is checked goes to ``refuse_digest`` instead.
"""

from __future__ import annotations

import hashlib
import json
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
from signerd.trust.metadata import Envelope, Signature

__all__ = [
    "ContentConfig", "ContentGuard", "ContentInvalid", "ContentStale", "Format", "GunOverride",
    "Limits", "Outcome", "RoleState", "StateConfig", "StateUnavailable", "WatermarkStore",
    "open_store", "parse_content", "parse_state",
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


def open_store(state: StateConfig) -> WatermarkStore:
    """The store ``[state] url`` names (SQLite file or PostgreSQL); raises StateUnavailable."""
    if state.is_postgres:
        from signerd.content._postgres import PostgresStore  # psycopg only when used

        return PostgresStore(state.url)
    from signerd.content._sqlite import SqliteStore

    return SqliteStore(state.sqlite_path)


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

    def check_and_record(self, gun: str, role: str, payload: bytes,
                         now: datetime | None = None) -> Outcome:
        """Check ``payload`` for a key of ``gun``/``role`` and record it before it is signed.

        ``now`` is aware UTC (default: the clock). Check and record are one transaction, so
        once any replica returned a signature at version N, no replica returns one below N.
        Raises ContentInvalid, ContentStale or StateUnavailable; nothing is recorded then.
        """
        limits = self.config.limits_for(gun)
        if not limits.enabled:
            return Outcome(checked=False)
        when = now or datetime.now(UTC)
        parsed = parse_payload(payload, role)
        hashes = [(m.role, m.sha256) for m in parsed.meta
                  if m.version is None and m.sha256 is not None]

        def _decide(prev: Previous) -> Update:
            return decide(parsed, gun, role, limits, when, prev)

        update = self.store.compare_and_set(gun, role, hashes, _decide, when)
        return _outcome(parsed, update)

    def note_signature(self, gun: str, role: str, payload: bytes, key_id: str, method: str,
                       signature: bytes) -> None:
        """After signing a Notary payload: remember the SHA-256 of the file notary writes
        with this one signature (notary's json.Marshal of data.Signed), so that a snapshot
        or timestamp referencing that file by hash maps it to its version (freeze check).

        Best effort by nature: a file with other or more signatures has another hash.
        Raises StateUnavailable. Does nothing for TUF payloads (their meta carry versions)
        or GUNs not checked.
        """
        if not self.applies(gun):
            return
        parsed = parse_payload(payload, role)
        if parsed.format is not Format.NOTARY:
            return
        file = Envelope(json.loads(payload), [Signature(key_id, method, signature)]).to_bytes()
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
