"""The content checks: pure decisions over a parsed payload and the state already recorded.

No I/O here (the shape of python-tuf's trusted_metadata_set.py): ``decide`` takes what the
watermark store holds for the GUN and role (``Previous``) and returns what to record
(``Update``) or raises. The store calls it inside its transaction, so that check and
record are one compare-and-set.

Checks, in order (notary-server's server/handlers/validation.go makes the same ones on
upload, python-tuf's client on download):

1. ``role``: ``_type`` names the key's role (delegations ``targets/*`` sign ``targets``);
   only root keys sign root.
2. ``expiry``: ``expires`` is after now and at most now + the role's maximum (both with
   the configured clock skew).
3. ``rollback``: ``version`` is not below the highest signed for the GUN and role. Equal
   is allowed (notary-server signs one timestamp version twice under concurrency) and,
   with other content, reported in ``Update.same_version_changed``.
4. ``freeze``: every ``meta`` entry of a snapshot or timestamp references a version not
   below the one the last signed snapshot or timestamp referenced. TUF 1.0 meta carries
   versions; Notary's carries hashes only, mapped to versions where signerd signed the file.
5. ``delegation``: a delegated targets role lists only targets inside the paths its
   parent gave it, when signerd signed the parent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from signerd.content._config import Limits, base_role
from signerd.content._errors import ContentInvalid, ContentStale
from signerd.content._parse import Delegation, Parsed
from signerd.errors import quoted


@dataclass(frozen=True)
class Watermark:
    """The highest version signed for a GUN and role, and the SHA-256 hex of its payload."""

    version: int
    digest: str


@dataclass(frozen=True)
class Previous:
    """What the store holds that the checks of one payload need.

    ``meta_versions``: meta entry name → highest version this role's signed metadata
    referenced. ``file_versions``: (role, sha256 hex) → version, for the meta hashes of the
    payload that signerd saw signed. ``delegation``: the paths the key role's parent gave it.
    """

    watermark: Watermark | None = None
    meta_versions: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    file_versions: Mapping[tuple[str, str], int] = field(
        default_factory=lambda: MappingProxyType({}))
    delegation: Delegation | None = None


@dataclass(frozen=True)
class Update:
    """What to record once the checks pass, and what they could not check.

    ``version``/``digest`` become the role's watermark when ``version`` is at least the
    recorded one; ``meta_versions`` raise the per-entry marks; ``delegations`` (child role →
    paths) replace what was recorded for those children. ``unchecked`` names checks that
    had nothing to check against (``freeze:targets``, ``delegation``), for the audit log.
    """

    version: int
    digest: str
    same_version_changed: bool = False
    previous_version: int | None = None
    meta_versions: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    delegations: Mapping[str, Delegation] = field(default_factory=lambda: MappingProxyType({}))
    unchecked: tuple[str, ...] = ()


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_role(parsed: Parsed, role: str) -> None:
    """Raise ContentInvalid('role') unless ``_type`` is the key role's (delegations: targets)."""
    if parsed.type != base_role(role):
        raise ContentInvalid(
            "role", f"a {quoted(role)} key does not sign {parsed.type} metadata")


def check_expiry(parsed: Parsed, role: str, limits: Limits, now: datetime) -> None:
    """Raise ContentInvalid('expiry') for an expired payload or one expiring too far ahead."""
    if parsed.expires <= now - limits.clock_skew:
        raise ContentInvalid(
            "expiry", f"{parsed.type} metadata expired at {_stamp(parsed.expires)} "
                      f"(now {_stamp(now)})")
    longest = limits.max_expiry_for(role)
    if parsed.expires > now + longest + limits.clock_skew:
        raise ContentInvalid(
            "expiry", f"{parsed.type} metadata expires at {_stamp(parsed.expires)}, more than "
                      f"{longest.days} days ahead (the most for {base_role(role)} here)")


def check_rollback(parsed: Parsed, role: str, gun: str, prev: Previous) -> bool:
    """Raise ContentStale('rollback') for a version below the watermark; True for an equal
    version with other content (allowed, reported)."""
    mark = prev.watermark
    if mark is None:
        return False
    if parsed.version < mark.version:
        raise ContentStale(
            "rollback", f"{role} version {parsed.version} is below version {mark.version} "
                        f"already signed for {gun}")
    return parsed.version == mark.version and parsed.digest != mark.digest


def check_freeze(parsed: Parsed, role: str, gun: str,
                 prev: Previous) -> tuple[dict[str, int], list[str]]:
    """Raise ContentStale('freeze') if a meta entry goes below the last referenced version.

    Returns (meta entry → version to record, entries whose version is unknown).
    """
    versions: dict[str, int] = {}
    unknown: list[str] = []
    for ref in parsed.meta:
        version = ref.version
        if version is None and ref.sha256 is not None:
            version = prev.file_versions.get((ref.role, ref.sha256))
        if version is None:
            unknown.append(ref.name)
            continue
        last = prev.meta_versions.get(ref.name)
        if last is not None and version < last:
            raise ContentStale(
                "freeze", f"{role} would reference {ref.name} version {version}, below version "
                          f"{last} referenced by the {role} already signed for {gun}")
        versions[ref.name] = version
    return versions, unknown


def check_delegation(parsed: Parsed, role: str, gun: str, prev: Previous) -> bool:
    """Raise ContentStale('delegation') for a target outside the role's delegated paths.

    Returns False when nothing was recorded for the role (signerd did not sign its
    parent), so the paths could not be checked.
    """
    if not role.startswith("targets/") or prev.delegation is None:
        return not role.startswith("targets/")
    for target in parsed.targets:
        if not prev.delegation.allows(target):
            raise ContentStale(
                "delegation", f"{role} lists target {quoted(target)}, outside the paths its "
                              f"parent delegated to it for {gun}")
    return True


def decide(parsed: Parsed, gun: str, role: str, limits: Limits, now: datetime,
           prev: Previous) -> Update:
    """Run every check on ``parsed`` for a key of ``gun``/``role`` at ``now`` (aware UTC).

    Raises ContentInvalid (role, expiry) or ContentStale (rollback, freeze, delegation);
    returns what to record.
    """
    check_role(parsed, role)
    check_expiry(parsed, role, limits, now)
    changed = check_rollback(parsed, role, gun, prev)
    meta, unknown = check_freeze(parsed, role, gun, prev)
    unchecked = [f"freeze:{name}" for name in unknown]
    if not check_delegation(parsed, role, gun, prev):
        unchecked.append("delegation")
    return Update(
        version=parsed.version,
        digest=parsed.digest,
        same_version_changed=changed,
        previous_version=prev.watermark.version if prev.watermark else None,
        meta_versions=MappingProxyType(meta),
        delegations=parsed.delegations,
        unchecked=tuple(unchecked),
    )
