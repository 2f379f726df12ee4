"""Authorization policy: who may do what to which keys.

The policy is a TOML file of ``[[rule]]`` tables. Each rule *grants*; there
are no deny rules, and a request that no rule grants is denied (deny by
default, so an empty file denies everything)::

    [[rule]]
    name = "ci-runners"               # optional; unique; shown in decisions
    identities = ["spiffe://ci/*"]    # required, non-empty: exact names or globs
    operations = ["sign", "read"]     # required: sign, create, delete, read, or "*"
    guns = ["docker.io/acme/*"]       # optional, default ["*"]
    roles = ["targets/ci-*"]          # optional, default ["*"]
    tokens = ["online"]               # optional, default ["*"]
    transports = ["tcp", "unix"]      # optional, default both

A rule matches a request when every field matches: one of its patterns
matches the request's value. Patterns are :func:`fnmatch.fnmatchcase` globs
(``*``, ``?``, ``[seq]``), matched case-sensitively against the whole value;
``*`` also matches ``/``, so ``docker.io/acme/*`` covers
``docker.io/acme/team/app``. The first matching rule (in file order) is named
in the :class:`Decision`; order never changes *whether* a request is allowed.

Root keys. Over the ``tcp`` transport a key of the role ``root`` is usable
only through a rule whose ``roles`` list contains the literal string
``"root"``; globs such as ``"*"`` or ``"r*"`` never reach a root key over TCP,
so a broad rule written for CI cannot hand out the root of trust. Over the
``unix`` transport (local peers identified by uid) globs match normally, so a
``roles = ["*"]`` rule does include root there.

Empty request fields. A request may leave ``gun``, ``role`` or ``token`` empty
when it is not about one key (for example the first check of a listing).
An empty value means "any", and only the pattern ``"*"`` matches it. That
grants nothing by itself: callers that list keys must filter each key
through :meth:`Policy.allows` with the key's own GUN, role and token.

Identities are compared as given by the server: URI SAN
(``spiffe://ci/runner-1``), DNS SAN, certificate CN, or ``uid:<n>`` for Unix
socket peers. A ``uid:`` identity arriving over TCP (a certificate whose CN
is ``uid:0``, say) is always denied, so a certificate can never pose as a
local user. An empty identity is always denied.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
import threading
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

from signerd.config import read_trusted
from signerd.errors import ConfigError, quoted

log = logging.getLogger("signerd.policy")

Operation = Literal["sign", "create", "delete", "read"]
Transport = Literal["tcp", "unix"]
OPERATIONS: Final[tuple[str, ...]] = get_args(Operation)
TRANSPORTS: Final[tuple[str, ...]] = get_args(Transport)
ROOT_ROLE: Final = "root"
_UID_PREFIX: Final = "uid:"
_RULE_KEYS: Final = ("name", "identities", "operations", "guns", "roles", "tokens", "transports")


@dataclass(frozen=True)
class Request:
    """One question to the policy.

    ``transport`` is ``"tcp"`` or ``"unix"``; ``operation`` one of
    :data:`OPERATIONS`. Anything else is denied rather than rejected, so a
    server bug fails closed. ``gun``, ``role`` and ``token`` describe the key;
    ``""`` means "any" and is matched only by the pattern ``"*"``.
    """

    identity: str
    transport: str
    operation: str
    gun: str = ""
    role: str = ""
    token: str = ""


@dataclass(frozen=True)
class Decision:
    """The answer: ``rule`` names the granting rule, ``reason`` says why in one line."""

    allowed: bool
    rule: str | None
    reason: str


class _Patterns:
    """A list of globs compiled once; ``*`` alone also matches the empty value."""

    __slots__ = ("texts", "_exact", "_globs", "_any")

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = tuple(texts)
        self._any = "*" in self.texts
        self._exact = frozenset(t for t in self.texts if not _is_glob(t))
        # translate() anchors the whole value (``\\Z``) and lets ``*`` cross ``/``.
        self._globs: tuple[Callable[[str], object], ...] = tuple(
            re.compile(fnmatch.translate(t)).match for t in self.texts if _is_glob(t)
        )

    def match(self, value: str) -> bool:
        if not value:
            return self._any
        return value in self._exact or any(m(value) for m in self._globs)

    def __contains__(self, literal: str) -> bool:
        return literal in self.texts


def _is_root(role: str) -> bool:
    return role.strip().lower() == ROOT_ROLE


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


@dataclass(frozen=True)
class Rule:
    """One grant. Built by :meth:`Policy.parse`; fields keep the file's strings."""

    name: str
    identities: tuple[str, ...]
    operations: frozenset[str]
    guns: tuple[str, ...] = ("*",)
    roles: tuple[str, ...] = ("*",)
    tokens: tuple[str, ...] = ("*",)
    transports: frozenset[str] = frozenset(TRANSPORTS)
    # Compiled once here rather than per request; derived, so not compared or shown.
    _identities: _Patterns = field(init=False, repr=False, compare=False)
    _guns: _Patterns = field(init=False, repr=False, compare=False)
    _roles: _Patterns = field(init=False, repr=False, compare=False)
    _tokens: _Patterns = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("identities", "guns", "roles", "tokens"):
            object.__setattr__(self, f"_{name}", _Patterns(getattr(self, name)))

    def matches(self, req: Request, *, root_by_glob: bool = False) -> bool:
        """Whether this rule grants ``req``.

        ``root_by_glob`` lifts the TCP root restriction; it exists only to
        explain denials and never decides anything.
        """
        if req.transport not in self.transports or req.operation not in self.operations:
            return False
        if req.transport == "tcp" and _is_root(req.role) and not root_by_glob:
            # Only a literal "root" entry opens root over TCP. Root look-alikes
            # ("Root", " root") must also match a pattern: they fail closed.
            role_ok = ROOT_ROLE in self._roles and (
                req.role == ROOT_ROLE or self._roles.match(req.role))
        else:
            role_ok = self._roles.match(req.role)
        return (
            role_ok
            and self._identities.match(req.identity)
            and self._guns.match(req.gun)
            and self._tokens.match(req.token)
        )


_DECISIONS = 4096  # decisions one Policy remembers


class Policy:
    """An immutable set of rules. Share one object freely between threads."""

    def __init__(self, rules: Sequence[Rule] = (), source: str = "<policy>",
                 sha256: str | None = None) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.source = source
        self.sha256 = sha256  # of the file's bytes, when loaded from a file
        # Decisions already made, by request: a policy never changes (a
        # reload makes a new Policy), so neither does a decision. Emptied
        # when full; dict reads and writes are atomic under the GIL.
        self._decisions: dict[Request, Decision] = {}

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read and validate a policy file.

        Raises :class:`ConfigError` with a one-line message naming the file,
        the rule index and the field, and what is accepted. The file is read
        as :func:`signerd.config.read_trusted` reads one: a regular file only
        (a FIFO never blocks the reload on the signal path), at most
        :data:`~signerd.config.MAX_CONFIG_BYTES`, owned by root or signerd's
        user and writable by no one else (whoever can write it decides who
        signs), in directories no one else can change.
        """
        raw = read_trusted(path, "policy")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"policy {path}: not UTF-8 text (byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"policy {path}: not valid TOML: {_one_line(str(e))}") from None
        return cls(_parse_rules(data, str(path)), str(path), hashlib.sha256(raw).hexdigest())

    @classmethod
    def parse(cls, data: dict[str, Any], source: str) -> Policy:
        """Validate already-parsed TOML; ``source`` names it in error messages."""
        return cls(_parse_rules(data, source), source)

    def decide(self, req: Request) -> Decision:
        """Allow ``req`` if some rule grants it; otherwise deny, saying why.
        Remembered per request (at most _DECISIONS of them), since the
        rules never change."""
        decision = self._decisions.get(req)
        if decision is None:
            decision = self._decide(req)
            if len(self._decisions) >= _DECISIONS:
                self._decisions.clear()
            self._decisions[req] = decision
        return decision

    def _decide(self, req: Request) -> Decision:
        who = f"{quoted(req.identity)} over {req.transport}"
        if not req.identity:
            return Decision(False, None, "the request has no identity")
        if req.transport not in TRANSPORTS:
            return Decision(False, None, f"unknown transport {quoted(req.transport)}")
        if req.operation not in OPERATIONS:
            return Decision(False, None, f"unknown operation {quoted(req.operation)}")
        if req.transport == "tcp" and req.identity.startswith(_UID_PREFIX):
            return Decision(False, None, f"{who}: uid: identities exist only on the unix socket")
        for rule in self.rules:
            if rule.matches(req):
                return Decision(True, rule.name,
                                f"rule {rule.name!r} grants {req.operation} to {who}")
        target = (f"gun {quoted(req.gun or '*')}, role {quoted(req.role or '*')}, "
                  f"token {quoted(req.token or '*')}")
        reason = f"no rule grants {req.operation} on {target} to {who}"
        if req.transport == "tcp" and _is_root(req.role):
            near = next((r.name for r in self.rules if r.matches(req, root_by_glob=True)), None)
            if near is not None:
                reason += (f" (rule {near!r} matches root only by a glob; over tcp a rule must "
                           f"list the role \"root\" explicitly)")
        return Decision(False, None, reason)

    def allows(self, req: Request) -> bool:
        """Shorthand for ``decide(req).allowed`` (for filtering listings)."""
        return self.decide(req).allowed

    def grants_on_token(self, req: Request) -> bool:
        """Whether some rule grants ``req.operation`` on *some* key of
        ``req.token`` (its GUN and role left open): who may read a token's
        description. ``req.gun`` and ``req.role`` are ignored."""
        if (not req.identity or req.transport not in TRANSPORTS
                or (req.transport == "tcp" and req.identity.startswith(_UID_PREFIX))):
            return False
        return any(
            req.transport in r.transports and req.operation in r.operations
            and r._identities.match(req.identity) and r._tokens.match(req.token)
            for r in self.rules
        )


class PolicyStore:
    """Holds the current :class:`Policy` and swaps it on reload (SIGHUP).

    Readers take ``store.current`` once per request and keep using that
    object, so a reload never changes a decision half-way through a request.
    """

    def __init__(self, path: Path) -> None:
        """Load ``path``; raises :class:`ConfigError` if it cannot be used."""
        self.path = path
        self._policy = Policy.load(path)
        self._swap_lock = threading.Lock()
        # Serialises whole reloads so two SIGHUPs cannot finish out of order
        # and leave the older file's policy in place.
        self._reload_lock = threading.Lock()
        log.info("policy loaded", extra={"fields": self._fields(self._policy)})

    @property
    def current(self) -> Policy:
        """The policy to use for a request that starts now."""
        with self._swap_lock:
            return self._policy

    def reload(self) -> bool:
        """Re-read the file. On failure keep the old policy, log why, return False."""
        with self._reload_lock:
            try:
                policy = Policy.load(self.path)
            except ConfigError as e:
                log.warning(
                    "policy reload failed; keeping the previous policy",
                    extra={"fields": {"file": str(self.path), "error": str(e),
                                      "sha256": self.current.sha256}},
                )
                return False
            with self._swap_lock:
                self._policy = policy
            log.info("policy reloaded", extra={"fields": self._fields(policy)})
            return True

    def _fields(self, policy: Policy) -> dict[str, Any]:
        return {"file": str(self.path), "rules": len(policy.rules), "sha256": policy.sha256}


def _parse_rules(data: Any, source: str) -> list[Rule]:
    if not isinstance(data, dict):
        raise ConfigError(f"policy {source}: expected a table of [[rule]] entries")
    unknown = sorted(set(data) - {"rule"})
    if unknown:
        raise ConfigError(
            f"policy {source}: unknown top-level keys {unknown}; "
            "only [[rule]] tables are accepted"
        )
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise ConfigError(
            f"policy {source}: 'rule' must be an array of tables written [[rule]], "
            f"got {_kind(raw_rules)}"
        )
    rules = [_parse_rule(source, i, r) for i, r in enumerate(raw_rules)]
    seen: dict[str, int] = {}
    for i, rule in enumerate(rules):
        if rule.name in seen:
            raise ConfigError(
                f"policy {source}: rule[{i}]: name {rule.name!r} is already used by "
                f"rule[{seen[rule.name]}]; names must be unique"
            )
        seen[rule.name] = i
    return rules


def _parse_rule(source: str, index: int, raw: Any) -> Rule:
    where = f"policy {source}: rule[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table written [[rule]], got {_kind(raw)}")
    name = raw.get("name", f"rule[{index}]")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: field 'name' must be a non-empty string, got {_show(name)}")
    where = f"{where} ({name!r})" if "name" in raw else where
    unknown = sorted(set(raw) - set(_RULE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown}; accepted: {', '.join(_RULE_KEYS)}")
    for required in ("identities", "operations"):
        if required not in raw:
            raise ConfigError(f"{where}: field '{required}' is required")

    def strings(key: str, accepted: str) -> list[str]:
        value = raw.get(key, ["*"])
        if not isinstance(value, list):
            raise ConfigError(f"{where}: field '{key}' must be a list of {accepted}, "
                              f"got {_show(value)}")
        if not value:
            hint = "" if key == "identities" else "; omit the field to mean [\"*\"]"
            raise ConfigError(f"{where}: field '{key}' must not be empty{hint}")
        for item in value:
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{where}: field '{key}' must be a list of {accepted}, "
                                  f"got item {_show(item)}")
            if item != item.strip():
                # Such a pattern would silently never match: surely a typo.
                raise ConfigError(f"{where}: field '{key}': {item!r} has leading or trailing "
                                  "whitespace")
        return value

    def choices(key: str, allowed: tuple[str, ...]) -> frozenset[str]:
        accepted = ", ".join(allowed) + ' or "*"'
        values = strings(key, accepted)
        for v in values:
            if v != "*" and v not in allowed:
                raise ConfigError(
                    f"{where}: field '{key}': unknown value {v!r}; accepted: {accepted}"
                )
        return frozenset(allowed) if "*" in values else frozenset(values)

    return Rule(
        name=name,
        identities=tuple(strings("identities", "identities (exact or glob)")),
        operations=choices("operations", OPERATIONS),
        guns=tuple(strings("guns", "GUN globs")),
        roles=tuple(strings("roles", "role names or globs")),
        tokens=tuple(strings("tokens", "token names or globs")),
        transports=choices("transports", TRANSPORTS),
    )


def _kind(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a float"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{_kind(value)} {text if len(text) <= 60 else text[:57] + '...'}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
