"""The ``signerd`` process: its command line, worker processes, systemd readiness,
``check-config``, and the JSON log lines of gRPC's C core.

This package may import everything below it (config, token, audit, server);
nothing but the console script imports it. ``signerd = signerd.daemon:main``.
"""

from signerd.daemon._main import main, pin_cpu

__all__ = ["main", "pin_cpu"]
