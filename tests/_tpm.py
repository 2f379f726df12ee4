"""A TPM 2.0 token for the tests: swtpm + tpm2-abrmd + tpm2-pkcs11, on loopback.

Facts measured here (tpm2-pkcs11 1.9, swtpm 0.7, Debian 12) that shape it:

- Without a resource manager one process can make one key and use two: a
  third gets the TPM's out-of-memory error (TPM_RC_OBJECT_MEMORY). So
  tpm2-abrmd runs in front of swtpm, on a private D-Bus session bus, with
  ``--max-transients=100`` (one process then holds 50 key pairs).
- ``tpm2_ptool init`` makes the store; the token is made through PKCS#11
  (C_InitToken, SO login, C_InitPIN) in a child process, since tpm2-pkcs11
  reads its store only at C_Initialize.
- Killing swtpm makes signing fail at once (CKR_GENERAL_ERROR) while
  C_GetTokenInfo still answers from the module's cache; after swtpm is back
  only C_Finalize + C_Initialize recovers.
- Each kill may count as an authorisation failure (a shutdown that was not
  orderly), and swtpm's dictionary-attack defaults (3 failures, each
  forgotten after 1000 s) then lock the TPM after a few outages under load;
  ``start`` relaxes them.

Nothing here skips: a missing package is a failure (``./dev.sh test``
installs them).
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
LABEL = "test-tpm"
PROGRAMS = ("swtpm", "tpm2-abrmd", "tpm2_ptool", "dbus-daemon", "dbus-send")


def missing() -> list[str]:
    """What of the TPM stack is not installed."""
    gone = [p for p in PROGRAMS if shutil.which(p) is None]
    return gone + ([MODULE] if not Path(MODULE).exists() else [])


def _free_port_pair() -> int:
    """P and P+1 both free on 127.0.0.1 (swtpm's data and control ports)."""
    for _ in range(200):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return int(port)
    raise RuntimeError("no free port pair on 127.0.0.1")


def _wait_port(port: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.02)


# Children get SIGTERM when the test process dies (a killed run leaves no
# simulator, bus or resource manager behind). setpriv sets it and execs, so
# no Python runs between fork and exec: a preexec_fn makes subprocess fork()
# instead of vfork(), and gRPC's fork handlers then aborted children of a
# process with gRPC threads (seen in CI: "epoll_wait error: Bad file descriptor").
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "TERM")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# Run in a child process: make the token through PKCS#11 with signerd's own
# thread-safe initialisation.
_INIT_TOKEN = """
import sys
from signerd.token import MODULES
module, label, so_pin, pin = sys.argv[1:5]
lib = MODULES.acquire(module)
slot = next(s for s in lib.get_slots(token_present=True)
            if not s.get_token().flags & 0x400)  # CKF_TOKEN_INITIALIZED
lib.module.init_token(slot.slot_id, so_pin.encode(), label)
session = lib.get_token(token_label=label).open(rw=True, so_pin=so_pin)
session.init_pin(pin)
session.close()
MODULES.release(module)
"""


@dataclass
class Tpm:
    """A running TPM stack with one token, ``LABEL``, and its user PIN file."""

    dir: Path
    pin_file: Path
    port: int = 0
    bus: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """What tpm2-pkcs11 and tpm2-tools read, before C_Initialize."""
        return {"TPM2_PKCS11_STORE": str(self.dir / "store"),
                "TPM2_PKCS11_TCTI": "tabrmd:bus_type=session",
                "TPM2TOOLS_TCTI": "tabrmd:bus_type=session",
                "TPM2_PKCS11_LOG_LEVEL": "0",
                "DBUS_SESSION_BUS_ADDRESS": self.bus}

    def _start_swtpm(self) -> None:
        (self.dir / "state").mkdir(exist_ok=True)
        log = (self.dir / "swtpm.log").open("ab")
        self.procs["swtpm"] = subprocess.Popen(
            [*DIE_WITH_PARENT, "swtpm", "socket", "--tpm2",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear", "--tpmstate", f"dir={self.dir / 'state'}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        _wait_port(self.port + 1)  # the control port: swtpm serves one data connection

    def _start_bus(self) -> None:
        conf = self.dir / "dbus.conf"
        conf.write_text(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN\"\n"
            " \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n"
            f"<busconfig><type>session</type><listen>unix:path={self.dir / 'bus'}</listen>"
            "<auth>EXTERNAL</auth><policy context=\"default\">"
            "<allow send_destination=\"*\" eavesdrop=\"true\"/><allow eavesdrop=\"true\"/>"
            "<allow own=\"*\"/></policy></busconfig>\n")
        bus = subprocess.Popen([*DIE_WITH_PARENT, "dbus-daemon", f"--config-file={conf}",
                                "--nofork", "--print-address=1"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.procs["dbus"] = bus
        assert bus.stdout is not None
        ready, _, _ = select.select([bus.stdout], [], [], 10)
        self.bus = bus.stdout.readline().decode().strip() if ready else ""
        if not self.bus:
            raise RuntimeError("dbus-daemon printed no address")

    def _start_abrmd(self) -> None:
        log = (self.dir / "abrmd.log").open("ab")
        self.procs["abrmd"] = subprocess.Popen(
            [*DIE_WITH_PARENT, "tpm2-abrmd", f"--tcti=swtpm:host=127.0.0.1,port={self.port}",
             "--session", "--allow-root", "--flush-all", "--max-transients=100"],
            env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            owned = subprocess.run(
                ["dbus-send", "--session", "--print-reply", "--dest=org.freedesktop.DBus",
                 "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
                 "string:com.intel.tss2.Tabrmd"],
                env={**os.environ, **self.env}, capture_output=True, text=True, timeout=5)
            if "boolean true" in owned.stdout:
                return
            if self.procs["abrmd"].poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"tpm2-abrmd did not start: {(self.dir / 'abrmd.log').read_text()}")

    def unplug(self) -> None:
        """Stop the TPM (the simulator and the resource manager in front of it)."""
        _stop(self.procs.pop("abrmd", None))
        _stop(self.procs.pop("swtpm", None))

    def replug(self) -> None:
        """Start the same TPM again: same state, same ports, same bus."""
        self._start_swtpm()
        self._start_abrmd()

    def stop(self) -> None:
        self.unplug()
        _stop(self.procs.pop("dbus", None))


def start(base: Path) -> Tpm:
    """Start swtpm, D-Bus and tpm2-abrmd under ``base`` and make the token
    ``LABEL`` with a random user PIN (in a 0600 file) and SO PIN."""
    from signerd import pki

    base.mkdir(parents=True, exist_ok=True)
    (base / "store").mkdir(exist_ok=True)
    tpm = Tpm(base, base / "tpm.pin", _free_port_pair())
    try:
        tpm._start_swtpm()
        tpm._start_bus()
        tpm._start_abrmd()
        env = {**os.environ, **tpm.env}
        # Each unplug is a shutdown that was not orderly, which a TPM counts
        # as an authorisation failure when one may have been in progress;
        # swtpm allows 3 (TPM2_PT_MAX_AUTH_FAIL), each forgotten after 1000 s,
        # so a few unplugs under load put it in lockout (C_Login:
        # "TPM is in DA lockout mode") for the rest of the run.
        subprocess.run(["tpm2_dictionarylockout", "--setup-parameters", "--max-tries=1000",
                        "--recovery-time=1", "--lockout-recovery-time=1"], env=env,
                       check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        subprocess.run(["tpm2_ptool", "init", f"--path={base / 'store'}"], env=env,
                       check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
        pki.write_private(tpm.pin_file, pin.encode())
        subprocess.run([sys.executable, "-c", _INIT_TOKEN, MODULE, LABEL, so_pin, pin],
                       env=env, check=True, capture_output=True, timeout=120,
                       stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parent.parent)
    except BaseException:
        tpm.stop()
        raise
    return tpm
