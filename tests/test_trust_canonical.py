"""Canonical JSON byte for byte against hand-written vectors, and Notary's envelope bytes."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from signerd.canonicaljson import encode_canonical
from signerd.errors import InvalidArgument
from signerd.trust import Envelope, Signature, VerificationError

VECTORS = Path(__file__).parent / "vectors" / "canonical_json.txt"


def _load_vectors() -> list[Any]:
    cases, current = [], {}
    for line in VECTORS.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        field, _, value = line.partition(": ")
        current[field] = value
        if field == "expect":
            # literal_eval: the vectors are Python literals written by hand
            cases.append(pytest.param(ast.literal_eval(current["input"]),
                                      ast.literal_eval(current["expect"]), id=current["name"]))
            current = {}
    return cases


CASES = _load_vectors()


def test_vector_file_has_cases() -> None:
    assert len(CASES) >= 10


@pytest.mark.parametrize(("value", "expected"), CASES)
def test_canonical_json_vectors(value: Any, expected: bytes) -> None:
    assert encode_canonical(value) == expected


@pytest.mark.parametrize(
    "value",
    [pytest.param(1.5, id="float"), pytest.param({1: "a"}, id="int-key"),
     pytest.param({"a": b"x"}, id="bytes")],
)
def test_canonical_json_refuses_what_notary_cannot_sign(value: Any) -> None:
    with pytest.raises(InvalidArgument):
        encode_canonical(value)


ENVELOPE_CASES = [
    pytest.param(
        {"_type": "Targets", "version": 1},
        b'{"signed":{"_type":"Targets","version":1},"signatures":'
        b'[{"keyid":"ab","method":"ecdsa","sig":"AAEC"}]}',
        id="signed-first-then-signatures",
    ),
    pytest.param(
        {"targets": {"a<b>&c": 1}},
        b'{"signed":{"targets":{"a\\u003cb\\u003e\\u0026c":1}},"signatures":'
        b'[{"keyid":"ab","method":"ecdsa","sig":"AAEC"}]}',
        id="go-html-escapes",
    ),
    pytest.param(
        {"t": "\u2028\u00e9"},
        b'{"signed":{"t":"\\u2028\xc3\xa9"},"signatures":'
        b'[{"keyid":"ab","method":"ecdsa","sig":"AAEC"}]}',
        id="line-separator-escaped-non-ascii-raw",
    ),
]


@pytest.mark.parametrize(("signed", "expected"), ENVELOPE_CASES)
def test_envelope_bytes_match_notary_json_marshal(signed: dict[str, Any], expected: bytes) -> None:
    env = Envelope(signed, [Signature("ab", "ecdsa", b"\x00\x01\x02")])
    data = env.to_bytes()
    assert data == expected
    # Reading it back yields the same signed object, hence the same signed bytes.
    back = Envelope.from_bytes(data, "targets")
    assert back.signed == signed
    assert back.message() == encode_canonical(signed)
    assert json.loads(data)["signatures"][0]["sig"] == "AAEC"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        pytest.param(b"not json", "not valid JSON", id="garbage"),
        pytest.param(b"[]", "not a signed metadata object", id="list"),
        pytest.param(b'{"signatures":[]}', "missing 'signed'", id="no-signed"),
        pytest.param(b'{"signed":{},"signatures":[{"keyid":"a","method":"ecdsa","sig":"A"}]}',
                     "base64", id="bad-base64"),
        pytest.param(b'{"signed":{},"signatures":[{"keyid":"a","method":"ecdsa","sig":"AAF="}]}',
                     "canonical base64", id="stray-padding-bits"),
        pytest.param(b'{"signed":{"v":1.5},"signatures":[]}', "cannot encode", id="float"),
    ],
)
def test_envelope_parse_errors_name_the_file(data: bytes, fragment: str) -> None:
    with pytest.raises(VerificationError) as err:
        Envelope.from_bytes(data, "targets/releases")
    assert err.value.file == "targets/releases.json"
    assert str(err.value).startswith("targets/releases.json: ")
    assert fragment in str(err.value)
