"""Token profiles and capabilities: what a kind of token needs, and what it can do.

A profile is data plus a few settings, not a subclass: every token runs the
same code (securesystemslib's signers differ the same way, behind one
interface). It is chosen by the token's ``profile`` setting, or from the
manufacturer that ``C_GetTokenInfo`` reports.

Capabilities come from the token itself at start: ``C_GetMechanismList`` and
``C_GetMechanismInfo`` (PKCS#11 v2.40 §5.5), so that signerd refuses an
algorithm the token cannot do before asking it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from signerd.keys import ALGORITHMS, Algorithm

# Mechanisms (PKCS#11 v2.40 §2; CKM_EC_EDWARDS_KEY_PAIR_GEN and CKM_EDDSA from v3.0)
CKM_RSA_PKCS_KEY_PAIR_GEN = 0x0
CKM_RSA_PKCS = 0x1
CKM_RSA_PKCS_PSS = 0xD
CKM_EC_KEY_PAIR_GEN = 0x1040
CKM_ECDSA = 0x1041
CKM_EC_EDWARDS_KEY_PAIR_GEN = 0x1055
CKM_EDDSA = 0x1057

# CKA_EC_PARAMS naming Ed25519 as a DER PrintableString (PKCS#11 v3.0 §2.3.10)
ED25519_NAME = bytes.fromhex("130c656477617264733235353139")  # "edwards25519"


@dataclass(frozen=True)
class Profile:
    """What signerd does differently for one kind of token.

    - ``max_sessions``: sessions the device allows in total, counted against
      ``sessions`` × worker processes of every token using this profile on
      one module (None: no limit known).
    - ``keepalive``: seconds after which an idle pooled session is touched,
      because the device closes idle sessions (None: never).
    - ``modules``: substrings of the PKCS#11 module's file name, and
      ``manufacturers``: C_GetTokenInfo manufacturerID prefixes, that select
      this profile when the config names none.
    - ``signs_pss_unlisted``: the module signs CKM_RSA_PKCS_PSS although its
      mechanism list omits it (tpm2-pkcs11 1.9).
    - ``ties_sign_to_decrypt``: the token keeps CKA_SIGN/CKA_ENCRYPT and
      CKA_VERIFY/CKA_DECRYPT in one attribute bit each, so a template that
      sets SIGN and clears ENCRYPT fails (tpm2-pkcs11 1.9: TPMA_OBJECT_SIGN_ENCRYPT
      and TPMA_OBJECT_DECRYPT; CKR_GENERAL_ERROR). Generation then leaves
      ENCRYPT and DECRYPT to the token; tpm2-pkcs11 needs DECRYPT anyway,
      since it signs RSA with TPM2_RSA_Decrypt. signerd itself never asks
      such a key for anything but signatures.
    - ``private_data``: signerd's data objects (key metadata) must be
      CKA_PRIVATE, readable only when logged in: tpm2-pkcs11 refuses public
      ones (CKR_ATTRIBUTE_VALUE_INVALID), and YubiHSM's module refuses
      private ones, so the default is public.
    - ``reads_mixed_attributes``: one C_GetAttributeValue may ask a public
      key for both EC and RSA material (the ones it lacks come back
      unavailable, as PKCS#11 v2.40 §5.7 says). SoftHSM does; tpm2-pkcs11
      1.9 stops at the first attribute the object lacks and leaves the rest
      unfilled, so elsewhere a key's material is read by its type.
    - ``signs_in_process``: the module signs in the calling thread's CPU,
      with no device to wait for (SoftHSM: about 70 µs for P-256); the aio
      engine then signs with elliptic-curve keys on its event loop thread
      instead of handing the call to a thread.
    - ``probe_random``: C_GetTokenInfo is answered from the module's cache,
      so the health probe asks the device for random bytes instead
      (tpm2-pkcs11: TPM2_GetRandom; it fails at once when the TPM is gone;
      yubihsm_pkcs11: GET PSEUDO RANDOM on the device).
    - ``sets_unwrap``: a private key template may say ``CKA_UNWRAP`` false.
      yubihsm_pkcs11 2.6 takes any CKA_UNWRAP in a key pair template as a
      request for a wrap key (GENERATE WRAP KEY, 0x5B, instead of GENERATE
      ASYMMETRIC KEY), so for it the attribute is left out; its keys never
      unwrap anyway (signerd delegates no unwrap capability).
    - ``ed25519_params``: the CKA_EC_PARAMS that name Ed25519 to the module.
      PKCS#11 v3.0 §2.3.10 allows the OID (RFC 8410 §3) or the
      PrintableString "edwards25519"; yubihsm_pkcs11 2.6 takes only the
      latter (CKR_CURVE_NOT_SUPPORTED otherwise; yubihsm-shell issues 75,
      270), SoftHSM either.
    - ``id_bytes``: bytes of a new key pair's random CKA_ID. 16 where the
      token takes any length: a collision among 2**64 keys is a chance of
      one in 2**65, so no search for a free ID is needed. 2 for a YubiHSM,
      whose module maps CKA_ID to the 16-bit object ID (a longer one costs
      a hidden meta object per key); there a free ID is searched (at most
      256 objects, listed by the device) and the device itself refuses a
      taken one.
    - ``generation_file``: the token keeps a generation counter in a file
      that a write bumps without re-reading the directory (SoftHSM's file
      store, Generation::commit): a write after another process's write
      would leave that process's objects invisible here, so the key store
      searches once before writing, but only when the counter moved since
      its own last look (:mod:`signerd.token._softhsm`).
    """

    name: str
    max_sessions: int | None = None
    keepalive: float | None = None
    modules: tuple[str, ...] = ()
    manufacturers: tuple[str, ...] = ()
    signs_pss_unlisted: bool = False
    ties_sign_to_decrypt: bool = False
    private_data: bool = False
    reads_mixed_attributes: bool = False
    probe_random: bool = False
    signs_in_process: bool = False
    sets_unwrap: bool = True
    ed25519_params: bytes = bytes.fromhex("06032b6570")  # the OID 1.3.101.112
    id_bytes: int = 16
    generation_file: bool = False


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("generic"),
        Profile("softhsm", modules=("softhsm",), manufacturers=("SoftHSM",),
                reads_mixed_attributes=True, signs_in_process=True, generation_file=True),
        # tpm2-pkcs11 reports the TPM's own vendor and model (swtpm: "IBM",
        # "SW   TPM"), so it is known by its module.
        Profile("tpm", modules=("tpm2_pkcs11",), signs_pss_unlisted=True,
                ties_sign_to_decrypt=True, private_data=True, probe_random=True),
        # YubiHSM 2: 16 sessions per device, and a session idle for 30 s is
        # closed by the device (Yubico's YubiHSM 2 user guide, "Sessions").
        # yubihsm_pkcs11 answers C_GetTokenInfo from its connector's cached status,
        # so only GET PSEUDO RANDOM (C_GenerateRandom) tells that the device is gone
        # (found by the conformance suite on Yubico's module, tests/_yubihsm).
        Profile("yubihsm", max_sessions=16, keepalive=20.0, modules=("yubihsm_pkcs11",),
                manufacturers=("Yubico",), probe_random=True, sets_unwrap=False,
                ed25519_params=ED25519_NAME, id_bytes=2),
    )
}
PROFILE_NAMES = tuple(PROFILES)


def detect(module: str, manufacturer: str) -> Profile:
    """The profile for a token, from its module's path and its
    C_GetTokenInfo manufacturerID; "generic" when neither is known."""
    name = module.rsplit("/", 1)[-1]
    for p in PROFILES.values():
        if any(m in name for m in p.modules):
            return p
    for p in PROFILES.values():
        if any(manufacturer.startswith(m) for m in p.manufacturers):
            return p
    return PROFILES["generic"]


@dataclass(frozen=True)
class MechanismInfo:
    """CK_MECHANISM_INFO: key sizes as the token reports them (bits for RSA
    and EC, per v2.40 §2.1 and §2.3), and the CKF_* flags."""

    min_key_size: int
    max_key_size: int
    flags: int


def supported_algorithms(mechanisms: Mapping[int, MechanismInfo],
                         profile: Profile) -> tuple[str, ...]:
    """Names of the signerd algorithms a token can generate and sign with.

    An algorithm needs its key-pair generation mechanism with a key size
    range that covers it, and a signing mechanism signerd uses for it.
    """

    def covers(mech: int, bits: int) -> bool:
        info = mechanisms.get(mech)
        if info is None:
            return False
        # A module that reports no maximum (0) sets no limit.
        return info.min_key_size <= bits <= (info.max_key_size or bits)

    def can(alg: Algorithm) -> bool:
        if alg.keytype == "rsa":
            signs = (CKM_RSA_PKCS_PSS in mechanisms or CKM_RSA_PKCS in mechanisms
                     or profile.signs_pss_unlisted)
            return signs and covers(CKM_RSA_PKCS_KEY_PAIR_GEN, alg.bits)
        if alg.keytype == "ed25519":
            return CKM_EDDSA in mechanisms and CKM_EC_EDWARDS_KEY_PAIR_GEN in mechanisms
        return CKM_ECDSA in mechanisms and covers(CKM_EC_KEY_PAIR_GEN, alg.bits)

    return tuple(name for name, alg in ALGORITHMS.items() if can(alg))


def session_budget(tokens: Iterable[tuple[str, str, int]], processes: int) -> list[str]:
    """Errors for profiles whose session limit the pool sizes exceed.

    ``tokens``: (name, profile name, sessions) of each configured token whose
    profile is set; ``processes``: serving processes, each with its own pool.
    """
    used: dict[str, list[tuple[str, int]]] = {}
    for name, profile, sessions in tokens:
        used.setdefault(profile, []).append((name, sessions))
    errors = []
    for profile, members in used.items():
        limit = PROFILES[profile].max_sessions
        total = sum(n for _, n in members) * processes
        if limit is not None and total > limit:
            names = ", ".join(f"{name} ({n})" for name, n in members)
            errors.append(
                f"{profile} tokens allow {limit} sessions in all, but the pools need {total}: "
                f"sessions of {names} × {processes} worker process(es); lower tokens.sessions "
                "or server.workers"
            )
    return errors
