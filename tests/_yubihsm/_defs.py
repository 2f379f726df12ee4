"""The numbers of the YubiHSM 2 wire protocol that the software device speaks.

Every value is the device's own (Yubico's "YubiHSM 2 commands" reference;
python-yubihsm ``yubihsm/defs.py`` and yubihsm-shell ``lib/yubihsm.h`` name
the same numbers). Only what the device in this package implements is here.
"""

from __future__ import annotations

from enum import IntEnum


class Command(IntEnum):
    """Command codes: a response carries ``code | 0x80``, an error ``ERROR``."""

    ECHO = 0x01
    CREATE_SESSION = 0x03
    AUTHENTICATE_SESSION = 0x04
    SESSION_MESSAGE = 0x05
    DEVICE_INFO = 0x06
    CLOSE_SESSION = 0x40
    GET_STORAGE_INFO = 0x41
    PUT_OPAQUE = 0x42
    GET_OPAQUE = 0x43
    GENERATE_ASYMMETRIC_KEY = 0x46
    SIGN_PKCS1 = 0x47
    LIST_OBJECTS = 0x48
    GET_OBJECT_INFO = 0x4E
    GET_PSEUDO_RANDOM = 0x51
    GET_PUBLIC_KEY = 0x54
    SIGN_PSS = 0x55
    SIGN_ECDSA = 0x56
    DELETE_OBJECT = 0x58
    SIGN_EDDSA = 0x6A
    ERROR = 0x7F


RESPONSE = 0x80  # added to a command code in its response


class Error(IntEnum):
    """The one-byte code of an ERROR response."""

    INVALID_COMMAND = 0x01
    INVALID_DATA = 0x02
    INVALID_SESSION = 0x03
    AUTHENTICATION_FAILED = 0x04
    SESSIONS_FULL = 0x05
    STORAGE_FAILED = 0x07
    WRONG_LENGTH = 0x08
    INSUFFICIENT_PERMISSIONS = 0x09
    OBJECT_NOT_FOUND = 0x0B
    INVALID_ID = 0x0C
    OBJECT_EXISTS = 0x11


class ObjectType(IntEnum):
    OPAQUE = 0x01
    AUTHENTICATION_KEY = 0x02
    ASYMMETRIC_KEY = 0x03


class Algorithm(IntEnum):
    RSA_PKCS1_SHA1 = 1
    RSA_PKCS1_SHA256 = 2
    RSA_PKCS1_SHA384 = 3
    RSA_PKCS1_SHA512 = 4
    RSA_PSS_SHA1 = 5
    RSA_PSS_SHA256 = 6
    RSA_PSS_SHA384 = 7
    RSA_PSS_SHA512 = 8
    RSA_2048 = 9
    RSA_3072 = 10
    RSA_4096 = 11
    EC_P256 = 12
    EC_P384 = 13
    EC_ECDSA_SHA1 = 23
    OPAQUE_DATA = 30
    OPAQUE_X509_CERTIFICATE = 31
    RSA_MGF1_SHA1 = 32
    RSA_MGF1_SHA256 = 33
    RSA_MGF1_SHA384 = 34
    RSA_MGF1_SHA512 = 35
    AES128_YUBICO_AUTHENTICATION = 38
    EC_ECDSA_SHA256 = 43
    EC_ECDSA_SHA384 = 44
    EC_ECDSA_SHA512 = 45
    EC_ED25519 = 46


KEY_ALGORITHMS = (Algorithm.RSA_2048, Algorithm.RSA_3072, Algorithm.RSA_4096,
                  Algorithm.EC_P256, Algorithm.EC_P384, Algorithm.EC_ED25519)


class Capability(IntEnum):
    """Bit numbers of the 64-bit capability set (bit n is ``1 << n``)."""

    GET_OPAQUE = 0x00
    PUT_OPAQUE = 0x01
    GENERATE_ASYMMETRIC_KEY = 0x04
    SIGN_PKCS = 0x05
    SIGN_PSS = 0x06
    SIGN_ECDSA = 0x07
    SIGN_EDDSA = 0x08
    GET_PSEUDO_RANDOM = 0x13
    DELETE_OPAQUE = 0x27
    DELETE_ASYMMETRIC_KEY = 0x29


def bit(capability: Capability) -> int:
    """The capability's mask in the 64-bit set."""
    return 1 << capability


ALL_CAPABILITIES = (1 << 0x38) - 1  # the factory authentication key holds every one
ALL_DOMAINS = 0xFFFF
LABEL_LENGTH = 40

# The device's limits (Yubico's YubiHSM 2 user guide, "Sessions" and "Objects"):
MAX_OBJECTS = 256
MAX_SESSIONS = 16
SESSION_IDLE_SECONDS = 30.0
# A firmware 2.4 device takes messages up to 3136 bytes (yubihsm-shell
# lib/yubihsm.h YH_MSG_BUF_SIZE; before 2.4, 2048).
MAX_MESSAGE = 3136
FIRMWARE = (2, 4, 0)
