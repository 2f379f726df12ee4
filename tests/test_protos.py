"""The committed generated protobuf/gRPC code matches protos/ (it is never stale)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gen_protos  # noqa: E402


@pytest.mark.parametrize("proto", gen_protos.PROTOS)
def test_generated_code_is_up_to_date(proto: str, tmp_path: Path) -> None:
    gen_protos.generate(tmp_path)
    stem = proto.removesuffix(".proto")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
        fresh = (tmp_path / f"{stem}{suffix}").read_text()
        committed = (ROOT / f"{stem}{suffix}").read_text()
        assert committed == fresh, (
            f"{stem}{suffix} is stale: run 'python tools/gen_protos.py' and commit the result"
        )


def test_notary_wire_names_are_notarys() -> None:
    from signerd.notary import signer_pb2

    services = {
        s.full_name: [m.name for m in s.methods]
        for s in signer_pb2.DESCRIPTOR.services_by_name.values()
    }
    assert services == {
        "proto.KeyManagement": ["CreateKey", "DeleteKey", "GetKeyInfo"],
        "proto.Signer": ["Sign"],
    }
    fields = {
        m: {f.name: f.number for f in signer_pb2.DESCRIPTOR.message_types_by_name[m].fields}
        for m in (
            "CreateKeyRequest",
            "KeyInfo",
            "GetKeyInfoResponse",
            "Signature",
            "SignatureRequest",
            "PublicKey",
        )
    }
    assert fields["CreateKeyRequest"] == {"algorithm": 1, "gun": 2, "role": 3}
    assert fields["KeyInfo"] == {"keyID": 1, "algorithm": 2}
    assert fields["GetKeyInfoResponse"] == {"keyInfo": 1, "publicKey": 2, "role": 3}
    assert fields["Signature"] == {"keyInfo": 1, "algorithm": 2, "content": 3}
    assert fields["SignatureRequest"] == {"keyID": 1, "content": 2}
    assert fields["PublicKey"] == {"keyInfo": 1, "publicKey": 2}
