"""Files the daemon trusts, and config values legal but hostile (issue 22 §5, §7).

Each example of the issue is a case here: a symbolic link, a device or a
FIFO where the audit log, a policy or a PIN file belongs; a file or a
directory that someone else could write; numbers a machine cannot honour.
The tests run as root, so ownership is tested with chown to nobody.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from signerd.audit import AuditLog, verify
from signerd.config import (
    BOUNDS,
    Pkcs11Uri,
    TokenConfig,
    parse_config,
)
from signerd.errors import ConfigError
from signerd.policy import Policy
from signerd.trusted_files import MAX_CONFIG_BYTES, MAX_PIN_BYTES, read_trusted
from tests.conftest import HSM, PKI, daemon_config, spawn_daemon, write_toml

NOBODY = 65534
GOOD_POLICY = '[[rule]]\nidentities = ["a"]\noperations = ["read"]\n'
ROOT = Path(__file__).resolve().parent.parent


def serve(config: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signerd.daemon", "serve", "--config",
                           str(config)], capture_output=True, text=True, timeout=timeout)


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signerd.daemon", "check-config", "--config",
                           str(config)], capture_output=True, text=True, timeout=120)


def errors(run: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in run.stdout.splitlines() if line.startswith("error: ")]


# -- one helper reads every trusted file --------------------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path, 0o600)


def _dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _huge(path: Path) -> None:
    path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))


def _group_writable(path: Path) -> None:
    path.write_text(GOOD_POLICY)
    path.chmod(0o664)


def _world_writable(path: Path) -> None:
    path.write_text(GOOD_POLICY)
    path.chmod(0o646)


def _someone_elses(path: Path) -> None:
    path.write_text(GOOD_POLICY)
    os.chown(path, NOBODY, NOBODY)


def _open_directory(path: Path) -> None:
    path.parent.chmod(0o777)  # not sticky: anyone could replace the file
    path.write_text(GOOD_POLICY)


def _a_directory(path: Path) -> None:
    path.mkdir()


POLICY_CASES = [
    pytest.param(_fifo, "is not a regular file (a FIFO)", id="fifo"),
    pytest.param(_dev_zero, "is not a regular file (a character device)", id="dev-zero"),
    pytest.param(_huge, f"is larger than {MAX_CONFIG_BYTES} bytes", id="too-large"),
    pytest.param(_group_writable, "is writable by group or others (mode 0664); chmod go-w it",
                 id="group-writable"),
    pytest.param(_world_writable, "is writable by group or others (mode 0646)",
                 id="world-writable"),
    pytest.param(_someone_elses, f"is owned by uid {NOBODY}, not by root", id="not-ours"),
    pytest.param(_open_directory, "is writable by group or others (mode 0777): they could "
                 "replace what is in it", id="directory-writable"),
    pytest.param(_a_directory, "cannot read: Is a directory", id="a-directory"),
]


@pytest.mark.parametrize(("prepare", "words"), POLICY_CASES)
def test_a_policy_file_signerd_cannot_trust_is_refused_in_one_line(
        tmp_path: Path, prepare: Any, words: str) -> None:
    """Regression (issue 22 §5, §7): serve accepted a policy others could
    write; a FIFO blocked the reading thread; /dev/zero was read until
    MemoryError. Each is refused at once, in one line naming what and why."""
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    path = directory / "policy.toml"
    prepare(path)
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        Policy.load(path)
    assert time.monotonic() - start < 5  # never blocks (a FIFO with no writer)
    message = str(info.value)
    assert message.startswith(f"policy {path}: ") and words in message, message
    assert "\n" not in message


def test_a_symlink_to_a_trusted_file_is_followed_once(tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap's files as symbolic links: the link is
    resolved, and what it names is checked (the file and its directories)."""
    real = tmp_path / "data" / "policy.toml"
    real.parent.mkdir()
    real.write_text(GOOD_POLICY)
    link = tmp_path / "policy.toml"
    link.symlink_to(real)
    assert len(Policy.load(link).rules) == 1
    real.parent.chmod(0o777)
    with pytest.raises(ConfigError, match=re.escape(f"directory {real.parent} is writable")):
        Policy.load(link)


def test_a_root_owned_sticky_directory_is_trusted(tmp_path: Path) -> None:
    """As /tmp (1777): no one can rename or remove there what they do not own."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "policy.toml").write_text(GOOD_POLICY)
    assert len(Policy.load(sticky / "policy.toml").rules) == 1
    os.chown(sticky, NOBODY, NOBODY)  # a sticky directory of someone else's is not
    with pytest.raises(ConfigError, match=f"owned by uid {NOBODY}"):
        Policy.load(sticky / "policy.toml")


@pytest.mark.parametrize(("mode", "content", "words"), [
    pytest.param(0o644, b"1234", "is accessible by group or others (mode 0644); chmod 600 it",
                 id="world-readable"),
    pytest.param(0o640, b"1234", "is accessible by group or others (mode 0640)",
                 id="group-readable"),
    pytest.param(0o600, b"1" * (MAX_PIN_BYTES + 1), f"is larger than {MAX_PIN_BYTES} bytes",
                 id="too-large"),
    pytest.param(0o600, b"\xff\xfe", "is not UTF-8 text", id="not-text"),
])
def test_a_pin_file_signerd_cannot_trust_is_refused(tmp_path: Path, mode: int, content: bytes,
                                                    words: str) -> None:
    pin = tmp_path / "t.pin"
    pin.write_bytes(content)
    pin.chmod(mode)
    token = TokenConfig("t", "/m.so", Pkcs11Uri(token="t"), pin_file=pin)
    with pytest.raises(ConfigError) as info:
        token.read_pin()
    assert words in str(info.value) and str(pin) in str(info.value)
    assert "1234" not in str(info.value)


def test_a_pin_file_that_is_dev_zero_is_refused(tmp_path: Path) -> None:
    """Regression (issue 22 §7): pin_file = "/dev/zero" was read without bound."""
    token = TokenConfig("t", "/m.so", Pkcs11Uri(token="t"), pin_file=Path("/dev/zero"))
    with pytest.raises(ConfigError, match=r"/dev/zero: is not a regular file \(a character"):
        token.read_pin()
    pin = tmp_path / "ok.pin"
    pin.write_bytes(b"1234\n")
    pin.chmod(0o600)
    assert TokenConfig("t", "/m.so", Pkcs11Uri(token="t"), pin_file=pin).read_pin() == "1234"


def test_a_client_config_is_bounded_but_not_held_to_the_daemons_rules(tmp_path: Path) -> None:
    """A client's own config is not trusted by the daemon: mode and owner are
    its user's business, but it is still a regular file of bounded size."""
    mine = tmp_path / "client.toml"
    mine.write_text('server = "x:1"\n')
    mine.chmod(0o666)
    assert read_trusted(mine, "client config", trusted=False) == b'server = "x:1"\n'
    with pytest.raises(ConfigError, match="not a regular file"):
        read_trusted(Path("/dev/zero"), "client config", trusted=False)


# -- the audit log's names ---------------------------------------------------------


@pytest.mark.parametrize(("prepare", "words"), [
    pytest.param(lambda p: p.symlink_to(p.with_name("elsewhere")),
                 "it is a symbolic link (refused: never followed)", id="symlink"),
    pytest.param(lambda p: os.mkfifo(p), "it is not a regular file", id="fifo"),
    pytest.param(lambda p: (p.write_bytes(b""), os.chown(p, NOBODY, NOBODY)),
                 f"it is owned by uid {NOBODY}", id="not-ours"),
])
def test_the_audit_log_opens_only_its_own_regular_file(tmp_path: Path, prepare: Any,
                                                      words: str) -> None:
    path = tmp_path / "audit.log"
    prepare(path)
    with pytest.raises(ConfigError, match=re.escape(f"audit log {path}: cannot open: {words}")):
        AuditLog(path)
    assert not path.with_name("elsewhere").exists()


def test_the_audit_log_is_never_written_through_a_symlink_put_there_while_open(
        tmp_path: Path) -> None:
    """Regression (issue 22 §5): the log, replaced by a link while open, was
    written through it. Neither the log nor its head file follows one."""
    from signerd.errors import Unavailable

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.write({"operation": "x"})
        path.unlink()
        path.symlink_to(victim)
        with pytest.raises(Unavailable, match="symbolic link"):
            log.write({"operation": "x"})
        assert log.failure is not None and "symbolic link" in log.failure
        path.unlink()
        log.write({"operation": "x"})  # a file again: the chain continues in it
        assert log.failure is None
    assert victim.read_bytes() == b"precious\n"
    assert verify(path).ok


def test_a_symlink_at_the_rotation_file_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        log.write({"operation": "x"})
        path.with_name(".audit.log.next").symlink_to(victim)
        assert log.rotate() is not None  # the stale name is removed, the new file made O_EXCL
        log.write({"operation": "x"})
    assert victim.read_bytes() == b"precious\n"


# -- config values legal but hostile -----------------------------------------------


BASE: dict[str, Any] = {"tokens": [{"name": "t", "module": "/m.so", "uri": "pkcs11:token=t",
                                    "pin_env": "P"}]}


def _setting(key: str, value: Any) -> dict[str, Any]:
    section, name = key.split(".")
    if section == "tokens[]":
        return {"tokens": [{**BASE["tokens"][0], name: value}]}
    extra = {"file": "a.log"} if section == "audit" else {}
    return {**BASE, section: {**extra, name: value}}


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_every_number_is_bounded_to_what_the_machine_can_honour(key: str) -> None:
    """Regression (issue 22 §7): health_interval = 0.000001 was accepted and
    the daemon used ~90% of a CPU. Every numeric setting has a range; both
    ends are accepted, just outside them (and NaN, and an integer too large
    for a float) are refused with the range and unit."""
    low, high, unit = BOUNDS[key]
    for good in (low, high):
        parse_config(_setting(key, good), Path("/"))
    step = 1 if isinstance(low, int) and isinstance(high, int) else low / 2
    bad: list[Any] = [low - step, high + step, 10 ** 400]
    if not (isinstance(low, int) and isinstance(high, int)):
        bad.append(float("nan"))
    shown = key.replace("tokens[]", "tokens[0]")
    for value in bad:
        with pytest.raises(ConfigError, match=re.escape(f"{shown} must be between ")) as info:
            parse_config(_setting(key, value), Path("/"))
        assert f"({unit}), got" in str(info.value)


def test_the_readme_documents_every_bound() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    for key, (low, high, unit) in BOUNDS.items():
        row = f"| `{key}` | {low} | {high} | {unit} |"
        assert row in section, row


def test_a_slot_id_past_a_ck_ulong_is_refused() -> None:
    with pytest.raises(ConfigError, match="slot-id must be a number from 0 to"):
        Pkcs11Uri.parse(f"pkcs11:slot-id={1 << 64}")
    assert Pkcs11Uri.parse(f"pkcs11:slot-id={(1 << 64) - 1}").slot_id == (1 << 64) - 1


# -- serve and check-config, end to end --------------------------------------------


def test_check_config_refuses_the_issues_hostile_values(hsm: HSM, certs: PKI,
                                                       tmp_path: Path) -> None:
    """Regression (issue 22 §7): health_interval = 0.000001, pin_file and
    policy.file = /dev/zero and audit.file = /dev/full were reported ok."""
    cases: list[tuple[Any, str]] = [
        (lambda d: d["server"].update(health_interval=0.000001),
         "server.health_interval must be between 0.05 and 3600 (seconds), got 1e-06"),
        (lambda d: d["tokens"][1].update(pin_file="/dev/zero"),
         "/dev/zero: is not a regular file (a character device)"),
        (lambda d: d["policy"].update(file="/dev/zero"),
         "policy /dev/zero: is not a regular file (a character device)"),
        (lambda d: d["audit"].update(file="/dev/full"),
         "/dev/full is not a regular file (a character device)"),
    ]
    for i, (change, words) in enumerate(cases):
        data = daemon_config(hsm, certs, tmp_path / f"c{i}")
        change(data)
        run = check_config(write_toml(tmp_path / f"c{i}" / "signerd.toml", data))
        assert run.returncode == 1, run.stdout
        assert len(errors(run)) == 1 and words in errors(run)[0], run.stdout


def test_check_config_refuses_an_audit_directory_others_can_write(
        hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    data = daemon_config(hsm, certs, tmp_path / "d")
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o1777)  # sticky is not enough here: the log's names are made in it
    data["audit"]["file"] = str(logs / "audit.log")
    run = check_config(write_toml(tmp_path / "d" / "signerd.toml", data))
    assert errors(run) == [f"error: audit: directory {logs} is writable by group or others "
                           "(mode 1777): they could replace what is in it; chmod go-w it"]


@pytest.mark.parametrize("what", ["config", "policy", "state-directory"])
def test_serve_refuses_files_others_can_write(hsm: HSM, certs: PKI, tmp_path: Path,
                                              what: str) -> None:
    """Regression (issue 22 §5): serve accepted a policy, a config or a state
    directory that others could write. Exit 2 and one line naming the file
    or directory and its mode."""
    state = tmp_path / "state"
    data = daemon_config(hsm, certs, state, tokens=("online",))
    config = write_toml(state / "signerd.toml", data)
    target = {"config": config, "policy": state / "policy.toml", "state-directory": state}[what]
    mode = 0o777 if what == "state-directory" else 0o666
    target.chmod(mode)
    run = serve(config)
    assert run.returncode == 2, run.stderr
    last = run.stderr.splitlines()[-1]
    assert last.startswith("signerd: ") and str(target) in last and f"(mode {mode:04o})" in last
    assert len([x for x in run.stderr.splitlines() if x.startswith("signerd: ")]) == 1


def test_a_policy_replaced_by_a_fifo_never_blocks_sigterm(hsm: HSM, certs: PKI,
                                                          tmp_path: Path) -> None:
    """Regression (issue 22 §5): a policy file replaced by a FIFO blocked the
    main thread on SIGHUP's reload; SIGTERM was handled only once something
    was written to the FIFO. The reload now refuses it at once, keeps the
    old policy, and SIGTERM stops the daemon."""
    data = daemon_config(hsm, certs, tmp_path, tokens=("online",))
    proc = spawn_daemon(write_toml(tmp_path / "signerd.toml", data), tmp_path)
    policy = tmp_path / "policy.toml"
    try:
        policy.unlink()
        os.mkfifo(policy, 0o600)
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "policy reload failed" not in proc.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "not a regular file (a FIFO)" in proc.log()
        start = time.monotonic()
        assert proc.stop(signal.SIGTERM, timeout=30) == 0
        assert time.monotonic() - start < 15
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()


def test_the_embedded_default_is_trusted_whatever_the_umask(tmp_path: Path) -> None:
    """Under umask 002 (common for users with their own group) the embedded
    default's config and policy came out group-writable, which serve now
    refuses: they are written 0644 whatever the umask."""
    script = ("import os, sys\nfrom pathlib import Path\nos.umask(0o002)\n"
              "from signerd import config, embedded\n"
              "cfg = config.load_config(embedded.ensure(Path(sys.argv[1])))\n"
              "from signerd.policy import Policy\n"
              "assert cfg.policy_file is not None\nPolicy.load(cfg.policy_file)\n")
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    run = subprocess.run([sys.executable, "-c", script, str(state)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert {p.name: p.stat().st_mode & 0o022 for p in state.glob("*.toml")} == {
        p.name: 0 for p in state.glob("*.toml")}
