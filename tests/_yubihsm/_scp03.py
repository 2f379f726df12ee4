"""The device's half of a YubiHSM 2 session: SCP03 with AES-128 keys.

The rules (GlobalPlatform Card Specification Amendment D, "Secure Channel
Protocol 03", as the YubiHSM 2 applies it; yubihsm-shell ``lib/yubihsm.c``
is the host's half):

- Session keys come from the authentication key's ENC and MAC keys with the
  SCP03 KDF (NIST SP 800-108 counter mode, AES-CMAC as the PRF), over the
  context host challenge || card challenge.
- The card proves itself with an 8-byte card cryptogram; the host answers
  with a host cryptogram in AUTHENTICATE SESSION, MACed from a zero chain.
- Every later command is a SESSION MESSAGE: the inner frame padded with 0x80
  and zeros to a 16-byte block, AES-CBC under S-ENC with the IV
  AES(S-ENC, counter); a C-MAC (8 bytes of CMAC(S-MAC, chain || outer frame))
  whose full 16 bytes become the next chain; and an R-MAC on the response,
  CMAC(S-RMAC, that chain || response frame), with the same IV.

Written here, with ``cryptography`` doing AES and CMAC, because no library
implements the card's side of SCP03.
"""

from __future__ import annotations

import hmac
import secrets
import struct
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from tests._yubihsm._defs import Command, Error

# Derivation constants (SCP03 §6.2.2.2 and §6.2.2.3)
CARD_CRYPTOGRAM = 0x00
HOST_CRYPTOGRAM = 0x01
S_ENC = 0x04
S_MAC = 0x06
S_RMAC = 0x07

CHALLENGE = 8
MAC = 8
BLOCK = 16


class SessionError(Exception):
    """A message the session refuses; ``code`` is the device's error byte."""

    def __init__(self, code: Error) -> None:
        super().__init__(code.name)
        self.code = code


def keys_from_password(password: str) -> tuple[bytes, bytes]:
    """(ENC, MAC) of an authentication key derived from a password, as
    yubihsm-shell does: PBKDF2-HMAC-SHA256, salt "Yubico", 10,000 rounds,
    32 bytes split in two."""
    raw = PBKDF2HMAC(hashes.SHA256(), 32, b"Yubico", 10000).derive(password.encode())
    return raw[:16], raw[16:]


def cmac(key: bytes, *parts: bytes) -> bytes:
    """AES-CMAC of the concatenated parts (16 bytes)."""
    c = CMAC(algorithms.AES(key))
    for p in parts:
        c.update(p)
    return c.finalize()


def kdf(key: bytes, constant: int, context: bytes, bits: int) -> bytes:
    """The SCP03 KDF for outputs of one CMAC block (64 or 128 bits)."""
    label = b"\0" * 11 + struct.pack(">BBHB", constant, 0, bits, 1)
    return cmac(key, label, context)[: bits // 8]


@dataclass
class Session:
    """One session slot of the device, from CREATE SESSION to its close."""

    sid: int
    auth_key: int
    domains: int
    capabilities: int
    context: bytes
    s_enc: bytes
    s_mac: bytes
    s_rmac: bytes
    chain: bytes = bytes(16)
    counter: int = 1
    authenticated: bool = False
    used: float = field(default_factory=time.monotonic)

    @classmethod
    def create(cls, sid: int, auth_key: int, enc: bytes, mac: bytes, domains: int,
               capabilities: int, host_challenge: bytes) -> tuple[Session, bytes]:
        """A new session and the CREATE SESSION answer's card challenge ||
        card cryptogram."""
        card_challenge = secrets.token_bytes(CHALLENGE)
        context = host_challenge + card_challenge
        s = cls(sid, auth_key, domains, capabilities, context, kdf(enc, S_ENC, context, 128),
                kdf(mac, S_MAC, context, 128), kdf(mac, S_RMAC, context, 128))
        return s, card_challenge + kdf(s.s_mac, CARD_CRYPTOGRAM, context, 64)

    def authenticate(self, frame: bytes) -> None:
        """Check an AUTHENTICATE SESSION frame (cmd, len, sid, host
        cryptogram, C-MAC); raises SessionError if it is wrong."""
        if self.authenticated or len(frame) != 3 + 1 + CHALLENGE + MAC:
            raise SessionError(Error.INVALID_SESSION)
        chain = cmac(self.s_mac, self.chain, frame[:-MAC])
        expected = kdf(self.s_mac, HOST_CRYPTOGRAM, self.context, 64)
        if not (hmac.compare_digest(frame[-MAC:], chain[:MAC])
                and hmac.compare_digest(frame[4:-MAC], expected)):
            raise SessionError(Error.AUTHENTICATION_FAILED)
        self.chain, self.authenticated = chain, True
        self.touch()

    def touch(self) -> None:
        self.used = time.monotonic()

    def _cipher(self) -> Cipher[modes.CBC]:
        ecb = Cipher(algorithms.AES(self.s_enc), modes.ECB()).encryptor()  # noqa: S305 - the IV rule
        iv = ecb.update(self.counter.to_bytes(BLOCK, "big")) + ecb.finalize()
        return Cipher(algorithms.AES(self.s_enc), modes.CBC(iv))

    def unwrap(self, frame: bytes) -> bytes:
        """The inner command frame of a SESSION MESSAGE (checks its C-MAC and
        moves the chain on); raises SessionError."""
        body = frame[4:-MAC]
        if not self.authenticated or len(body) == 0 or len(body) % BLOCK:
            raise SessionError(Error.INVALID_SESSION if not self.authenticated
                               else Error.WRONG_LENGTH)
        chain = cmac(self.s_mac, self.chain, frame[:-MAC])
        if not hmac.compare_digest(frame[-MAC:], chain[:MAC]):
            raise SessionError(Error.AUTHENTICATION_FAILED)
        self.chain = chain
        d = self._cipher().decryptor()
        padded = d.update(body) + d.finalize()
        end = padded.rstrip(b"\0")
        if not end.endswith(b"\x80"):
            raise SessionError(Error.INVALID_DATA)
        inner = end[:-1]
        if len(inner) < 3 or struct.unpack(">H", inner[1:3])[0] != len(inner) - 3:
            raise SessionError(Error.WRONG_LENGTH)
        self.touch()
        return inner

    def wrap(self, inner: bytes) -> bytes:
        """The SESSION MESSAGE response carrying ``inner`` (with its R-MAC);
        the counter then moves on."""
        # ISO/IEC 9797-1 method 2: 0x80 then zeros to the block
        padded = inner + b"\x80" + bytes(-(len(inner) + 1) % BLOCK)
        e = self._cipher().encryptor()
        body = bytes([self.sid]) + e.update(padded) + e.finalize()
        head = struct.pack(">BH", Command.SESSION_MESSAGE | 0x80, len(body) + MAC)
        rmac = cmac(self.s_rmac, self.chain, head, body)[:MAC]
        self.counter += 1
        return head + body + rmac
