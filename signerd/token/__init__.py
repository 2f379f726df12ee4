"""PKCS#11 tokens: load modules, log in, pool sessions, index keys, watch health.

:class:`Token` is a façade over small pieces, one job each:

- :mod:`~signerd.token._modules`: :data:`MODULES`, each PKCS#11 module loaded
  and initialised once per process (``C_Initialize`` with
  ``CKF_OS_LOCKING_OK``, :mod:`~signerd.token._p11`), shared by the tokens of
  that module, re-initialised when a token must be found again;
  :mod:`~signerd.token._locks`, the per-token locks that keep SoftHSM's
  readers off the object files it is writing.
- :mod:`~signerd.token._slot`: where the token is (its slot, found by the
  configured URI), what it is (its profile and mechanisms, learnt at the
  first connection) and the login.
- :mod:`~signerd.token._pool`: the session pool (borrow, give back,
  keepalive, the profile's session budget).
- :mod:`~signerd.token._health`: the probe, outage detection, the down/up
  warnings, reconnects, and the retry of an operation that lost its session.
- :mod:`~signerd.token._keystore`: the in-process key index (listing,
  lookup, refresh) and signing, the entry point for every operation on a
  key by its ID; it delegates the writes (generation, purposes, deletion,
  "has signed" marks, SoftHSM's generation watch) to
  :mod:`~signerd.token._keywrites` and the sweep of objects that belong to
  no key to :mod:`~signerd.token._sweep`. With :mod:`~signerd.token._listing`
  (reading keys off the token), :mod:`~signerd.token._keygen` (one key pair)
  and :mod:`~signerd.token._certificates`, all on top of
  :mod:`~signerd.token._layout` (how keys and metadata sit on the token).
- :mod:`~signerd.token.profiles`: per-token-kind data and a few hooks.

The signing path is: take a pooled session, ``C_SignInit`` + ``C_Sign`` with
the indexed private key handle, give the session back. No ``C_FindObjects``,
no session open/close, no login. When the token says the session or login is
gone, the token is re-opened once (new sessions, login, key handles) and the
operation retried once; only then does the caller see :class:`Unavailable`.

Health is whether the token answers now: the probe (:meth:`Token.check`)
calls ``C_GetTokenInfo``, which reaches the token's store or device, and a
failure makes the token unusable until a reconnect succeeds. A key search
whose token stops answering meanwhile is not believed either, so a token
that goes away never turns known keys into NOT_FOUND.

There is no database besides the token, so a restarted daemon, or a second
daemon on the same token, sees the same keys.
"""

from __future__ import annotations

from signerd.token import _layout, _p11
from signerd.token._listing import KeyEntry
from signerd.token._locks import _ObjectLocks, _SharedLock
from signerd.token._modules import MODULES, _Modules
from signerd.token._token import Token, TokenStatus

__all__ = [
    "MODULES",
    "KeyEntry",
    "Token",
    "TokenStatus",
    "_Modules",
    "_ObjectLocks",
    "_SharedLock",
    "_layout",
    "_p11",
]
