"""Configuration: frozen dataclasses loaded from TOML.

Relative paths are resolved against the directory of the config file. PINs
are never part of the config itself: only the file or the environment
variable they are read from.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from signerd.errors import ConfigError
from signerd.trusted_files import MAX_PIN_BYTES, read_toml, read_trusted

# The parsers of the audit, content and token sections are imported where a config
# is parsed, not here: they pull in most of signerd (about 0.4 s), and the clients
# and `signerd serve`'s first look at its file (signerd.daemon._main) need only the
# file reading (signerd.trusted_files) and resolve_module.
if TYPE_CHECKING:
    from signerd.audit._tlogconfig import TlogConfig
    from signerd.content._config import ContentConfig, StateConfig

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 1 << 29  # gRPC lengths are 32-bit signed, and a response may be twice this
MAX_CONNECTIONS = 1 << 20  # Linux's default fs.nr_open: no process holds more file descriptors
CK_ULONG_MAX = (1 << 64) - 1  # a PKCS#11 slot ID is a CK_ULONG (64 bits on Linux)

# The legal range of every numeric setting: (least, most, unit). A value out
# of range is refused at load (and so by check-config); README's
# "Configuration reference" lists the same table (a test keeps them equal).
# Why each bound, briefly: the lower ones keep a protection on (a health
# probe every 50 µs used ~90% of a CPU; max_message_bytes = -1 is gRPC's
# "no limit"; a 0 s handshake or read timeout closes every client); the upper
# ones keep what the machine is asked for within what it can give (threads
# and processes it can schedule, file descriptors it can hold: fs.nr_open).
BOUNDS: dict[str, tuple[int | float, int | float, str]] = {
    "tokens[].sessions": (1, 256, "sessions"),
    "server.max_message_bytes": (1024, MAX_MESSAGE_BYTES, "bytes"),
    "server.threads": (1, 1024, "threads"),
    "server.max_inflight_per_identity": (1, 1024, "requests"),
    "server.handshake_timeout": (0.1, 3600, "seconds"),
    "server.max_connections": (1, MAX_CONNECTIONS, "connections"),
    "server.max_unix_connections": (1, MAX_CONNECTIONS, "connections"),
    "server.workers": (1, 64, "processes"),
    "server.health_interval": (0.05, 3600, "seconds"),
    "audit.max_bytes": (4096, 1 << 40, "bytes"),
    "metrics.max_connections": (1, MAX_CONNECTIONS, "connections"),
    "metrics.read_timeout": (0.1, 300, "seconds"),
}


@dataclass(frozen=True)
class Pkcs11Uri:
    """The token-selecting parts of an RFC 7512 ``pkcs11:`` URI."""

    token: str | None = None
    serial: str | None = None
    slot_id: int | None = None
    module_path: str | None = None

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        if not uri.startswith("pkcs11:"):
            raise ConfigError(f"token uri must start with 'pkcs11:', got {uri[:40]!r}")
        path, _, query = uri[len("pkcs11:") :].partition("?")
        attrs: dict[str, str] = {}
        for part in [p for p in path.split(";") if p] + [q for q in query.split("&") if q]:
            name, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"token uri attribute {name!r} has no value")
            if name in ("pin-value", "pin-source"):
                # A PIN inside a URI ends up in logs and process listings.
                raise ConfigError("token uri must not carry a PIN: use pin_file or pin_env")
            attrs[name] = unquote(value)
        slot = attrs.get("slot-id")
        if slot is not None and not (slot.isdigit() and int(slot) <= CK_ULONG_MAX):
            raise ConfigError(f"token uri slot-id must be a number from 0 to {CK_ULONG_MAX}, "
                              f"got {slot[:40]!r}")
        uri_ = cls(
            attrs.get("token"),
            attrs.get("serial"),
            int(slot) if slot else None,
            attrs.get("module-path"),
        )
        if uri_.token is None and uri_.serial is None and uri_.slot_id is None:
            raise ConfigError("token uri must name the token by token=, serial= or slot-id=")
        return uri_


@dataclass(frozen=True)
class TokenConfig:
    name: str
    module: str
    uri: Pkcs11Uri
    pin_file: Path | None = None
    pin_env: str | None = None
    sessions: int = 4  # pooled sessions: concurrent signing operations on this token
    roles: tuple[str, ...] = ("*",)  # roles whose new keys go here by default (globs)
    # signerd.token.profiles name; None: chosen from the token's manufacturer at start
    profile: str | None = None
    processes: int = 1  # serving processes, each with its own session pool (server.workers)

    def holds_role(self, role: str) -> bool:
        return any(fnmatch.fnmatchcase(role, pattern) for pattern in self.roles)

    def read_pin(self) -> str:
        """Read the user PIN. The PIN itself never appears in an error."""
        if self.pin_env:
            pin = os.environ.get(self.pin_env)
            if pin is None:
                raise ConfigError(
                    f"token {self.name}: environment variable {self.pin_env} is not set"
                )
            return pin
        assert self.pin_file is not None
        raw = read_trusted(self.pin_file, f"PIN file of token {self.name}",
                           limit=MAX_PIN_BYTES, secret=True)
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigError(f"token {self.name}: PIN file {self.pin_file} is not UTF-8 "
                              "text") from None


@dataclass(frozen=True)
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None  # required for mutual TLS on TCP listeners


CPU_AFFINITIES = ("none", "spread")
# "aio": one grpc.aio event loop per serving process, fast signatures on the
# loop thread (signerd.server._aio); "threads": grpc's thread-per-call server.
ENGINES = ("aio", "threads")


def _default_tlog() -> TlogConfig:
    from signerd.audit._tlogconfig import TlogConfig

    return TlogConfig()


def _default_content() -> ContentConfig:
    from signerd.content._config import ContentConfig

    return ContentConfig()


@dataclass(frozen=True)
class Config:
    tokens: tuple[TokenConfig, ...]
    listen: str | None = "127.0.0.1:4443"
    unix_socket: Path | None = None
    tls: TLSConfig | None = None
    # Plaintext TCP, loopback only: the embedded development default's escape hatch.
    dev_plaintext: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Requests of one identity working at once (per serving process); more
    # wait their turn. None (unset): threads less the reserve. See inflight_limit.
    max_inflight_per_identity: int | None = None
    threads: int = 8  # bench: 8 beat 32 at 64 callers (p99 85 vs 124 ms)
    # Seconds a TCP connection may take to finish its TLS handshake; a
    # connection that never speaks is closed then.
    handshake_timeout: float = 10.0
    # Connections one serving process holds at once, authenticated or not;
    # past it, new ones are closed at once.
    max_connections: int = 1000
    # Connections the Unix socket holds at once (each costs three file
    # descriptors: see signerd.fdbudget); past it, new ones are closed at once.
    max_unix_connections: int = 256
    workers: int = 1
    # "spread": each serving process is pinned to one CPU (worker i to the
    # i-th allowed CPU); see signerd.daemon.pin_cpu. "none" leaves it to the kernel.
    cpu_affinity: str = "none"
    engine: str = "threads"
    policy_file: Path | None = None
    audit_file: Path | None = None
    # [audit] max_bytes: the audit log rotates once a line takes it to this
    # size (bytes) or more; None (unset) rotates only on SIGHUP. With workers,
    # each worker's chain rotates at this size. See signerd/audit/, Rotation.
    audit_max_bytes: int | None = None
    # [audit] checkpoints, checkpoint_interval, origin, checkpoint_key,
    # [[audit.witnesses]]...: the audit log as a transparency log (signerd.audit).
    audit_tlog: TlogConfig = field(default_factory=_default_tlog)
    debug: bool = False  # keep the process dumpable
    health_interval: float = 5.0
    environment: dict[str, str] = field(default_factory=dict)
    # Set for a supervisor's workers only: they share the TCP port (SO_REUSEPORT).
    shares_port: bool = False
    # [metrics] listen: plain HTTP for /metrics, /livez and /readyz (signerd.metrics);
    # None (unset) serves none of them.
    metrics_listen: str | None = None
    # [metrics] max_connections: HTTP connections held at once; past it, new
    # ones are closed at once. [metrics] read_timeout: seconds a connection
    # has to send its whole request (a slow one is closed then).
    metrics_max_connections: int = 64
    metrics_read_timeout: float = 5.0
    # [content]: the checks a metadata key's payload passes (signerd.content._config).
    content: ContentConfig = field(default_factory=_default_content)
    # [state]: the watermark store; parse_config always sets it (default: a SQLite
    # file next to the config, signerd-state.db).
    state: StateConfig | None = None

    @property
    def inflight_reserve(self) -> int:
        """Work slots (of ``threads``) an identity that already has a request
        running never gets, kept so that a newly arriving identity is served
        at once: one per 8 threads, at least 1 (0 with a single thread)."""
        return 0 if self.threads == 1 else max(1, self.threads // 8)

    @property
    def inflight_limit(self) -> int:
        """Requests one identity may have working at once, per serving
        process: ``max_inflight_per_identity``, or when unset ``threads``
        less :attr:`inflight_reserve`, every thread one identity alone may
        use. More wait their turn (signerd.server._fair); the reserve is
        kept whatever this says."""
        if self.max_inflight_per_identity is not None:
            return self.max_inflight_per_identity
        return self.threads - self.inflight_reserve

    @property
    def queue_limit(self) -> int:
        """Requests that may wait for a thread at once, all identities
        together, per serving process: 8 per thread. Past it a request is
        refused RESOURCE_EXHAUSTED (the identity with the most waiting gives
        up its newest first)."""
        return 8 * self.threads

    def inflight_warning(self) -> str | None:
        """Why ``max_inflight_per_identity`` does not do what it says, or None.

        A value above ``threads`` less the reserve is capped there: the
        reserve is kept for newly arriving identities whatever it says.
        Said at start and by ``signerd check-config``."""
        usable = self.threads - self.inflight_reserve
        if self.inflight_limit <= usable:
            return None
        return (f"server.max_inflight_per_identity = {self.inflight_limit} is more than the "
                f"{usable} of {self.threads} handler threads (server.threads) one identity "
                f"may hold; {self.inflight_reserve} stay for newly arriving identities, so "
                f"it means {usable}; leave it unset")


def is_host_port(text: str, *, listening: bool = True) -> bool:
    """Whether ``text`` is ``HOST:PORT``: a host that is not empty (an IPv6
    literal in brackets, ``[::1]:4443``) and a port of 1-65535, or 0 when
    ``listening`` (the kernel then picks the port)."""
    host, sep, port = text.rpartition(":")
    return bool(sep and host.strip("[]") and port.isdigit()
                and (0 if listening else 1) <= int(port) <= 65535)


def is_loopback(host: str) -> bool:
    """Whether ``host``, the host part of a listen address (``server.listen``
    without ``:PORT``; an IPv6 literal without its brackets), is loopback: the
    name ``localhost``, or an IP address that :mod:`ipaddress` calls loopback
    (127.0.0.0/8, ``::1``). No other name is resolved: it is not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _path(base: Path, value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string path")
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else base / p


# What a config value of each type is called in an error ("must be an integer").
_KINDS = {int: "an integer", str: "a string", bool: "true or false", list: "a list",
          float: "a number", dict: "a table"}


def _take(
    table: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str
) -> Any:
    value = table.pop(key, default)
    if value is not default and (
        not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool)
    ):
        name = _KINDS.get(kind, "a number") if isinstance(kind, type) else "a number"
        raise ConfigError(f"{where}{key} must be {name}, got {value!r}")
    return value


def _show_bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _bounded(key: str, value: Any, where: str | None = None) -> None:
    """Raise ConfigError unless ``value`` lies in ``BOUNDS[key]`` (NaN never
    does: it fails every comparison). ``where`` names the setting in the
    message when it is not ``key`` itself (``tokens[2].sessions``). Compared
    before any float(), so that an integer too large for a float is refused,
    not an OverflowError."""
    low, high, unit = BOUNDS[key]
    if value is not None and not low <= value <= high:
        raise ConfigError(f"{where or key} must be between {_show_bound(low)} and "
                          f"{_show_bound(high)} ({unit}), got {value!r}")


def _number(table: dict[str, Any], key: str, default: float, where: str) -> float:
    """A setting in seconds (an integer or a float), checked against BOUNDS."""
    value = _take(table, key, (int, float), default, where)
    _bounded(where + key, value)
    return float(value)


def resolve_module(base: Path, module: str, key: str = "module") -> str:
    """A ``[[tokens]] module`` as the daemon loads it: a bare file name is left
    to the dynamic loader's search path, a path is resolved against ``base``
    (the config's directory; ``~`` expanded). Raises ConfigError (``key``
    names the setting) for an empty one."""
    return str(_path(base, module, key)) if "/" in module else module


def _token(base: Path, raw: dict[str, Any], index: int) -> TokenConfig:
    where = f"tokens[{index}]."
    raw = dict(raw)
    name = _take(raw, "name", str, None, where)
    module = _take(raw, "module", str, None, where)
    uri = _take(raw, "uri", str, None, where)
    if not name or not uri:
        raise ConfigError(f"{where}name and {where}uri are required")
    parsed = Pkcs11Uri.parse(uri)
    module = module or parsed.module_path
    if not module:
        raise ConfigError(f"{where}module (the PKCS#11 module path) is required")
    pin_file = raw.pop("pin_file", None)
    pin_env = _take(raw, "pin_env", str, None, where)
    if (pin_file is None) == (pin_env is None):
        raise ConfigError(f"token {name}: set exactly one of pin_file or pin_env")
    if "pin" in raw:
        raise ConfigError(f"token {name}: a PIN never goes in the config; use pin_file or pin_env")
    sessions = _take(raw, "sessions", int, 4, where)
    roles = _take(raw, "roles", list, ["*"], where)
    profile = _take(raw, "profile", str, None, where)
    from signerd.token.profiles import PROFILE_NAMES

    if profile is not None and profile not in PROFILE_NAMES:
        raise ConfigError(f"{where}profile must be one of {list(PROFILE_NAMES)}, not {profile!r}")
    if raw:
        raise ConfigError(f"{where}: unknown keys {sorted(raw)}")
    _bounded("tokens[].sessions", sessions, where + "sessions")
    return TokenConfig(
        name=name,
        module=resolve_module(base, module, where + "module"),
        uri=parsed,
        pin_file=_path(base, pin_file, where + "pin_file") if pin_file is not None else None,
        pin_env=pin_env,
        sessions=sessions,
        roles=tuple(str(r) for r in roles),
        profile=profile,
    )


def parse_config(data: dict[str, Any], base: Path) -> Config:
    """The daemon's :class:`Config` from a TOML document (``base``: the
    directory relative paths start from). Raises ConfigError."""
    from signerd.audit._tlogconfig import parse_tlog
    from signerd.content._config import parse_content, parse_state
    from signerd.token.profiles import session_budget

    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    server = data.pop("server", {})
    tls = data.pop("tls", None)
    tokens = data.pop("tokens", None)
    policy = data.pop("policy", {})
    audit = data.pop("audit", {})
    environment = data.pop("environment", {})
    metrics_table = data.pop("metrics", {})
    content = parse_content(data.pop("content", None))
    state = parse_state(data.pop("state", None), base)
    if data:
        raise ConfigError(f"unknown config sections {sorted(data)}")
    tables = {"server": server, "tls": tls or {}, "policy": policy, "audit": audit,
              "environment": environment}
    for section, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
    if not tokens or not isinstance(tokens, list):
        raise ConfigError("at least one [[tokens]] entry is required")
    token_cfgs = tuple(_token(base, t, i) for i, t in enumerate(tokens))
    names = [t.name for t in token_cfgs]
    if len(set(names)) != len(names):
        raise ConfigError(f"token names must be unique, got {names}")
    tls_cfg = None
    if tls is not None:
        tls_cfg = TLSConfig(
            cert=_path(base, tls.get("cert"), "tls.cert"),
            key=_path(base, tls.get("key"), "tls.key"),
            client_ca=_path(base, tls["client_ca"], "tls.client_ca")
            if "client_ca" in tls
            else None,
        )
    s = server
    cfg = Config(
        tokens=token_cfgs,
        listen=_take(s, "listen", str, "127.0.0.1:4443", "server.") or None,
        unix_socket=_path(base, s.pop("unix_socket"), "server.unix_socket")
        if "unix_socket" in s
        else None,
        tls=tls_cfg,
        dev_plaintext=_take(s, "dev_plaintext", bool, False, "server."),
        max_message_bytes=_take(s, "max_message_bytes", int, DEFAULT_MAX_MESSAGE_BYTES, "server."),
        max_inflight_per_identity=_take(s, "max_inflight_per_identity", int, None, "server."),
        threads=_take(s, "threads", int, 8, "server."),
        handshake_timeout=_number(s, "handshake_timeout", 10.0, "server."),
        max_connections=_take(s, "max_connections", int, 1000, "server."),
        max_unix_connections=_take(s, "max_unix_connections", int, 256, "server."),
        workers=_take(s, "workers", int, 1, "server."),
        cpu_affinity=_take(s, "cpu_affinity", str, "none", "server."),
        engine=_take(s, "engine", str, "threads", "server."),
        debug=_take(s, "debug", bool, False, "server."),
        health_interval=_number(s, "health_interval", 5.0, "server."),
        policy_file=_path(base, policy["file"], "policy.file") if "file" in policy else None,
        audit_file=_path(base, audit.pop("file"), "audit.file") if "file" in audit else None,
        audit_max_bytes=_take(audit, "max_bytes", int, None, "audit."),
        environment={str(k): str(v) for k, v in environment.items()},
        content=content,
        state=state,
    )
    if s:
        raise ConfigError(f"unknown keys in [server]: {sorted(s)}")
    if not isinstance(metrics_table, dict):
        raise ConfigError("[metrics] must be a table")
    metrics_listen = _take(metrics_table, "listen", str, None, "metrics.")
    cfg = replace(
        cfg,
        metrics_max_connections=_take(metrics_table, "max_connections", int, 64, "metrics."),
        metrics_read_timeout=_number(metrics_table, "read_timeout", 5.0, "metrics."))
    if metrics_table:
        raise ConfigError(f"unknown keys in [metrics]: {sorted(metrics_table)}")
    if metrics_listen is not None:
        if not is_host_port(metrics_listen):
            raise ConfigError(f"metrics.listen must be HOST:PORT, got {metrics_listen!r}")
        cfg = replace(cfg, metrics_listen=metrics_listen)
    cfg = replace(cfg, audit_tlog=parse_tlog(audit))
    if audit:
        raise ConfigError(f"unknown keys in [audit]: {sorted(audit)}")
    for key, value in (("audit.max_bytes", cfg.audit_max_bytes),
                       ("server.workers", cfg.workers),
                       ("server.threads", cfg.threads),
                       ("server.max_inflight_per_identity", cfg.max_inflight_per_identity),
                       ("server.max_message_bytes", cfg.max_message_bytes),
                       ("server.max_connections", cfg.max_connections),
                       ("server.max_unix_connections", cfg.max_unix_connections),
                       ("metrics.max_connections", cfg.metrics_max_connections)):
        _bounded(key, value)
    cfg = replace(cfg, tokens=tuple(replace(t, processes=cfg.workers) for t in cfg.tokens))
    budget = session_budget(((t.name, t.profile, t.sessions) for t in cfg.tokens if t.profile),
                            cfg.workers)
    if budget:
        raise ConfigError(budget[0])
    if cfg.engine not in ENGINES:
        raise ConfigError(f"server.engine must be one of {list(ENGINES)}, not {cfg.engine!r}")
    if cfg.cpu_affinity not in CPU_AFFINITIES:
        raise ConfigError(
            f"server.cpu_affinity must be one of {list(CPU_AFFINITIES)}, "
            f"not {cfg.cpu_affinity!r}"
        )
    return cfg


def load_config(path: Path) -> Config:
    """Load and check the daemon's config at ``path``: read as a trusted
    file (:func:`read_trusted`: whoever can write it decides who signs),
    then :func:`parse_config`. Raises ConfigError."""
    return parse_config(read_toml(path, "config", trusted=True), path.parent.resolve())
