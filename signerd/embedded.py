"""The embedded default: a ready-to-use signerd under a local state directory.

On first run ``signerd serve`` (with no --config) creates, under the state
directory (``$SIGNERD_STATE_DIR``, else ``$XDG_STATE_HOME/signerd``, else
``~/.local/state/signerd``):

- a SoftHSM configuration from ``softhsm-config/softhsm2.conf.in`` and two
  tokens, ``signerd-root`` and ``signerd-online``, each with a random user
  PIN and SO PIN stored in 0600 files (never in argv);
- a local CA, a server certificate for localhost and a client certificate,
  so that mutual TLS is on from the first run;
- a policy granting that client certificate, and the current uid over the
  Unix socket, every operation (root keys included, and the admin operations
  ``purpose`` and ``reset``);
- a SQLite watermark store for the content checks, ``signerd-state.db``;
- ``signerd.toml`` for the daemon and ``client.toml`` for ``signerctl``.

Later runs reuse all of it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from signerd.errors import ConfigError

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
DEFAULT_LISTEN = "127.0.0.1:4443"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"  # /metrics, /livez, /readyz (signerd.metrics)
CLIENT_IDENTITY = "spiffe://signerd.local/signerctl"
TOKENS = ("root", "online")


def state_dir() -> Path:
    if os.environ.get("SIGNERD_STATE_DIR"):
        return Path(os.environ["SIGNERD_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "signerd"


def softhsm_module() -> str:
    for path in SOFTHSM_MODULES:
        if Path(path).exists():
            return path
    raise ConfigError(
        "SoftHSM is not installed (no libsofthsm2.so found); "
        "install it with: apt-get install softhsm2"
    )


def init_softhsm_token(module_path: str, conf: Path, label: str, pin: bytes, so_pin: bytes) -> None:
    """Initialise a free SoftHSM slot as token ``label`` with the given PINs,
    through PKCS#11 (C_InitToken, C_InitPIN) rather than softhsm2-util, whose
    --pin flag would put the PIN in argv."""
    os.environ["SOFTHSM2_CONF"] = str(conf)
    from signerd.token import MODULES

    lib = MODULES.acquire(module_path)
    try:
        free = [
            s for s in lib.get_slots(token_present=True) if not s.get_token().flags & 0x400
        ]  # CKF_TOKEN_INITIALIZED
        if not free:
            raise ConfigError("SoftHSM has no free slot to initialise")
        lib.module.init_token(free[0].slot_id, so_pin, label)
        token = lib.get_token(token_label=label)
        session = token.open(rw=True, so_pin=so_pin.decode())
        try:
            session.init_pin(pin.decode())
        finally:
            session.close()
    finally:
        MODULES.release(module_path)


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    # Writable by no one else whatever the umask (002 is common): signerd
    # refuses a config or policy its group may write (trusted_files.read_trusted).
    os.chmod(path, 0o644)


def _toml_str(value: str | Path) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def ensure(state: Path, listen: str = DEFAULT_LISTEN,
           metrics_listen: str = DEFAULT_METRICS_LISTEN) -> Path:
    """Create the embedded default under ``state`` if needed; return its config path.
    ``listen`` and ``metrics_listen`` ("HOST:PORT") are used only when creating it.
    Paths written into it are absolute, whatever ``state`` is: a relative
    --state-dir used to make a daemon that started only from the directory
    it was made in (SOFTHSM2_CONF and SoftHSM's tokendir are read as they
    are, not relative to the config)."""
    state = Path(os.path.abspath(state))
    config = state / "signerd.toml"
    if config.exists():
        return config
    # Imported here: a supervisor of workers loads neither, and starts them sooner.
    from signerd import pki
    from signerd.token import _p11

    module = softhsm_module()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state, 0o700)
    tokendir = state / "tokens"
    tokendir.mkdir(exist_ok=True, mode=0o700)
    # A path next to this file, not importlib.resources: setuptools' editable
    # installs break resources.files() when run outside the checkout.
    template = (Path(__file__).parent / "data" / "softhsm2.conf.in").read_text()
    conf = state / "softhsm2.conf"
    _write(conf, template.replace("@TOKENDIR@", str(tokendir)))
    for name in TOKENS:
        pin, so_pin = secrets.token_urlsafe(24).encode(), secrets.token_urlsafe(24).encode()
        pki.write_private(state / f"{name}.pin", pin)
        pki.write_private(state / f"{name}.so-pin", so_pin)
        try:
            init_softhsm_token(module, conf, f"signerd-{name}", pin, so_pin)
        except _p11.P11Error as e:
            raise ConfigError(f"cannot initialise the SoftHSM token: {e}") from None

    tls = state / "tls"
    tls.mkdir(exist_ok=True, mode=0o700)
    ca = pki.make_ca("signerd embedded CA")
    ca.write(tls / "ca.pem", tls / "ca-key.pem")
    pki.issue(ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1", "::1")).write(
        tls / "server.pem", tls / "server-key.pem"
    )
    pki.issue(ca, "signerctl", server=False, uris=(CLIENT_IDENTITY,)).write(
        tls / "client.pem", tls / "client-key.pem"
    )

    _write(
        state / "policy.toml",
        f"""# Embedded default policy: the local signerctl certificate and the
# current user over the Unix socket may do everything, root keys included.
[[rule]]
name = "local-admin-tls"
identities = [{_toml_str(CLIENT_IDENTITY)}]
operations = ["*", "purpose", "reset"]
roles = ["*", "root"]

[[rule]]
name = "local-admin-unix"
identities = ["uid:{os.getuid()}"]
operations = ["*", "purpose", "reset"]
transports = ["unix"]
""",
    )
    tokens = "".join(
        f"""
[[tokens]]
name = "{name}"
module = {_toml_str(module)}
uri = "pkcs11:token=signerd-{name}"
pin_file = "{name}.pin"
roles = {'["root"]' if name == "root" else '["*"]'}
"""
        for name in TOKENS
    )
    _write(
        config,
        f"""# signerd embedded default, created on first run. See README.md.
[server]
listen = {_toml_str(listen)}
unix_socket = "signerd.sock"

[tls]
cert = "tls/server.pem"
key = "tls/server-key.pem"
client_ca = "tls/ca.pem"

[policy]
file = "policy.toml"

[audit]
file = "audit.log"

[metrics]
listen = {_toml_str(metrics_listen)}

[state]
url = {_toml_str("sqlite:///" + str(state / "signerd-state.db"))}

[environment]
SOFTHSM2_CONF = {_toml_str(conf)}
{tokens}""",
    )
    _write(
        state / "client.toml",
        f"""# signerctl's default client config (embedded signerd).
server = {_toml_str(listen)}
server_name = "localhost"
ca = "tls/ca.pem"
cert = "tls/client.pem"
key = "tls/client-key.pem"
""",
    )
    return config
