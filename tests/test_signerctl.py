"""signerctl against a real daemon (in process: real gRPC, real mTLS, real
SoftHSM), run as a separate program: big files by digest in bounded memory,
and the one-line messages of "Newcomer and operator, round 3" (§3, §6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from signerd.cli import _interrupt
from tests.conftest import unique_gun

MIB = 1 << 20
MAX_RSS = 200 * MIB  # signerctl's peak RSS while signing or verifying a 64 MiB file


def client_toml(daemon: Any, path: Path, **extra: Any) -> Path:
    """A signerctl client config for ``daemon`` (admin identity)."""
    cfg = daemon.client_config()
    lines = [f'server = "{cfg.server}"', f'server_name = "{cfg.server_name}"',
             f'ca = "{cfg.ca}"', f'cert = "{cfg.cert}"', f'key = "{cfg.key}"',
             *(f"{k} = {v}" for k, v in extra.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def ctl(config: Path | None, *args: str, stdin: bytes | None = None,
        env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run signerctl (with ``--config config``) as its own process; return the
    run and its peak RSS in bytes (ru_maxrss of a wrapper whose one child is
    signerctl, so nothing else is counted)."""
    cmd = [sys.executable, "-m", "signerd.cli", *(["--config", str(config)] if config else []),
           *args]
    wrapper = ("import resource, subprocess, sys; "
               "run = subprocess.run(sys.argv[1:], input=sys.stdin.buffer.read()); "
               "sys.stderr.write('RSS %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN)"
               ".ru_maxrss); sys.exit(run.returncode)")
    run = subprocess.run([sys.executable, "-c", wrapper, *cmd], input=(stdin or b""),
                         capture_output=True, timeout=300,
                         env={**os.environ, "SIGNERD_STATE_DIR": "/nonexistent",
                              **(env or {})})
    *lines, last = run.stderr.decode().splitlines()
    assert last.startswith("RSS "), run.stderr
    text = subprocess.CompletedProcess(run.args, run.returncode, run.stdout.decode(),
                                       "".join(line + "\n" for line in lines))
    return text, int(last.split()[1]) * 1024


def one_line(run: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed signerctl printed."""
    assert run.returncode != 0, run.stdout
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and run.stderr.endswith("\n"), run.stderr
    return lines[0]


def new_key(daemon: Any, algorithm: str) -> str:
    with daemon.client() as c:
        return str(c.create_key(unique_gun(), "targets", algorithm, purpose="raw").key_id)


def audited_signs(daemon: Any) -> int:
    lines = (daemon.workdir / "audit.log").read_text().splitlines()
    return sum(1 for line in lines if json.loads(line).get("operation") == "sign")


def test_a_64_mib_file_is_signed_and_verified_in_bounded_memory(daemon: Any,
                                                                tmp_path: Path) -> None:
    """Regression: a 5 MB file got RESOURCE_EXHAUSTED "Received message larger
    than max"; a 3 GiB one took 9.5 GB of memory, then INTERNAL. Now the file
    is hashed in chunks and its digest signed; verify hashes in chunks too."""
    config = client_toml(daemon, tmp_path / "client.toml")
    big = tmp_path / "big"
    with big.open("wb") as f:
        for i in range(64):
            f.write(os.urandom(1024) * 1024 if i % 2 else bytes([i]) * MIB)
    key = new_key(daemon, "ecdsa-p256")
    sig = tmp_path / "big.sig"
    signed, sign_rss = ctl(config, "sign", "--key", key, "--out", str(sig), str(big))
    assert signed.returncode == 0, signed.stderr
    verified, verify_rss = ctl(config, "verify", "--key", key, "--signature", str(sig), str(big))
    assert verified.returncode == 0 and verified.stdout == f"signature OK (key {key})\n", verified
    print(f"\n[test_signerctl] 64 MiB file: signerctl peak RSS sign {sign_rss / MIB:.0f} MiB, "
          f"verify {verify_rss / MIB:.0f} MiB")
    assert sign_rss < MAX_RSS and verify_rss < MAX_RSS, (sign_rss, verify_rss)
    # the signature is over the message itself, as if the daemon had hashed it
    with daemon.client() as c:
        pem = c.get_key(key).public_key_pem.encode()
    public = serialization.load_pem_public_key(pem)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    raw = sig.read_bytes()
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    public.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                       int.from_bytes(raw[32:], "big")),
                  big.read_bytes(), ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(("algorithm", "padding_name"), [
    ("ecdsa-p256", "pss"), ("ecdsa-p384", "pss"), ("rsa-2048", "pss"), ("rsa-2048", "pkcs1v15"),
])
def test_a_file_sent_by_digest_gets_the_signature_of_the_message(
        daemon: Any, tmp_path: Path, algorithm: str, padding_name: str) -> None:
    """The client hashes with the key's hash (SHA-384 for P-384): the
    signature verifies over the whole message, and RSA PKCS#1 v1.5 (which is
    deterministic) is byte for byte the one the daemon makes from the message."""
    config = client_toml(daemon, tmp_path / "client.toml", max_message_bytes=4096)
    message = tmp_path / "message"
    message.write_bytes(os.urandom(20_000))  # over this config's limit, under the daemon's
    key = new_key(daemon, algorithm)
    run, _ = ctl(config, "sign", "--key", key, "--encoding", "der", "--rsa-padding",
                 padding_name, "--out", str(tmp_path / "sig"), str(message))
    assert run.returncode == 0, run.stderr
    sig = (tmp_path / "sig").read_bytes()
    with daemon.client() as c:
        public = serialization.load_pem_public_key(c.get_key(key).public_key_pem.encode())
        whole = c.sign(key, message=message.read_bytes(), encoding="der",
                       rsa_padding=padding_name).signature
    data = message.read_bytes()
    if isinstance(public, ec.EllipticCurvePublicKey):
        chosen = hashes.SHA384() if algorithm == "ecdsa-p384" else hashes.SHA256()
        public.verify(sig, data, ec.ECDSA(chosen))
        public.verify(whole, data, ec.ECDSA(chosen))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        pad: padding.AsymmetricPadding = (
            padding.PSS(padding.MGF1(hashes.SHA256()), 32) if padding_name == "pss"
            else padding.PKCS1v15())
        public.verify(sig, data, pad, hashes.SHA256())
        if padding_name == "pkcs1v15":
            assert sig == whole
    verified, _ = ctl(config, "verify", "--key", key, "--encoding", "der", "--rsa-padding",
                      padding_name, "--signature", str(tmp_path / "sig"), str(message))
    assert verified.returncode == 0, verified.stderr


def test_standard_input_over_the_limit_goes_by_digest(daemon: Any, tmp_path: Path) -> None:
    config = client_toml(daemon, tmp_path / "client.toml")
    key = new_key(daemon, "ecdsa-p384")
    data = os.urandom(3 * MIB)
    run, _ = ctl(config, "sign", "--key", key, "-", stdin=data)
    assert run.returncode == 0, run.stderr
    (tmp_path / "sig").write_text(run.stdout)
    verified, _ = ctl(config, "verify", "--key", key, "--signature", str(tmp_path / "sig"), "-",
                      stdin=data)
    assert verified.returncode == 0, verified.stderr


def test_ed25519_refuses_a_file_above_the_limit_before_reading_it(daemon: Any,
                                                                  tmp_path: Path) -> None:
    """Pure EdDSA needs the whole message, so no digest can stand in: a 3 GiB
    (sparse) file is refused at once, in memory for nothing, saying why."""
    config = client_toml(daemon, tmp_path / "client.toml")
    key = new_key(daemon, "ed25519")
    huge = tmp_path / "huge"
    with huge.open("wb") as f:
        f.truncate(3 << 30)
    before = audited_signs(daemon)
    run, rss = ctl(config, "sign", "--key", key, str(huge))
    assert one_line(run) == (
        f"signerctl: {huge} is {3 << 30} bytes, more than signerd at "
        f"{daemon.client_config().server} takes in one request (1048576 bytes, "
        "max_message_bytes); an ed25519 key signs the whole message (pure EdDSA), so it "
        "cannot be sent as a digest: use an ECDSA or RSA key, or raise [server] "
        "max_message_bytes on the daemon and max_message_bytes in the client config")
    assert rss < MAX_RSS and audited_signs(daemon) == before
    piped, _ = ctl(config, "sign", "--key", key, "-", stdin=b"x" * (2 * MIB))
    assert "is more than" in one_line(piped) and "pure EdDSA" in piped.stderr
    # a small file is signed whole, as before
    (tmp_path / "small").write_bytes(b"hello")
    small, _ = ctl(config, "sign", "--key", key, "--out", str(tmp_path / "s.sig"),
                   str(tmp_path / "small"))
    assert small.returncode == 0 and len((tmp_path / "s.sig").read_bytes()) == 64


def test_a_daemon_with_a_smaller_limit_is_one_line_naming_the_setting(
        daemon: Any, tmp_path: Path) -> None:
    """Regression: 'RESOURCE_EXHAUSTED: SERVER: Received message larger than
    max (5000075 vs. 1048576)', with no hint."""
    config = client_toml(daemon, tmp_path / "client.toml", max_message_bytes=8 * MIB)
    (tmp_path / "m").write_bytes(os.urandom(5_000_000))
    run, _ = ctl(config, "sign", "--key", new_key(daemon, "ecdsa-p256"), str(tmp_path / "m"))
    line = one_line(run)
    assert line.startswith("signerctl: the request was 5000") and line.endswith(
        "more than signerd at " + daemon.client_config().server + " accepts (1048576 bytes, "
        "its [server] max_message_bytes); set max_message_bytes = 1048576 in the client "
        "config, and signerctl sends bigger files by their digest"), line


def test_a_digest_file_is_a_digest(daemon: Any, tmp_path: Path) -> None:
    config = client_toml(daemon, tmp_path / "client.toml")
    (tmp_path / "m").write_bytes(b"x" * 10_000)
    run, _ = ctl(config, "sign", "--key", new_key(daemon, "ecdsa-p256"), "--digest",
                 str(tmp_path / "m"))
    assert one_line(run) == (f"signerctl: {tmp_path / 'm'} is not a digest (more than 4096 "
                             "bytes); leave out --digest to sign or verify the file itself")


def test_a_der_signature_checked_as_raw_says_try_der(daemon: Any, tmp_path: Path) -> None:
    """Regression: it said only 'does NOT verify'."""
    config = client_toml(daemon, tmp_path / "client.toml")
    key = new_key(daemon, "ecdsa-p256")
    (tmp_path / "m").write_bytes(b"release")
    signed, _ = ctl(config, "sign", "--key", key, "--encoding", "der", "--out",
                    str(tmp_path / "der.sig"), str(tmp_path / "m"))
    assert signed.returncode == 0, signed.stderr
    run, _ = ctl(config, "verify", "--key", key, "--signature", str(tmp_path / "der.sig"),
                 str(tmp_path / "m"))
    assert one_line(run) == (f"signerctl: signature does NOT verify with key {key}; the "
                             "signature looks DER-encoded: try --encoding der")
    ctl(config, "sign", "--key", key, "--out", str(tmp_path / "raw.sig"), str(tmp_path / "m"))
    run, _ = ctl(config, "verify", "--key", key, "--encoding", "der", "--signature",
                 str(tmp_path / "raw.sig"), str(tmp_path / "m"))
    assert one_line(run).endswith("; the signature looks raw (r||s): try --encoding raw")
    (tmp_path / "other").write_bytes(b"releasE")  # a wrong message: no hint
    run, _ = ctl(config, "verify", "--key", key, "--signature", str(tmp_path / "raw.sig"),
                 str(tmp_path / "other"))
    assert one_line(run) == f"signerctl: signature does NOT verify with key {key}"


def test_the_metrics_port_is_not_blamed_on_tls(daemon_factory: Any, tmp_path: Path) -> None:
    """Regression: --server at the metrics port said 'TLS handshake ... failed'."""
    d = daemon_factory(metrics=True)
    config = client_toml(d, tmp_path / "client.toml")
    where = f"127.0.0.1:{d.servers.http.port}"
    run, _ = ctl(config, "--server", where, "keys", "list")
    assert one_line(run) == (f"signerctl: {where} answered, but not with TLS: is it signerd's "
                             "gRPC port ([server] listen), not its metrics port or another "
                             "service? Check --server")


def test_a_mistyped_option_is_named(tmp_path: Path) -> None:
    """Regression: '--sever 127.0.0.1:4443' gave "invalid choice: '127.0.0.1:4443'"."""
    run, _ = ctl(None, "--sever", "127.0.0.1:4443", "keys", "list")
    assert run.returncode == 2
    assert one_line(run) == ("signerctl: unrecognized option --sever; did you mean --server? "
                             "(see 'signerctl --help')")


def test_a_named_config_that_is_missing_says_so(tmp_path: Path) -> None:
    """Regression: it suggested "start 'signerd serve' once"."""
    run, _ = ctl(tmp_path / "nonexistent.toml", "keys", "list")
    assert one_line(run) == (f"signerctl: no client config at {tmp_path / 'nonexistent.toml'} "
                             "(named by --config); check the path")
    run, _ = ctl(None, "keys", "list", env={"SIGNERCTL_CONFIG": str(tmp_path / "gone.toml")})
    assert one_line(run) == (f"signerctl: no client config at {tmp_path / 'gone.toml'} "
                             "(named by $SIGNERCTL_CONFIG); check the path")


def test_an_unreadable_default_config_is_one_line_or_passed_over(daemon: Any,
                                                                  tmp_path: Path) -> None:
    """Regression: 'unexpected error: PermissionError ...', even with --server.
    A client.toml that cannot be read (here a directory: the tests run as
    root, whom no file mode stops) is one line, or, when --server and the
    TLS flags name the daemon, passed over."""
    state = tmp_path / "state"
    (state / "client.toml").mkdir(parents=True)
    env = {"SIGNERD_STATE_DIR": str(state)}
    run, _ = ctl(None, "keys", "list", env=env)
    assert one_line(run) == (
        f"signerctl: cannot read client config {state / 'client.toml'}: Is a directory; "
        "run signerctl as the user that owns it, or pass --config, or --server with "
        "--tls-ca/--tls-cert/--tls-key")
    cfg = daemon.client_config()
    run, _ = ctl(None, "--server", cfg.server, "--tls-ca", str(cfg.ca), "--tls-cert",
                 str(cfg.cert), "--tls-key", str(cfg.key), "--server-name", "localhost",
                 "keys", "list", "--json", env=env)
    assert run.returncode == 0 and isinstance(json.loads(run.stdout), list), run.stderr


def test_verify_help_calls_its_input_the_file_to_verify() -> None:
    run = subprocess.run([sys.executable, "-m", "signerd.cli", "verify", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert "file to verify, or - for standard input" in " ".join(run.stdout.split())
    assert "file to sign" not in run.stdout


# --- Ctrl-C while a key is created; keys list shows USED (issue 21 §4) -------------------


@pytest.mark.parametrize("presses", [1, 2], ids=["finishes", "abandoned"])
def test_ctrl_c_during_key_creation_never_leaves_a_key_unnamed(
        daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, presses: int) -> None:
    """Regression (issue 21 §4): Ctrl-C during 'keys create --algorithm
    rsa-4096' printed 'interrupted' (exit 130), but signerd created the key and
    its ID was never shown. Now the first Ctrl-C lets the call finish and the
    ID is printed (exit 130); a second abandons it and says how to list what
    may be left, which is the key, unused. The daemon's key generation is held
    until the Ctrl-C has arrived, so the signal always meets the call in flight."""
    config = client_toml(daemon, tmp_path / "client.toml")
    service = daemon.servers.service
    entered, release = threading.Event(), threading.Event()
    create = service.create_key

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(60)
        return create(*args, **kwargs)

    monkeypatch.setattr(service, "create_key", held)
    gun = unique_gun()
    proc = subprocess.Popen(
        [sys.executable, "-m", "signerd.cli", "--config", str(config), "keys", "create",
         "--gun", gun, "--role", "targets", "--algorithm", "rsa-4096"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SIGNERD_STATE_DIR": "/nonexistent"})
    try:
        assert entered.wait(60), "CreateKey never reached the daemon"
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        assert proc.stderr.readline() == _interrupt.FIRST + "\n"
        if presses == 2:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 130
        release.set()
        out, err = proc.communicate(timeout=120)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    with daemon.client() as c:
        deadline = time.monotonic() + 60
        while not (made := list(c.list_keys(gun, "targets"))):  # abandoned: still generating
            assert time.monotonic() < deadline, "the key was never created"
            time.sleep(0.1)
    [key] = made
    assert not key.used
    if presses == 1:
        assert out == (f"created rsa-4096 metadata key {key.key_id} for targets of {gun} "
                       "on token online\n")
        assert err == _interrupt.finished_line() + "\n"
    else:
        assert out == ""
        assert err == (f"signerctl: interrupted before signerd answered: a key being created "
                       f"may exist all the same; 'signerctl keys list --gun {gun} --role "
                       "targets' shows it (USED no)\n")
        listed, _ = ctl(config, "keys", "list", "--gun", gun, "--role", "targets")
        assert listed.returncode == 0
        [header, row] = listed.stdout.splitlines()
        assert header.split() == ["KEY", "ID", "ALGORITHM", "TOKEN", "PURPOSE", "ROLE", "USED",
                                  "GUN"]
        assert row.split() == [key.key_id, "rsa-4096", "online", "metadata", "targets", "no",
                               gun]


def test_keys_list_shows_whether_a_key_is_used(daemon: Any, tmp_path: Path) -> None:
    """keys list shows USED (yes once the key has signed), as --json shows "used"."""
    config = client_toml(daemon, tmp_path / "client.toml")
    gun = unique_gun()
    with daemon.client() as c:
        signer, idle = (c.create_key(gun, "targets", purpose="raw").key_id for _ in range(2))
        c.sign(signer, message=b"m")
    listed, _ = ctl(config, "keys", "list", "--gun", gun)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    column = header.replace("KEY ID", "KEY_ID").split().index("USED")
    used = {row.split()[0]: row.split()[column] for row in rows}
    assert used == {signer: "yes", idle: "no"}
    shown, _ = ctl(config, "keys", "list", "--gun", gun, "--json")
    assert {k["key_id"]: k["used"] for k in json.loads(shown.stdout)} == {
        signer: True, idle: False}


def test_keys_list_refuses_a_malformed_gun_and_show_writes_flags_as_the_table(
        daemon: Any, tmp_path: Path) -> None:
    """A new user's finding: 'keys list --gun notagun' printed an empty table (exit 0) where
    keys create and state show refuse the name; 'keys show' wrote 'used: False'."""
    config = client_toml(daemon, tmp_path / "client.toml")
    run, _ = ctl(config, "keys", "list", "--gun", "notagun")
    assert run.returncode == 1 and one_line(run).startswith("signerctl: ")
    key = new_key(daemon, "ecdsa-p256")
    run, _ = ctl(config, "keys", "show", key)
    assert run.returncode == 0 and "\nused: no\n" in run.stdout
