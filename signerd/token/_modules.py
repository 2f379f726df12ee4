"""PKCS#11 modules: loaded and initialised once per path per process.

The tokens of one module share it: :data:`MODULES` loads a module on its
first :meth:`~_Modules.acquire` (``C_Initialize`` with ``CKF_OS_LOCKING_OK``,
see :func:`signerd.token._p11.load`), finalises it on its last
:meth:`~_Modules.release`, knows which tokens use it (so that one token's
logout does not log out another's login, and a re-initialisation pauses the
others), and hands each token and process its one :class:`_ObjectLocks`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import pkcs11

from signerd.errors import ConfigError
from signerd.token import _p11
from signerd.token._locks import _ObjectLocks

if TYPE_CHECKING:  # annotations only: a Token uses MODULES
    from signerd.token._token import Token

log = logging.getLogger("signerd.token")

_PAUSE_WAIT = 5.0  # seconds a module re-initialisation waits for another token's sessions


class _Modules:
    """One initialised module per path per process, finalised on last close."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._libs: dict[str, tuple[_p11.ThreadSafeLib, int]] = {}
        self._users: dict[str, list[Token]] = {}
        self._object_locks: dict[tuple[str, int], _ObjectLocks] = {}

    def object_locks(self, path: str, slot_id: int) -> _ObjectLocks:
        """The one _ObjectLocks of a token in this process, however many
        Token objects use it."""
        with self._lock:
            return self._object_locks.setdefault((path, slot_id), _ObjectLocks())

    def shares_login(self, token: Token) -> bool:
        """Whether another connected Token of this process uses ``token``'s
        slot, and so its login (PKCS#11 logs in per application and token)."""
        with self._lock:
            return any(t is not token and t.connected and t.slot_id == token.slot_id
                       for t in self._users.get(token.config.module, []))

    def acquire(self, path: str, user: Token | None = None) -> _p11.ThreadSafeLib:
        """The module at ``path``, loaded and initialised on first use; ``user``
        is the Token that uses it. Raises ConfigError (missing or unloadable)."""
        with self._lock:
            lib, count = self._libs.get(path, (None, 0))
            if lib is None:
                lib = self._load(path)
            self._libs[path] = (lib, count + 1)
            if user is not None:
                self._users.setdefault(path, []).append(user)
            return lib

    @staticmethod
    def _load(path: str) -> _p11.ThreadSafeLib:
        """dlopen and C_Initialize ``path``. Raises ConfigError."""
        missing = _p11.missing_module(path)
        if missing is not None:
            raise ConfigError(missing)
        try:
            return _p11.load(path)
        except (pkcs11.PKCS11Error, _p11.P11Error, OSError) as e:
            log.debug("cannot load a PKCS#11 module", extra={"fields": {
                "module": path, "detail": _p11.failure_detail(e)}})
            raise ConfigError(
                f"cannot load PKCS#11 module {path}: {_p11.load_error(path, e)}") from None

    def warm(self, paths: Iterable[str]) -> Callable[[], None]:
        """Load and initialise the modules at ``paths`` on threads, one module
        at a time (as tokens load them), so that a start does its other work
        (imports, the gRPC server) during their ``C_Initialize``: SoftHSM's
        reads its whole object store, 1.3-1.75 s at 10,000 keys (issue 24),
        and ctypes lets go of the GIL for the call. A module loaded ahead is
        used by no one until a token's :meth:`acquire` takes it, and finalised
        by its last :meth:`release` as usual (so a start that retries still
        reads its tokens afresh). Returns
        the function to call once the tokens are open: it waits for the loads
        and finalises a module that no token took. A module that cannot be
        loaded is not kept; the token's own :meth:`acquire` then says why."""

        def load(path: str) -> None:
            with self._lock:
                if path in self._libs:
                    return
                start = time.monotonic()
                try:
                    self._libs[path] = (self._load(path), 0)
                except ConfigError:
                    return
            log.debug("module loaded ahead", extra={"fields": {
                "module": path, "seconds": round(time.monotonic() - start, 3)}})

        wanted = list(dict.fromkeys(paths))
        threads = [threading.Thread(target=load, args=(p,), name="module-load", daemon=True)
                   for p in wanted]
        for t in threads:
            t.start()

        def done() -> None:
            for t in threads:
                t.join()
            for path in wanted:
                with self._lock:
                    lib, count = self._libs.get(path, (None, 1))
                    if lib is not None and count == 0:
                        del self._libs[path]
                        with contextlib.suppress(_p11.P11Error):
                            lib.close()

        return done

    def release(self, path: str, user: Token | None = None) -> None:
        """Give back one :meth:`acquire`; the last one finalises the module."""
        with self._lock:
            if user is not None and user in self._users.get(path, []):
                self._users[path].remove(user)
            lib, count = self._libs[path]
            if count > 1:
                self._libs[path] = (lib, count - 1)
                return
            del self._libs[path]
            try:
                lib.close()
            except _p11.P11Error as e:
                log.warning(
                    "C_Finalize failed", extra={"fields": {"module": path, "error": str(e)}}
                )

    def reinitialize(self, path: str, for_token: Token | None = None) -> bool:
        """C_Finalize + C_Initialize a module: some modules (SoftHSM among
        them) only find a token that went away and came back after
        re-initialisation.

        Without ``for_token``, only when every token of the module is
        unusable. With it (the health probe of a token that stays unusable),
        the module's other tokens are paused for it: each one's reconnects
        are held and its borrowed sessions awaited (up to _PAUSE_WAIT
        seconds, else nothing is done), and each reconnects on its next use.
        That costs them a new login once per probe while a token is away,
        and is how a token comes back while its neighbours stayed up."""
        with self._lock:
            users = self._users.get(path, [])
            if path not in self._libs:
                return False
            others = [t for t in users if t is not for_token and t.connected]
            if others and for_token is None:
                return False
            held: list[Token] = []
            try:
                for t in others:
                    if not t.pause(_PAUSE_WAIT):
                        return False
                    held.append(t)
                for t in users:
                    t.forget_sessions()  # C_Finalize closes them; their handles may be reused
                lib = self._libs[path][0]
                try:
                    lib.module.finalize()
                    lib.module.initialize()
                except _p11.P11Error as e:
                    # Tried again at every probe while the token is away: the
                    # token's own down/up warnings are what the operator reads.
                    log.debug("module re-initialisation failed",
                              extra={"fields": {"module": path, "error": str(e)}})
                    return False
            finally:
                for t in held:
                    t.resume()
            log.info("module re-initialised", extra={"fields": {"module": path,
                                                                "paused": len(held)}})
            return True


MODULES = _Modules()
"""The process's modules, shared by every Token."""
