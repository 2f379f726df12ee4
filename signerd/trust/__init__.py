"""TUF/Notary trust data for Docker Content Trust.

Layers: ``signer`` (what a key must offer), ``metadata`` (Notary's JSON
shapes and envelopes), ``x509`` (root certificates), ``repo`` (a local trust
directory and its operations), ``verify`` (client-side verification) and
``notary_http`` (notary-server's HTTP API). Above them, the Docker Content
Trust workflows of ``signerctl trust``: ``keysource`` (keys through the
daemon or on the tokens), ``state`` (what a trust directory remembers),
``workflows`` (init, sign, delegate, rotate, publish, pull, inspect) and
``results`` (what they return). Nothing here imports gRPC or argparse.
"""

from signerd.trust._key import TufKey, key_from_pem
from signerd.trust.errors import (
    NotaryServerError,
    NotAuthorized,
    TrustError,
    UnsignedTag,
    UnwritableValue,
    VerificationError,
)
from signerd.trust.metadata import (
    DEFAULT_EXPIRY,
    DelegatedRole,
    Envelope,
    FileMeta,
    RoleKeys,
    Root,
    Signature,
    Snapshot,
    Targets,
    Timestamp,
    default_expires,
    format_expires,
    parse_expires,
    sign_envelope,
)
from signerd.trust.notary_http import MetadataNotFound, NotaryClient
from signerd.trust.repo import TrustRepo, signer_key
from signerd.trust.signer import SoftwareSigner, TrustSigner
from signerd.trust.verify import (
    SignedTag,
    TrustedState,
    VerifiedRepository,
    verify_repository,
    verify_role,
    verify_root,
)
from signerd.trust.x509 import (
    build_root_certificate,
    certificate_key,
    check_root_certificate,
    x509_key_id,
)

__all__ = [
    "DEFAULT_EXPIRY",
    "DelegatedRole",
    "Envelope",
    "FileMeta",
    "MetadataNotFound",
    "NotAuthorized",
    "NotaryClient",
    "NotaryServerError",
    "RoleKeys",
    "Root",
    "Signature",
    "SignedTag",
    "Snapshot",
    "SoftwareSigner",
    "Targets",
    "Timestamp",
    "TrustError",
    "TrustRepo",
    "TrustSigner",
    "TrustedState",
    "TufKey",
    "UnsignedTag",
    "UnwritableValue",
    "VerificationError",
    "VerifiedRepository",
    "build_root_certificate",
    "certificate_key",
    "check_root_certificate",
    "default_expires",
    "format_expires",
    "key_from_pem",
    "parse_expires",
    "sign_envelope",
    "signer_key",
    "verify_repository",
    "verify_role",
    "verify_root",
    "x509_key_id",
]
