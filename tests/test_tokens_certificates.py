"""Certificates and Notation's signatures on every kind of token of the
conformance suite (tests/test_tokens.py): SoftHSM, SoftHSM under the
``yubihsm`` profile, and a TPM 2.0 (swtpm + tpm2-pkcs11).

For each kind: a certificate object is made on the token for a root and for
a key of each algorithm Notation can use (tpm2-pkcs11 and YubiHSM's module
take only public certificate objects), the chain survives a daemon restart
and goes with its key, and RSA keys sign the RSASSA-PSS digests Notation
asks for (SHA-256, -384 and -512, salt = hash length)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc

from signerd import signing
from signerd.keys import parse_algorithm
from tests import test_tokens
from tests.conftest import HSM, PKI, rpc_error, unique_gun
from tests.test_certify import SUBJECT, verify_notary_chain
from tests.test_tokens import Kind, _start

kind = test_tokens.kind  # the conformance suite's token kinds


NOTATION_ALGORITHMS = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096")
MESSAGE = b"notation signs this"


def test_certificates_and_notation_digests_on_every_kind(
    kind: Kind, certs: PKI, tmp_path: Path
) -> None:
    algorithms = [a for a in kind.algorithms if a in NOTATION_ALGORITHMS]
    d = _start(kind, certs, tmp_path / "first")
    try:
        with d.client() as c:
            root = c.create_key(unique_gun(), "root", kind.algorithms[0], purpose="raw")
            c.certify_key(root.key_id, "CN=acme root,O=Acme,C=US")
            chains = {}
            for name in algorithms:
                key = c.create_key(unique_gun(), "targets", name, purpose="raw")
                chains[key.key_id] = c.certify_key(key.key_id, SUBJECT, root.key_id)
                verify_notary_chain(chains[key.key_id])
                alg = parse_algorithm(name)
                sizes = (32, 48, 64) if alg.keytype == "rsa" else (alg.digest_size,)
                for size in sizes:
                    digest = {32: hashlib.sha256, 48: hashlib.sha384,
                              64: hashlib.sha512}[size](MESSAGE).digest()
                    sig = c.sign(key.key_id, digest=digest).signature
                    signing.verify(key.public_key_der, alg, sig, digest,
                                   signing.SignOptions(prehashed=True))
            gone = c.create_key(unique_gun(), "targets", kind.algorithms[0], purpose="raw")
            c.certify_key(gone.key_id, SUBJECT, root.key_id)
            c.delete_key(gone.key_id)
            assert rpc_error(lambda: c.certificate_chain(gone.key_id)).code() == \
                grpc.StatusCode.NOT_FOUND
    finally:
        d.stop()
    # The certificates are on the token: a new daemon finds every chain.
    d = _start(kind, certs, tmp_path / "second")
    try:
        with d.client() as c:
            for key_id, chain in chains.items():
                assert c.certificate_chain(key_id) == chain
    finally:
        d.stop()


def test_create_key_searches_nothing_on_a_softhsm_token(hsm: HSM) -> None:
    """Issue 24 §2: CreateKey used to run two full searches (a free 2-byte
    CKA_ID, then a collision check); with 16-byte IDs and SoftHSM's
    generation file it runs none when no other process wrote."""
    from signerd.keys import ALGORITHMS
    from signerd.token import Token, _p11
    from signerd.token._keywrites import KeyWriter
    from tests.conftest import hsm_token

    token = Token(hsm_token(hsm, "online"))
    searches = 0
    real = _p11.Module.find_objects

    def counted(self: _p11.Module, session: int, template: dict[int, bytes]) -> list[int]:
        nonlocal searches
        searches += 1
        return real(self, session, template)

    real_sync = KeyWriter._sync

    def sync(s: object) -> None:
        nonlocal searches
        searches += 1
        real_sync(s)

    try:
        token.keys()
        token.generate(ALGORITHMS["ecdsa-p256"], "docker.io/scale/a", "targets")  # first: syncs
        _p11.Module.find_objects = counted  # type: ignore[method-assign]
        KeyWriter._sync = staticmethod(sync)  # type: ignore[method-assign]
        for i in range(3):
            k = token.generate(ALGORITHMS["ecdsa-p256"], f"docker.io/scale/{i}", "targets")
            assert len(k.object_id) == 16
            token.mark_used(k.key_id)
        assert searches == 0
    finally:
        _p11.Module.find_objects = real  # type: ignore[method-assign]
        KeyWriter._sync = staticmethod(real_sync)  # type: ignore[method-assign]
        token.close()
