"""Run the software YubiHSM 2 and its connector: ``python -m tests._yubihsm
--state FILE [--port N] [--ready FILE]``. The ready file gets the port once
the connector listens; SIGTERM stops it."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from tests._yubihsm._connector import Connector
from tests._yubihsm._defs import SESSION_IDLE_SECONDS
from tests._yubihsm._device import Device


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m tests._yubihsm")
    parser.add_argument("--state", type=Path, required=True, help="the device's object file")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready", type=Path, help="written with the port once serving")
    parser.add_argument("--serial", type=int, default=12345678)
    parser.add_argument("--idle", type=float, default=SESSION_IDLE_SECONDS,
                        help="seconds after which an unused session is closed")
    args = parser.parse_args(argv)
    # The factory password of authentication key 1 comes from the environment,
    # never argv; "password" as on a new device.
    password = os.environ.get("YUBIHSM_DEVICE_PASSWORD", "password")
    device = Device(args.state, args.serial, password, args.idle)
    server = Connector(device, port=args.port)

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.ready:
        tmp = args.ready.with_suffix(".tmp")
        tmp.write_text(str(server.port))
        tmp.rename(args.ready)
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
