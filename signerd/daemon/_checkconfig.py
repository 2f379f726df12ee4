"""``signerd check-config``: load and check everything a start would, serving nothing.

What it checks, in the order a start meets them:

* the config file: TOML, every key, the session budget of token profiles
  named in it (:func:`signerd.config.load_config`);
* listeners: mutual TLS on TCP (or ``dev_plaintext`` on loopback only), the
  Unix socket's directory and path length (``sun_path``, 108 bytes with NUL:
  unix(7));
* limits: a ``max_inflight_per_identity`` above ``threads`` less the
  reserve (which it cannot take) is a warning (Config.inflight_warning);
* TLS: the server certificate chain in ``tls.cert`` (each certificate
  issued by the next, the top one found in the file or ``tls.client_ca``),
  its dates, subjectAltName and extendedKeyUsage (RFC 5280 §4.2.1.6 and
  §4.2.1.12: clients match names against the SAN and want serverAuth), that
  ``tls.key`` is its key, and that ``tls.client_ca`` holds CA certificates;
* the policy (:meth:`signerd.policy.Policy.load`);
* the audit log (every worker's chain with ``workers`` > 1): that a start
  could continue it (:func:`signerd.audit.check_resumable`) and write it;
* each token: its PIN source, then opened as a start opens it
  (:class:`signerd.token.Token`: module loaded, token found by its URI,
  login with the PIN, profile and session budget), then closed. A wrong
  PIN counts as a failed login on the token, as a start's would.

Files signerd trusts are checked as a start reads them
(:func:`signerd.trusted_files.read_trusted`, sshd's StrictModes): the config, the
policy and PIN files must be regular files of at most
:data:`~signerd.trusted_files.MAX_CONFIG_BYTES` (a PIN file
:data:`~signerd.trusted_files.MAX_PIN_BYTES`), owned by root or signerd's user,
writable by no one else (whoever can write them decides who signs), in
directories no one else can change; a PIN file must not be readable by
group or others either. Each fault is an error, as it stops a start. The
audit log must be a regular file (or not exist yet) in a directory
signerd's user owns (:func:`signerd.trusted_files.audit_location_problem`). A TLS
key that others may read is an error, one that its group may read a
warning. Numbers out of their range (:data:`signerd.config.BOUNDS`) are
errors of the config. ``--strict`` makes every warning fail the check.

Output: one line per finding on stdout, ``error: SUBJECT: what``,
``warning: ...`` or ``ok: ...``; then, when the check fails, one line on
stderr. Exit status 1 when it fails, else 0. No PIN is ever printed.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from signerd import audit, one_line
from signerd.config import (
    Config,
    TokenConfig,
    is_loopback,
    load_config,
    parse_config,
)
from signerd.errors import ConfigError, SignerdError, Unavailable
from signerd.trusted_files import audit_location_problem, read_toml

if TYPE_CHECKING:
    from signerd.token import Token

Level = Literal["ok", "warning", "error"]
EXPIRY_WARNING = timedelta(days=30)  # a certificate that expires sooner is a warning
SUN_PATH_MAX = 107  # bytes of a Unix socket path, without the NUL (unix(7))
_OPEN_ATTEMPTS = 3  # SoftHSM can fail a login while another process logs in (KeyService.open)


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    level: Level
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.subject}: {self.message}"


class _Report:
    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def add(self, level: Level, subject: str, message: str) -> None:
        self.findings.append(Finding(level, subject, message))

    def ok(self, subject: str, message: str) -> None:
        self.add("ok", subject, message)

    def warn(self, subject: str, message: str) -> None:
        self.add("warning", subject, message)

    def error(self, subject: str, message: str) -> None:
        self.add("error", subject, message)


def main(path: Path, *, strict: bool = False, explicit: bool = True) -> int:
    """Run the checks on the config at ``path``, print the findings, and
    return the exit status: 1 on an error (or a warning with ``strict``),
    else 0. ``explicit``: the path was given with --config (else it is the
    embedded default's, which may not exist yet)."""
    if not explicit and not path.exists():
        findings = [Finding("error", "config", f"no config at {path}: pass --config FILE, or run "
                            "'signerd serve' once to create the embedded default")]
    else:
        findings = check(path)
    for f in findings:
        print(f)
    failed = [f for f in findings if f.level == "error" or (strict and f.level == "warning")]
    if failed:
        what = "error(s)" if not strict else "error(s) or warning(s)"
        print(f"signerd: check-config: {len(failed)} {what} in {path}", file=sys.stderr)
        return 1
    return 0


def check(path: Path) -> list[Finding]:
    """Every finding about the config at ``path``. Loads PKCS#11 modules and
    logs in to each token (as a start would), then closes them; sets the
    config's ``[environment]`` in this process first, as a start does."""
    report = _Report()
    try:
        config = load_config(path)
    except ConfigError as e:
        for fault in structural_faults(path, e):
            report.error("config", fault)
        return report.findings
    report.ok("config", f"{path}: {len(config.tokens)} token(s), workers {config.workers}")
    os.environ.update(config.environment)  # e.g. SOFTHSM2_CONF, before modules load
    _environment(report, config)
    _listeners(report, config)
    _limits(report, config)
    _tls(report, config)
    _policy(report, config)
    _audit(report, config)
    _state(report, config)
    _tokens(report, config)
    return report.findings


STATE_CHECK_TIMEOUT = 2.0  # seconds check-config waits for a PostgreSQL connection


def _state(report: _Report, config: Config) -> None:
    """The watermark store opens (and its schema is current, or migrated), as at a
    start; a SQLite file is created if it was not there, as a start would."""
    if config.state is None:
        return
    from signerd.content import StateUnavailable, open_store

    where = "PostgreSQL" if config.state.is_postgres else str(config.state.sqlite_path)
    try:
        # One look, not a start's patience: a start's pool keeps retrying a refused
        # connection for 10 s (the database may be starting), a check need not.
        store = open_store(config.state, timeout=STATE_CHECK_TIMEOUT)
    except (StateUnavailable, ConfigError) as e:
        report.error("state", f"{where}: {one_line(str(e))}; metadata keys could not sign")
        return
    store.close()
    report.ok("state", f"{where}: the watermark store opens")


# A token that parses, standing in for the file's own while another part is checked.
_STAND_IN_TOKEN = {"name": "check-config", "uri": "pkcs11:token=check-config",
                   "module": "/check-config.so", "pin_env": "CHECK_CONFIG_PIN"}
_KEY_BY_KEY = ("server", "audit", "metrics")  # tables whose keys stand alone


def structural_faults(path: Path, first: ConfigError) -> list[str]:
    """Every structural fault of the config at ``path``, whose load failed
    with ``first``: load_config stops at the first, so each part is parsed
    again on its own (each key of [server], [audit] and [metrics]; [tls],
    [policy] and [environment] whole; each [[tokens]] entry; unknown
    sections), beside a stand-in token. A fault that needs two parts to
    show (two tokens of one name, a session budget) is found only by the
    whole load: ``first`` is kept when no part shows a fault by itself."""
    try:
        data = read_toml(path, "config")
    except ConfigError as e:
        return [str(e)]
    parts: list[tuple[dict[str, Any], int]] = []  # (a part, the index of its token)
    for section, value in data.items():
        if section == "tokens" and isinstance(value, list) and value:
            parts += [({"tokens": [entry]}, i) for i, entry in enumerate(value)]
        elif section in _KEY_BY_KEY and isinstance(value, dict) and value:
            parts += [({section: {key: item}}, 0) for key, item in value.items()]
        else:
            parts.append(({section: value}, 0))
    faults: list[str] = []
    for part, index in parts:
        part.setdefault("tokens", [dict(_STAND_IN_TOKEN)])
        try:
            parse_config(part, path.parent.resolve())
        except ConfigError as e:
            fault = str(e).replace("tokens[0].", f"tokens[{index}].")
            if fault not in faults:
                faults.append(fault)
    if str(first) not in faults:  # a fault of two parts together
        faults.insert(0, str(first))
    return faults


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _secret_mode(report: _Report, subject: str, path: Path) -> None:
    mode = _mode(path)
    if mode is None:
        return
    if mode & stat.S_IRWXO:
        report.error(subject, f"{path} is accessible by others (mode {mode:04o}); chmod 600 it")
    elif mode & stat.S_IRWXG:
        report.warn(subject, f"{path} is accessible by its group (mode {mode:04o}); chmod 600 "
                    "it unless the group is meant to read it")


def _environment(report: _Report, config: Config) -> None:
    conf = config.environment.get("SOFTHSM2_CONF")
    if conf is not None and not Path(conf).is_file():
        report.error("environment.SOFTHSM2_CONF", f"{conf} does not exist: SoftHSM cannot "
                     "find its tokens")


def _listeners(report: _Report, config: Config) -> None:
    if config.listen:
        host, sep, port = config.listen.rpartition(":")
        host = host.strip("[]")
        if not sep or not port.isdigit() or int(port) > 65535:
            report.error("server.listen", f"{config.listen!r} is not host:port")
        elif config.dev_plaintext:
            if is_loopback(host):
                report.warn("server.listen", f"{config.listen}: plaintext (dev_plaintext), "
                            "every caller is dev:loopback")
            else:
                report.error("server.listen", f"dev_plaintext is allowed only on loopback, not "
                             f"{config.listen}")
        elif config.tls is None or config.tls.client_ca is None:
            report.error("server.listen", "a TCP listener needs [tls] cert, key and client_ca "
                         "(mutual TLS)")
        else:
            report.ok("server.listen", f"{config.listen}: mutual TLS")
    sock = config.unix_socket
    if sock is not None:
        existing = sock.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent  # the daemon creates the missing directories
        if len(os.fsencode(sock)) > SUN_PATH_MAX:
            report.error("server.unix_socket", f"{sock} is longer than {SUN_PATH_MAX} bytes, "
                         "the limit of a Unix socket path")
        elif not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            report.error("server.unix_socket", f"cannot create {sock}: {existing} is not a "
                         "writable directory")
        else:
            report.ok("server.unix_socket", str(sock))
    if not config.listen and sock is None:
        report.error("server", "configure at least one listener: server.listen or "
                     "server.unix_socket")


def _limits(report: _Report, config: Config) -> None:
    subject = "server.max_inflight_per_identity"
    too_high = config.inflight_warning()
    if too_high is not None:
        report.warn(subject, too_high)
    else:
        how = ("set" if config.max_inflight_per_identity is not None
               else "unset: threads less the reserve")
        report.ok(subject, f"{config.inflight_limit} of {config.threads} handler threads per "
                  f"identity ({how})")


def _read(report: _Report, subject: str, path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as e:
        report.error(subject, f"cannot read {path}: {e.strerror}")
        return None


def _certs(report: _Report, subject: str, path: Path) -> list[x509.Certificate]:
    data = _read(report, subject, path)
    if data is None:
        return []
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        report.error(subject, f"{path} holds no PEM certificate (or a malformed one)")
        return []
    return certs


def _dates(report: _Report, subject: str, cert: x509.Certificate, now: datetime) -> bool:
    """False (and an error) when ``cert`` is not valid now."""
    name = cert.subject.rfc4514_string() or "(empty subject)"
    if now < cert.not_valid_before_utc:
        report.error(subject, f"{name} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
        return False
    if now > cert.not_valid_after_utc:
        report.error(subject, f"{name} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        return False
    if cert.not_valid_after_utc - now < EXPIRY_WARNING:
        report.warn(subject, f"{name} expires on {cert.not_valid_after_utc:%Y-%m-%d}")
    return True


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _tls(report: _Report, config: Config) -> None:
    tls = config.tls
    if tls is None:
        return
    now = datetime.now(UTC)
    chain = _certs(report, "tls.cert", tls.cert)
    cas = _certs(report, "tls.client_ca", tls.client_ca) if tls.client_ca is not None else []
    for ca in cas:
        name = ca.subject.rfc4514_string()
        try:
            is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            report.warn("tls.client_ca", f"{name} is not a CA certificate (basicConstraints "
                        "cA is not true): it cannot issue client certificates")
        _dates(report, "tls.client_ca", ca, now)
    if cas:
        report.ok("tls.client_ca", f"{tls.client_ca}: {len(cas)} certificate(s)")
    if chain:
        _server_chain(report, chain, cas, now)
    _secret_mode(report, "tls.key", tls.key)
    key_data = _read(report, "tls.key", tls.key)
    if key_data is None:
        return
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as e:
        why = "it is encrypted" if "encrypted" in str(e).lower() else "not a PEM private key"
        report.error("tls.key", f"{tls.key}: cannot load: {why}")
        return
    if chain:
        der = serialization.Encoding.DER
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        mine = key.public_key().public_bytes(der, spki)
        if mine != chain[0].public_key().public_bytes(der, spki):
            report.error("tls.key", f"{tls.key} is not the key of the certificate in {tls.cert}")
        else:
            report.ok("tls.key", "matches the certificate")


def _server_chain(report: _Report, chain: list[x509.Certificate], cas: list[x509.Certificate],
                  now: datetime) -> None:
    leaf = chain[0]
    name = leaf.subject.rfc4514_string() or "(empty subject)"
    valid = all([_dates(report, "tls.cert", c, now) for c in chain])
    for child, parent in zip(chain, chain[1:], strict=False):
        if not _issued_by(child, parent):
            report.error("tls.cert", f"{child.subject.rfc4514_string()} is not issued by the "
                         f"next certificate in the file, {parent.subject.rfc4514_string()}")
            return
    top = chain[-1]
    if top.issuer == top.subject and _issued_by(top, top):
        anchor = "a self-signed certificate in the file"
    else:
        issuers = [ca for ca in cas if ca.subject == top.issuer and _issued_by(top, ca)]
        if any(ca.subject == top.issuer for ca in cas) and not issuers:
            report.error("tls.cert", f"{top.subject.rfc4514_string()} names "
                         f"{top.issuer.rfc4514_string()} as issuer, but its signature does not "
                         "verify with that certificate in tls.client_ca")
            return
        anchor = (f"{top.issuer.rfc4514_string()} from tls.client_ca" if issuers else
                  f"{top.issuer.rfc4514_string()} (in neither tls.cert nor tls.client_ca: "
                  "clients must trust it)")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
        report.warn("tls.cert", f"{name} has no subjectAltName: clients match the host they "
                    "dial against the SAN only")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
            report.error("tls.cert", f"{name}: its extendedKeyUsage lacks serverAuth, so TLS "
                         "clients refuse it as a server certificate")
    except x509.ExtensionNotFound:
        pass
    if valid:
        report.ok("tls.cert", f"{name} (SAN {', '.join(names) or 'none'}), chains to {anchor}")


def _policy(report: _Report, config: Config) -> None:
    from signerd.policy import Policy, PolicyErrors

    if config.policy_file is None:
        report.error("policy", "[policy] file is required: signerd denies everything without a "
                     "policy")
        return
    try:
        policy = Policy.load(config.policy_file)
    except PolicyErrors as e:
        for problem in e.problems:  # every faulty rule, so one run finds them all
            report.error("policy", problem)
        return
    except ConfigError as e:
        report.error("policy", str(e))
        return
    report.ok("policy", f"{config.policy_file}: {len(policy.rules)} rule(s)")


def _audit(report: _Report, config: Config) -> None:
    if config.audit_file is None:
        report.warn("audit", "no [audit] file: requests are not audited")
        return
    from signerd.daemon._workers import worker_audit_file

    files = ([config.audit_file] if config.workers == 1 else
             [worker_audit_file(config.audit_file, i) for i in range(1, config.workers + 1)])
    for path in files:
        directory = path.parent
        problem = audit_location_problem(path)
        if problem is not None:
            report.error("audit", problem)
            continue
        if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
            report.error("audit", f"{directory} is not a writable directory: {path.name}, its "
                         "head file and rotated files are created there")
            continue
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            report.error("audit", f"{path} cannot be read and written")
            continue
        try:
            seq, renamed = audit.check_resumable(path)
        except ConfigError as e:
            report.error("audit", str(e))
            continue
        where = f"continues at seq {seq + 1}" if seq else "new chain"
        if renamed is not None:
            where += f" (after {renamed}, renamed while signerd was stopped)"
        size = (f"rotates at {config.audit_max_bytes} bytes" if config.audit_max_bytes
                else "rotates on SIGUSR1 (logrotate's postrotate) only")
        report.ok("audit", f"{path}: {where}, {size}")


def _pin_source(report: _Report, tc: TokenConfig) -> bool:
    subject = f"token {tc.name}"
    if tc.pin_env:
        if os.environ.get(tc.pin_env) is None:
            report.error(subject, f"environment variable {tc.pin_env} (its PIN) is not set")
            return False
        return True
    assert tc.pin_file is not None
    try:
        empty = not tc.read_pin()  # as a start reads it: read_trusted, secret
    except ConfigError as e:
        report.error(subject, str(e))
        return False
    if empty:
        report.error(subject, f"PIN file {tc.pin_file} is empty")
        return False
    return True


@contextmanager
def _opened(report: _Report, tc: TokenConfig) -> Iterator[Token | None]:
    """The token, opened as a start opens it (None after an error), closed after."""
    from signerd.token import Token
    from signerd.token._p11 import missing_module

    subject = f"token {tc.name}"
    missing = missing_module(tc.module)
    if missing is not None:
        report.error(subject, missing)
        yield None
        return
    token: Token | None = None
    for attempt in range(1, _OPEN_ATTEMPTS + 1):
        try:
            token = Token(tc)
            break
        except Unavailable as e:
            if attempt == _OPEN_ATTEMPTS:
                report.error(subject, str(e).removeprefix(subject + ": "))
            else:
                time.sleep(0.1 * attempt)
        except SignerdError as e:  # a refused PIN, an unloadable module, a session budget
            report.error(subject, str(e).removeprefix(subject + ": "))
            break
    try:
        yield token
    finally:
        if token is not None:
            token.close()


def _tokens(report: _Report, config: Config) -> None:
    from signerd.token.profiles import session_budget

    with ExitStack() as stack:  # every token stays open until all are checked
        opened: list[Token] = []
        for tc in config.tokens:
            t = stack.enter_context(_opened(report, tc)) if _pin_source(report, tc) else None
            if t is None:
                continue
            opened.append(t)
            info = t.info
            what = f"{info.manufacturer} {info.model}, serial {info.serial}" if info else ""
            report.ok(f"token {t.name}", f"logged in: {what}; profile {t.profile.name}; "
                      f"{t.config.sessions} session(s) × {config.workers} process(es); can "
                      f"create {', '.join(t.algorithms) or 'nothing'}")
        # The config checks only the profiles it names; these were detected at login.
        for problem in session_budget(((t.name, t.profile.name, t.config.sessions)
                                       for t in opened if t.config.profile is None),
                                      config.workers):
            report.error("tokens", problem)

