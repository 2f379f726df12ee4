"""Token-side work of the benchmark, run in child processes.

Each function here is the body of a ``multiprocessing`` child started with
the 'spawn' method, because a PKCS#11 module must be initialised in the
process that uses it (never inherited across fork), and because the harness
process itself should stay free of the module.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

PAYLOAD_BYTES = 512


def _token(module: str, conf: Path, label: str, pin_file: Path, sessions: int) -> Any:
    os.environ["SOFTHSM2_CONF"] = str(conf)
    from signerd.config import Pkcs11Uri, TokenConfig
    from signerd.token import Token

    return Token(TokenConfig(name="bench", module=module, uri=Pkcs11Uri(token=label),
                             pin_file=pin_file, sessions=sessions))


def init_token(module: str, conf: Path, label: str, pin: bytes, so_pin: bytes) -> None:
    """Initialise a SoftHSM slot as token ``label`` (PINs never in argv)."""
    from signerd import embedded

    embedded.init_softhsm_token(module, conf, label, pin, so_pin)


def generate_keys(module: str, conf: Path, label: str, pin_file: Path, count: int,
                  algorithm: str, first: int = 0) -> dict[str, Any]:
    """Make the token hold ``count`` keys, generated straight on it with
    signerd's own ``Token.generate`` so the objects look exactly like the
    daemon's. Resumes where an interrupted run stopped. Key ``i`` is for GUN
    ``bench.example/many/r<(first + i) // 100>`` (bench/_fill.py fills copies
    of one token, each from its own ``first``)."""
    from signerd.keys import parse_algorithm

    # Token.generate searches nothing when this process is the token's only
    # writer (SoftHSM's generation file tells it; signerd.token._softhsm), so
    # filling a token is linear in its keys.
    token = _token(module, conf, label, pin_file, 1)
    alg = parse_algorithm(algorithm)
    start = time.monotonic()
    have = len(token.keys())
    last = max((k.key_id for k in token.keys()), default="")
    try:
        for i in range(have, count):
            # Raw keys: the bench signs opaque payloads (a metadata key refuses them).
            last = token.generate(alg, f"bench.example/many/r{(first + i) // 100}", "targets",
                                  "raw").key_id
    finally:
        token.close()
    return {"keys": count, "seconds": time.monotonic() - start, "last_key_id": last}


def _rate(calls: Sequence[Callable[[], object]], seconds: float) -> float:
    """Calls per second with one thread per callable, each calling its own."""
    counts = [0] * len(calls)
    start = threading.Barrier(len(calls) + 1)
    stop = threading.Event()

    def run(i: int) -> None:
        call = calls[i]
        start.wait()
        n = 0
        while not stop.is_set():
            call()
            n += 1
        counts[i] = n

    pool = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.monotonic()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


def _pkcs11_mechanism(alg: Any) -> tuple[Any, Any]:
    """python-pkcs11's spelling of the mechanism signerd uses for ``alg``."""
    from pkcs11 import MGF, Mechanism

    if alg.keytype == "ecdsa":
        return Mechanism.ECDSA, None
    if alg.keytype == "ed25519":
        return Mechanism.EDDSA, None
    return Mechanism.RSA_PKCS_PSS, (Mechanism.SHA256, MGF.SHA256, 32)


def token_rates(module: str, conf: Path, label: str, pin_file: Path, keys: dict[str, str],
                thread_counts: list[int], seconds: float) -> dict[str, dict[str, dict[str, float]]]:
    """Signing rates with no RPC in front, for the same keys and the same
    512-byte payload the daemon gets (what the token is handed: the SHA-256
    digest for ECDSA and RSA-PSS, the whole message for Ed25519):

    ``token``    the token's own rate: python-pkcs11 ``key.sign`` with an
                 explicit mechanism, one session per thread (as in issue 6);
    ``signerd``  signerd's signing path, ``Token.sign``: pooled session,
                 cached handle, ctypes C_SignInit + C_Sign.

    The result maps algorithm name -> those two -> {threads: signatures/s}.
    """
    from pkcs11 import Attribute, ObjectClass

    from signerd import signing
    from signerd.keys import KeyID, parse_algorithm

    token = _token(module, conf, label, pin_file, max(thread_counts))
    token.keys()  # wait for its first listing, which uses a pooled session
    # The token's pooled sessions, borrowed for python-pkcs11 (they are logged
    # in: a login holds for every session of the process).
    sessions = token._sessions[: max(thread_counts)]
    payload = bytes(range(256)) * (PAYLOAD_BYTES // 256)
    out: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for name, kid in keys.items():
            alg = parse_algorithm(name)
            mechanism, data = signing.prepare(alg, payload, signing.SignOptions())
            mech, param = _pkcs11_mechanism(alg)
            entry = token.get(KeyID(kid)) or token.lookup(KeyID(kid))
            assert entry is not None
            objs = [s.get_key(object_class=ObjectClass.PRIVATE_KEY,
                              id=entry.object_id) for s in sessions]
            assert all(o[Attribute.SIGN] for o in objs)

            own = [partial(o.sign, data, mechanism=mech, mechanism_param=param) for o in objs]
            ours = partial(token.sign, KeyID(kid), mechanism, data, alg.signature_size)
            for _ in range(50):  # warm up both paths
                own[0]()
                ours()
            out[name] = {
                "token": {str(n): _rate(own[:n], seconds)
                          for n in thread_counts},
                "signerd": {str(n): _rate([ours] * n, seconds) for n in thread_counts},
            }
    finally:
        token.close()
    return out


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def open_breakdown(module: str, conf: Path, label: str, pin_file: Path) -> dict[str, float]:
    """Where a daemon's start goes on a big token, step by step, in one
    process: the module's C_Initialize (SoftHSM reads its object store), the
    login and session pool, and signerd's key listing; with RSS after each."""
    os.environ["SOFTHSM2_CONF"] = str(conf)
    from signerd.token import MODULES

    out = {"rss_before_mib": _rss_mib()}
    t0 = time.monotonic()
    MODULES.acquire(module)  # held until the end, so the token below reuses it
    out["module_init_s"] = round(time.monotonic() - t0, 3)
    out["rss_after_module_init_mib"] = _rss_mib()
    t0 = time.monotonic()
    token = _token(module, conf, label, pin_file, 4)  # serves from here on
    out["login_and_sessions_s"] = round(time.monotonic() - t0, 3)
    out["keys"] = len(token.keys())  # waits for the first listing (in the background)
    out["key_listing_s"] = round(time.monotonic() - t0, 3)
    out["rss_after_listing_mib"] = _rss_mib()
    token.close()
    MODULES.release(module)
    return out
