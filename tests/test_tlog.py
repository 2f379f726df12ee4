"""RFC 9162 trees and proofs, and C2SP signed notes, against published vectors.

The tree vectors are the RFC 6962 reference data that Certificate Transparency's
and transparency-dev's implementations test with (leaves "", 00, 10, 2021, ...);
the note vectors are Go's sumdb/note example (example.com/foo) and, for ECDSA
notes, transparency-dev/formats' Rekor and Pixel 6 checkpoints. A log that no
other implementation agrees with proves nothing to anyone.
"""

from __future__ import annotations

import hashlib
import itertools

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from signerd.tlog import merkle, note
from signerd.tlog.merkle import MemoryHashes, ProofError
from signerd.tlog.note import Checkpoint, Note, NoteError, Verifier

LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243",
                                     "5051525354555657", "606162636465666768696a6b6c6d6e6f")]
ROOTS = ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
         "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
         "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
         "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
         "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
         "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
         "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
         "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
         "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]
INCLUSION = [  # (leaf index, tree size, path)
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CONSISTENCY = [  # (old size, new size, proof)
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]


def _tree(leaves: list[bytes]) -> MemoryHashes:
    tree = MemoryHashes()
    for data in leaves:
        tree.append(merkle.leaf_hash(data))
    return tree


def test_roots_match_rfc6962_reference_data() -> None:
    tree = MemoryHashes()
    assert merkle.root(tree, 0).hex() == ROOTS[0]
    for size, data in enumerate(LEAVES, start=1):
        tree.append(merkle.leaf_hash(data))
        for n in range(size + 1):  # every earlier size stays computable
            assert merkle.root(tree, n).hex() == ROOTS[n], n


@pytest.mark.parametrize(("index", "size", "path"), INCLUSION)
def test_inclusion_proofs_match_the_reference(index: int, size: int, path: list[str]) -> None:
    tree = _tree(LEAVES)
    proof = merkle.inclusion_proof(tree, index, size)
    assert [p.hex() for p in proof] == path
    leaf = merkle.leaf_hash(LEAVES[index])
    merkle.verify_inclusion(leaf, index, size, proof, bytes.fromhex(ROOTS[size]))
    with pytest.raises(ProofError):
        merkle.verify_inclusion(leaf, index, size, proof, bytes.fromhex(ROOTS[size - 1]))
    with pytest.raises(ProofError):
        merkle.verify_inclusion(merkle.leaf_hash(b"x"), index, size, proof,
                                bytes.fromhex(ROOTS[size]))


@pytest.mark.parametrize(("old", "new", "path"), CONSISTENCY)
def test_consistency_proofs_match_the_reference(old: int, new: int, path: list[str]) -> None:
    tree = _tree(LEAVES)
    proof = merkle.consistency_proof(tree, old, new)
    assert [p.hex() for p in proof] == path
    merkle.verify_consistency(old, new, bytes.fromhex(ROOTS[old]), bytes.fromhex(ROOTS[new]),
                              proof)


def test_every_proof_of_a_ragged_tree_verifies_and_tampering_fails() -> None:
    data = [bytes([i, i * 7 % 256]) for i in range(37)]
    tree = _tree(data)
    roots = [merkle.root(tree, n) for n in range(38)]
    for size in range(1, 38):
        for i in range(size):
            proof = merkle.inclusion_proof(tree, i, size)
            merkle.verify_inclusion(merkle.leaf_hash(data[i]), i, size, proof, roots[size])
            with pytest.raises(ProofError):
                merkle.verify_inclusion(merkle.leaf_hash(data[i]), (i + 1) % size or size,
                                        size, proof, roots[size])
    for old, new in itertools.combinations(range(1, 38), 2):
        proof = merkle.consistency_proof(tree, old, new)
        merkle.verify_consistency(old, new, roots[old], roots[new], proof)
        with pytest.raises(ProofError):  # a rewritten history cannot prove it extends
            merkle.verify_consistency(old, new, roots[old - 1] if old > 1 else b"\0" * 32,
                                      roots[new], proof)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.lists(st.binary(min_size=32, max_size=32),
                                                        max_size=8))
def test_no_forged_consistency_proof_verifies(old: int, new: int, forged: list[bytes]) -> None:
    old, new = min(old, new), max(old, new)
    tree = _tree([bytes([i]) for i in range(40)])
    other = _tree([bytes([i]) if i != 0 else b"edited" for i in range(40)])
    if old == new:
        return
    with pytest.raises(ProofError):  # the edited history against the honest old root
        merkle.verify_consistency(old, new, merkle.root(tree, old), merkle.root(other, new),
                                  merkle.consistency_proof(other, old, new))
    with pytest.raises(ProofError):
        merkle.verify_consistency(old, new, merkle.root(tree, old), merkle.root(other, new),
                                  forged)


def test_bad_requests_are_proof_errors() -> None:
    tree = _tree(LEAVES)
    for index, size in [(8, 8), (-1, 8), (0, 0)]:
        with pytest.raises(ProofError):
            merkle.inclusion_proof(tree, index, size)
    for old, new in [(0, 5), (6, 5)]:
        with pytest.raises(ProofError):
            merkle.consistency_proof(tree, old, new)
    with pytest.raises(ProofError, match="empty consistency proof"):
        merkle.verify_consistency(4, 8, bytes.fromhex(ROOTS[4]), bytes.fromhex(ROOTS[8]), [])


# --- signed notes ------------------------------------------------------------------------

GO_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
GO_NOTE = ("This is an example message.\n\n\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnag"
           "v1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n").encode()


def test_go_sumdb_note_example_verifies() -> None:
    verifier = Verifier.from_vkey(GO_VKEY)
    assert verifier.vkey() == GO_VKEY and verifier.key_id.hex() == "530d903a"
    parsed = Note.parse(GO_NOTE)
    assert parsed.text == "This is an example message.\n" and parsed.verified_by(verifier)
    assert parsed.to_bytes() == GO_NOTE
    tampered = GO_NOTE.replace(b"example message", b"exemplary message")
    with pytest.raises(NoteError, match="does not verify"):
        Note.parse(tampered).verified_by(verifier)


def _ed25519() -> tuple[Ed25519PrivateKey, bytes]:
    key = Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_checkpoint_signed_and_cosigned_round_trip() -> None:
    log_key, log_pub = _ed25519()
    wit_key, wit_pub = _ed25519()
    cp = Checkpoint("signerd.example/audit/host-1", 8, bytes.fromhex(ROOTS[8]))
    assert cp.text() == ("signerd.example/audit/host-1\n8\nXcnaeacGWamtVZy3Ad7Zoqudgjqt"
                         "L0lgz+Nw7/RgQyg=\n")
    signed = note.sign_note(cp.text(), cp.origin, log_pub, log_key.sign)
    witness = Verifier("witness.example", note.COSIGNATURE_V1, wit_pub)
    cosig = note.cosign(cp.text(), witness.name, wit_pub, 1_765_000_000, wit_key.sign)
    both = Note(signed.text, (*signed.signatures, cosig))
    again = Note.parse(both.to_bytes())
    assert again.verified_by(Verifier(cp.origin, note.ED25519, log_pub))
    assert Checkpoint.parse(again.text) == cp
    assert note.cosignatures(again, [witness]) == {"witness.example": 1_765_000_000}
    assert Verifier.from_vkey(witness.vkey()) == witness
    # A cosignature over another checkpoint does not verify on this one.
    other = Checkpoint(cp.origin, 7, bytes.fromhex(ROOTS[7])).text()
    with pytest.raises(NoteError, match="does not verify"):
        note.verify_cosignature(other, cosig, witness)


@pytest.mark.parametrize("bad", [
    "no blank line\n\u2014 a AAAAAAAA\n".encode(),
    b"text\n\n",
    b"text\n\n- a AAAAAAAAAAA=\n",
    "text\n\n\u2014 a !!!\n".encode(),
    b"\xff\xfe\n\n",
])
def test_malformed_notes_are_note_errors(bad: bytes) -> None:
    with pytest.raises(NoteError):
        Note.parse(bad)


@pytest.mark.parametrize("text", ["", "a", "a\n\nb\n", "a\n0\nAAAA\n", "a\n01\n" + "A" * 43 +
                                  "=\n", "a\nx\n" + "A" * 43 + "=\n"])
def test_malformed_checkpoints_are_note_errors(text: str) -> None:
    with pytest.raises(NoteError):
        Checkpoint.parse(text)


def test_vkeys_that_lie_about_their_key_id_are_refused() -> None:
    name, kid, blob = GO_VKEY.split("+")
    with pytest.raises(NoteError, match="does not match"):
        Verifier.from_vkey(f"{name}+00000000+{blob}")
    with pytest.raises(NoteError):
        Verifier.from_vkey("a b+530d903a+" + blob)


# Known answers for ECDSA notes (signed-note type 0x02), from
# transparency-dev/formats note/note_verifier_test.go: Sigstore Rekor's key and
# one of its checkpoints, and the Pixel 6 transparency log's.
REKOR_VKEY = ("rekor.sigstore.dev+c0d23d6a+AjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABNhtmPtrWm3U1e"
              "QXBogSMdGvXwBcK5AW5i0hrZLOC96l+smGNM7nwZ4QvFK/4sueRoVj//QP22Ni4Qt9DPfkWLc=")
REKOR_NOTE = ("Rekor\n798034\nf+7CoKgXKE/tNys9TTXcr/ad6U/K3xvznmzew9y6SP0=\n\n"
              "\u2014 rekor.sigstore.dev wNI9ajBEAiARInWIWyCdyG27CO6LPnPekyw20qO0YJfoaPaowGp/"
              "XgIgc+qEHS3+GKVClgqq20uDLet7MCoTURUCRdxwWBHHufk=\n").encode()
PIXEL_VKEY = ("pixel6_transparency_log+91c16e30+AjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABN+4x0Jk1y"
              "TwvLFI9A4NDdGZcX0aiWVdWM5XJVy0M4VWD3AvyW5Q6Hs9A0mcDkpUoYgn+KKPNzFC0H3nN3q6JQ8=")
PIXEL_NOTE = ("DEFAULT\n10\nbsWRucJU5xJPHb5eBdOm6+DM+VelCZBuvtI3sHERJ9Y=\n\n"
              "\u2014 pixel6_transparency_log kcFuMDBFAiEAhqMAP8P6qf6QxtUJhzMhbN+MbZ9dwfUHzGQJm"
              "ffJHtoCIGD0cNe47dHWBoPwYdgBCepB06/+g5O1FmYjXl06owL4\n").encode()


@pytest.mark.parametrize(("vkey", "data", "kid"), [(REKOR_VKEY, REKOR_NOTE, "c0d23d6a"),
                                                   (PIXEL_VKEY, PIXEL_NOTE, "91c16e30")],
                         ids=["rekor", "pixel6"])
def test_ecdsa_notes_of_transparency_dev_verify(vkey: str, data: bytes, kid: str) -> None:
    from tests._note_check import open_ecdsa_note

    verifier = Verifier.from_vkey(vkey)
    assert verifier.sig_type == note.ECDSA_SHA256 and verifier.key_id.hex() == kid
    assert verifier.vkey() == vkey
    parsed = Note.parse(data)
    assert parsed.verified_by(verifier) and parsed.to_bytes() == data
    # The tests' own verifier, written from the spec, agrees on the vectors.
    assert open_ecdsa_note(data, vkey) == parsed.text
    text, _, sigs = data.partition(b"\n\n")
    edited = Note.parse(b"X" + text[1:] + b"\n\n" + sigs)  # another origin
    with pytest.raises(NoteError, match="does not verify"):
        edited.verified_by(verifier)


def test_ecdsa_vkeys_and_signatures_that_are_wrong_are_refused() -> None:
    name, kid, blob = REKOR_VKEY.split("+", 2)
    with pytest.raises(NoteError, match="does not match"):
        Verifier.from_vkey(f"{name}+00000000+{blob}")
    with pytest.raises(NoteError):
        Verifier.from_vkey(f"{name}+{kid}+AwEB")  # type 0x03, reserved
    # The key ID of type 0x02 does not hash the name: the same key under another
    # name is another (name, ID) pair, and its signatures are not this one's.
    other = Verifier.from_vkey(f"bananas.sigstore.dev+{kid}+{blob}")
    assert other.key_id.hex() == kid and not Note.parse(REKOR_NOTE).verified_by(other)
    bad_sig = REKOR_NOTE.replace(b"wNI9ajBEAiAR", b"wNI9ajBEAiAS")
    with pytest.raises(NoteError, match="does not verify"):
        Note.parse(bad_sig).verified_by(Verifier.from_vkey(REKOR_VKEY))
    # A curve the spec does not allow, and an Ed25519 key dressed as type 0x02.
    k1 = ec.generate_private_key(ec.SECP256K1()).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    ed = _ed25519()[0].public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    for spki, why in ((k1, "P-256, P-384 or P-521"), (ed, "P-256, P-384 or P-521"),
                      (b"\x30\x00", "DER SubjectPublicKeyInfo")):
        vkey = Verifier("x.example", note.ECDSA_SHA256, spki).vkey()
        with pytest.raises(NoteError, match=why):
            Verifier.from_vkey(vkey)


def test_an_ecdsa_signed_checkpoint_round_trips_and_is_randomized() -> None:
    from tests._note_check import open_ecdsa_note

    private = ec.generate_private_key(ec.SECP256R1())
    spki = private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    cp = Checkpoint("signerd.example/audit/host-1", 8, bytes.fromhex(ROOTS[8]))

    def sign(message: bytes) -> bytes:
        return private.sign(message, ec.ECDSA(hashes.SHA256()))

    one = note.sign_note(cp.text(), cp.origin, spki, sign, note.ECDSA_SHA256)
    two = note.sign_note(cp.text(), cp.origin, spki, sign, note.ECDSA_SHA256)
    verifier = Verifier(cp.origin, note.ECDSA_SHA256, spki)
    assert verifier.key_id == hashlib.sha256(spki).digest()[:4]
    assert Verifier.from_vkey(verifier.vkey()) == verifier
    for signed in (one, two):
        data = signed.to_bytes()
        assert Note.parse(data).verified_by(verifier)
        assert open_ecdsa_note(data, verifier.vkey()) == cp.text()
    # Randomized: one checkpoint, two signatures, both good.
    assert one.signatures[0].blob != two.signatures[0].blob
    with pytest.raises(NoteError, match="type 0x01 or 0x02"):
        note.sign_note(cp.text(), cp.origin, spki, sign, note.COSIGNATURE_V1)
