"""Regenerate the committed protobuf/gRPC modules from protos/.

Run: python tools/gen_protos.py [OUTDIR]   (default: the repository root)
tests/test_protos.py regenerates into a temporary directory and fails when
the committed files differ, so they can never go stale unnoticed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["signerd/v1/signer.proto", "signerd/notary/signer.proto"]


def generate(outdir: Path) -> None:
    for proto in PROTOS:
        rc = protoc.main(
            [
                "protoc",
                f"-I{ROOT / 'protos'}",
                f"--python_out={outdir}",
                f"--pyi_out={outdir}",
                f"--grpc_python_out={outdir}",
                str(ROOT / "protos" / proto),
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed on {proto}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
