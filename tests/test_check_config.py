"""``signerd check-config`` and ``--version``, run as commands against real
configs, real certificates and the real SoftHSM tokens."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from signerd import pki
from signerd.client import Client, ClientConfig
from signerd.config import is_loopback
from tests.conftest import HSM, PKI, daemon_config, spawn_daemon, unique_gun, write_toml


def check_config(cfg: Path | None, *extra: str,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "signerd.daemon", "check-config", *extra]
    if cfg is not None:
        cmd += ["--config", str(cfg)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def findings(run: subprocess.CompletedProcess[str], level: str) -> list[str]:
    return [line for line in run.stdout.splitlines() if line.startswith(level + ": ")]


def good_config(hsm: HSM, certs: PKI, workdir: Path, **kw: Any) -> dict[str, Any]:
    data = daemon_config(hsm, certs, workdir, **kw)
    data["server"]["unix_socket"] = str(workdir / "run" / "signerd.sock")
    return data


def test_a_good_config_passes_and_serves_nothing(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "signerd.toml", good_config(hsm, certs, tmp_path))
    run = check_config(cfg)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr == ""
    assert findings(run, "error") == [] and findings(run, "warning") == []
    oks = findings(run, "ok")
    for subject in ("config", "server.listen", "server.unix_socket", "tls.client_ca",
                    "tls.cert", "tls.key", "policy", "audit", "token root", "token online"):
        assert any(line.startswith(f"ok: {subject}: ") for line in oks), (subject, run.stdout)
    assert ("ok: server.max_inflight_per_identity: 14 of 16 handler threads per identity "
            "(unset: threads less the reserve)") in oks
    assert any("token online: logged in: SoftHSM" in line for line in oks), run.stdout
    assert any("chains to CN=signerd test CA from tls.client_ca" in line for line in oks)
    assert not (tmp_path / "run").exists()  # no socket, nothing served
    assert not (tmp_path / "audit.log").exists()  # no log created either
    for pin in hsm.pins.values():
        assert pin.read_text().strip() not in run.stdout + run.stderr


def test_check_config_while_the_daemon_runs(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """The check before a restart: the live audit log is locked by the daemon
    and read as it is; the tokens are opened a second time."""
    cfg = write_toml(tmp_path / "signerd.toml", good_config(hsm, certs, tmp_path))
    proc = spawn_daemon(cfg, tmp_path)
    try:
        cert, key = certs.files["admin"]
        with Client(ClientConfig(f"127.0.0.1:{proc.info['tcp']}", certs.ca_file, cert, key,
                                 "localhost", 20)) as c:
            c.create_key(unique_gun(), "targets")  # one audit line
        run = check_config(cfg)
    finally:
        assert proc.stop(signal.SIGTERM) == 0
    assert run.returncode == 0, run.stdout + run.stderr
    # seq 1 is the audit tree's start record (checkpoints are on by default), 2 the key
    assert any(line.startswith("ok: audit: ") and "continues at seq 3" in line
               for line in findings(run, "ok")), run.stdout


def _foreign_key(certs: PKI, tmp_path: Path) -> None:
    other = pki.issue(certs.ca, "localhost", server=True, dns=("localhost",))
    other.write(tmp_path / "other.pem", tmp_path / "other-key.pem")


def _expired_server(certs: PKI, tmp_path: Path) -> None:
    old = pki.issue(certs.ca, "localhost", server=True, dns=("localhost",), days=1,
                    not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=5))
    old.write(tmp_path / "other.pem", tmp_path / "other-key.pem")


Mutation = Callable[[dict[str, Any], HSM, PKI, Path], None]


def _set_tls(**files: str) -> Mutation:
    def apply(data: dict[str, Any], hsm: HSM, certs: PKI, tmp: Path) -> None:
        data["tls"].update({k: str(tmp / v) for k, v in files.items()})
    return apply


def _policy(text: str) -> Mutation:
    def apply(data: dict[str, Any], hsm: HSM, certs: PKI, tmp: Path) -> None:
        (tmp / "policy.toml").write_text(text)
    return apply


def _wrong_pin(data: dict[str, Any], hsm: HSM, certs: PKI, tmp: Path) -> None:
    pki.write_private(tmp / "wrong.pin", b"not-the-pin")
    data["tokens"][1]["pin_file"] = str(tmp / "wrong.pin")


def _token(**changes: Any) -> Mutation:
    def apply(data: dict[str, Any], hsm: HSM, certs: PKI, tmp: Path) -> None:
        data["tokens"][1].update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del data["tokens"][1][key]
    return apply


def _server(**changes: Any) -> Mutation:
    def apply(data: dict[str, Any], hsm: HSM, certs: PKI, tmp: Path) -> None:
        data["server"].update(changes)
    return apply


def _exposed_pin(data: dict[str, Any], hsm: HSM, certs: PKI, tmp: Path) -> None:
    pin = tmp / "exposed.pin"
    pin.write_bytes(hsm.pins["online"].read_bytes())
    pin.chmod(0o644)
    data["tokens"][1]["pin_file"] = str(pin)


def _torn_audit(data: dict[str, Any], hsm: HSM, certs: PKI, tmp: Path) -> None:
    (tmp / "audit.log").write_bytes(b'{"seq":1,"prev":"00')


def _write_file(name: str, content: str) -> Callable[[PKI, Path], None]:
    def apply(certs: PKI, tmp: Path) -> None:
        (tmp / name).write_text(content)
    return apply


CASES = [
    # (id, files to create, config change, subject of the one error, words of its message)
    ("tls-key-of-another-cert", _foreign_key, _set_tls(key="other-key.pem"),
     "tls.key", "is not the key of the certificate"),
    ("tls-cert-expired", _expired_server,
     _set_tls(cert="other.pem", key="other-key.pem"), "tls.cert", "expired on"),
    ("tls-client-ca-not-pem", _write_file("ca.txt", "not a certificate\n"),
     _set_tls(client_ca="ca.txt"), "tls.client_ca", "holds no PEM certificate"),
    ("tls-cert-missing", None, _set_tls(cert="nope.pem"), "tls.cert",
     "cannot read"),
    ("policy-bad-operation", None,
     _policy('[[rule]]\nname = "x"\nidentities = ["a"]\noperations = ["fly"]\n'),
     "policy", "fly"),
    ("policy-not-toml", None, _policy("[[rule\n"), "policy", "not valid TOML"),
    ("wrong-pin", None, _wrong_pin, "token online", "login refused (CKR_PIN_INCORRECT)"),
    ("module-missing", None, _token(module="/nonexistent/libpkcs11.so"), "token online",
     "PKCS#11 module /nonexistent/libpkcs11.so does not exist"),
    ("module-a-directory", None, _token(module="/"), "token online",
     "PKCS#11 module / is not a file"),
    ("module-not-pkcs11", None, _token(module="/bin/true"), "token online",
     "cannot load PKCS#11 module /bin/true"),
    ("token-not-found", None, _token(uri="pkcs11:token=no-such-token"), "token online",
     "no token matches its uri"),
    ("pin-env-unset", None, _token(pin_file=None, pin_env="SIGNERD_TEST_UNSET_PIN"),
     "token online", "SIGNERD_TEST_UNSET_PIN"),
    ("pin-file-world-readable", None, _exposed_pin, "token online",
     "is accessible by group or others (mode 0644)"),
    ("session-budget", None, _token(profile="yubihsm", sessions=20), "config",
     "yubihsm tokens allow 16 sessions"),
    ("audit-log-torn", None, _torn_audit, "audit", "has no newline (a torn write?)"),
    ("no-request-per-identity", None, _server(max_inflight_per_identity=0), "config",
     "server.max_inflight_per_identity must be between 1 and 1024 (requests), got 0"),
    ("plaintext-not-loopback", None, _server(dev_plaintext=True, listen="0.0.0.0:4443"),
     "server.listen", "dev_plaintext is allowed only on loopback, not 0.0.0.0:4443"),
]


@pytest.mark.parametrize(("files", "change", "subject", "words"),
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_each_problem_is_one_error_line(
        hsm: HSM, certs: PKI, tmp_path: Path, files: Callable[[PKI, Path], None] | None,
        change: Mutation, subject: str, words: str) -> None:
    data = good_config(hsm, certs, tmp_path)
    if files is not None:
        files(certs, tmp_path)
    change(data, hsm, certs, tmp_path)
    run = check_config(write_toml(tmp_path / "signerd.toml", data))
    errors = findings(run, "error")
    assert run.returncode == 1, run.stdout
    assert len(errors) == 1, run.stdout
    assert errors[0].startswith(f"error: {subject}: ") and words in errors[0], errors
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("signerd: check-config: 1 ")
    assert "Traceback" not in run.stdout + run.stderr
    assert "not-the-pin" not in run.stdout + run.stderr


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
    ("::", False), ("192.0.2.1", False), ("[::1]", False),
    ("LOCALHOST", False), ("example.com", False), ("", False)])
def test_is_loopback_takes_a_bare_host(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_group_readable_pin_is_an_error(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """Issue 22 §5: a PIN file readable by group or others was only warned
    about; serve now refuses it (sshd's rule for private keys), and so
    check-config reports it as an error, naming the file and its mode."""
    data = good_config(hsm, certs, tmp_path)
    pin = tmp_path / "group.pin"
    pin.write_bytes(hsm.pins["online"].read_bytes())
    pin.chmod(0o640)
    data["tokens"][1]["pin_file"] = str(pin)
    cfg = write_toml(tmp_path / "signerd.toml", data)
    run = check_config(cfg)
    assert run.returncode == 1, run.stdout
    assert findings(run, "error") == [
        f"error: token online: PIN file of token online {pin}: is accessible by group or "
        "others (mode 0640); chmod 600 it"]


def test_an_identity_limit_above_threads_less_the_reserve_is_a_warning(
        hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    data = good_config(hsm, certs, tmp_path)
    data["server"].update(threads=8, max_inflight_per_identity=8)
    cfg = write_toml(tmp_path / "signerd.toml", data)
    lenient = check_config(cfg)
    assert lenient.returncode == 0, lenient.stdout
    [warning] = [w for w in findings(lenient, "warning")
                 if w.startswith("warning: server.max_inflight_per_identity: ")]
    assert "is more than the 7 of 8 handler threads" in warning
    assert check_config(cfg, "--strict").returncode == 1
    data["server"]["max_inflight_per_identity"] = 7
    fair = check_config(write_toml(tmp_path / "signerd.toml", data))
    assert ("ok: server.max_inflight_per_identity: 7 of 8 handler threads per identity (set)"
            in findings(fair, "ok")), fair.stdout


def test_no_config_anywhere_is_one_error(tmp_path: Path) -> None:
    run = check_config(None, env={"SIGNERD_STATE_DIR": str(tmp_path / "empty")})
    assert run.returncode == 1
    assert findings(run, "error") == [f"error: config: no config at {tmp_path}/empty/signerd.toml:"
                                      " pass --config FILE, or run 'signerd serve' once to create "
                                      "the embedded default"]
    assert not (tmp_path / "empty").exists()  # check-config creates nothing


def test_an_unparsable_config_is_one_error(tmp_path: Path) -> None:
    cfg = tmp_path / "signerd.toml"
    cfg.write_text("[server\n")
    run = check_config(cfg)
    assert run.returncode == 1
    assert len(findings(run, "error")) == 1 and "is not valid TOML" in run.stdout


@pytest.mark.parametrize("module", ["signerd.daemon", "signerd.cli"])
def test_version_comes_from_the_package_metadata(module: str) -> None:
    run = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                         text=True, timeout=60)
    prog = "signerd" if module == "signerd.daemon" else "signerctl"
    assert (run.returncode, run.stdout, run.stderr) == (0, f"{prog} {version('signerd')}\n", "")


def test_changelog_and_license_match_the_package() -> None:
    root = Path(__file__).resolve().parent.parent
    license_text = (root / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert 'license = "Apache-2.0"' in (root / "pyproject.toml").read_text()
    assert (root / "CHANGELOG.md").read_text().startswith("# Changelog")


@pytest.mark.parametrize(("key", "value", "words"), [
    ("health_interval", 0, "server.health_interval must be between 0.05 and 3600"),
    ("health_interval", -1, "server.health_interval must be between 0.05 and 3600"),
    ("health_interval", float("nan"), "server.health_interval must be between 0.05 and 3600"),
    ("health_interval", 1e9, "server.health_interval must be between 0.05 and 3600"),
    ("health_interval", 0.000001, "server.health_interval must be between 0.05 and 3600"),
    ("max_message_bytes", -1, "server.max_message_bytes must be between 1024"),
    ("max_message_bytes", 0, "server.max_message_bytes must be between 1024"),
    ("max_message_bytes", 1 << 31, "server.max_message_bytes must be between 1024"),
])
def test_numbers_that_would_switch_a_protection_off_are_refused(key: str, value: float,
                                                                words: str) -> None:
    """Regression (new-user trial): health_interval = 0 (or negative, or NaN)
    made the health probe spin on a CPU, and max_message_bytes = -1 is
    gRPC's 'no limit'; both were accepted."""
    from signerd.config import ConfigError, parse_config
    base = {"tokens": [{"name": "t", "module": "/m.so", "uri": "pkcs11:token=t",
                        "pin_env": "P"}]}
    with pytest.raises(ConfigError, match=words):
        parse_config({**base, "server": {key: value}}, Path("/"))
    good = {"health_interval": 5, "max_message_bytes": 4096}[key]
    assert parse_config({**base, "server": {key: good}}, Path("/"))


def test_every_structural_fault_is_reported(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """Regression: check-config reported only the first structural fault of a
    file that had two (load_config stops at the first)."""
    data = good_config(hsm, certs, tmp_path)
    data["server"].update(threds=4, workers=0)
    data["audit"]["max_bytes"] = 10
    data["tokens"][1]["sesions"] = 3
    run = check_config(write_toml(tmp_path / "signerd.toml", data))
    assert run.returncode == 1
    assert sorted(findings(run, "error")) == [  # printed in the file's order
        "error: config: audit.max_bytes must be between 4096 and 1099511627776 (bytes), got 10",
        "error: config: server.workers must be between 1 and 64 (processes), got 0",
        "error: config: tokens[1].: unknown keys ['sesions']",
        "error: config: unknown keys in [server]: ['threds']",
    ], run.stdout
    assert run.stderr == f"signerd: check-config: 4 error(s) in {tmp_path / 'signerd.toml'}\n"
    # a fault only two parts together make is still the one line it was
    data = good_config(hsm, certs, tmp_path)
    data["tokens"][1]["name"] = data["tokens"][0]["name"]
    run = check_config(write_toml(tmp_path / "signerd.toml", data))
    assert len(findings(run, "error")) == 1 and "token names must be unique" in run.stdout


@pytest.mark.parametrize(("tcti", "named"), [
    ("tabrmd", 'TCTI "tabrmd" (TPM2_PKCS11_TCTI)'),
    ("device:/nonexistent/tpmrm0", 'TCTI "device:/nonexistent/tpmrm0" (TPM2_PKCS11_TCTI)'),
])
def test_a_tpm_out_of_reach_names_its_tcti(hsm: HSM, certs: PKI, tmp_path: Path, tcti: str,
                                           named: str) -> None:
    """Regression: 'cannot load PKCS#11 module ...: CKR_GENERAL_ERROR' and
    nothing more, for tpm2-pkcs11 with TPM2_PKCS11_TCTI = "tabrmd" and no
    tpm2-abrmd on the system D-Bus."""
    module = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
    assert Path(module).exists(), "tpm2-pkcs11 is required (Debian: libtpm2-pkcs11-1)"
    data = good_config(hsm, certs, tmp_path)
    (tmp_path / "store").mkdir()
    data["environment"].update(TPM2_PKCS11_STORE=str(tmp_path / "store"), TPM2_PKCS11_TCTI=tcti)
    data["tokens"][1].update(module=module, uri="pkcs11:token=signerd")
    run = check_config(write_toml(tmp_path / "signerd.toml", data),
                       env={"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path / 'no-bus'}"})
    [error] = findings(run, "error")
    assert error == (f"error: token online: cannot load PKCS#11 module {module}: "
                     f"CKR_GENERAL_ERROR: tpm2-pkcs11 could not reach the TPM through {named}; "
                     '"tabrmd" needs tpm2-abrmd on the system D-Bus ("tabrmd:bus_type=session" '
                     'for a session bus), a real TPM is "device:/dev/tpmrm0"'), run.stdout
