"""``signerd.tuf_signer``: the import path users' python-tuf code names.

The implementation is :mod:`signerd.adapters.tuf`; importing either registers the
``signerd`` private key URI scheme with securesystemslib.
"""

from signerd.adapters.tuf import (
    SCHEME,
    SignerdSigner,
    SignerdSignerError,
    make_uri,
    parse_uri,
)

__all__ = ["SCHEME", "SignerdSigner", "SignerdSignerError", "make_uri", "parse_uri"]
