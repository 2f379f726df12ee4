"""C2SP signed notes (c2sp.org/signed-note), checkpoints (c2sp.org/tlog-checkpoint)
and witness cosignatures (c2sp.org/tlog-cosignature): Ed25519 and ECDSA.

A note is UTF-8 text ending in a newline, a blank line, then one line per
signature: ``— NAME BASE64(KEYID || SIG)``. A verifier key (vkey) is
``NAME+HEX(KEYID)+BASE64(TYPE || PUBLIC KEY)``. The signature types here:

``0x01`` Ed25519 (RFC 8032) over the note's text; the public key is its 32
         raw bytes, and the key ID the first four bytes of
         ``SHA-256(NAME || 0x0A || 0x01 || PUBLIC KEY)``.
``0x02`` ECDSA "as implemented by github.com/transparency-dev/witness"
         (c2sp.org/signed-note, Signature types): the public key is the DER
         SubjectPublicKeyInfo, on NIST P-256 (SHOULD), P-384 or P-521; the
         signature is the ASN.1 DER ``ECDSA-Sig-Value`` over ``SHA-256(text)``
         whatever the curve; and the key ID is the first four bytes of
         ``SHA-256(SPKI DER)`` alone: neither the name nor the type byte is
         hashed, unlike every other type (the spec's note on 0x02, and
         transparency-dev/formats ``note/note_verifier.go``,
         ``NewECDSAVerifier`` and ``keyHashECDSA``; the same in
         transparency-dev/witness ``internal/note/note_verifier.go``). Its
         known-answer vectors are Sigstore Rekor's and the Pixel 6 log's keys
         and checkpoints in ``note/note_verifier_test.go`` there. ECDSA
         signatures are randomized: two signatures of one text differ.
``0x04`` a witness's cosignature, Ed25519 over ``cosignature/v1\\ntime T\\n``
         followed by the checkpoint, carried as ``KEYID || T (8 bytes,
         big-endian) || SIG``; key ID as for 0x01.

A checkpoint's text is ``ORIGIN\\nSIZE\\nBASE64(ROOT)\\n`` and optional
extension lines (c2sp.org/tlog-checkpoint §Note text).

Signing takes a callable, so the private key can stay on a token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)

ED25519 = 0x01
ECDSA_SHA256 = 0x02
COSIGNATURE_V1 = 0x04
DASH = "\u2014 "
MAX_SIGNATURES = 100  # Go's note.Open refuses more; so does signerd


class NoteError(ValueError):
    """A malformed note, vkey or checkpoint, or a signature that does not verify."""


def _valid_name(name: str) -> str:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise NoteError(f"a key name is non-empty, without spaces or '+': {name!r}")
    return name


# The curves c2sp.org/signed-note allows for type 0x02 (it MUST be one of them).
_ECDSA_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def key_id(name: str, sig_type: int, public_key: bytes) -> bytes:
    """The 4-byte key ID of (name, signature type, public key) (c2sp.org/signed-note):
    ``SHA-256(name || 0x0A || type || public key)[:4]``, except for ECDSA (0x02),
    whose ID is ``SHA-256(SPKI DER)[:4]`` (see the module's docstring).
    Raises NoteError for a name a note cannot carry."""
    _valid_name(name)
    if sig_type == ECDSA_SHA256:
        return hashlib.sha256(public_key).digest()[:4]
    return hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public_key).digest()[:4]


def ecdsa_public_key(spki_der: bytes) -> ec.EllipticCurvePublicKey:
    """The ECDSA key of a type 0x02 vkey's DER SubjectPublicKeyInfo. Raises
    NoteError for bytes that are not a DER SPKI of a P-256, P-384 or P-521 key,
    or not in the form DER fixes (named curve, uncompressed point): the key ID
    hashes these very bytes, so a second encoding of one key is refused."""
    try:
        key = load_der_public_key(spki_der)
    except (ValueError, UnsupportedAlgorithm):
        raise NoteError("vkey: an ECDSA (type 0x02) key is a DER SubjectPublicKeyInfo") \
            from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or \
            not isinstance(key.curve, _ECDSA_CURVES):
        raise NoteError("vkey: an ECDSA (type 0x02) key is on NIST P-256, P-384 or P-521")
    if key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != spki_der:
        raise NoteError("vkey: the ECDSA (type 0x02) key is not in its DER form")
    return key


@dataclass(frozen=True)
class Verifier:
    """A verifier key: who signs, which kind of signature, with which public key."""

    name: str
    sig_type: int
    public_key: bytes  # raw 32-byte Ed25519 key; DER SPKI for ECDSA (0x02)

    @property
    def key_id(self) -> bytes:
        """This key's 4-byte ID."""
        return key_id(self.name, self.sig_type, self.public_key)

    def vkey(self) -> str:
        """``NAME+HEX(KEYID)+BASE64(TYPE || KEY)``."""
        blob = base64.b64encode(bytes([self.sig_type]) + self.public_key).decode()
        return f"{self.name}+{self.key_id.hex()}+{blob}"

    @classmethod
    def from_vkey(cls, text: str) -> Verifier:
        """Parse a vkey; raises NoteError for a malformed one or a key ID that
        does not match its key."""
        parts = text.strip().split("+", 2)  # base64 may hold '+'; a name may not
        if len(parts) != 3 or len(parts[1]) != 8:
            raise NoteError(f"a vkey is NAME+KEYID+KEY, not {text[:80]!r}")
        try:
            blob = base64.b64decode(parts[2], validate=True)
            want = bytes.fromhex(parts[1])
        except (binascii.Error, ValueError):
            raise NoteError("vkey: key ID or key is not hex/base64") from None
        if blob[:1] == bytes([ECDSA_SHA256]):
            ecdsa_public_key(blob[1:])
        elif len(blob) != 33 or blob[0] not in (ED25519, COSIGNATURE_V1):
            raise NoteError("vkey: only Ed25519 (types 0x01 and 0x04) and ECDSA (type 0x02) "
                            "keys are supported")
        verifier = cls(_valid_name(parts[0]), blob[0], blob[1:])
        if verifier.key_id != want:
            raise NoteError(f"vkey {parts[0]}: key ID {parts[1]} does not match its key")
        return verifier

    def _check(self, signature: bytes, message: bytes) -> bool:
        try:
            if self.sig_type == ECDSA_SHA256:
                # DER ECDSA-Sig-Value over SHA-256 of the message (OpenSSL refuses a
                # signature that is not in DER's one form).
                ecdsa_public_key(self.public_key).verify(
                    signature, message, ec.ECDSA(hashes.SHA256()))
            else:
                Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class Signature:
    """One signature line of a note: the signer's name and the decoded bytes
    (key ID first)."""

    name: str
    blob: bytes

    def line(self) -> str:
        """``— NAME BASE64`` plus newline."""
        return f"{DASH}{self.name} {base64.b64encode(self.blob).decode()}\n"


@dataclass(frozen=True)
class Note:
    """A note's text and its signature lines (verified or not)."""

    text: str
    signatures: tuple[Signature, ...]

    def to_bytes(self) -> bytes:
        """The note as sent: text, blank line, signature lines."""
        return (self.text + "\n" + "".join(s.line() for s in self.signatures)).encode()

    @classmethod
    def parse(cls, data: bytes) -> Note:
        """Split a note into text and signature lines; raises NoteError for a malformed one.
        Nothing is verified here."""
        try:
            whole = data.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("a note is UTF-8 text") from None
        cut = whole.rfind("\n\n")
        if cut < 0 or not whole.endswith("\n"):
            raise NoteError("a note is text, a blank line, then signature lines")
        text, lines = whole[:cut + 1], whole[cut + 2:].splitlines()
        if not lines or len(lines) > MAX_SIGNATURES:
            raise NoteError(f"a note has 1 to {MAX_SIGNATURES} signature lines")
        sigs = []
        for line in lines:
            name, _, b64 = line.removeprefix(DASH).partition(" ")
            try:
                blob = base64.b64decode(b64, validate=True)
            except binascii.Error:
                blob = b""
            if not line.startswith(DASH) or len(blob) < 5:
                raise NoteError(f"malformed signature line {line[:80]!r}")
            sigs.append(Signature(_valid_name(name), blob))
        return cls(text, tuple(sigs))

    def verified_by(self, verifier: Verifier) -> bool:
        """Whether ``verifier`` signed this note (type 0x01 or 0x02). A line with its
        name and key ID that does not verify makes the whole note bad: NoteError."""
        for sig in self.signatures:
            if sig.name == verifier.name and sig.blob[:4] == verifier.key_id:
                if not verifier._check(sig.blob[4:], self.text.encode()):
                    raise NoteError(f"signature by {verifier.name} does not verify")
                return True
        return False


def sign_note(text: str, name: str, public_key: bytes,
              sign: Callable[[bytes], bytes], sig_type: int = ED25519) -> Note:
    """A note of ``text`` signed by ``sign`` with the key ``public_key`` of type
    ``sig_type``: Ed25519 (0x01; ``sign`` returns the raw 64-byte signature of
    the message, a token's CKM_EDDSA) or ECDSA (0x02; ``public_key`` is the DER
    SPKI, ``sign`` returns a DER signature of the message's SHA-256). Raises
    NoteError for text a note cannot carry, another type, or no signature."""
    if not text.endswith("\n") or "\n\n" in text or not text.strip():
        raise NoteError("note text is non-empty, ends in a newline and has no blank line")
    if sig_type not in (ED25519, ECDSA_SHA256):
        raise NoteError(f"a note is signed with type 0x01 or 0x02, not {sig_type:#04x}")
    signature = sign(text.encode())
    if not signature:
        raise NoteError("the signer returned no signature")
    return Note(text, (Signature(name, key_id(name, sig_type, public_key) + signature),))


@dataclass(frozen=True)
class Checkpoint:
    """A log's checkpoint: origin, tree size and root hash (c2sp.org/tlog-checkpoint)."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        """The note text: origin, size, base64 root, extension lines, each ending in \\n."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(),
                 *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse checkpoint text; raises NoteError for a malformed one."""
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "" or not lines[0]:
            raise NoteError("a checkpoint is origin, size and root hash lines")
        size_text, root_text = lines[1], lines[2]
        if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
            raise NoteError(f"checkpoint size {size_text[:30]!r} is not a decimal number")
        try:
            root = base64.b64decode(root_text, validate=True)
        except binascii.Error:
            root = b""
        if len(root) != 32:
            raise NoteError("checkpoint root hash is not 32 bytes of base64")
        return cls(lines[0], int(size_text), root, tuple(lines[3:-1]))


def cosignature_message(checkpoint_text: str, timestamp: int) -> bytes:
    """What a witness signs (c2sp.org/tlog-cosignature): a header with the time in
    seconds since the epoch, then the checkpoint text."""
    return f"cosignature/v1\ntime {timestamp}\n".encode() + checkpoint_text.encode()


def cosign(checkpoint_text: str, name: str, public_key: bytes, timestamp: int,
           sign: Callable[[bytes], bytes]) -> Signature:
    """A witness's cosignature line over a checkpoint (type 0x04)."""
    kid = key_id(name, COSIGNATURE_V1, public_key)
    body = sign(cosignature_message(checkpoint_text, timestamp))
    return Signature(name, kid + struct.pack(">Q", timestamp) + body)


def verify_cosignature(checkpoint_text: str, sig: Signature, verifier: Verifier) -> int:
    """Check one cosignature line against a witness's vkey (type 0x04); returns its
    timestamp. Raises NoteError if the line is not that witness's or does not verify."""
    if verifier.sig_type != COSIGNATURE_V1:
        raise NoteError(f"{verifier.name}: not a cosignature (type 0x04) key")
    if sig.name != verifier.name or sig.blob[:4] != verifier.key_id or len(sig.blob) != 76:
        raise NoteError(f"not a cosignature by {verifier.name}")
    (timestamp,) = struct.unpack(">Q", sig.blob[4:12])
    if not verifier._check(sig.blob[12:], cosignature_message(checkpoint_text, timestamp)):
        raise NoteError(f"cosignature by {verifier.name} does not verify")
    return int(timestamp)


def cosignatures(note: Note, witnesses: Iterable[Verifier]) -> dict[str, int]:
    """Every valid cosignature on ``note`` by one of ``witnesses``: name -> timestamp.
    Lines by other keys are ignored; a known witness's bad line raises NoteError."""
    found: dict[str, int] = {}
    for w in witnesses:
        for sig in note.signatures:
            if sig.name == w.name and sig.blob[:4] == w.key_id:
                found[w.name] = verify_cosignature(note.text, sig, w)
    return found
