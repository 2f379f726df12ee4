"""``signerd check-config``'s findings on TLS material, listeners, the policy
and the audit log, checked in-process with :func:`check` on real files and
real certificates: the server chain as an operator may get it wrong, keys
that do not load, listeners that cannot work, an audit log renamed while
signerd was stopped. The tokens are left out here (a PIN variable that is
not set: no module is loaded); test_check_config.py opens real ones."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signerd import pki
from signerd.audit import AuditLog
from signerd.daemon._checkconfig import Finding, check
from tests._postgres import postgres  # noqa: F401 - the fixture
from tests.conftest import write_toml

NOW = dt.datetime.now(dt.UTC)
UNSET_PIN = "SIGNERD_TEST_CHECK_FINDINGS_NO_PIN"


SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, *, issuer: pki.Issued | None = None,
          ca: bool | None = False, eku: x509.ObjectIdentifier | None = SERVER_AUTH,
          dns: tuple[str, ...] = ("localhost",), start: dt.datetime | None = None,
          days: int = 365) -> x509.Certificate:
    """A certificate with exactly the extensions asked for (``ca`` None: no
    basicConstraints; ``eku`` None: no extendedKeyUsage; ``dns`` empty: no
    subjectAltName); self-signed unless ``issuer``."""
    start = start or NOW - dt.timedelta(minutes=5)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer.cert.subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days)))
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if dns:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]),
                            critical=False)
    return b.sign(issuer.key if issuer else key, hashes.SHA256())


def _issued(subject: str, **kw: Any) -> pki.Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    return pki.Issued(_cert(subject, key, **kw), key)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class World:
    """A config in a temporary directory: a CA, a server certificate it
    issued, a policy, an audit log path and a token whose PIN is unset."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = pki.make_ca("findings CA")
        self.server = pki.issue(self.ca, "localhost", server=True, dns=("localhost",))
        (tmp / "ca.pem").write_bytes(_pem(self.ca.cert))
        self.server.write(tmp / "server.pem", tmp / "server-key.pem")
        (tmp / "policy.toml").write_text('[[rule]]\nname = "a"\nidentities = ["spiffe://x/a"]\n'
                                         'operations = ["read"]\n')
        self.data: dict[str, Any] = {
            "server": {"listen": "127.0.0.1:4443"},
            "tls": {"cert": str(tmp / "server.pem"), "key": str(tmp / "server-key.pem"),
                    "client_ca": str(tmp / "ca.pem")},
            "policy": {"file": str(tmp / "policy.toml")},
            "audit": {"file": str(tmp / "audit.log")},
            "tokens": [{"name": "t", "module": "/nonexistent/libpkcs11.so",
                        "uri": "pkcs11:token=t", "pin_env": UNSET_PIN}],
        }

    def check(self) -> list[Finding]:
        return check(write_toml(self.tmp / "signerd.toml", self.data))

    def about(self, *subjects: str) -> list[str]:
        """The findings about ``subjects``, as printed."""
        return [str(f) for f in self.check() if f.subject in subjects]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.delenv(UNSET_PIN, raising=False)
    return World(tmp_path)


def test_the_world_is_good_but_for_its_token(world: World) -> None:
    """The baseline every other test changes one thing of."""
    findings = world.check()
    assert [str(f) for f in findings if f.level != "ok"] == [
        f"error: token t: environment variable {UNSET_PIN} (its PIN) is not set"]
    assert "ok: tls.cert: CN=localhost (SAN localhost), chains to CN=findings CA from " \
           "tls.client_ca" in [str(f) for f in findings]
    assert "ok: tls.key: matches the certificate" in [str(f) for f in findings]


def test_a_chain_whose_certificates_do_not_follow_is_an_error(world: World) -> None:
    stranger = _issued("stranger CA", ca=True, eku=None, dns=())
    (world.tmp / "server.pem").write_bytes(_pem(world.server.cert, stranger.cert))
    assert world.about("tls.cert") == [
        "error: tls.cert: CN=localhost is not issued by the next certificate in the file, "
        "CN=stranger CA"]


def test_a_chain_up_to_a_self_signed_root_in_the_file(world: World) -> None:
    root = _issued("own root", ca=True, eku=None, dns=())
    leaf = _issued("localhost", issuer=root)
    (world.tmp / "server.pem").write_bytes(_pem(leaf.cert, root.cert))
    leaf_key = leaf.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    pki.write_private(world.tmp / "server-key.pem", leaf_key)
    assert world.about("tls.cert") == [
        "ok: tls.cert: CN=localhost (SAN localhost), chains to a self-signed certificate in "
        "the file"]


def test_an_issuer_of_the_right_name_but_another_key_is_an_error(world: World) -> None:
    """A CA re-made under the same name: tls.client_ca no longer verifies the server."""
    impostor = pki.make_ca("findings CA")
    (world.tmp / "ca.pem").write_bytes(_pem(impostor.cert))
    assert world.about("tls.cert") == [
        "error: tls.cert: CN=localhost names CN=findings CA as issuer, but its signature does "
        "not verify with that certificate in tls.client_ca"]


def test_an_issuer_in_neither_file_must_be_trusted_by_the_clients(world: World) -> None:
    (world.tmp / "ca.pem").write_bytes(_pem(pki.make_ca("another CA").cert))
    assert world.about("tls.cert") == [
        "ok: tls.cert: CN=localhost (SAN localhost), chains to CN=findings CA (in neither "
        "tls.cert nor tls.client_ca: clients must trust it)"]


def test_a_server_certificate_without_san_or_server_auth(world: World) -> None:
    client_only = _issued("localhost", issuer=world.ca, eku=ExtendedKeyUsageOID.CLIENT_AUTH,
                          dns=())
    client_only.write(world.tmp / "server.pem", world.tmp / "server-key.pem")
    assert world.about("tls.cert") == [
        "warning: tls.cert: CN=localhost has no subjectAltName: clients match the host they "
        "dial against the SAN only",
        "error: tls.cert: CN=localhost: its extendedKeyUsage lacks serverAuth, so TLS clients "
        "refuse it as a server certificate",
        "ok: tls.cert: CN=localhost (SAN none), chains to CN=findings CA from tls.client_ca"]


def test_a_certificate_that_expires_soon_is_a_warning(world: World) -> None:
    soon = _issued("localhost", issuer=world.ca, eku=None, days=10)
    soon.write(world.tmp / "server.pem", world.tmp / "server-key.pem")
    day = soon.cert.not_valid_after_utc
    assert world.about("tls.cert") == [
        f"warning: tls.cert: CN=localhost expires on {day:%Y-%m-%d}",
        "ok: tls.cert: CN=localhost (SAN localhost), chains to CN=findings CA from tls.client_ca"]


def test_client_cas_that_cannot_issue_or_are_not_valid_yet(world: World) -> None:
    leaf = pki.issue(world.ca, "a leaf", server=False)
    no_constraints = _issued("no constraints", ca=None, eku=None, dns=())
    future = _issued("future CA", ca=True, eku=None, dns=(), start=NOW + dt.timedelta(days=2))
    (world.tmp / "ca.pem").write_bytes(_pem(world.ca.cert, leaf.cert, no_constraints.cert,
                                            future.cert))
    day = future.cert.not_valid_before_utc
    assert world.about("tls.client_ca") == [
        "warning: tls.client_ca: CN=a leaf is not a CA certificate (basicConstraints cA is not "
        "true): it cannot issue client certificates",
        "warning: tls.client_ca: CN=no constraints is not a CA certificate (basicConstraints "
        "cA is not true): it cannot issue client certificates",
        f"error: tls.client_ca: CN=future CA is not valid before {day:%Y-%m-%d}",
        f"ok: tls.client_ca: {world.tmp / 'ca.pem'}: 4 certificate(s)"]


@pytest.mark.parametrize(("mode", "finding"), [
    (0o640, "warning: tls.key: {key} is accessible by its group (mode 0640); chmod 600 it unless "
            "the group is meant to read it"),
    (0o604, "error: tls.key: {key} is accessible by others (mode 0604); chmod 600 it"),
])
def test_a_tls_key_others_may_read(world: World, mode: int, finding: str) -> None:
    key = world.tmp / "server-key.pem"
    key.chmod(mode)
    assert world.about("tls.key") == [finding.format(key=key),
                                      "ok: tls.key: matches the certificate"]


def test_an_encrypted_or_foreign_tls_key_is_named(world: World) -> None:
    key = world.tmp / "server-key.pem"
    pki.write_private(key, world.server.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"a passphrase")))
    assert world.about("tls.key") == [f"error: tls.key: {key}: cannot load: it is encrypted"]
    pki.write_private(key, b"-----BEGIN CERTIFICATE-----\nnot a key\n")
    assert world.about("tls.key") == [f"error: tls.key: {key}: cannot load: not a PEM private key"]
    key.unlink()
    assert world.about("tls.key") == [f"error: tls.key: cannot read {key}: No such file or "
                                      "directory"]


@pytest.mark.parametrize(("server", "tls", "findings"), [
    ({"listen": "localhost"}, True, ["error: server.listen: 'localhost' is not host:port"]),
    ({"listen": "127.0.0.1:70000"}, True, ["error: server.listen: '127.0.0.1:70000' is not "
                                           "host:port"]),
    ({"listen": "[::1]:4443", "dev_plaintext": True}, False,
     ["warning: server.listen: [::1]:4443: plaintext (dev_plaintext), every caller is "
      "dev:loopback"]),
    ({"listen": "127.0.0.1:4443"}, False,
     ["error: server.listen: a TCP listener needs [tls] cert, key and client_ca (mutual TLS)"]),
    ({"listen": ""}, False, ["error: server: configure at least one listener: server.listen or "
                             "server.unix_socket"]),
])
def test_listeners_that_cannot_serve(world: World, server: dict[str, Any], tls: bool,
                                     findings: list[str]) -> None:
    world.data["server"] = server
    if not tls:
        del world.data["tls"]
    assert world.about("server", "server.listen", "server.unix_socket") == findings
    if not tls:  # nothing of it to check
        assert world.about("tls.cert", "tls.key", "tls.client_ca") == []


def test_a_unix_socket_path_too_long_for_sun_path(world: World) -> None:
    sock = world.tmp / ("s" * 110) / "signerd.sock"
    world.data["server"] = {"listen": "", "unix_socket": str(sock)}
    assert world.about("server", "server.unix_socket") == [
        f"error: server.unix_socket: {sock} is longer than 107 bytes, the limit of a Unix "
        "socket path"]
    world.data["server"]["unix_socket"] = str(world.tmp / "a-file" / "signerd.sock")
    (world.tmp / "a-file").write_text("")
    assert world.about("server", "server.unix_socket") == [
        f"error: server.unix_socket: cannot create {world.tmp / 'a-file' / 'signerd.sock'}: "
        f"{world.tmp / 'a-file'} is not a writable directory"]


def test_no_policy_denies_everything(world: World) -> None:
    del world.data["policy"]
    assert world.about("policy") == [
        "error: policy: [policy] file is required: signerd denies everything without a policy"]


def test_every_faulty_policy_rule_is_reported_in_one_run(world: World) -> None:
    """An operator fixing a policy sees every faulty rule at once (a new user fixed
    three faults in three runs); the daemon's own refusal stays one line, and says
    how many more there are."""
    from signerd.errors import ConfigError
    from signerd.policy import Policy

    policy = world.tmp / "policy.toml"
    policy.write_text(
        '[[rule]]\nname = "a"\nidentities = ["spiffe://x/a"]\noperations = ["read"]\n'
        '[[rule]]\nname = "b"\nidentities = ["spiffe://x/b"]\noperations = ["fly"]\n'
        '[[rule]]\nname = "c"\nidentities = ["spiffe://x/c"]\noperations = ["read"]\n'
        'colour = "red"\n'
        '[[rule]]\nname = "a"\nidentities = ["spiffe://x/d"]\noperations = ["read"]\n')
    found = world.about("policy")
    assert len(found) == 3, found
    assert all(f.startswith(f"error: policy: policy {policy}: rule[") for f in found)
    assert "rule[1]" in found[0] and "'fly'" in found[0]
    assert "rule[2]" in found[1] and "colour" in found[1]
    assert "rule[3]" in found[2] and "already used by rule[0]" in found[2]
    with pytest.raises(ConfigError) as e:
        Policy.load(policy)
    assert str(e.value) == found[0].removeprefix("error: policy: ") + (
        " (and 2 more faulty rules: `signerd check-config` lists each)")
    assert "\n" not in str(e.value)
    policy.write_text(
        '[[rule]]\nname = "b"\nidentities = ["spiffe://x/b"]\noperations = ["fly"]\n')
    (only,) = world.about("policy")
    with pytest.raises(ConfigError) as e:
        Policy.load(policy)
    assert str(e.value) == only.removeprefix("error: policy: ")  # one fault: as before


def test_no_audit_file_is_a_warning(world: World) -> None:
    del world.data["audit"]
    assert world.about("audit") == ["warning: audit: no [audit] file: requests are not audited"]


def test_an_audit_log_renamed_while_stopped_is_continued(world: World) -> None:
    """logrotate renamed the log (a copy of it, as ``create`` leaves it) while
    signerd was stopped: a start continues the chain from the renamed file."""
    path = world.tmp / "audit.log"
    with AuditLog(path) as log:
        for i in range(3):
            log.write({"op": "list_keys", "n": i})
    path.rename(world.tmp / "audit.log.1")
    last = json.loads((world.tmp / "audit.log.1").read_bytes().splitlines()[-1])["seq"]
    world.data["audit"]["max_bytes"] = 1 << 20
    assert world.about("audit") == [
        f"ok: audit: {path}: continues at seq {last + 1} (after audit.log.1, renamed while "
        "signerd was stopped), rotates at 1048576 bytes"]


def test_workers_each_have_their_own_audit_chain(world: World) -> None:
    world.data["server"]["workers"] = 2
    findings = world.about("audit")
    assert findings == [f"ok: audit: {world.tmp / name}: new chain, rotates on SIGUSR1 "
                        "(logrotate's postrotate) only"
                        for name in ("audit.log.w1", "audit.log.w2")], findings


def test_an_empty_pin_file_is_an_error(world: World) -> None:
    pin = world.tmp / "t.pin"
    pki.write_private(pin, b"\n")
    world.data["tokens"][0] = {**world.data["tokens"][0], "pin_file": str(pin)}
    del world.data["tokens"][0]["pin_env"]
    assert world.about("token t") == [f"error: token t: PIN file {pin} is empty"]


def test_each_token_entry_is_checked_and_a_fault_is_one_line(world: World) -> None:
    """Every [[tokens]] entry is parsed on its own (load_config stops at the
    first fault); the same fault of two entries is one line."""
    bad = {"name": "u", "module": "/m.so", "uri": "pkcs11:token=u", "pin_env": "X",
           "sessions": 0}
    nameless = {"module": "/m.so", "uri": "pkcs11:token=w", "pin_env": "X"}
    no_pin = {"name": "y", "module": "/m.so", "uri": "pkcs11:token=y"}
    world.data["tokens"] = [dict(bad), {**bad, "name": "v"}, nameless, no_pin, no_pin]
    errors = [str(f) for f in world.check()]
    assert errors == ["error: config: tokens[0].sessions must be between 1 and 256 "
                      "(sessions), got 0",
                      "error: config: tokens[1].sessions must be between 1 and 256 "
                      "(sessions), got 0",
                      "error: config: tokens[2].name and tokens[2].uri are required",
                      "error: config: token y: set exactly one of pin_file or pin_env"], \
        json.dumps(errors, indent=1)


def test_a_softhsm_conf_that_does_not_exist(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """check() sets [environment] in its process, as a start does: the test's
    environment is restored after."""
    monkeypatch.setenv("SOFTHSM2_CONF", "/restored/after/the/test")
    world.data["environment"] = {"SOFTHSM2_CONF": str(world.tmp / "softhsm2.conf")}
    assert world.about("environment.SOFTHSM2_CONF") == [
        f"error: environment.SOFTHSM2_CONF: {world.tmp / 'softhsm2.conf'} does not exist: "
        "SoftHSM cannot find its tokens"]


def test_the_state_store_is_opened_as_a_start_would(world: World, postgres: Any) -> None:  # noqa: F811 - the fixture
    """A new user's finding: check-config passed a [state] url no start could open. It now
    opens the store: the default SQLite file, a PostgreSQL that answers, one that does not
    (an error naming it, on one line)."""
    assert [s for s in world.about("state") if s.startswith("ok: ")] == [
        f"ok: state: {world.tmp / 'signerd-state.db'}: the watermark store opens"]
    world.data["state"] = {"url": postgres.url}
    assert world.about("state") == ["ok: state: PostgreSQL: the watermark store opens"]
    # A closed port: check-config gives up after STATE_CHECK_TIMEOUT (2 s), where a start's
    # pool keeps retrying for 10 s.
    world.data["state"] = {"url": "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"}
    [line] = world.about("state")
    assert line.startswith("error: state: PostgreSQL: ") and "\n" not in line
    assert line.endswith("; metadata keys could not sign")
