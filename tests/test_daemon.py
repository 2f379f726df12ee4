"""signerd as a separate process: restarts, two daemons, the embedded default, signerctl."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from signerd import signing
from signerd.client import Client, ClientConfig
from signerd.keys import parse_algorithm
from tests.conftest import (
    HSM,
    PKI,
    daemon_config,
    spawn_daemon,
    threads_taking_signals,
    unique_gun,
    write_toml,
)


def _client(certs: PKI, port: int) -> Client:
    cert, key = certs.files["admin"]
    return Client(ClientConfig(f"127.0.0.1:{port}", certs.ca_file, cert, key, "localhost", 20))


def _config(hsm: HSM, certs: PKI, workdir: Path, **kw: Any) -> Path:
    return write_toml(workdir / "signerd.toml", daemon_config(hsm, certs, workdir, **kw))


def test_keys_survive_a_restart(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    cfg = _config(hsm, certs, tmp_path)
    first = spawn_daemon(cfg, tmp_path)
    try:
        with _client(certs, first.info["tcp"]) as c:
            key = c.create_key(unique_gun(), "targets/releases", "ed25519", purpose="raw")
    finally:
        assert first.stop(signal.SIGTERM) == 0
    second = spawn_daemon(cfg, tmp_path)
    try:
        with _client(certs, second.info["tcp"]) as c:
            again = c.get_key(key.key_id)
            sig = c.sign(key.key_id, message=b"after restart").signature
    finally:
        assert second.stop(signal.SIGINT) == 0
    assert (again.gun, again.role, again.public_key_der) == (key.gun, key.role, key.public_key_der)
    signing.verify(
        key.public_key_der, parse_algorithm("ed25519"), sig, b"after restart", signing.SignOptions()
    )
    assert "signerd stopped" in second.log()


def test_two_daemons_on_one_token_see_each_others_keys(
    hsm: HSM, certs: PKI, tmp_path: Path
) -> None:
    a = spawn_daemon(_config(hsm, certs, tmp_path / "a"), tmp_path / "a")
    b = spawn_daemon(_config(hsm, certs, tmp_path / "b"), tmp_path / "b")
    try:
        with _client(certs, a.info["tcp"]) as ca, _client(certs, b.info["tcp"]) as cb:
            gun = unique_gun()
            made_by_a = ca.create_key(gun, "targets", purpose="raw")
            made_by_b = cb.create_key(gun, "snapshot", "rsa-2048", purpose="raw")
            # each daemon finds the other's key (a miss re-reads the token)
            assert cb.get_key(made_by_a.key_id).public_key_der == made_by_a.public_key_der
            sig = ca.sign(made_by_b.key_id, message=b"cross").signature
            assert {k.key_id for k in ca.list_keys(gun=gun)} == {made_by_a.key_id, made_by_b.key_id}
            # B has just listed the token; a key A makes now is usable on B at once
            fresh = ca.create_key(gun, "targets/releases", purpose="raw")
            assert cb.sign(fresh.key_id, message=b"at once").signature
            cb.delete_key(made_by_a.key_id)
    finally:
        a.stop()
        b.stop()
    signing.verify(
        made_by_b.public_key_der, parse_algorithm("rsa-2048"), sig, b"cross", signing.SignOptions()
    )


def _serve_once(cfg: Path) -> subprocess.CompletedProcess[str]:
    """Run a daemon that is expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "signerd.daemon", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_wrong_pin_stops_startup_with_a_clear_error(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    data = daemon_config(hsm, certs, tmp_path, tokens=("online",))
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("not-the-pin\n")
    wrong.chmod(0o600)
    data["tokens"][0]["pin_file"] = str(wrong)
    cfg = write_toml(tmp_path / "signerd.toml", data)
    proc = _serve_once(cfg)
    assert proc.returncode == 2
    assert "login refused (CKR_PIN_INCORRECT)" in proc.stderr
    assert "not-the-pin" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "problem,expected",
    [
        ("pin-in-uri", "must not carry a PIN"),
        ("no-policy", "[policy] file is required"),
        ("plaintext-not-loopback", "dev_plaintext is allowed only on loopback"),
        ("no-tls", "needs [tls] cert, key and client_ca"),
        ("unknown-key", "unknown keys in [server]"),
        ("threads-not-integer", "server.threads must be an integer, got '8'"),
        # Regression: a start said "... an error the PKCS#11 module did not name".
        ("module-missing", "PKCS#11 module /nonexistent/lib.so does not exist"),
        ("module-a-directory", "PKCS#11 module / is not a file"),
        ("module-not-a-library", "cannot load PKCS#11 module /etc/hostname: "),
    ],
)
def test_bad_config_is_one_clear_line(
    hsm: HSM, certs: PKI, tmp_path: Path, problem: str, expected: str
) -> None:
    data = daemon_config(hsm, certs, tmp_path, tokens=("online",))
    if problem == "pin-in-uri":
        data["tokens"][0]["uri"] = "pkcs11:token=test-online?pin-value=1234"
    elif problem == "no-policy":
        del data["policy"]
    elif problem == "plaintext-not-loopback":
        data["server"].update(dev_plaintext=True, listen="0.0.0.0:0")
    elif problem == "no-tls":
        del data["tls"]
    elif problem == "threads-not-integer":
        data["server"]["threads"] = "8"
    elif problem.startswith("module-"):
        data["tokens"][0]["module"] = {"module-missing": "/nonexistent/lib.so",
                                       "module-a-directory": "/",
                                       "module-not-a-library": "/etc/hostname"}[problem]
    else:
        data["server"]["lissten"] = "x"
    cfg = write_toml(tmp_path / "signerd.toml", data)
    proc = _serve_once(cfg)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("signerd: ") and expected in last
    assert "1234" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ctl(
    env: dict[str, str], *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "signerd.cli", *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, **env},
        timeout=60,
    )


def test_embedded_default_starts_from_nothing_and_signs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {"SIGNERD_STATE_DIR": str(state)}
    proc = spawn_daemon(None, tmp_path, env=env, args=("--listen", f"127.0.0.1:{_free_port()}",
                                                   "--metrics-listen", f"127.0.0.1:{_free_port()}"))
    try:
        assert (state / "root.pin").stat().st_mode & 0o777 == 0o600
        assert (state / "tls" / "client-key.pem").stat().st_mode & 0o777 == 0o600
        pin = (state / "online.pin").read_text()
        made = _ctl(
            env, "keys", "create", "--gun", "docker.io/acme/app", "--role", "targets",
            "--purpose", "raw", "--json"  # it signs a plain message below
        )
        assert made.returncode == 0, made.stderr
        key = json.loads(made.stdout)
        assert {"key_id", "algorithm", "gun", "role", "public_key_pem"} <= key.keys()
        assert key["algorithm"] == "ecdsa-p256"
        (tmp_path / "msg").write_bytes(b"hello")
        signed = _ctl(
            env,
            "sign",
            "--key",
            key["key_id"],
            "--out",
            str(tmp_path / "sig"),
            str(tmp_path / "msg"),
        )
        assert signed.returncode == 0, signed.stderr
        verify = ("verify", "--key", key["key_id"], "--signature", str(tmp_path / "sig"),
                  str(tmp_path / "msg"))
        ok = _ctl(env, *verify)
        assert ok.returncode == 0 and b"signature OK" in ok.stdout
        (tmp_path / "msg").write_bytes(b"hellO")
        bad = _ctl(env, *verify)  # same signature, changed message
        assert bad.returncode == 1 and b"does NOT verify" in bad.stderr
        # root keys land on the separate root token
        root = _ctl(
            env, "keys", "create", "--gun", "docker.io/acme/app", "--role", "root", "--json"
        )
        assert json.loads(root.stdout)["token"] == "root"
        listed = _ctl(env, "keys", "list")
        assert listed.returncode == 0 and key["key_id"].encode() in listed.stdout
        # the Unix socket works too, with the caller's uid as identity
        unix = _ctl(
            env,
            "--server",
            f"unix:{state / 'signerd.sock'}",
            "keys",
            "show",
            key["key_id"],
            "--json",
        )
        assert unix.returncode == 0 and json.loads(unix.stdout)["key_id"] == key["key_id"]
    finally:
        assert proc.stop() == 0
    log = proc.log()
    assert pin not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line["msg"] == "signerd serving" for line in lines)
    audit = (state / "audit.log").read_text().splitlines()
    assert len(audit) >= 6 and all(json.loads(a)["identity"] for a in audit)
    check = _ctl({}, "audit", "verify", str(state / "audit.log"))
    assert check.returncode == 0, check.stdout + check.stderr


# Every failure a person meets at the command line: (tool, arguments, words of
# the one line). {NAME} in an argument is a value of the cli_world fixture.
CLI_FAILURES = [
    ("out-not-writable", "signerctl",
     ("sign", "--key", "{used}", "--out", "/nonexistent/dir/x.sig", "{message}"),
     "cannot write the signature to /nonexistent/dir/x.sig"),
    ("log-level-unknown", "signerd", ("serve", "--log-level", "verbose"),
     "argument --log-level: invalid choice: 'verbose'"),
    ("tls-wrong-ca", "signerctl", ("--tls-ca", "{other_ca}", "keys", "list"),
     "TLS handshake with signerd at 127.0.0.1:"),
    ("daemon-down", "signerctl", ("--server", "127.0.0.1:{closed_port}", "keys", "list"),
     "cannot reach signerd at 127.0.0.1:"),
    ("verify-bad-pubkey", "signerctl",
     ("verify", "--pubkey", "{message}", "--signature", "{message}", "{message}"),
     "holds no public key signerd can use"),
    ("delete-used-key", "signerctl", ("keys", "delete", "{used}"), "pass --yes to delete it"),
    ("unknown-option", "signerctl", ("keys", "list", "--colour"),
     "unrecognized arguments: --colour (see 'signerctl --help')"),
    ("missing-argument", "signerctl", ("keys", "delete"),
     "signerctl keys delete: the following arguments are required: key_id"),
    ("unknown-key", "signerctl", ("keys", "show", "ab" * 32), "NOT_FOUND: no key with ID"),
    ("bad-gun", "signerctl", ("keys", "create", "--gun", "BAD GUN", "--role", "targets"),
     "INVALID_ARGUMENT: invalid gun"),
    ("input-missing", "signerctl", ("sign", "--key", "ab" * 32, "/nonexistent/file"),
     "cannot read /nonexistent/file"),
    ("tls-ca-missing", "signerctl",
     ("--server", "127.0.0.1:1", "--tls-ca", "/nonexistent", "keys", "list"),
     "cannot read TLS file /nonexistent"),
]


@pytest.mark.parametrize(("tool", "args", "words"),
                         [pytest.param(*case[1:], id=case[0]) for case in CLI_FAILURES])
def test_every_cli_failure_is_one_line(cli_world: dict[str, str], tool: str,
                                       args: tuple[str, ...], words: str) -> None:
    """Issue 11 §7: each failure is exactly one line on stderr (no usage
    block, no traceback) and a non-zero exit."""
    module = "signerd.cli" if tool == "signerctl" else "signerd.daemon"
    run = subprocess.run([sys.executable, "-m", module, *(a.format(**cli_world) for a in args)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SIGNERD_STATE_DIR": cli_world["state"]})
    assert run.returncode != 0, run.stdout
    assert len(run.stderr.splitlines()) == 1 and run.stderr.endswith("\n"), run.stderr
    assert run.stderr.startswith(f"{tool}") and words in run.stderr, run.stderr


# Usage errors: exit 2 before anything is read or reached. Regression: a
# --timeout of -1, nan or 1e308 was taken, then blamed on the daemon.
USAGE_ERRORS = [
    ("timeout-negative", "signerctl", ("--timeout", "-1", "keys", "list"),
     "signerctl: argument --timeout: must be seconds, a number more than 0 and at most 86400, "
     "not '-1'"),
    ("timeout-nan", "signerctl", ("keys", "list", "--timeout", "nan"),
     "argument --timeout: must be seconds"),
    ("timeout-huge", "signerctl", ("--timeout", "1e308", "keys", "list"),
     "argument --timeout: must be seconds"),
    # Regression (second trial): reached gRPC's resolver ("errors resolving nohostport").
    ("server-no-port", "signerctl", ("--server", "nohostport", "keys", "list"),
     "argument --server: expected HOST:PORT or unix:/path/to/signerd.sock, got 'nohostport'"),
    ("timeout-trust", "signerctl", ("trust", "inspect", "docker.io/a/b", "--timeout", "-1"),
     "argument --timeout: must be seconds"),
    # Regression: 0 silently issued a 10-year certificate.
    ("days-zero", "signerctl", ("keys", "certify", "ab" * 32, "--subject", "CN=x", "--days", "0"),
     "argument --days: must be a whole number of days from 1 to 36500, not '0'; leave --days "
     "out for the default"),
    ("days-huge", "signerctl",
     ("keys", "certify", "ab" * 32, "--subject", "CN=x", "--days", "36501"), "argument --days"),
    # Regression: "length must not be negative", from the daemon's side.
    ("size-negative", "signerctl",
     ("trust", "sign", "docker.io/a/b:v1", "--digest", "sha256:" + "0" * 64, "--size", "-5"),
     "argument --size: must be a whole number of bytes from 0 to"),
    # Regression: "the following arguments are required: keys_cmd".
    ("keys-no-command", "signerctl", ("keys",),
     "signerctl keys: a command is required: create, list, show, delete, export, certify "
     "or set-purpose"),
    ("no-command", "signerctl", (), "signerctl: a command is required: keys, tokens, sign"),
    ("delegation-no-command", "signerctl", ("trust", "delegation"),
     "signerctl trust delegation: a command is required: add or remove"),
    ("signerd-no-command", "signerd", (),
     "signerd: a command is required: check-config, sweep or serve"),
    ("listen-not-an-address", "signerd", ("serve", "--listen", "4443"),
     "argument --listen: must be HOST:PORT, not '4443'"),
]


@pytest.mark.parametrize(("tool", "args", "words"),
                         [pytest.param(*case[1:], id=case[0]) for case in USAGE_ERRORS])
def test_usage_errors_exit_2_in_one_line(tmp_path: Path, tool: str, args: tuple[str, ...],
                                         words: str) -> None:
    module = "signerd.cli" if tool == "signerctl" else "signerd.daemon"
    run = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "SIGNERD_STATE_DIR": str(tmp_path)})
    assert run.returncode == 2 and run.stdout == "", (run.returncode, run.stdout)
    assert len(run.stderr.splitlines()) == 1 and words in run.stderr, run.stderr
    assert not (tmp_path / "signerd.toml").exists()


@pytest.mark.parametrize(("text", "words"), [
    # Regression: "unexpected error: ValueError: could not convert string to float: 'soon'".
    ('timeout = "soon"', "timeout must be seconds, a number more than 0 and at most 86400, "
                         "got 'soon'"),
    ("timeout = nan", "timeout must be seconds"),
    ("timeout = -1", "timeout must be seconds"),
    ('plaintext = "false"', "plaintext must be true or false, got 'false'"),  # was true
    ("ca = 5", "ca must be a non-empty string, got 5"),
    ("server_name = true", "server_name must be a non-empty string, got True"),
])
def test_a_bad_client_config_value_is_named(tmp_path: Path, text: str, words: str) -> None:
    config = tmp_path / "client.toml"
    config.write_text(f'server = "127.0.0.1:{_free_port()}"\n{text}\n')
    run = _ctl({}, "--config", str(config), "keys", "list")
    lines = run.stderr.decode().splitlines()
    assert run.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"signerctl: client config {config}: {words}"), lines


@pytest.mark.parametrize("server", ["nohostport", "host:", ":4443", "host:99999",
                                    "unix:"])
def test_a_bad_server_in_client_config_is_named(tmp_path: Path, server: str) -> None:
    """Regression (second trial): server = "nohostport" reached gRPC's resolver."""
    config = tmp_path / "client.toml"
    config.write_text(f'server = "{server}"\n')
    run = _ctl({}, "--config", str(config), "keys", "list")
    lines = run.stderr.decode().splitlines()
    assert run.returncode == 1 and len(lines) == 1, lines
    assert lines[0] == (f"signerctl: client config {config}: server must be HOST:PORT or "
                        f"unix:/path/to/signerd.sock, got '{server}'"), lines


def test_audit_verify_failures_are_one_line_on_stderr(tmp_path: Path) -> None:
    """Regression: 'audit verify' printed its failures on stdout."""
    torn = tmp_path / "torn.log"
    torn.write_text('{"seq": 1')
    for args in ([str(tmp_path / "missing.log")], [str(torn)], ["--json", str(torn)]):
        run = _ctl({}, "audit", "verify", *args)
        lines = run.stderr.decode().splitlines()
        assert run.returncode == 1 and len(lines) == 1, (args, lines)
        assert lines[0].startswith(f"signerctl: {args[-1]}: "), lines
        if "--json" in args:  # the result document stays on stdout, as on success
            assert json.loads(run.stdout)["ok"] is False
        else:
            assert run.stdout == b"", run.stdout


def test_listen_flags_are_honoured_for_this_run(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """Regression: --listen and --metrics-listen were ignored once a config
    existed; now they apply to this run, said in one warning line, and the
    config file is left as it was."""
    cfg = _config(hsm, certs, tmp_path, metrics=True)
    before = cfg.read_text()
    port, metrics_port = _free_port(), _free_port()
    proc = spawn_daemon(cfg, tmp_path, args=("--listen", f"127.0.0.1:{port}",
                                             "--metrics-listen", f"127.0.0.1:{metrics_port}"))
    try:
        assert (proc.info["tcp"], proc.info["metrics"]) == (port, metrics_port)
        with _client(certs, port) as c:
            assert c.list_tokens()
    finally:
        assert proc.stop() == 0
    assert cfg.read_text() == before
    said = [json.loads(line) for line in proc.log().splitlines()
            if "for this run only" in line]
    assert len(said) == 1 and said[0]["level"] == "warning", said
    assert said[0]["server.listen"] == {"this_run": f"127.0.0.1:{port}", "config": "127.0.0.1:0"}
    assert f"edit server.listen and metrics.listen in {cfg}" in said[0]["msg"]


def test_an_unexpected_error_is_one_line_unless_debug(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from signerd.cli import signerctl as cli

    def broken(args: Any) -> None:  # a bug in a command
        raise RuntimeError("no such thing\nsecond line")

    monkeypatch.setattr(cli, "cmd_keys_list", broken)
    assert cli.main(["keys", "list"]) == 1
    assert capsys.readouterr().err == ("signerctl: unexpected error: RuntimeError: no such thing "
                                       "second line (--debug shows where)\n")
    with pytest.raises(RuntimeError):  # with --debug, Python prints its traceback
        cli.main(["keys", "list", "--debug"])


def _delete_at_a_terminal(env: dict[str, str], key_id: str, answer: bytes
                          ) -> subprocess.CompletedProcess[bytes]:
    """``signerctl keys delete KEY`` with a terminal (a pty) as its stdin,
    answering its question with ``answer``."""
    import pty

    terminal, their_end = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "signerd.cli", "keys", "delete", key_id],
                                stdin=their_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, **env})
        os.close(their_end)
        os.write(terminal, answer + b"\n")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(terminal)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_deleting_a_key_that_has_signed_takes_a_yes(cli_world: dict[str, str]) -> None:
    """Regression (issue 11 §7): 'keys delete' destroyed a key that had signed
    (that verifiers may still trust) without a word."""
    env = {"SIGNERD_STATE_DIR": cli_world["state"]}
    state = Path(cli_world["state"])

    def new_key(used: bool) -> str:
        made = _ctl(env, "keys", "create", "--gun", unique_gun(), "--role", "targets",
                    "--purpose", "raw", "--json")
        key_id: str = json.loads(made.stdout)["key_id"]
        if used:
            _mark_used(state, key_id)
        return key_id

    def exists(key_id: str) -> bool:
        return _ctl(env, "keys", "show", key_id).returncode == 0

    used = new_key(used=True)
    refused = _ctl(env, "keys", "delete", used, stdin=b"y\n")  # a pipe is not a terminal
    assert refused.returncode == 1 and refused.stderr.count(b"\n") == 1, refused.stderr
    assert b"has made signatures" in refused.stderr and exists(used)
    no = _delete_at_a_terminal(env, used, b"n")
    assert no.returncode == 1 and b"destroy it for good? [y/N]" in no.stderr, no.stderr
    assert no.stderr.endswith(f"signerctl: key {used} not deleted\n".encode()) and exists(used)
    yes = _delete_at_a_terminal(env, used, b"y")
    assert yes.returncode == 0 and f"deleted key {used}".encode() in yes.stdout, yes.stderr
    assert not exists(used)
    forced = new_key(used=True)
    assert _ctl(env, "keys", "delete", "--yes", forced).returncode == 0 and not exists(forced)
    unused = new_key(used=False)  # never signed: nothing to ask
    assert _ctl(env, "keys", "delete", unused).returncode == 0 and not exists(unused)


def _sign_batch(env: dict[str, str], key_id: str) -> None:
    from signerd.v1 import signer_pb2 as pb

    with Client(ClientConfig.load(Path(env["SIGNERD_STATE_DIR"]) / "client.toml")) as c:
        items = c.stub.SignBatch(pb.SignBatchRequest(requests=[
            pb.SignRequest(key_id=key_id, message=b"a"), pb.SignRequest(key_id=key_id, message=b"b")
        ]), timeout=20).items
    assert [i.code for i in items] == [0, 0], items


def _sign_stream(env: dict[str, str], key_id: str) -> None:
    from signerd.v1 import signer_pb2 as pb

    with Client(ClientConfig.load(Path(env["SIGNERD_STATE_DIR"]) / "client.toml")) as c:
        items = list(c.sign_stream([pb.SignRequest(key_id=key_id, message=b"a")], timeout=20))
    assert [i.code for i in items] == [0], items


@pytest.mark.parametrize("how", ["sign", "sign-batch", "sign-stream", "certify-issuer"])
def test_every_signature_marks_the_key_used(cli_world: dict[str, str], how: str) -> None:
    """Regression (new-user trial): only the Notary API's Sign set 'used', so
    'keys delete' removed a key signerd.v1 had signed with (or a CA key that
    had certified others, breaking their chains) without asking."""
    env = {"SIGNERD_STATE_DIR": cli_world["state"]}

    def new_key() -> str:
        made = _ctl(env, "keys", "create", "--gun", unique_gun(), "--role", "targets",
                    "--purpose", "raw", "--json")
        key_id: str = json.loads(made.stdout)["key_id"]
        return key_id

    def used(key_id: str) -> bool:
        shown = _ctl(env, "keys", "show", key_id, "--json")  # GetKey
        assert shown.returncode == 0, shown.stderr
        value: bool = json.loads(shown.stdout)["used"]
        return value

    key = new_key()
    assert not used(key)
    if how == "sign":
        assert _ctl(env, "sign", "--key", key, cli_world["message"]).returncode == 0
    elif how == "sign-batch":
        _sign_batch(env, key)
    elif how == "sign-stream":
        _sign_stream(env, key)
    else:  # key becomes a CA (it signs its own certificate), then certifies a leaf
        assert _ctl(env, "keys", "certify", key, "--subject", "CN=ca").returncode == 0
        leaf = new_key()
        certified = _ctl(env, "keys", "certify", leaf, "--subject", "CN=leaf",
                         "--issuer-key", key)
        assert certified.returncode == 0, certified.stderr
        assert not used(leaf)  # certified, but it signed nothing
    assert used(key)
    refused = _ctl(env, "keys", "delete", key)  # no --yes, no terminal
    assert refused.returncode == 1 and b"has made signatures" in refused.stderr, refused.stderr
    assert used(key)  # still there


@pytest.fixture(scope="module")
def embedded_daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("embedded")
    env = {"SIGNERD_STATE_DIR": str(tmp / "state")}
    proc = spawn_daemon(None, tmp, env=env, args=("--listen", f"127.0.0.1:{_free_port()}",
                                                   "--metrics-listen", f"127.0.0.1:{_free_port()}"))
    yield env
    proc.stop()


def _mark_used(state: Path, key_id: str) -> None:
    """Sign once through the Notary API, which marks the key used."""
    from signerd.client import channel
    from signerd.notary import signer_pb2 as npb
    from signerd.notary import signer_pb2_grpc as npb_grpc

    with channel(ClientConfig.load(state / "client.toml")) as ch:
        npb_grpc.SignerStub(ch).Sign(npb.SignatureRequest(keyID=npb.KeyID(ID=key_id),
                                                          content=b"{}"), timeout=20)


@pytest.fixture(scope="module")
def cli_world(embedded_daemon: dict[str, str], certs: PKI,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What CLI_FAILURES' arguments name: the embedded daemon's state, a key
    that has signed, a file, a CA that did not issue signerd's certificate,
    and a port nothing listens on."""
    state = Path(embedded_daemon["SIGNERD_STATE_DIR"])
    made = _ctl(embedded_daemon, "keys", "create", "--gun", unique_gun(), "--role", "targets",
                "--purpose", "raw", "--json")  # signs opaque bytes: a raw key
    used = json.loads(made.stdout)["key_id"]
    _mark_used(state, used)
    message = tmp_path_factory.mktemp("cli") / "message"
    message.write_bytes(b"not a key, nor a signature")
    return {"state": str(state), "used": used, "message": str(message),
            "other_ca": str(certs.ca_file), "closed_port": str(_free_port())}


@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug-flag"])
def test_daemon_is_not_dumpable_unless_debug(
    hsm: HSM, certs: PKI, tmp_path: Path, debug: bool
) -> None:
    proc = spawn_daemon(_config(hsm, certs, tmp_path), tmp_path, args=("--debug",) if debug else ())
    try:
        # read inside the daemon with prctl(PR_GET_DUMPABLE) and reported when ready
        assert proc.info["dumpable"] is debug
    finally:
        proc.stop()


def test_only_the_main_thread_takes_signals(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """A Python signal handler runs only when the main thread wakes up, so a
    SIGHUP or SIGTERM that the kernel gave to a gRPC thread waited for ever
    (a reload test failed so in CI). Every other thread blocks them."""
    proc = spawn_daemon(_config(hsm, certs, tmp_path), tmp_path)
    try:
        with _client(certs, proc.info["tcp"]) as c:
            c.create_key(unique_gun(), "targets", purpose="raw")  # the server's threads are all up
        assert len(list(Path(f"/proc/{proc.proc.pid}/task").iterdir())) > 3
        assert threads_taking_signals(proc.proc.pid) == []
    finally:
        assert proc.stop() == 0


def test_sigterm_finishes_in_flight_requests(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    import threading

    from signerd.v1 import signer_pb2 as pb

    proc = spawn_daemon(_config(hsm, certs, tmp_path), tmp_path)
    result: dict[str, Any] = {}
    with _client(certs, proc.info["tcp"]) as c:
        key = c.create_key(unique_gun(), "targets", "rsa-4096", purpose="raw")
        batch = pb.SignBatchRequest(
            requests=[pb.SignRequest(key_id=key.key_id, message=b"%d" % i) for i in range(120)]
        )
        t = threading.Thread(target=lambda: result.update(r=c.stub.SignBatch(batch, timeout=60)))
        t.start()
        time.sleep(0.3)  # the batch is in flight
        proc.proc.send_signal(signal.SIGTERM)
        t.join()
        assert proc.proc.wait(30) == 0
    assert [item.code for item in result["r"].items] == [0] * 120
    log = proc.log()
    assert log.index("finishing in-flight requests") < log.index("signerd stopped")


@pytest.mark.parametrize("first_workers,second_workers", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_one_daemon_per_port(hsm: HSM, certs: PKI, tmp_path: Path,
                             first_workers: int, second_workers: int) -> None:
    """Regression: gRPC turns SO_REUSEPORT on, so a second daemon (another CA,
    another policy) could bind a port signerd held and take half its
    connections. Only a supervisor's own workers share a port."""
    port = _free_port()
    first = spawn_daemon(_config(hsm, certs, tmp_path / "a",
                                 server={"listen": f"127.0.0.1:{port}",
                                         "workers": first_workers}), tmp_path / "a")
    try:
        second = subprocess.run(
            [sys.executable, "-m", "signerd.daemon", "serve", "--config",
             str(_config(hsm, certs, tmp_path / "b", server={"listen": f"127.0.0.1:{port}",
                                                             "workers": second_workers}))],
            capture_output=True, text=True, timeout=60)
        assert second.returncode == 3  # a retry may find it free: not a config fault
        assert second.stderr.strip().splitlines()[-1] == \
            f"signerd: address 127.0.0.1:{port} is already in use"
        with _client(certs, port) as c:
            made = c.create_key(unique_gun(), "targets", purpose="raw")
            assert c.sign(made.key_id, message=b"m").signature
    finally:
        assert first.stop() == 0
    # once the first is gone, the port is free again at once (TIME_WAIT notwithstanding)
    again = spawn_daemon(_config(hsm, certs, tmp_path / "c",
                                 server={"listen": f"127.0.0.1:{port}"}), tmp_path / "c")
    assert again.stop() == 0


def test_another_program_on_the_port_is_found(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "signerd.daemon", "serve", "--config",
             str(_config(hsm, certs, tmp_path, server={"listen": f"127.0.0.1:{port}"}))],
            capture_output=True, text=True, timeout=60)
    assert run.returncode == 3  # a retry may fix it: not exit 2
    assert run.stderr.strip().splitlines()[-1] == \
        f"signerd: address 127.0.0.1:{port} is already in use"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_busy_metrics_port_exits_3(hsm: HSM, certs: PKI, tmp_path: Path, workers: int) -> None:
    """A port another process holds may be free on the next try: exit 3,
    which the unit restarts (RestartPreventExitStatus=2 stops only config
    faults). Regression: it exited 2, so systemd never retried."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "signerd.daemon", "serve", "--config",
             str(_config(hsm, certs, tmp_path, metrics_listen=f"127.0.0.1:{port}",
                         server={"workers": workers}))],
            capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    assert run.stderr.strip().splitlines()[-1] == \
        f"signerd: cannot listen on metrics.listen 127.0.0.1:{port}: Address already in use"


def test_signerctl_says_what_to_check_in_one_line(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """Regression: a TLS failure printed a raw gRPC core line, then a line ending
    in ': OK'; a daemon that was down gave gRPC's transport text."""
    proc = spawn_daemon(_config(hsm, certs, tmp_path), tmp_path)
    cert, key = certs.files["admin"]
    common = ("--tls-cert", str(cert), "--tls-key", str(key), "--server-name", "localhost")
    try:
        other_ca = certs.files["foreign"][0]  # a certificate signerd's was not issued by
        at = ("--server", f"127.0.0.1:{proc.info['tcp']}")
        wrong = _ctl({}, *at, "--tls-ca", str(other_ca), *common, "keys", "list")
        # Regression: these two said "cannot reach signerd ...; is 'signerd serve' running".
        foreign_cert, foreign_key = certs.files["foreign"]  # a client CA signerd does not trust
        foreign = _ctl({}, *at, "--tls-ca", str(certs.ca_file), *common, "--tls-cert",
                       str(foreign_cert), "--tls-key", str(foreign_key), "keys", "list")
        misnamed = _ctl({}, *at, "--tls-ca", str(certs.ca_file), *common, "--server-name",
                        "wrong.example", "keys", "list")
    finally:
        proc.stop()
    for run, why in ((foreign, "(Socket closed: signerd may not accept the client certificate)"),
                     (misnamed, "(Hostname Verification Check failed)")):
        lines = run.stderr.decode().splitlines()
        assert run.returncode == 1 and lines == [
            f"signerctl: TLS handshake with signerd at 127.0.0.1:{proc.info['tcp']} failed "
            f"{why}; check --tls-ca, --tls-cert, --tls-key and --server-name"], lines
    log = [json.loads(line) for line in proc.log().splitlines()]
    # a client's wrong server name is the client's mistake (gRPC logs it as an error)
    assert [line["level"] for line in log if "No match found for server name" in
            line["msg"]] == ["warning"], log
    # gRPC's "Log level INFO is not suitable for production" (signerd sets INFO on purpose)
    assert not [line for line in log if "not suitable for production" in line["msg"]]
    down = _ctl({}, "--server", f"127.0.0.1:{_free_port()}", "--tls-ca", str(certs.ca_file),
                *common, "keys", "list")
    for run, start in ((wrong, "signerctl: TLS handshake with signerd at 127.0.0.1:"),
                       (down, "signerctl: cannot reach signerd at 127.0.0.1:")):
        lines = run.stderr.decode().splitlines()
        assert run.returncode == 1 and len(lines) == 1, lines
        assert lines[0].startswith(start) and not lines[0].endswith(": OK"), lines
    assert "check --tls-ca" in wrong.stderr.decode()
    assert "is 'signerd serve' running" in down.stderr.decode()


def test_sign_to_a_path_that_cannot_be_written_fails_before_signing(
        hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """Regression: the signature was made, then lost in a FileNotFoundError traceback."""
    proc = spawn_daemon(_config(hsm, certs, tmp_path), tmp_path)
    cert, key = certs.files["admin"]
    common = ("--server", f"127.0.0.1:{proc.info['tcp']}", "--tls-ca", str(certs.ca_file),
              "--tls-cert", str(cert), "--tls-key", str(key), "--server-name", "localhost")
    try:
        made = _ctl({}, *common, "keys", "create", "--gun", unique_gun(), "--role",
                    "targets", "--purpose", "raw", "--json")
        kid = json.loads(made.stdout)["key_id"]
        (tmp_path / "msg").write_bytes(b"m")
        run = _ctl({}, *common, "sign", "--key", kid, "--out", str(tmp_path / "no" / "x.sig"),
                   str(tmp_path / "msg"))
        ok = _ctl({}, *common, "sign", "--key", kid, "--out", str(tmp_path / "x.sig"),
                  str(tmp_path / "msg"))
    finally:
        proc.stop()
    lines = run.stderr.decode().splitlines()
    assert run.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("signerctl: cannot write the signature to ")
    assert ok.returncode == 0 and len((tmp_path / "x.sig").read_bytes()) == 64
    audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert sum(1 for e in audit if e.get("operation") == "sign") == 1  # only the one that wrote


# (algorithm, encoding, rsa_padding, digest name or None for the message)
_VERIFY_CASES = [
    ("ecdsa-p256", "raw", "pss", None), ("ecdsa-p256", "der", "pss", "sha256"),
    ("ecdsa-p384", "raw", "pss", None), ("ecdsa-p384", "der", "pss", "sha384"),
    ("ecdsa-p384", "raw", "pss", "sha256"), ("rsa-2048", "raw", "pss", None),
    ("rsa-2048", "raw", "pkcs1v15", None), ("rsa-2048", "raw", "pss", "sha512"),
    ("rsa-2048", "raw", "pkcs1v15", "sha384"), ("ed25519", "raw", "pss", None),
]


def test_verify_with_a_public_key_file_needs_no_daemon(
        daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 11 §7: 'signerctl verify --pubkey FILE' checks signerd's
    signatures (every encoding, padding and digest it signs with) with
    nothing but the file: here with no client config and no daemon to ask."""
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from signerd.cli import signerctl as cli

    monkeypatch.setenv("SIGNERD_STATE_DIR", str(tmp_path / "no-client-config"))
    monkeypatch.delenv("SIGNERCTL_CONFIG", raising=False)

    def verify(*args: str) -> tuple[int, str, str]:
        code = cli.main(["verify", *args])
        out, err = capsys.readouterr()
        return code, out, err

    message = tmp_path / "message"
    message.write_bytes(b"the release manifest")
    keys: dict[str, Any] = {}
    with daemon.client() as c:
        for i, (alg, encoding, padding, digest) in enumerate(_VERIFY_CASES):
            key = keys.get(alg) or keys.setdefault(
                alg, c.create_key(unique_gun(), "targets", alg, purpose="raw"))
            payload = (hashlib.new(digest, message.read_bytes()).digest() if digest
                       else message.read_bytes())
            sig = c.sign(key.key_id, **({"digest": payload} if digest else {"message": payload}),
                         encoding=encoding, rsa_padding=padding).signature
            (tmp_path / f"{i}.sig").write_bytes(sig)
            pub = tmp_path / f"{alg}.{'pem' if i % 2 else 'der'}"
            pub.write_bytes(key.public_key_pem.encode() if i % 2 else key.public_key_der)
            flags = ["--pubkey", str(pub), "--signature", str(tmp_path / f"{i}.sig"),
                     "--encoding", encoding, "--rsa-padding", padding]
            if digest:
                (tmp_path / "digest").write_text(payload.hex())
                flags += ["--digest", str(tmp_path / "digest")]
            else:
                flags.append(str(message))
            case = (alg, encoding, padding, digest)
            assert verify(*flags) == (0, f"signature OK (the public key in {pub})\n", ""), case
            # a signature over something else, or checked as another encoding or padding
            if digest:
                (tmp_path / "digest").write_text(hashlib.new(digest, b"x").hexdigest())
                changed = flags
            else:
                changed = [*flags[:-1], str(tmp_path / "other")]
                (tmp_path / "other").write_bytes(b"the release manifesT")
            code, _, err = verify(*changed)
            assert code == 1 and err == f"signerctl: signature does NOT verify with the public " \
                f"key in {pub}\n", (case, err)
    # the right signature (case 0, ecdsa-p256), another key
    (tmp_path / "p384.pem").write_text(keys["ecdsa-p384"].public_key_pem)
    code, _, err = verify("--pubkey", str(tmp_path / "p384.pem"), "--signature",
                          str(tmp_path / "0.sig"), str(message))
    assert code == 1 and "does NOT verify" in err
    (tmp_path / "p521.pem").write_bytes(ec.generate_private_key(ec.SECP521R1()).public_key()
                                        .public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "ed.pem").write_text(keys["ed25519"].public_key_pem)
    bad = {
        "unsupported curve secp521r1": ["--pubkey", str(tmp_path / "p521.pem")],
        "holds no public key signerd can use": ["--pubkey", str(message)],
        f"cannot read {tmp_path / 'nope.pem'}": ["--pubkey", str(tmp_path / "nope.pem")],
        "ed25519 signs whole messages": ["--pubkey", str(tmp_path / "ed.pem"), "--digest"],
    }
    for words, flags in bad.items():
        code, out, err = verify(*flags, "--signature", str(tmp_path / "0.sig"), str(message))
        assert code == 1 and out == "" and words in err and err.count("\n") == 1, (words, err)
    with pytest.raises(SystemExit) as usage:  # argparse's exit, as for every usage error
        cli.main(["verify", "--key", "ab" * 32, "--pubkey", str(message), "--signature",
                  str(message), str(message)])
    err = capsys.readouterr().err
    assert usage.value.code == 2 and err.count("\n") == 1
    assert "argument --pubkey: not allowed with argument --key" in err


def test_a_relative_state_dir_starts_from_anywhere(tmp_path: Path) -> None:
    """Regression: 'signerd serve --state-dir s2' wrote SOFTHSM2_CONF = "s2/softhsm2.conf"
    (and a relative SoftHSM tokendir), so the daemon started only from the
    directory it was made in. Every path written is absolute now."""
    made_in, elsewhere = tmp_path / "a", tmp_path / "b"
    made_in.mkdir()
    elsewhere.mkdir()
    ports = ("--listen", f"127.0.0.1:{_free_port()}", "--metrics-listen",
             f"127.0.0.1:{_free_port()}")
    first = subprocess.Popen([sys.executable, "-m", "signerd.daemon", "serve", "--state-dir",
                              "s2", "--ready-file", "ready.json", *ports], cwd=made_in,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (made_in / "ready.json").exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the embedded default did not start"
            time.sleep(0.1)
    finally:
        first.terminate()
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    state = made_in / "s2"
    conf = (state / "signerd.toml").read_text()
    assert f'SOFTHSM2_CONF = "{state / "softhsm2.conf"}"' in conf, conf
    assert f"directories.tokendir = {state / 'tokens'}" in (state / "softhsm2.conf").read_text()
    proc = spawn_daemon(state / "signerd.toml", elsewhere)  # started from another directory
    try:
        env = {"SIGNERCTL_CONFIG": str(state / "client.toml")}
        listed = _ctl(env, "--server", f"127.0.0.1:{proc.info['tcp']}", "tokens", "list")
        assert listed.returncode == 0 and b"online: healthy" in listed.stdout, listed.stderr
    finally:
        assert proc.stop() == 0
