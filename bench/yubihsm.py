"""Yubico's PKCS#11 module on the software YubiHSM 2 of the test suite.

    python -m bench.yubihsm [--seconds 5] [--keys 32] [--out bench/results/yubihsm-latest.json]

Starts the device (tests/_yubihsm: the YubiHSM 2 protocol behind
yubihsm-connector's HTTP interface, on loopback, in its own process), opens
it through ``yubihsm_pkcs11.so`` with signerd's Token (4 pooled sessions, as
the daemon's default), and measures:

- P-256 signatures per second through ``Token.sign`` (CKM_ECDSA on a SHA-256
  digest; each one a SESSION MESSAGE over HTTP, SCP03 and the device's
  ECDSA) from 1 and 4 threads, each for ``--seconds``;
- the time to list the token's keys (``Token.refresh``: C_FindObjects and
  attribute reads for every key and metadata object) with ``--keys`` P-256
  keys on the device, best and median of 5.

The device runs one command at a time, as the real one does, and the module
holds one device session per slot, so 4 callers queue on it; the figures
say what the module and the protocol cost, not what a real YubiHSM 2's
processor signs per second (Yubico's data sheet: ECDSA P-256 takes about 73 ms).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.tokens import _rate  # one rate loop for the token benchmarks

ROOT = Path(__file__).resolve().parent.parent


def measure(work: Path, seconds: float, keys: int) -> dict[str, Any]:
    """The figures, from a device started in ``work``."""
    sys.path.insert(0, str(ROOT))
    from tests import _yubihsm

    device = _yubihsm.start(work / "device")
    os.environ.update(device.env)  # read by the module at C_Initialize
    try:
        from signerd import signing
        from signerd.config import Pkcs11Uri, TokenConfig
        from signerd.keys import ALGORITHMS
        from signerd.token import Token

        token = Token(TokenConfig(name="yubihsm", module=_yubihsm.MODULE,
                                  uri=Pkcs11Uri(token=_yubihsm.LABEL),
                                  pin_file=device.pin_file))
        try:
            alg = ALGORITHMS["ecdsa-p256"]
            made = [token.generate(alg, f"bench/app-{i}", "targets") for i in range(keys)]
            key = made[0]
            mechanism, data = signing.prepare(alg, hashlib.sha256(b"x").digest(),
                                              signing.SignOptions())

            def sign() -> None:
                token.sign(key.key_id, mechanism, data, alg.signature_size)

            sign()
            rates = {str(n): round(_rate(sign, n, seconds), 1) for n in (1, 4)}
            listing = []
            for _ in range(5):
                start = time.perf_counter()
                token.refresh()
                listing.append(time.perf_counter() - start)
            listed = len(token.keys())
            for k in made:
                token.delete(k.key_id)
        finally:
            token.close()
    finally:
        device.stop()
    return {
        "signatures_per_second": {"ecdsa-p256": rates},
        "list_keys_seconds": {"keys": listed, "best": round(min(listing), 4),
                              "median": round(statistics.median(listing), 4)},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print and write its JSON; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.yubihsm")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--keys", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/yubihsm-latest.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-yubihsm-") as work:
        figures = measure(Path(work), args.seconds, args.keys)
    result = {"when": datetime.now(UTC).isoformat(timespec="seconds"),
              "module": "yubihsm_pkcs11.so (Debian yubihsm-pkcs11)",
              "device": "tests/_yubihsm software YubiHSM 2 over HTTP on loopback",
              "cpus": os.cpu_count(), **figures}
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
