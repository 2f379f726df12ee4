"""Content checks' configuration: ``[content]`` and ``[state]`` of signerd.toml.

::

    [content]
    enabled = true            # false: sign any payload, as before (no check, no record)
    clock_skew = 60           # seconds of clock difference tolerated on `expires`

    [content.timestamp]       # one table per role: root, targets, snapshot, timestamp
    max_expiry_days = 31      # `expires` at most this far ahead of now (delegations: targets)

    [[content.gun]]           # overrides for GUNs matching `pattern` (fnmatch); first match wins
    pattern = "docker.io/acme/*"
    enabled = true
    [content.gun.timestamp]
    max_expiry_days = 7

    [state]
    url = "sqlite:////var/lib/signerd/state.db"  # or postgresql://… for replicas
                                                  # (relative sqlite paths: to the config file)

The defaults are notary-server's own expiries (notary's const.go: timestamp 14 days, snapshot
and targets 3 years, root 10 years; a year is 365 days), except timestamp, which is 31 days:
the README's python-tuf example signs a 30-day timestamp and must keep working.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

from signerd.errors import ConfigError

DAY = timedelta(days=1)
YEAR = 365 * DAY
METADATA_ROLES = ("root", "targets", "snapshot", "timestamp")
DEFAULT_MAX_EXPIRY: Mapping[str, timedelta] = MappingProxyType({
    "root": 10 * YEAR,
    "targets": 3 * YEAR,
    "snapshot": 3 * YEAR,
    "timestamp": 31 * DAY,
})
DEFAULT_CLOCK_SKEW = timedelta(seconds=60)
DEFAULT_STATE_FILE = "signerd-state.db"


def base_role(role: str) -> str:
    """``targets`` for a delegation ``targets/NAME``, else ``role`` itself."""
    return "targets" if role.startswith("targets/") else role


@dataclass(frozen=True)
class Limits:
    """What the checks allow for one GUN: whether they run, expiry bounds, clock skew."""

    enabled: bool = True
    max_expiry: Mapping[str, timedelta] = field(default_factory=lambda: DEFAULT_MAX_EXPIRY)
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW

    def max_expiry_for(self, role: str) -> timedelta:
        """The longest ``expires - now`` allowed for ``role`` (delegations: targets')."""
        return self.max_expiry[base_role(role)]


@dataclass(frozen=True)
class GunOverride:
    """A ``[[content.gun]]`` entry: limits for GUNs that match ``pattern`` (fnmatch)."""

    pattern: str
    limits: Limits


@dataclass(frozen=True)
class ContentConfig:
    """The ``[content]`` section: default limits and per-GUN overrides (first match wins)."""

    default: Limits = field(default_factory=Limits)
    overrides: tuple[GunOverride, ...] = ()

    def limits_for(self, gun: str) -> Limits:
        """The limits of the first override whose pattern matches ``gun``, else the default."""
        for o in self.overrides:
            if fnmatch.fnmatchcase(gun, o.pattern):
                return o.limits
        return self.default


@dataclass(frozen=True)
class StateConfig:
    """The ``[state]`` section: where watermarks live (``sqlite:///PATH`` or ``postgresql://``)."""

    url: str

    @property
    def is_postgres(self) -> bool:
        """True for a PostgreSQL URL (``postgresql://`` or ``postgres://``)."""
        return self.url.startswith(("postgresql://", "postgres://"))

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file of a ``sqlite:///PATH`` URL; raises ConfigError for another."""
        if not self.url.startswith("sqlite:///"):
            raise ConfigError(f"state.url is not a sqlite:/// URL: {self.url[:40]!r}")
        return Path(self.url.removeprefix("sqlite://"))


def _limits(raw: Mapping[str, Any], where: str, inherit: Limits) -> Limits:
    enabled = raw.get("enabled", inherit.enabled)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}.enabled must be true or false, got {enabled!r}")
    skew = raw.get("clock_skew", inherit.clock_skew.total_seconds())
    if isinstance(skew, bool) or not isinstance(skew, int | float) or not 0 <= skew <= 3600:
        raise ConfigError(f"{where}.clock_skew must be 0 to 3600 (seconds), got {skew!r}")
    expiry = dict(inherit.max_expiry)
    for role in METADATA_ROLES:
        table = raw.get(role)
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"[{where}.{role}] must be a table")
        unknown = sorted(set(table) - {"max_expiry_days"})
        if unknown:
            raise ConfigError(f"unknown keys in [{where}.{role}]: {unknown}")
        days = table.get("max_expiry_days")
        if isinstance(days, bool) or not isinstance(days, int | float) or not 0 < days <= 36500:
            raise ConfigError(
                f"{where}.{role}.max_expiry_days must be more than 0 and at most 36500, "
                f"got {days!r}"
            )
        expiry[role] = timedelta(days=days)
    return Limits(enabled, MappingProxyType(expiry), timedelta(seconds=skew))


_LIMIT_KEYS = {"enabled", "clock_skew", *METADATA_ROLES}


def parse_content(raw: Any) -> ContentConfig:
    """Parse the ``[content]`` table (None or missing: the defaults).

    Raises ConfigError naming the key at fault. The config loader calls it with
    ``data.get("content")``.
    """
    if raw is None:
        return ContentConfig()
    if not isinstance(raw, dict):
        raise ConfigError("[content] must be a table")
    unknown = sorted(set(raw) - _LIMIT_KEYS - {"gun"})
    if unknown:
        raise ConfigError(f"unknown keys in [content]: {unknown}")
    default = _limits(raw, "content", Limits())
    guns = raw.get("gun", [])
    if not isinstance(guns, list):
        raise ConfigError("[[content.gun]] must be an array of tables")
    overrides = []
    for i, entry in enumerate(guns):
        where = f"content.gun[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"[{where}] must be a table")
        unknown = sorted(set(entry) - _LIMIT_KEYS - {"pattern"})
        if unknown:
            raise ConfigError(f"unknown keys in [{where}]: {unknown}")
        pattern = entry.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}.pattern must be a non-empty GUN pattern (fnmatch)")
        overrides.append(GunOverride(pattern, _limits(entry, where, default)))
    return ContentConfig(default, tuple(overrides))


def parse_state(raw: Any, base: Path) -> StateConfig:
    """Parse the ``[state]`` table; ``base`` is the config file's directory.

    Missing: a SQLite file ``signerd-state.db`` next to the config. A relative
    ``sqlite:///`` path is taken as relative to ``base`` (``sqlite:////abs`` or
    ``sqlite:///`` followed by an absolute path are absolute). Raises ConfigError.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("[state] must be a table")
    unknown = sorted(set(raw) - {"url"})
    if unknown:
        raise ConfigError(f"unknown keys in [state]: {unknown}")
    url = raw.get("url", f"sqlite:///{base / DEFAULT_STATE_FILE}")
    if not isinstance(url, str):
        raise ConfigError("state.url must be a string")
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_absolute():
            path = base / path
        return StateConfig(f"sqlite://{path}")
    if url.startswith(("postgresql://", "postgres://")):
        return StateConfig(url)
    # Never echo the URL: a PostgreSQL URL may hold a password.
    raise ConfigError("state.url must start with sqlite:/// or postgresql://")
