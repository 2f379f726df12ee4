"""What one Sign request costs signerd itself, without gRPC: one thread, in-process.

    python -m bench.handler [--calls 5000]

Opens a fresh SoftHSM token the way the daemon does (KeyService, gate with
policy and audit log, the v1 servicer), then times in a loop: the whole
``SignerService.Sign`` handler, and the parts it is made of. The servicer is
called directly with a minimal stand-in for gRPC's ServicerContext (only what
the handler touches), so the figures exclude gRPC entirely: the difference to
bench.run's CPU per signature is the price of the transport and of threads
handing the GIL to each other.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/handler.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import IDENTITY, Env, Hsm, Settings, payload  # noqa: E402


class _Context:
    """The part of grpc.ServicerContext that the Sign handler uses."""

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def measure(calls: int) -> dict[str, float]:
    """Microseconds per call of the handler and of each of its parts."""
    from signerd import signing
    from signerd.config import load_config
    from signerd.keys import validate_key_id
    from signerd.policy import Identity, Request
    from signerd.server import app
    from signerd.server._gate import Caller
    from signerd.server.v1 import SignerServicer
    from signerd.v1 import signer_pb2 as pb

    with tempfile.TemporaryDirectory(prefix="signerd-handler-") as tmp:
        env = Env.create(Path(tmp))
        hsm = Hsm.create(env.dir / "hsm", env.module)
        config = load_config(env.write_config("h", hsm, Settings(workers=1)))
        os.environ.update(config.environment)
        servers = app.open_servers(config)
        try:
            # The bench's client certificate's identity: its URI SAN, typed as the
            # server types it (signerd.policy.Identity).
            who = Identity("uri", IDENTITY)
            caller = Caller(who, "tcp", "ipv4:127.0.0.1:1")
            servicer = SignerServicer(servers.service, servers.gate, lambda _ctx: caller)
            key = servers.service.create_key("bench.example/app", "targets", "ecdsa-p256",
                                             purpose="raw")
            request = pb.SignRequest(key_id=key.key_id, message=payload(512))
            context: Any = _Context()
            options = signing.SignOptions()
            decision = Request(who, "tcp", "sign", key.gun, key.role, key.token)
            record = {"request_id": "0" * 16, "identity": str(who), "peer": caller.peer,
                      "transport": "tcp", "operation": "sign", "key_id": key.key_id,
                      "gun": key.gun, "role": key.role, "token": key.token,
                      "payload_sha256": "0" * 64, "decision": "allow", "status": "OK",
                      "latency_ms": 0.3}
            audit = servers.audit
            assert audit is not None
            parts: dict[str, Callable[[], object]] = {
                "Sign handler, whole": lambda: servicer.Sign(request, context),
                "KeyService.sign_with (token)": lambda: servers.service.sign_with(
                    key, request.message, options),
                "audit line": lambda: audit.write(record),
                "policy decision": lambda: servers.policy.current.decide(decision),
                "key lookup": lambda: servers.service.get_key(key.key_id),
                "key ID check": lambda: validate_key_id(key.key_id),
            }
            results = {}
            for name, fn in parts.items():
                fn()
                results[name] = round(timeit.timeit(fn, number=calls) / calls * 1e6, 1)
            return results
        finally:
            servers.stop(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.handler", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=5000, help="calls timed per line")
    a = p.parse_args(argv)
    print("| one thread, no gRPC | µs per call |\n| --- | ---: |")
    for name, us in measure(a.calls).items():
        print(f"| {name} | {us:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
