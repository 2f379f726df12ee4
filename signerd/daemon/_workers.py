"""``[server] workers = N``: N daemon processes sharing one TCP port.

Why processes: one CPython process runs gRPC's Python side, the gate and
the audit log on about one core (the GIL), and on this path most of the
CPU is Python. N workers bound to the same address with SO_REUSEPORT let
the kernel spread connections over N interpreters.

The supervisor (the process ``signerd serve`` started as) never loads a
PKCS#11 module and never reads a PIN. It reserves the port, starts N workers
as fresh interpreters (``python -m signerd.daemon serve --worker I``: a
module's C_Initialize state does not survive fork, so each worker must
initialise and log in itself), forwards SIGTERM, SIGINT, SIGHUP and SIGUSR1
to them, and writes the ready file once every worker serves.

Each worker:

* listens on the same address (SO_REUSEPORT is on in every server);
* opens its own sessions and logs in (a token's session limit is shared);
* writes its own audit chain, ``<audit file>.w1``, ``.w2``, ... Each is a
  complete hash chain with its own head file, verified on its own. One
  shared chain would need a cross-process lock and a re-read of the head on
  every request, and AuditLog deliberately refuses a file that another
  process holds; per-worker chains keep every guarantee with no new code in
  the audit path. Lines of different workers are ordered by their ``time``;
* enforces ``max_inflight_per_identity`` on its own connections (one
  client connection always lands on one worker);
* serves the Unix socket only if it is worker 1 (a path binds once);
* exits when the supervisor dies (PR_SET_PDEATHSIG), so a killed
  supervisor cannot leave workers holding the port;
* reloads its policy on SIGHUP, and rotates its own audit chain on SIGUSR1
  (both forwarded by the supervisor) and at ``[audit] max_bytes``, as one
  process does: ``audit.log.w1`` becomes
  ``audit.log.w1.20261128T141503Z`` and so on;
* gets no ``NOTIFY_SOCKET``: the supervisor is the main PID that systemd
  listens to, and it reports READY=1 once every worker serves.

If a worker exits on its own, the supervisor stops the others and exits 1:
restarting is the service manager's job, as it is with one process. A worker
that exits 2 while starting (a config fault, a refused PIN) makes it exit 2,
which the systemd unit does not restart.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from signerd.config import Config
from signerd.daemon import _sdnotify
from signerd.errors import ConfigError, Unavailable

log = logging.getLogger("signerd")
PR_SET_PDEATHSIG = 1
_POLL = 0.05  # seconds between checks on the workers while waiting
STOP_GRACE = 30.0  # seconds a worker gets to finish in-flight requests


def worker_audit_file(path: Path, index: int) -> Path:
    """The audit chain of worker ``index`` (1-based): ``audit.log.w1``, ..."""
    return path.with_name(f"{path.name}.w{index}")


def worker_config(config: Config, index: int, listen: str | None) -> Config:
    """What worker ``index`` serves: the shared address, its own audit chain,
    and the Unix socket only for worker 1."""
    return replace(
        config,
        workers=1,
        listen=listen if listen is not None else config.listen,
        audit_file=(worker_audit_file(config.audit_file, index)
                    if config.audit_file is not None else None),
        unix_socket=config.unix_socket if index == 1 else None,
        metrics_listen=None,  # the supervisor serves every worker's figures in one scrape
        shares_port=True,
    )


class _WorkerField(logging.Filter):
    """Adds ``worker`` to every log line of a worker."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        record.fields = {**(fields if isinstance(fields, dict) else {}), "worker": self.index}
        return True


def become_worker(index: int, supervisor_pid: int) -> None:
    """Set up this process as worker ``index`` of ``supervisor_pid``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:  # the supervisor died before prctl took effect
        raise ConfigError(f"worker {index}: supervisor {supervisor_pid} is gone")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(index))


def _split(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"server.listen must be host:port, got {listen!r}")
    return host.strip("[]"), int(port)


def _reserve(listen: str) -> tuple[socket.socket | None, str]:
    """For port 0, pick the port once for all workers: bind (without
    listening) a SO_REUSEPORT socket and keep it until the workers listen.
    A bound socket that does not listen never receives connections."""
    host, port = _split(listen)
    if port != 0:
        return None, listen
    family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        # A port in use may be free on the next try (exit 3, not 2: daemon._main).
        error = Unavailable if e.errno == errno.EADDRINUSE else ConfigError
        raise error(f"cannot listen on {listen}: {e.strerror}") from None
    bound = sock.getsockname()[1]
    return sock, f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"


class Supervisor:
    """Starts the workers, relays signals, and stops them."""

    def __init__(self, config_path: Path, config: Config, worker_args: list[str]) -> None:
        self.config_path = config_path
        self.config = config
        self.worker_args = worker_args
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stop = threading.Event()
        self.serving = threading.Event()  # set once every worker serves

    def _signal(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def _reload(self) -> None:
        """SIGHUP: each worker reloads its policy (only its policy).
        READY=1 follows at once: the workers' reloads run on their own."""
        _sdnotify.notify(_sdnotify.reloading())
        self._signal(signal.SIGHUP)
        _sdnotify.notify(_sdnotify.READY)

    def _rotate(self) -> None:
        """SIGUSR1: each worker rotates its own audit chain (only that). A
        worker that is not serving yet would be killed by it (SIGUSR1's
        default action), so none is sent before every worker serves: a log
        that does not exist yet has nothing to rotate."""
        if self.serving.is_set():
            self._signal(signal.SIGUSR1)
        else:
            log.warning("SIGUSR1 before every worker serves: no audit log rotated")

    def _start(self, listen: str | None, readydir: Path) -> list[Path]:
        files = []
        for i in range(1, self.config.workers + 1):
            ready = readydir / f"worker{i}.json"
            cmd = [sys.executable, "-m", "signerd.daemon", "serve", "--config",
                   str(self.config_path), "--ready-file", str(ready), "--worker", str(i),
                   "--supervisor-pid", str(os.getpid()), *self.worker_args]
            if listen is not None:
                cmd += ["--worker-listen", listen]
            # Inherits stderr (one log stream), not NOTIFY_SOCKET: see the module doc.
            env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
            self.procs.append(subprocess.Popen(cmd, env=env))
            files.append(ready)
        return files

    def _wait_ready(self, files: list[Path]) -> list[dict[str, object]] | None:
        """Each worker's ready info, or None if one exited or we were told to stop."""
        while not all(f.exists() for f in files):
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or self.stop.wait(_POLL):
                return None
        return [json.loads(f.read_text()) for f in files]

    def _stop_all(self) -> int:
        """SIGTERM every worker, wait (then kill); 0 if all exited cleanly."""
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        code = 0
        for p in self.procs:
            try:
                rc = p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time; killing it",
                          extra={"fields": {"worker_pid": p.pid}})
                p.kill()
                rc = p.wait()
            if rc != 0:
                code = 1
        return code

    def _metrics(self) -> tuple[Any, Path | None]:
        """With [metrics] listen: every worker counts into prometheus-client's
        multiprocess files in a directory of this supervisor's (set in the
        workers' environment), and this process serves /metrics, /livez and
        /readyz from them, and each worker's audit tree (checkpoint and tiles)
        at /w<i>/ from its files. Raises ConfigError if the address is taken."""
        if self.config.metrics_listen is None:
            return None, None
        directory = Path(tempfile.mkdtemp(prefix="signerd-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)  # before metrics is imported
        from signerd import metrics

        registry = metrics.multiprocess_registry()
        trees = None
        if self.config.audit_file is not None:  # each worker's tree at /w<i>/ (issue 25 §3)
            from signerd.audit._publish import WorkerTrees

            trees = WorkerTrees({f"w{i}": worker_audit_file(self.config.audit_file, i)
                                 for i in range(1, self.config.workers + 1)})
        try:
            listener = metrics.HttpListener(
                self.config.metrics_listen, lambda: metrics.not_ready(registry), registry,
                max_connections=self.config.metrics_max_connections,
                read_timeout=self.config.metrics_read_timeout,
                routes=trees.serve if trees is not None else None)
        except OSError as e:
            shutil.rmtree(directory, ignore_errors=True)
            error = Unavailable if e.errno == errno.EADDRINUSE else ConfigError
            raise error(f"cannot listen on metrics.listen {self.config.metrics_listen}: "
                              f"{e.strerror}") from None
        return listener, directory

    def run(self, ready_file: Path | None) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload())
        signal.signal(signal.SIGUSR1, lambda *_: self._rotate())
        listener, metrics_dir = self._metrics()
        try:
            return self._run(ready_file, listener)
        finally:
            if listener is not None:
                listener.stop()
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)

    def _run(self, ready_file: Path | None, listener: Any) -> int:
        reserved, listen = _reserve(self.config.listen) if self.config.listen else (None, None)
        readydir = Path(tempfile.mkdtemp(prefix="signerd-workers-"))
        try:
            infos = self._wait_ready(self._start(listen, readydir))
        finally:
            if reserved is not None:
                reserved.close()  # the workers hold the port now (or are gone)
            shutil.rmtree(readydir, ignore_errors=True)
        if infos is None:
            failed = not self.stop.is_set()
            # A worker's 2 (config fault, refused PIN) is passed on: no restart fixes it.
            config_fault = any(p.poll() == 2 for p in self.procs)
            code = self._stop_all()
            if failed:
                log.error("a worker exited during startup; stopping")
                return 2 if config_fault else 1
            return code
        first = infos[0]
        info = {"pid": os.getpid(), "tcp": first.get("tcp"), "unix": first.get("unix"),
                "tokens": first.get("tokens"), "dumpable": first.get("dumpable"),
                "workers": [i.get("pid") for i in infos],
                "metrics": listener.port if listener is not None else None}
        if listener is not None:
            listener.start()
        self.serving.set()
        log.info("signerd serving", extra={"fields": info})
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(ready_file)
        _sdnotify.notify(_sdnotify.READY, f"STATUS=serving; {len(self.procs)} workers")
        while not self.stop.wait(_POLL * 4):
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                log.error("a worker exited; stopping the others",
                          extra={"fields": {"worker_pid": dead[0].pid,
                                            "exit_code": dead[0].returncode}})
                self._stop_all()
                return 1
        _sdnotify.notify(_sdnotify.STOPPING)
        log.info("signerd stopping: workers finish in-flight requests")
        code = self._stop_all()
        log.info("signerd stopped", extra={"fields": {"exit_code": code}})
        return code
