"""A software YubiHSM 2 below Yubico's real PKCS#11 module, for the tests.

As tests/_tpm.py runs swtpm below tpm2-pkcs11, this package runs a device of
its own below ``yubihsm_pkcs11.so`` (Debian's yubihsm-pkcs11, from
bookworm-backports; ``./dev.sh test`` installs it), so the module itself is
under test: its object mapping, its one device session per slot, its
templates. The device speaks the YubiHSM 2 wire protocol (framing, SCP03
sessions with authentication key 1, objects, ECDSA/EdDSA/PSS/PKCS#1
signatures, opaque objects, random bytes, storage info) behind
yubihsm-connector's HTTP interface on loopback; it runs in its own process
(``python -m tests._yubihsm``), since the module's calls block in C while the
device answers.

- ``_defs``: the protocol's numbers; ``_scp03``: the session crypto;
  ``_store``: the objects, in a JSON file; ``_commands``: what runs in a
  session; ``_device``: frames and sessions; ``_connector``: HTTP.

Unplugging stops the process; replugging starts it again on the same port
with the same objects, as a device that was pulled and put back.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests._tpm import DIE_WITH_PARENT

MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/yubihsm_pkcs11.so"
# The module's token label: "YubiHSM" (yubihsm-shell pkcs11/yubihsm_pkcs11.c, C_GetTokenInfo).
LABEL = "YubiHSM"
AUTH_KEY = 1
PASSWORD = "password"  # authentication key 1's factory password
PIN = f"{AUTH_KEY:04x}{PASSWORD}"  # the module's PIN: key ID in 4 hex digits, then the password
ROOT = Path(__file__).resolve().parents[2]  # the repository, for ``python -m tests._yubihsm``


def missing() -> list[str]:
    """What is not installed: the PKCS#11 module."""
    return [] if Path(MODULE).exists() else [MODULE]


@dataclass
class YubiHsm:
    """A running software device, its connector port and the module's config."""

    dir: Path
    port: int
    conf: Path
    pin_file: Path
    proc: subprocess.Popen[bytes] | None = None
    idle: float = 30.0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self) -> None:
        ready = self.dir / f"ready-{secrets.token_hex(4)}"
        log = (self.dir / "device.log").open("ab")
        self.proc = subprocess.Popen(
            [*DIE_WITH_PARENT, sys.executable, "-m", "tests._yubihsm",
             "--state", str(self.dir / "objects.json"), "--port", str(self.port),
             "--ready", str(ready), "--idle", str(self.idle)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        log.close()
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the software YubiHSM exited: "
                                   f"{(self.dir / 'device.log').read_text()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("the software YubiHSM did not start in 30 s")
            time.sleep(0.02)
        self.port = int(ready.read_text())
        ready.unlink()

    def unplug(self) -> None:
        """Take the device away: the connector stops answering."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def replug(self) -> None:
        """Bring it back on the same port, with the objects it had."""
        if self.proc is None:
            self._spawn()

    def stop(self) -> None:
        self.unplug()


def start(directory: Path, idle: float = 30.0) -> YubiHsm:
    """Start a device whose objects live in ``directory``, write the module's
    config and the PIN file there. ``env`` holds YUBIHSM_PKCS11_CONF, which
    the module reads at C_Initialize."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "yubihsm_pkcs11.conf"
    pin_file = directory / "yubihsm.pin"
    pin_file.write_text(PIN)
    pin_file.chmod(0o600)
    y = YubiHsm(directory, 0, conf, pin_file, idle=idle)
    y._spawn()
    # timeout: seconds the module waits to connect (yubihsm-shell pkcs11/cmdline.ggo)
    conf.write_text(f"connector = {y.url}\ntimeout = 5\n")
    y.env = {"YUBIHSM_PKCS11_CONF": str(conf)}
    return y
