"""A process that writes keys in a loop, for the crash tests (tests/test_sweep.py).

``python -m tests._crashloop CONF MODULE LABEL PIN_FILE MODE``: opens the
token, writes ``ready`` on stdout, then until killed:

- ``churn``: CreateKey, sign once (marks it used), certify it, DeleteKey
  every other key;
- ``check``: print how many keys are listed, sign with each, and exit 0 if
  every one signs and verifies.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path


def main() -> int:
    conf, module, label, pin_file, mode = sys.argv[1:6]
    os.environ["SOFTHSM2_CONF"] = conf
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from signerd import signing
    from signerd.config import Pkcs11Uri, TokenConfig
    from signerd.keys import ALGORITHMS
    from signerd.token import Token

    token = Token(TokenConfig(name="crash", module=module, uri=Pkcs11Uri(token=label),
                              pin_file=Path(pin_file)))
    keys = token.keys()
    alg = ALGORITHMS["ecdsa-p256"]
    mechanism, data = signing.prepare(alg, b"crash", signing.SignOptions())
    if mode == "check":
        for k in keys:
            raw = token.sign(k.key_id, mechanism, data, alg.signature_size)
            signing.verify(k.spki_der, alg, signing.encode(alg, raw, signing.SignOptions()),
                           b"crash", signing.SignOptions())
        print(len(keys), flush=True)
        token.close()
        return 0
    print("ready", flush=True)
    ca = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crash")])
    i = 0
    while True:
        i += 1
        k = token.generate(alg, f"crash.example/r{i}", "targets")
        token.sign(k.key_id, mechanism, data, alg.signature_size)
        token.mark_used(k.key_id)
        pub = serialization.load_der_public_key(k.spki_der)
        now = datetime.now(UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(pub).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
                .not_valid_before(now).not_valid_after(now + timedelta(days=1))
                .sign(ca, hashes.SHA256()))
        der = cert.public_bytes(serialization.Encoding.DER)
        for _ in range(2):  # certify, then certify again (replaces)
            token.store_certificate(k.key_id, der, name.public_bytes(), name.public_bytes(),
                                    bytes.fromhex("020101"))
        if i % 2 == 0:
            token.delete(k.key_id)


if __name__ == "__main__":
    sys.exit(main())
