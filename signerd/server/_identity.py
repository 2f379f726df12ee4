"""Who is calling: from the verified client certificate, or the Unix peer uid.

gRPC has already verified the certificate chain against the client CA bundle
(and its validity period) during the TLS handshake; here we only read the
identity out of the leaf, typed by the field it comes from
(signerd.policy.Identity). Precedence, first field present wins:

1. the first URI SAN -> ``uri:<uri>``; it must start with a scheme
   (RFC 3986 §3.1), else the certificate is refused;
2. else the first DNS SAN -> ``dns:<name>``; it must be made of a host
   name's characters, else refused;
3. else the subject's first CN -> ``cn:<name>``; a CN that starts with a URI
   scheme (``spiffe://...``, ``uid:0``, ``dev:loopback``) pretends to be
   another kind of identity and is refused.

A refused certificate is UNAUTHENTICATED (audited, as any unidentified
caller); so is one with none of the three. Unix socket peers are
``uid:<n>``, callers of the plaintext development listener ``dev:loopback``.
"""

from __future__ import annotations

import functools
import threading

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from signerd.errors import SignerdError, Unauthenticated, quoted
from signerd.policy import Identity, is_host_name, starts_with_scheme
from signerd.server._gate import Caller

DEV_LOOPBACK = Identity("dev", "loopback")


@functools.lru_cache(maxsize=4096)
def identity_from_pem(pem: bytes) -> Identity:
    """Identity of a client certificate (cached: parsing is on the hot path).
    Raises Unauthenticated when its identifying field is malformed or it has
    none, ValueError when the PEM does not parse."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if uris:
            if not starts_with_scheme(uris[0]):
                raise Unauthenticated(f"client certificate URI SAN {quoted(uris[0])} has no "
                                      "scheme (such as spiffe://)")
            return Identity("uri", uris[0])
        names = san.get_values_for_type(x509.DNSName)
        if names:
            if not is_host_name(names[0]):
                raise Unauthenticated(f"client certificate DNS SAN {quoted(names[0])} is not "
                                      "a host name")
            return Identity("dns", names[0])
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        cn = str(cns[0].value)
        if starts_with_scheme(cn):
            raise Unauthenticated(f"client certificate CN {quoted(cn)} looks like a URI or a "
                                  "kind:name identity; signerd takes a URI only from a URI SAN")
        if cn:
            return Identity("cn", cn)
    raise Unauthenticated("client certificate has no URI SAN, DNS SAN or CN to identify it")


def tls_caller(context: grpc.ServicerContext) -> Caller | SignerdError:
    """The caller on a mutual-TLS listener, from its verified certificate,
    or the Unauthenticated error that refuses it."""
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
    return Caller(DEV_LOOPBACK, "tcp", context.peer())


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
        return Caller(Identity("uid", str(uid)), "unix", f"unix:uid={uid}")
