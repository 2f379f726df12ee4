"""A small gRPC client for signerd.v1, used by signerctl and the trust commands."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from signerd import embedded
from signerd.config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES,
    is_host_port,
)
from signerd.errors import ConfigError
from signerd.trusted_files import read_toml
from signerd.v1 import signer_pb2 as pb
from signerd.v1 import signer_pb2_grpc as pb_grpc

ENCODINGS = {"raw": pb.SIGNATURE_ENCODING_RAW, "der": pb.SIGNATURE_ENCODING_DER}
PADDINGS = {"pss": pb.RSA_PADDING_PSS, "pkcs1v15": pb.RSA_PADDING_PKCS1V15}
CERTIFICATE_PROFILES = {
    "": pb.CERTIFICATE_PROFILE_UNSPECIFIED,
    "ca": pb.CERTIFICATE_PROFILE_CA,
    "code-signing": pb.CERTIFICATE_PROFILE_CODE_SIGNING,
}
MAX_TIMEOUT = 86400.0  # seconds: the longest timeout a client config or --timeout may set


#: KeyPurpose values by name (signerd.keys.PURPOSES).
PURPOSES = {"metadata": pb.KEY_PURPOSE_METADATA, "raw": pb.KEY_PURPOSE_RAW}
PURPOSE_NAMES = {v: k for k, v in PURPOSES.items()}


def valid_server(value: str) -> bool:
    """Whether ``value`` is an address signerd's clients accept:
    ``unix:PATH`` (a socket path, as gRPC reads it) or ``HOST:PORT`` with a
    port of 1-65535 (an IPv6 host in brackets, ``[::1]:4443``)."""
    if value.startswith("unix:"):
        return len(value) > len("unix:")
    return is_host_port(value, listening=False)


def valid_timeout(value: object) -> float | None:
    """``value`` as a call timeout in seconds, if it is a number (not a
    bool) more than 0 and at most :data:`MAX_TIMEOUT`; else None (NaN and
    infinity included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 < value <= MAX_TIMEOUT else None


@dataclass(frozen=True)
class ClientConfig:
    server: str  # "host:port" (mutual TLS) or "unix:/path/to/signerd.sock"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    timeout: float = 30.0
    # Plaintext TCP, for a daemon in dev_plaintext mode on loopback only.
    plaintext: bool = False
    # The daemon's [server] max_message_bytes: signerctl sends a bigger file
    # by its digest (or refuses it, for ed25519) instead of being refused.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @classmethod
    def load(cls, path: Path) -> ClientConfig:
        data = read_toml(path, "client config")
        if "server" not in data:
            raise ConfigError(f"client config {path} has no 'server'")

        def bad(key: str, what: str) -> ConfigError:
            return ConfigError(f"client config {path}: {key} must be {what}, "
                               f"got {data[key]!r}")

        def text(key: str) -> str | None:
            value: Any = data.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                raise bad(key, "a non-empty string")
            return value

        def p(key: str) -> Path | None:
            value = text(key)
            return path.parent / value if value is not None else None

        server = str(text("server"))
        if not valid_server(server):
            raise bad("server", "HOST:PORT or unix:/path/to/signerd.sock")
        timeout = valid_timeout(data.get("timeout", 30.0))
        if timeout is None:
            raise bad("timeout", f"seconds, a number more than 0 and at most {MAX_TIMEOUT:g}")
        plaintext = data.get("plaintext", False)
        if not isinstance(plaintext, bool):
            raise bad("plaintext", "true or false")
        limit = data.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
        if isinstance(limit, bool) or not isinstance(limit, int) or \
                not 1024 <= limit <= MAX_MESSAGE_BYTES:
            raise bad("max_message_bytes",
                      f"a whole number of bytes from 1024 to {MAX_MESSAGE_BYTES}, as the "
                      "daemon's [server] max_message_bytes")
        return cls(server, p("ca"), p("cert"), p("key"), text("server_name"),
                   timeout, plaintext, limit)

    @classmethod
    def default_path(cls) -> Path:
        env = os.environ.get("SIGNERCTL_CONFIG")
        return Path(env) if env else embedded.state_dir() / "client.toml"


# gRPC's UNAVAILABLE text for a connection it could not make:
# "failed to connect to all addresses; last error: UNKNOWN: ipv4:HOST:PORT: REASON"
_LAST_ERROR = re.compile(r"^[A-Z_]+: (?:(?:ipv4|ipv6|unix|unix-abstract):\S*: )?")
_TLS_WORDS = ("handshake", "ssl_error", "verification check", "certificate")


@dataclass(frozen=True)
class ConnectFailure:
    """Why a call never reached signerd: gRPC's ``reason`` (for a failed
    handshake, its last part), and whether something at the address
    answered but the TLS ``handshake`` failed."""

    reason: str
    handshake: bool
    # Something answered, but not with TLS (a metrics or other HTTP port).
    not_tls: bool = False


def connect_failure(server: str, details: str) -> ConnectFailure | None:
    """For an UNAVAILABLE call to ``server`` with these ``details``: None when
    the call reached signerd (the daemon itself said UNAVAILABLE); else why
    it did not. A client certificate the daemon refuses gives only "Socket
    closed" (the daemon checks it after the client's side of the handshake
    is done), so a reason that names no TLS failure is told apart from
    "nothing listens" by connecting to the address once (plain TCP)."""
    if "failed to connect to all addresses" not in details:
        return None
    reason = _LAST_ERROR.sub("", details.rpartition("last error: ")[2].removesuffix(": OK"))
    lowered = reason.lower()
    if any(word in lowered for word in _TLS_WORDS) or "verification context" in lowered:
        if _speaks_tls(server) is False:
            return ConnectFailure(reason.rpartition(": ")[2].rstrip("."), False, True)
        return ConnectFailure(reason.rpartition(": ")[2].rstrip("."), True)
    if "connection refused" not in lowered and _listening(server):
        return ConnectFailure(f"{reason}: signerd may not accept the client certificate", True)
    return ConnectFailure(reason, False)


def _speaks_tls(server: str) -> bool | None:
    """Whether whatever listens at ``server`` ("HOST:PORT") answers a TLS
    handshake (nothing verified, nothing sent after it); None when no TCP
    connection could be made or the answer says nothing either way. A plain
    HTTP server (signerd's metrics port) answers a ClientHello with an HTTP
    error, which OpenSSL reports as a record that is not TLS."""
    import ssl

    host, _, port = server.rpartition(":")
    if server.startswith("unix:") or not port.isdigit():
        return None
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2) as raw, \
                ctx.wrap_socket(raw):
            return True
    except ssl.SSLError as e:
        not_tls = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                   "HTTP_REQUEST")
        return False if any(word in str(e).upper() for word in not_tls) else None
    except OSError:
        return None


def _listening(server: str) -> bool:
    """Whether a TCP connection to ``server`` ("HOST:PORT") is accepted."""
    host, _, port = server.rpartition(":")
    if server.startswith("unix:") or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except OSError:
        return False


def channel(cfg: ClientConfig) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if cfg.server.startswith("unix:"):
        return grpc.insecure_channel(cfg.server, options=options)
    if cfg.plaintext:
        host = cfg.server.rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ConfigError(f"plaintext is only for a development daemon on loopback, not {host}")
        return grpc.insecure_channel(cfg.server, options=options)
    if not (cfg.ca and cfg.cert and cfg.key):
        raise ConfigError(
            "a TCP server needs ca, cert and key (mutual TLS); "
            "use --tls-ca/--tls-cert/--tls-key or a client config"
        )
    try:
        creds = grpc.ssl_channel_credentials(
            cfg.ca.read_bytes(), cfg.key.read_bytes(), cfg.cert.read_bytes()
        )
    except OSError as e:
        raise ConfigError(f"cannot read TLS file {e.filename}: {e.strerror}") from None
    if cfg.server_name:
        options.append(("grpc.ssl_target_name_override", cfg.server_name))  # type: ignore[arg-type]
    return grpc.secure_channel(cfg.server, creds, options=options)


class Client:
    """signerd.v1 calls. Errors are grpc.RpcError with the server's status."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.channel = channel(cfg)
        self.stub = pb_grpc.SignerServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_key(self, gun: str, role: str, algorithm: str = "", token: str = "",
                   purpose: str = "") -> pb.Key:
        """CreateKey; ``purpose`` is ``metadata``, ``raw`` or "" (the server's
        default, metadata)."""
        return self.stub.CreateKey(
            pb.CreateKeyRequest(gun=gun, role=role, algorithm=algorithm, token=token,
                                purpose=PURPOSES.get(purpose, pb.KEY_PURPOSE_UNSPECIFIED)),
            timeout=self.cfg.timeout,
        )

    def set_key_purpose(self, key_id: str, purpose: str) -> pb.Key:
        """SetKeyPurpose: ``purpose`` is ``metadata`` or ``raw``."""
        return self.stub.SetKeyPurpose(
            pb.SetKeyPurposeRequest(
                key_id=key_id, purpose=PURPOSES.get(purpose, pb.KEY_PURPOSE_UNSPECIFIED)),
            timeout=self.cfg.timeout)

    def get_state(self, gun: str) -> pb.GetStateResponse:
        """GetState: the watermarks recorded for ``gun``."""
        return self.stub.GetState(pb.GetStateRequest(gun=gun), timeout=self.cfg.timeout)

    def reset_state(self, gun: str) -> int:
        """ResetState: forget ``gun``'s watermarks; the rows removed."""
        return int(self.stub.ResetState(pb.ResetStateRequest(gun=gun),
                                        timeout=self.cfg.timeout).removed)

    def get_key(self, key_id: str) -> pb.Key:
        return self.stub.GetKey(pb.GetKeyRequest(key_id=key_id), timeout=self.cfg.timeout)

    def find_key(self, key_id: str) -> pb.Key | None:
        """GetKey, or None when signerd does not have the key or will not show it
        to the caller (NOT_FOUND, PERMISSION_DENIED); other failures raise."""
        try:
            return self.get_key(key_id)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                return None
            raise

    def list_keys(self, gun: str = "", role: str = "", token: str = "") -> Iterator[pb.Key]:
        page = ""
        while True:
            resp = self.stub.ListKeys(
                pb.ListKeysRequest(gun=gun, role=role, token=token, page_token=page),
                timeout=self.cfg.timeout,
            )
            yield from resp.keys
            page = resp.next_page_token
            if not page:
                return

    def list_tokens(self) -> list[pb.TokenInfo]:
        resp = self.stub.ListTokens(pb.ListTokensRequest(), timeout=self.cfg.timeout)
        return list(resp.tokens)

    def delete_key(self, key_id: str) -> None:
        self.stub.DeleteKey(pb.DeleteKeyRequest(key_id=key_id), timeout=self.cfg.timeout)

    def sign(
        self,
        key_id: str,
        message: bytes | None = None,
        digest: bytes | None = None,
        encoding: str = "raw",
        rsa_padding: str = "pss",
    ) -> pb.SignResponse:
        req = pb.SignRequest(
            key_id=key_id, encoding=ENCODINGS[encoding], rsa_padding=PADDINGS[rsa_padding]
        )
        if digest is not None:
            req.digest = digest
        else:
            req.message = message or b""
        return self.stub.Sign(req, timeout=self.cfg.timeout)

    def sign_stream(self, requests: Iterable[pb.SignRequest],
                    timeout: float | None = None) -> Iterator[pb.SignBatchItem]:
        """SignStream: send ``requests`` on one call as the iterable yields
        them (it is read on gRPC's thread), and yield one item per request,
        in request order, as the answers arrive. ``timeout`` (seconds) bounds
        the whole call (default: none). Raises grpc.RpcError only for the
        call as a whole (UNAUTHENTICATED, UNAVAILABLE...); a bad request is
        an item with its own code. If ``requests`` itself raises, the stream
        ends there (the requests before it are answered) and the exception is
        raised here after their items; gRPC alone would end the call UNKNOWN
        "Exception iterating requests!" and lose it."""
        raised: list[Exception] = []

        def feed() -> Iterator[pb.SignRequest]:
            try:
                yield from requests
            except Exception as e:  # noqa: BLE001 - re-raised on the caller's thread
                raised.append(e)

        for response in self.stub.SignStream(feed(), timeout=timeout):
            yield from response.items
        if raised:
            raise raised[0]

    def certify_key(
        self,
        key_id: str,
        subject: str,
        issuer_key_id: str = "",
        days: int = 0,
        profile: str = "",
    ) -> list[bytes]:
        """CertifyKey: issue and store a certificate for ``key_id``, signed by
        ``issuer_key_id`` (empty: self-signed); ``profile`` is "", "ca" or
        "code-signing". Returns the new chain, DER, leaf first."""
        resp = self.stub.CertifyKey(
            pb.CertifyKeyRequest(key_id=key_id, subject=subject, issuer_key_id=issuer_key_id,
                                 validity_days=days, profile=CERTIFICATE_PROFILES[profile]),
            timeout=self.cfg.timeout,
        )
        return list(resp.certificates)

    def certificate_chain(self, key_id: str) -> list[bytes]:
        """GetCertificateChain: the key's chain, DER, leaf first, root last."""
        resp = self.stub.GetCertificateChain(
            pb.GetCertificateChainRequest(key_id=key_id), timeout=self.cfg.timeout)
        return list(resp.certificates)
