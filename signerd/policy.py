"""Authorization policy: who may do what to which keys.

The policy is a TOML file of ``[[rule]]`` tables. Each rule *grants*; there
are no deny rules, and a request that no rule grants is denied (deny by
default, so an empty file denies everything)::

    [[rule]]
    name = "ci-runners"               # optional; unique; shown in decisions
    identities = ["spiffe://ci/*"]    # required, non-empty: exact names or globs
    operations = ["sign", "read"]     # required: sign, create, delete, read, or "*";
                                      # purpose, reset (admin: never granted by "*")
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

Admin operations. ``purpose`` (set an existing key's purpose: ``signerctl keys
set-purpose``) and ``reset`` (forget a GUN's watermarks: ``signerctl state
reset``) weaken what the content checks protect, so ``"*"`` never grants them:
a rule lists them by name. ``reset`` is asked with the GUN and an empty role
and token, so the rule's ``roles`` and ``tokens`` must be ``"*"``.

Identities are typed: an :class:`Identity` is a kind and a name, written
``kind:name`` in rules and in the audit log. The server gives each caller
one (signerd.server._identity): ``uri:`` a URI SAN (``uri:spiffe://ci/r1``),
``dns:`` a DNS SAN, ``cn:`` the subject CN, ``uid:`` a Unix socket peer's
uid, ``dev:loopback`` every caller of the plaintext development listener. A
pattern in ``identities`` is matched against the name of identities of its
kind only, so a certificate can never pose as another kind of caller:

* ``"*"`` alone matches every identity, whatever its kind;
* ``"uri:GLOB"``, ``"dns:GLOB"``, ``"cn:GLOB"``, ``"uid:GLOB"``,
  ``"dev:GLOB"`` match the name of that kind only;
* a pattern written without a kind (policies older than typed identities)
  keeps working by this rule: one that starts with a URI scheme
  (``spiffe://ci/*``, ``https:...``: RFC 3986 ``ALPHA *( ALPHA / DIGIT /
  "+" / "-" / "." ) ":"``) matches URI SANs only; one with no ``:`` at all
  (``runner-1.ci.example``, ``ci-*``) matches a DNS SAN or a CN; any other
  ``:`` is refused as ambiguous. So ``"spiffe://ci/runner-a"`` never
  matches a certificate whose CN is ``spiffe://ci/runner-a``.

A kind is written in lower case; ``"URI:..."`` or ``"Uid:0"`` is refused
rather than read as a URI scheme. A ``cn:`` or ``dns:`` pattern that could
only match a name the server refuses (a CN that starts with a URI scheme, a
DNS name with characters no host name has) is refused when the file is
loaded. A ``uid:`` identity arriving over TCP is always denied (defence in
depth: no certificate field gives one), and so is an empty name.
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

from signerd.errors import ConfigError, quoted
from signerd.trusted_files import read_trusted

log = logging.getLogger("signerd.policy")

Operation = Literal["sign", "create", "delete", "read", "purpose", "reset"]
Transport = Literal["tcp", "unix"]
OPERATIONS: Final[tuple[str, ...]] = get_args(Operation)
# What "*" grants: every operation but the admin ones (see the module docstring).
ADMIN_OPERATIONS: Final = frozenset({"purpose", "reset"})
STAR_OPERATIONS: Final[tuple[str, ...]] = tuple(o for o in OPERATIONS
                                                if o not in ADMIN_OPERATIONS)
TRANSPORTS: Final[tuple[str, ...]] = get_args(Transport)
ROOT_ROLE: Final = "root"
IdentityKind = Literal["uri", "dns", "cn", "uid", "dev"]
IDENTITY_KINDS: Final[tuple[str, ...]] = get_args(IdentityKind)
# RFC 3986 section 3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), then ":".
_URI_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# A host name's characters (RFC 1123 labels; "_" as real certificates use it).
_HOST_NAME: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_RULE_KEYS: Final = ("name", "identities", "operations", "guns", "roles", "tokens", "transports")


def starts_with_scheme(name: str) -> bool:
    """Whether ``name`` starts with a URI scheme and ``:`` (RFC 3986 §3.1):
    ``spiffe://...``, ``uid:0``, ``dev:loopback``. Such a name is a URI, or
    a kind prefix, never a plain CN."""
    return _URI_SCHEME.match(name) is not None


def is_host_name(name: str) -> bool:
    """Whether ``name`` is made of a host name's characters (letters,
    digits, ``-``, ``_``, dots inside): what a DNS SAN may hold."""
    return _HOST_NAME.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: the kind of name that identifies it, and the name.

    ``kind`` is one of :data:`IDENTITY_KINDS`: ``uri`` (a certificate's URI
    SAN), ``dns`` (its DNS SAN), ``cn`` (its subject CN), ``uid`` (a Unix
    socket peer's uid, decimal), ``dev`` (``loopback``: the plaintext
    development listener). ``str()`` gives ``kind:name``, the form rules
    and the audit log use."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> Identity:
        """``Identity`` from its ``kind:name`` form; ValueError if ``text``
        has no known kind or an empty name."""
        kind, sep, name = text.partition(":")
        if not sep or kind not in IDENTITY_KINDS or not name:
            raise ValueError(f"not a kind:name identity ({', '.join(IDENTITY_KINDS)}): "
                             f"{quoted(text)}")
        return cls(kind, name)


@dataclass(frozen=True)
class Request:
    """One question to the policy.

    ``transport`` is ``"tcp"`` or ``"unix"``; ``operation`` one of
    :data:`OPERATIONS`. Anything else is denied rather than rejected, so a
    server bug fails closed. ``gun``, ``role`` and ``token`` describe the key;
    ``""`` means "any" and is matched only by the pattern ``"*"``.
    """

    identity: Identity
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


class _IdentityPatterns:
    """A rule's ``identities``, by kind (see the module docstring for how a
    pattern written without a kind is read)."""

    __slots__ = ("_any", "_by_kind")

    def __init__(self, texts: Sequence[str]) -> None:
        self._any = "*" in texts
        by_kind: dict[str, list[str]] = {}
        for text in texts:
            for kind, glob in identity_pattern_kinds(text):
                by_kind.setdefault(kind, []).append(glob)
        self._by_kind = {kind: _Patterns(globs) for kind, globs in by_kind.items()}

    def match(self, identity: Identity) -> bool:
        if not identity.name:
            return False
        if self._any:
            return True
        patterns = self._by_kind.get(identity.kind)
        return patterns is not None and patterns.match(identity.name)


def identity_pattern_kinds(text: str) -> list[tuple[str, str]]:
    """The (kind, glob) pairs an ``identities`` pattern stands for:
    ``"uri:spiffe://ci/*"`` -> ``[("uri", "spiffe://ci/*")]``; without a
    kind, ``"spiffe://ci/*"`` -> the same, ``"ci-*"`` -> ``[("cn", "ci-*"),
    ("dns", "ci-*")]``; ``"*"`` -> ``[]`` (every kind: matched on its own).
    Raises ValueError, saying why, for a pattern that is ambiguous or could
    never match (see the module docstring)."""
    if text == "*":
        return []
    kind, sep, name = text.partition(":")
    if sep and kind.lower() in IDENTITY_KINDS:
        if kind not in IDENTITY_KINDS:
            raise ValueError(f"write the kind {kind.lower()!r} in lower case")
        if not name:
            raise ValueError(f"{kind}: needs a name after it")
        if kind == "cn" and starts_with_scheme(name):
            raise ValueError("a CN that starts with a URI scheme is refused when a client "
                             f"presents it, so {text!r} would never match; a URI is "
                             f"'uri:{name}'")
        if kind == "dns" and not is_host_name(name.replace("*", "a").replace("?", "a")):
            raise ValueError("a DNS SAN holds a host name (letters, digits, '-', '_', '.'), "
                             f"so {text!r} would never match")
        if kind == "uid" and not re.fullmatch(r"[0-9*?\[\]!-]+", name):
            raise ValueError("a uid is a decimal number")
        return [(kind, name)]
    if starts_with_scheme(text):
        return [("uri", text)]
    if sep:
        raise ValueError("a ':' that does not end a URI scheme is ambiguous; write the kind "
                         f"before it: 'uri:{text}', 'dns:{text}' or 'cn:{text}'")
    return [("cn", text), ("dns", text)]


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
    _identities: _IdentityPatterns = field(init=False, repr=False, compare=False)
    _guns: _Patterns = field(init=False, repr=False, compare=False)
    _roles: _Patterns = field(init=False, repr=False, compare=False)
    _tokens: _Patterns = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_identities", _IdentityPatterns(self.identities))
        for name in ("guns", "roles", "tokens"):
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
        as :func:`signerd.trusted_files.read_trusted` reads one: a regular file only
        (a FIFO never blocks the reload on the signal path), at most
        :data:`~signerd.trusted_files.MAX_CONFIG_BYTES`, owned by root or signerd's
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
        who = f"{quoted(str(req.identity))} over {req.transport}"
        if not req.identity.name:
            return Decision(False, None, "the request has no identity")
        if req.transport not in TRANSPORTS:
            return Decision(False, None, f"unknown transport {quoted(req.transport)}")
        if req.operation not in OPERATIONS:
            return Decision(False, None, f"unknown operation {quoted(req.operation)}")
        if req.transport == "tcp" and req.identity.kind == "uid":
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
        return self._grants(req.identity, req.transport, req.operation, req.token)

    def grants_anything(self, identity: Identity, transport: str,
                        operation: str | None = None) -> bool:
        """Whether some rule grants ``identity`` over ``transport`` anything
        (``operation``, when given) on any key: a caller for whom this is
        False may be refused without looking at a key or a token at all."""
        return self._grants(identity, transport, operation, None)

    def _grants(self, identity: Identity, transport: str, operation: str | None,
                token: str | None) -> bool:
        """Some rule matches ``identity`` and ``transport``, and ``operation``
        and ``token`` unless None (GUN and role left open)."""
        if (not identity.name or transport not in TRANSPORTS
                or (transport == "tcp" and identity.kind == "uid")):
            return False
        return any(
            transport in r.transports and (operation is None or operation in r.operations)
            and r._identities.match(identity) and (token is None or r._tokens.match(token))
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
    rules: list[Rule] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_rules):  # every rule's first fault, not the policy's first
        try:
            rule = _parse_rule(source, i, raw)
        except ConfigError as e:
            problems.append(str(e))
            continue
        if rule.name in seen:
            problems.append(f"policy {source}: rule[{i}]: name {rule.name!r} is already used "
                            f"by rule[{seen[rule.name]}]; names must be unique")
        seen.setdefault(rule.name, i)
        rules.append(rule)
    if problems:
        raise PolicyErrors(problems)
    return rules


class PolicyErrors(ConfigError):
    """A policy with faults in one or more rules. ``problems``: one line per
    faulty rule (its first fault), as ``signerd check-config`` prints them;
    the message is the first, with how many more there are."""

    def __init__(self, problems: list[str]) -> None:
        more = len(problems) - 1
        super().__init__(problems[0] + (
            f" (and {more} more faulty rule{'s' if more > 1 else ''}: "
            "`signerd check-config` lists each)" if more else ""))
        self.problems = problems


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

    def identities() -> tuple[str, ...]:
        values = strings("identities", "identities (exact or glob)")
        for item in values:
            try:
                identity_pattern_kinds(item)
            except ValueError as e:
                raise ConfigError(f"{where}: field 'identities': {item!r}: {e}") from None
        return tuple(values)

    def choices(key: str, allowed: tuple[str, ...],
                star: tuple[str, ...] | None = None) -> frozenset[str]:
        accepted = ", ".join(allowed) + ' or "*"'
        values = strings(key, accepted)
        for v in values:
            if v != "*" and v not in allowed:
                raise ConfigError(
                    f"{where}: field '{key}': unknown value {v!r}; accepted: {accepted}"
                )
        if "*" in values:
            return frozenset(star or allowed) | frozenset(v for v in values if v != "*")
        return frozenset(values)

    return Rule(
        name=name,
        identities=identities(),
        operations=choices("operations", OPERATIONS, STAR_OPERATIONS),
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
