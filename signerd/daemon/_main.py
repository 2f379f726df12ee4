"""``signerd``: the daemon's command line.

    signerd serve [--config signerd.toml] [--ready-file FILE] [--debug]
    signerd check-config [--config signerd.toml] [--strict]
    signerd --version

With no --config, serves the embedded default (see signerd/embedded.py).
SIGTERM and SIGINT stop gracefully: in-flight requests finish, then sessions
are closed and the PKCS#11 modules finalised. SIGHUP reloads the policy, and
only the policy (``systemctl reload``). SIGUSR1 rotates the audit log, and
only the log (signerd/audit/, Rotation): logrotate's postrotate sends it
(deploy/logrotate/signerd). The two were one signal, so every policy reload
also cut the audit log into a new file (issue 21 §7). Under systemd
(``Type=notify``) it reports READY=1 once serving, RELOADING=1 and READY=1
around a SIGHUP, and STOPPING=1 (signerd/daemon/_sdnotify.py). With ``[server]
workers = N`` (N > 1) this process supervises N worker processes sharing
the port; see signerd/daemon/_workers.py. ``check-config`` loads and checks
everything a start would, serving nothing (signerd/daemon/_checkconfig.py).

Exit status of ``serve``: 0 after a clean stop; 2 for a config fault or a
PIN the token refused (no restart can fix those: the systemd unit's
RestartPreventExitStatus=2), or a usage error; 3 for another failure to
start, such as a token that cannot be reached yet or a port that another
process holds (the old daemon may still be stopping); 1 when a worker dies, or
for an unexpected error. Every failure is one line on stderr; an unexpected
one shows its traceback only with ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signerd import ArgumentParser, add_version_flag, embedded, one_line
from signerd.daemon import _logs as logs
from signerd.daemon import _sdnotify
from signerd.errors import ConfigError, SignerdError, Unavailable

if TYPE_CHECKING:
    from collections.abc import Callable

    from signerd.audit import AuditLog
    from signerd.config import Config

log = logging.getLogger("signerd")
PR_SET_DUMPABLE = 4


def make_undumpable() -> None:
    """No core dumps and no ptrace by other users: the process holds PINs."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning(
            "prctl(PR_SET_DUMPABLE, 0) failed", extra={"fields": {"errno": ctypes.get_errno()}}
        )


def is_dumpable() -> bool:
    libc = ctypes.CDLL(None)
    return bool(libc.prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE


def pin_cpu(config: Config, index: int) -> None:
    """With ``cpu_affinity = "spread"``, keep this process on one CPU: serving
    process ``index`` (1-based) on the index-th CPU it may use, round robin.

    Python's gRPC server hands every call between threads under the GIL; on
    two CPUs those hand-offs are cross-CPU wake-ups, and they cost more than
    the signing (see README, Performance). Every thread that exists now is
    pinned, and threads started later inherit it.
    """
    if config.cpu_affinity != "spread":
        return
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[(index - 1) % len(cpus)]
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as e:  # e.g. a seccomp or container policy
        log.warning("cannot pin to one CPU; running unpinned",
                    extra={"fields": {"cpu": cpu, "error": e.strerror}})
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:  # the thread ended meanwhile
            pass
    log.info("pinned to one CPU", extra={"fields": {"cpu": cpu}})


def claim_address(listen: str | None) -> socket.socket | None:
    """Make sure no other signerd, and no other program, serves ``listen``
    ("HOST:PORT"); the returned socket holds the claim while it is open.

    signerd's own claim is an abstract Unix socket named after the address
    (unique per network namespace, gone with the process); another program's
    is found by binding the address once without SO_REUSEPORT. A port of 0
    claims nothing. Raises Unavailable "address ... is already in use" (exit
    3: the other program may be gone by the next try, e.g. the old daemon
    still stopping), ConfigError for an address that cannot be bound."""
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0signerd-listen-{host.strip('[]')}:{port}")
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), int(port),
                                                          type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: SO_REUSEADDR lets a restart bind past its old
            # connections in TIME_WAIT, and still fails beside a listener.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(addr)
    except OSError as e:
        claim.close()
        if e.errno == errno.EADDRINUSE:
            raise Unavailable(f"address {listen} is already in use") from None
        raise ConfigError(f"cannot listen on {listen}: {e.strerror}") from None
    return claim


def address(text: str) -> str:
    """argparse type of --listen and --metrics-listen: HOST:PORT."""
    from signerd.config import is_host_port

    if not is_host_port(text):
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, not {text!r}")
    return text


def listen_flags(config: Config, path: Path, listen: str | None, metrics_listen: str | None,
                 embedded_default: bool) -> Config:
    """``config`` with --listen and --metrics-listen applied, for this run
    only: the config file is not rewritten. A flag that changes an address
    is said in one warning line, with where the saved one comes from."""
    changed = {key: value for key, value in (("listen", listen), ("metrics_listen", metrics_listen))
               if value is not None and value != getattr(config, key)}
    if not changed:
        return config
    settings = {"listen": "server.listen", "metrics_listen": "metrics.listen"}
    fields: dict[str, object] = {"config": str(path)}
    fields.update({settings[key]: {"this_run": value, "config": getattr(config, key)}
                   for key, value in changed.items()})
    keep = f"to keep it, edit {' and '.join(settings[key] for key in changed)} in {path}"
    if embedded_default and "listen" in changed:
        keep += f" and server in {path.parent / 'client.toml'} (signerctl reads that one)"
    log.warning(f"listen address given on the command line, for this run only; {keep}",
                extra={"fields": fields})
    from dataclasses import replace

    return replace(config, listen=changed.get("listen", config.listen),
                   metrics_listen=changed.get("metrics_listen", config.metrics_listen))


# stop, stop, reload the policy, rotate the audit log
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
ROTATE_SIGNAL = signal.SIGUSR1  # logrotate's postrotate; SIGHUP is the policy's alone


def rotate_audit(audit: AuditLog | None) -> None:
    """SIGUSR1's audit log rotation: rotate now, or, if another program
    (logrotate) has just renamed the file, start the new one now. A failure
    is logged and the log goes on in the current file: every line is still
    written (fail closed is about lines, not files)."""
    if audit is None:
        return
    try:
        audit.rotate("sigusr1")
    except Unavailable as e:
        log.error("audit log rotation failed; writing on in the current file",
                  extra={"fields": {"file": str(audit.path), "error": str(e)}})


def load_modules_early(path: Path, worker: int | None) -> Callable[[], None] | None:
    """Start each token's PKCS#11 module loading (``C_Initialize``: seconds for a
    large SoftHSM token, issue 24) on a thread before the config is parsed,
    since parsing imports most of signerd (about 0.4 s). The file is read as
    :func:`signerd.config.load_config` reads it (:func:`signerd.trusted_files.read_toml`,
    trusted: owner, mode, size, a regular file), so no module is loaded from a
    file a start refuses. Of it only ``[environment]`` (which the modules read
    at ``C_Initialize``; it is set here as :func:`serve` would set it),
    ``[server] workers`` (a supervisor opens no token) and each ``[[tokens]]
    module`` are read, the path resolved as the full parse resolves it, so that
    each token takes the module loaded here (:meth:`signerd.token.MODULES.warm`).
    An ``[environment]`` that sets HOME is left to :func:`serve`: it would
    change what ``~`` means to the parse. Anything unexpected: None, and the
    full parse says what is wrong. Returns the function to call once the tokens
    are open."""
    from signerd.config import resolve_module
    from signerd.trusted_files import read_toml

    try:
        doc = read_toml(path, "config", trusted=True)
    except ConfigError:
        return None
    server, environment, tokens = (doc.get("server", {}), doc.get("environment", {}),
                                   doc.get("tokens", []))
    if not (isinstance(server, dict) and isinstance(environment, dict)
            and isinstance(tokens, list)) or "HOME" in environment:
        return None
    if worker is None and server.get("workers", 1) != 1:
        return None
    modules = [m for t in tokens if isinstance(t, dict)
               for m in [t.get("module")] if isinstance(m, str) and m]
    if len(modules) != len(tokens) or not all(isinstance(v, str)
                                               for v in environment.values()):
        return None
    base = path.parent.resolve()  # as load_config resolves against
    paths = [resolve_module(base, m) for m in modules]
    try:
        os.environ.update({str(k): v for k, v in environment.items()})
    except ValueError:  # a name or value the environment cannot hold: serve() says so
        return None
    from signerd.token import MODULES

    return MODULES.warm(paths)


def serve(config: Config, ready_file: Path | None = None, sweep: bool = True,
          preloaded: Callable[[], None] | None = None) -> int:
    """Serve ``config`` in this process until SIGTERM or SIGINT; 0 when
    stopped. ``sweep``: report, once the keys are listed, objects on the
    tokens that belong to no key (one worker of several does it).
    ``preloaded``: what :func:`load_modules_early` returned, called once the
    tokens are open."""
    os.environ.update(config.environment)  # e.g. SOFTHSM2_CONF, before modules load
    if not config.debug:
        make_undumpable()
    # Blocked before any thread exists, so every thread (gRPC's, the tokens')
    # inherits the mask and these signals wait for the sigwait below. With
    # Python handlers, a signal the kernel gave to another thread ran only
    # once the main thread woke up, and a main thread asleep in a wait never
    # did: a SIGHUP or a SIGTERM could be lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    # gRPC's core logs to fd 2 on its own: its lines become JSON lines too.
    from signerd.daemon import _corelog

    restore_stderr = _corelog.route_stderr()
    try:
        return _serve(config, ready_file, sweep, preloaded)
    finally:
        restore_stderr()


START_SWEEP_DELAY = 60.0  # seconds from the first listing to the start-up sweep


def _start_up_sweep(tokens: list[Any], stopping: threading.Event) -> None:
    """Issue 22 §4: log what a crash left on each token (never removes:
    ``signerd sweep --remove`` does), :data:`START_SWEEP_DELAY` seconds after
    the first listing, unless the daemon is stopping. Not at once: the sweep
    searches the whole token (seconds at 10,000 keys), and a key's first
    signature, which writes its used mark, waits for a search in progress;
    a start's burst of first signatures waited up to 0.8 s (issue 24)."""
    for t in tokens:
        t.keys()  # waits for the first listing
    if stopping.wait(START_SWEEP_DELAY):
        return
    for t in tokens:
        if stopping.is_set():
            return
        t.report_junk()


def _serve(config: Config, ready_file: Path | None, sweep: bool = True,
           preloaded: Callable[[], None] | None = None) -> int:
    from signerd.token import MODULES

    # Each module's C_Initialize (seconds for a large SoftHSM token) runs beside
    # the imports and the rest of the start, not before them (if main() did not
    # start it even earlier: then this finds the modules loaded).
    loaded = MODULES.warm(tc.module for tc in config.tokens)
    try:
        from signerd.server import app

        servers = app.open_servers(config)
    finally:
        loaded()
        if preloaded is not None:
            preloaded()
    service = servers.service
    if servers.audit is not None:  # opened by app.build; set before the first line
        servers.audit.max_bytes = config.audit_max_bytes
    servers.start()
    stopping = threading.Event()
    if sweep:
        threading.Thread(target=_start_up_sweep, args=(list(service.tokens.values()), stopping),
                         name="start-up-sweep", daemon=True).start()
    info = {
        "pid": os.getpid(),
        "tcp": servers.ports.get("tcp"),
        "unix": str(config.unix_socket) if config.unix_socket else None,
        "tokens": sorted(service.tokens),
        "dumpable": is_dumpable(),
        "metrics": servers.http.port if servers.http is not None else None,
    }
    log.info("signerd serving", extra={"fields": info})
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(ready_file)
    _sdnotify.notify(_sdnotify.READY, f"STATUS=serving; tokens {', '.join(sorted(service.tokens))}")
    while (signum := signal.sigwait(_SIGNALS)) in (signal.SIGHUP, ROTATE_SIGNAL):
        if signum == ROTATE_SIGNAL:
            rotate_audit(servers.audit)
            continue
        _sdnotify.notify(_sdnotify.reloading())
        servers.policy.reload()
        _sdnotify.notify(_sdnotify.READY)
    _sdnotify.notify(_sdnotify.STOPPING)
    log.info("signerd stopping: finishing in-flight requests")
    stopping.set()
    servers.stop()
    log.info("signerd stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    # gRPC's core reports a failed TLS handshake only at INFO, and reads this
    # when grpc is first imported (not yet: only serve() imports it). signerd
    # turns those lines into JSON lines and counts them (signerd.daemon._corelog), so
    # an inherited GRPC_VERBOSITY=NONE or ERROR must not hide them.
    os.environ["GRPC_VERBOSITY"] = "INFO"
    parser: argparse.ArgumentParser = ArgumentParser(
        prog="signerd", description="PKCS#11-backed signing daemon")
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check-config", help="check everything a start would, serve nothing")
    c.add_argument("--config", type=Path,
                   help="signerd.toml (default: the embedded default's, if it exists)")
    c.add_argument("--state-dir", type=Path, help="state directory of the embedded default")
    c.add_argument("--strict", action="store_true", help="warnings fail the check too")
    w = sub.add_parser("sweep", help="report (and with --remove, remove) objects on the "
                       "tokens that belong to no key, as a crash leaves them")
    w.add_argument("--config", type=Path,
                   help="signerd.toml (default: the embedded default's, if it exists)")
    w.add_argument("--state-dir", type=Path, help="state directory of the embedded default")
    w.add_argument("--remove", action="store_true", help="remove them (after a second look)")
    w.add_argument("--grace", type=float, default=2.0, metavar="SECONDS",
                   help="seconds between the two looks of --remove (default 2)")
    p = sub.add_parser("serve", help="run the daemon")
    p.add_argument("--config", type=Path, help="signerd.toml (default: the embedded default)")
    p.add_argument("--state-dir", type=Path, help="state directory of the embedded default")
    p.add_argument(
        "--listen", type=address, metavar="HOST:PORT",
        help="listen address for this run (default: the config's server.listen); the "
        f"embedded default is created with it (default {embedded.DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--metrics-listen", type=address, metavar="HOST:PORT",
        help="metrics and health address for this run (default: the config's "
        "metrics.listen); the embedded default is created with it "
        f"(default {embedded.DEFAULT_METRICS_LISTEN})",
    )
    p.add_argument("--ready-file", type=Path, help="write {pid, ports} as JSON here once serving")
    p.add_argument("--debug", action="store_true", help="keep the process dumpable (core dumps)")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    # Internal: how a [server] workers > 1 supervisor starts its workers.
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-listen", help=argparse.SUPPRESS)
    p.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "check-config":
        from signerd.daemon import _checkconfig

        logs.setup("error")  # findings are printed; the loaders' info lines are noise here
        path = args.config or (args.state_dir or embedded.state_dir()) / "signerd.toml"
        try:
            return _checkconfig.main(path, strict=args.strict, explicit=args.config is not None)
        except Exception as e:  # noqa: BLE001 - a check that broke: one line, no traceback
            print(f"signerd: check-config: the check itself failed: {type(e).__name__}: {e}",
                  file=sys.stderr)
            return 1
    if args.command == "sweep":
        from signerd.daemon import _sweepcmd

        logs.setup("error")
        path = args.config or (args.state_dir or embedded.state_dir()) / "signerd.toml"
        return _sweepcmd.main(path, args.remove, args.grace)
    logs.setup(args.log_level)
    try:
        path = args.config
        if path is None:
            state = Path(os.path.abspath(args.state_dir or embedded.state_dir()))
            path = embedded.ensure(state, args.listen or embedded.DEFAULT_LISTEN,
                                   args.metrics_listen or embedded.DEFAULT_METRICS_LISTEN)
            log.info(
                "embedded default",
                extra={
                    "fields": {"state_dir": str(state), "client_config": str(state / "client.toml")}
                },
            )
        preloaded = load_modules_early(path, args.worker)
        try:
            return _run(args, path, preloaded)
        finally:
            if preloaded is not None:  # a module no token took is finalised before exit
                preloaded()
    except ConfigError as e:  # a config fault or a refused PIN: a restart cannot help
        print(f"signerd: {one_line(str(e))}", file=sys.stderr)
        return 2
    except SignerdError as e:  # e.g. a token not reachable yet: a restart may help
        print(f"signerd: {one_line(str(e))}", file=sys.stderr)
        return 3
    except Exception as e:  # a bug, or a failure nothing expects: its traceback on request
        if args.log_level == "debug":
            raise
        print(f"signerd: unexpected error: {type(e).__name__}: {one_line(str(e))} "
              "(--log-level debug shows where)", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, path: Path, preloaded: Callable[[], None] | None) -> int:
    """``signerd serve`` once its config file is known: one process, a
    supervisor of workers, or one worker."""
    from signerd.config import load_config

    config = listen_flags(load_config(path), path, args.listen, args.metrics_listen,
                          embedded_default=args.config is None)
    if args.debug:
        from dataclasses import replace

        config = replace(config, debug=True)
    if args.worker is not None:
        from signerd.daemon import _workers

        _workers.become_worker(args.worker, args.supervisor_pid)
        config = _workers.worker_config(config, args.worker, args.worker_listen)
        pin_cpu(config, args.worker)
        return serve(config, args.ready_file, sweep=args.worker == 1, preloaded=preloaded)
    elif config.workers > 1:
        from signerd.daemon import _workers

        worker_args = ["--log-level", args.log_level, *(["--debug"] if args.debug else [])]
        claim = claim_address(config.listen)  # held until the supervisor exits
        try:
            return _workers.Supervisor(path, config, worker_args).run(args.ready_file)
        finally:
            if claim is not None:
                claim.close()
    pin_cpu(config, 1)
    claim = claim_address(config.listen)  # held while this process serves
    try:
        return serve(config, args.ready_file, preloaded=preloaded)
    finally:
        if claim is not None:
            claim.close()
