"""Issue 22 §4: a process killed (SIGKILL) at random points of CreateKey,
the first signature's "used" mark, certify (twice: re-certifying) and
DeleteKey leaves only what the sweep recognises: ``signerd sweep`` reports
it, ``--remove`` removes it, and every key still listed signs.

Real SoftHSM tokens in a directory of their own, written by real processes
killed by the kernel; nothing is mocked.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests._fullfs import small_fs
from tests.conftest import (
    HSM,
    PKI,
    Process,
    daemon_config,
    make_hsm_apart,
    rpc_error,
    spawn_daemon,
    unique_gun,
    write_toml,
)

ROOT = Path(__file__).resolve().parents[1]
SIGNERD = [sys.executable, "-m", "signerd.daemon"]


def _config(hsm_dir: Path, h: HSM) -> Path:
    cfg = hsm_dir / "signerd.toml"
    cfg.write_text(
        f'[environment]\nSOFTHSM2_CONF = "{h.conf}"\n\n'
        f'[[tokens]]\nname = "online"\nmodule = "{h.module}"\n'
        f'uri = "pkcs11:token=test-online"\npin_file = "{h.pins["online"]}"\n')
    return cfg


def _loop(h: HSM, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests._crashloop", str(h.conf), h.module,
         "test-online", str(h.pins["online"]), mode],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_sigkill_at_random_points_leaves_only_what_the_sweep_removes(tmp_path: Path) -> None:
    hsm = make_hsm_apart(tmp_path / "hsm")
    cfg = _config(tmp_path, hsm)
    rng = random.Random()
    kills = 0
    for _ in range(12):
        proc = _loop(hsm, "churn")
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        time.sleep(rng.uniform(0.05, 0.6))  # somewhere inside a write, or between two
        proc.kill()
        proc.wait(10)
        kills += 1
    report = subprocess.run([*SIGNERD, "sweep", "--config", str(cfg)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode in (0, 1), report.stderr
    assert report.stdout.strip().endswith("belong to no key" if report.returncode == 0 else
                                          "`signerd sweep --remove` removes them"), report.stdout
    removed = subprocess.run([*SIGNERD, "sweep", "--remove", "--grace", "0.2",
                              "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    again = subprocess.run([*SIGNERD, "sweep", "--config", str(cfg)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == \
        "online: 0 object(s) belong to no key", again.stdout + again.stderr
    check = _loop(hsm, "check")
    out, err = check.communicate(timeout=120)
    assert check.returncode == 0, err
    assert int(out.strip()) >= 0
    print(f"{kills} kills; sweep found:\n{report.stdout}")


def test_a_first_signature_whose_used_mark_cannot_be_written_is_withheld(
        certs: PKI, tmp_path: Path) -> None:
    """Issue 22 §4: with the token's storage full, signatures came back while
    the key's "used" mark could not be written, so after a restart the key
    looked unused (Notary's CreateKey would hand it out again, and `keys
    delete` would not ask). The token lives on a real tmpfs that is filled."""
    from signerd.client import Client, ClientConfig

    with small_fs(tmp_path / "hsm", size_kb=2048) as fs:
        hsm = make_hsm_apart(fs.path)
        cfg = write_toml(tmp_path / "signerd.toml", daemon_config(hsm, certs, tmp_path))
        cert, key = certs.files["admin"]

        def client(proc: Process) -> Client:
            return Client(ClientConfig(f"127.0.0.1:{proc.info['tcp']}", certs.ca_file, cert,
                                       key, "localhost", 20))

        proc = spawn_daemon(cfg, tmp_path)
        try:
            with client(proc) as c:
                made = c.create_key(unique_gun(), "targets", purpose="raw")
                fs.fill()
                err = rpc_error(lambda: c.sign(made.key_id, message=b"first"))
                assert err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      grpc.StatusCode.UNAVAILABLE), err.details()
                assert "signature withheld" in (err.details() or "")
                assert not c.get_key(made.key_id).used
                fs.free()
                deadline = time.monotonic() + 30  # the token may be probed back first
                while True:
                    try:
                        assert c.sign(made.key_id, message=b"first").signature
                        break
                    except grpc.RpcError:
                        assert time.monotonic() < deadline, "never signed again"
                        time.sleep(0.2)
        finally:
            assert proc.stop() == 0
        proc = spawn_daemon(cfg, tmp_path)  # the mark is on the token, not in memory
        try:
            with client(proc) as c:
                assert c.get_key(made.key_id).used
        finally:
            assert proc.stop() == 0


def test_the_start_up_sweep_starts_from_the_first_listing_and_reports_only_junk(
        daemon: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up report (issue 22 §4) takes the keys its first look needs from the
    first listing rather than listing the token again (seconds at 10,000 keys, beside
    the first signatures: issue 24), and still reports what belongs to no key and
    nothing else: here one metadata object of no key, and not a key made after the
    listing."""
    import pkcs11

    from signerd.token import _layout

    token = daemon.servers.service.tokens["online"]
    token.keys()  # the first listing is done
    key = daemon.servers.service.create_key(unique_gun(), "targets", purpose="raw")
    orphan = _layout.meta_label("ab" * 32).decode()
    A = pkcs11.Attribute
    with token.session() as (_, s):
        s.create_object({A.CLASS: pkcs11.ObjectClass.DATA, A.TOKEN: True,
                                A.PRIVATE: False, A.LABEL: orphan,
                                A.APPLICATION: "signerd", A.VALUE: b"{}"})
    try:
        caplog.set_level(logging.WARNING, logger="signerd.token")
        # The daemon's start-up sweep: nothing while it waits out its delay and the daemon
        # stops; after the delay, the report.
        import threading

        from signerd.daemon import _main

        stopping = threading.Event()
        stopping.set()
        _main._start_up_sweep([token], stopping)
        assert not [r for r in caplog.records if "belong to no key" in r.getMessage()]
        monkeypatch.setattr(_main, "START_SWEEP_DELAY", 0.01)
        _main._start_up_sweep([token], threading.Event())
        reports = [r for r in caplog.records if "belong to no key" in r.getMessage()]
        assert len(reports) == 1
        fields = reports[0].fields  # type: ignore[attr-defined]
        assert fields["count"] == 1
        assert fields["objects"] == [f"metadata of no key {orphan!r}"]
        assert key.key_id not in " ".join(fields["objects"])
    finally:
        with token.session() as (_, s):
            for o in s.get_objects({A.LABEL: orphan}):
                o.destroy()
    caplog.clear()
    token.report_junk()
    assert not [r for r in caplog.records if "belong to no key" in r.getMessage()]
