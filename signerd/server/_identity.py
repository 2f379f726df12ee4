"""Who is calling: from the verified client certificate, or the Unix peer uid.

gRPC has already verified the certificate chain against the client CA bundle
(and its validity period) during the TLS handshake; here we only read the
identity out of the leaf: URI SAN first (``spiffe://ci/runner-1``), then DNS
SAN, then the subject CN.
"""

from __future__ import annotations

import functools
import threading

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from signerd.errors import SignerdError, Unauthenticated
from signerd.server._gate import Caller


@functools.lru_cache(maxsize=4096)
def identity_from_pem(pem: bytes) -> str:
    """Identity of a client certificate (cached: parsing is on the hot path)."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for kind in (x509.UniformResourceIdentifier, x509.DNSName):
            values = san.get_values_for_type(kind)
            if values:
                return str(values[0])
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        return str(cns[0].value)
    raise Unauthenticated("client certificate has no URI SAN, DNS SAN or CN to identify it")


def tls_caller(context: grpc.ServicerContext) -> Caller | SignerdError:
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert")
    if not pems:
        return Unauthenticated("a verified client certificate is required")
    try:
        return Caller(identity_from_pem(pems[0]), "tcp", context.peer())
    except Unauthenticated as e:
        return e
    except ValueError:
        return Unauthenticated("client certificate cannot be parsed")


def dev_caller(context: grpc.ServicerContext) -> Caller | SignerdError:
    """Plaintext development listener on loopback: everyone is ``dev:loopback``."""
    return Caller("dev:loopback", "tcp", context.peer())


class UnixPeers:
    """Peer of a relayed connection -> the Unix peer's uid.

    The Unix socket listener relays each accepted connection to a private
    gRPC listener (signerd.server._unix), from a uniquely named socket whose
    name gRPC reports as the peer, and records here which uid (from
    SO_PEERCRED) owns it. A connection to the private listener that did not
    come through the relay has no entry and is refused.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uids: dict[str, int] = {}

    def add(self, peer: str, uid: int) -> None:
        with self._lock:
            self._uids[peer] = uid

    def remove(self, peer: str) -> None:
        with self._lock:
            self._uids.pop(peer, None)

    def caller(self, context: grpc.ServicerContext) -> Caller | SignerdError:
        peer = context.peer()
        with self._lock:
            uid = self._uids.get(peer)
        if uid is None:
            return Unauthenticated(
                "connections to the internal listener must come through the Unix socket"
            )
        return Caller(f"uid:{uid}", "unix", f"unix:uid={uid}")
