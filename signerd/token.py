"""PKCS#11 tokens: load modules, log in, pool sessions, cache key handles.

The signing path is: take a pooled session, ``C_SignInit`` + ``C_Sign`` with
the cached private key handle, give the session back. No ``C_FindObjects``,
no session open/close, no login. When the token says the session or login is
gone, the token is re-opened once (new sessions, login, key handles) and the
operation retried once; only then does the caller see :class:`Unavailable`.

Key metadata lives on the token objects themselves: ``CKA_ID`` is the 32-byte
TUF key ID and ``CKA_LABEL`` a small JSON document (algorithm, GUN, role,
used). There is no other database, so a restarted daemon, or a second daemon
on the same token, sees the same keys.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from signerd import _p11
from signerd.config import TokenConfig
from signerd.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SignerdError,
    TokenLoginError,
    Unavailable,
)
from signerd.keys import ALGORITHMS, Algorithm, KeyID, key_id, tuf_public_bytes

log = logging.getLogger("signerd.token")

_CURVE_OIDS = {  # DER-encoded OBJECT IDENTIFIERs for CKA_EC_PARAMS
    "secp256r1": bytes.fromhex("06082a8648ce3d030107"),
    "secp384r1": bytes.fromhex("06052b81040022"),
    "ed25519": bytes.fromhex("06032b6570"),
}
_CURVES = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1()}
_LABEL_TAG = "signerd"
_POOL_WAIT = 30.0  # seconds a request waits for a free session before UNAVAILABLE
_CLOSE_WAIT = 30.0  # seconds close() waits for sessions in use to come back
_RETRY_EVERY = 1.0  # seconds between reconnect attempts while a token is unusable


@dataclass(frozen=True)
class KeyEntry:
    """A key pair on a token, as the daemon knows it."""

    key_id: KeyID
    algorithm: Algorithm
    gun: str
    role: str
    token: str
    spki_der: bytes
    used: bool
    handle: int  # private key object handle, valid in every session

    @property
    def tuf_public(self) -> bytes:
        return tuf_public_bytes(self.algorithm.keytype, self.spki_der)


def _label(alg: Algorithm, gun: str, role: str, used: bool) -> str:
    return json.dumps(
        {_LABEL_TAG: 1, "alg": alg.name, "gun": gun, "role": role, "used": used},
        separators=(",", ":"),
        sort_keys=True,
    )


def _parse_label(label: str) -> dict[str, Any] | None:
    try:
        meta = json.loads(label)
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get(_LABEL_TAG) != 1 or meta.get("alg") not in ALGORITHMS:
        return None
    return meta


def _octets(der: bytes) -> bytes:
    """The content of a DER OCTET STRING (CKA_EC_POINT is one)."""
    if not der or der[0] != 0x04:
        return der  # some modules return the raw point
    length, offset = der[1], 2
    if length & 0x80:
        n = length & 0x7F
        length, offset = int.from_bytes(der[2 : 2 + n], "big"), 2 + n
    return der[offset : offset + length]


def _spki(alg: Algorithm, pub: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a public key object on the token."""
    key: Any
    if alg.keytype == "rsa":
        n = int.from_bytes(pub[Attribute.MODULUS], "big")
        e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
        key = rsa.RSAPublicNumbers(e, n).public_key()
    elif alg.keytype == "ed25519":
        key = ed25519.Ed25519PublicKey.from_public_bytes(_octets(pub[Attribute.EC_POINT]))
    else:
        assert alg.curve is not None
        key = ec.EllipticCurvePublicKey.from_encoded_point(
            _CURVES[alg.curve], _octets(pub[Attribute.EC_POINT])
        )
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


class _SharedLock:
    """Many holders of ``shared()`` at once, or one of ``exclusive()``.

    Exclusive holders go first: once one waits, new shared holders wait too,
    so a steady stream of them cannot starve it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._sharing = 0
        self._exclusive = False
        self._waiting = 0  # exclusive holders waiting

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._sharing += 1
        try:
            yield
        finally:
            with self._cond:
                self._sharing -= 1
                if not self._sharing:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._sharing)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class _ObjectLocks:
    """What keeps SoftHSM 2.6.1's readers off the object files it is writing.

    SoftHSM truncates and rewrites an object's file in steps that other
    threads of the process are not locked out of (its fcntl locks only
    exclude other processes). A reader that meets the file half-written marks
    the object invalid: the write then fails (CKR_GENERAL_ERROR from
    C_GenerateKeyPair; SoftHSM issue 573, fixed after 2.6.1 and in no
    release), and the reader gets CKR_OBJECT_HANDLE_INVALID.

    - ``searches``: a search (C_FindObjectsInit re-reads every object whose
      file changed) and attribute reads share it; key generation, which
      writes new objects, holds it alone.
    - ``signing``: signing re-reads only its key's file, so it shares this
      one; relabelling a key (rewriting its files) holds it alone. Key
      generation needs no part of it: a key is signed with only once made.

    One per token and process (:meth:`_Modules.object_locks`); always taken
    in this order.
    """

    searches: _SharedLock = field(default_factory=_SharedLock)
    signing: _SharedLock = field(default_factory=_SharedLock)


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
        with self._lock:
            lib, count = self._libs.get(path, (None, 0))
            if lib is None:
                try:
                    lib = _p11.load(path)
                except (pkcs11.PKCS11Error, _p11.P11Error, OSError) as e:
                    raise ConfigError(f"cannot load PKCS#11 module {path}: {e}") from None
            self._libs[path] = (lib, count + 1)
            if user is not None:
                self._users.setdefault(path, []).append(user)
            return lib

    def release(self, path: str, user: Token | None = None) -> None:
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

    def reinitialize(self, path: str) -> bool:
        """C_Finalize + C_Initialize a module whose tokens are all unusable:
        some modules (SoftHSM among them) only find a token that went away
        and came back after re-initialisation. Never done while another
        token of the module is in use, since it ends every session."""
        with self._lock:
            users = self._users.get(path, [])
            if any(t.connected for t in users) or path not in self._libs:
                return False
            for t in users:
                t.forget_sessions()  # C_Finalize closes them; their handles may be reused
            lib = self._libs[path][0]
            try:
                lib.module.finalize()
                lib.module.initialize()
            except _p11.P11Error as e:
                log.error(
                    "module re-initialisation failed",
                    extra={"fields": {"module": path, "error": str(e)}},
                )
                return False
            log.warning("module re-initialised", extra={"fields": {"module": path}})
            return True


MODULES = _Modules()


class Token:
    """One configured token: its login, session pool and key cache."""

    def __init__(self, config: TokenConfig) -> None:
        self.config = config
        self.name = config.name
        self._pin = config.read_pin().encode()
        self._lib: _p11.ThreadSafeLib | None = MODULES.acquire(config.module, self)
        self.module = self._lib.module
        self._lock = threading.RLock()  # guards reconnects and the key cache's writers
        self._generation = 0
        self._pool: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._sessions: list[Any] = []
        self._keys: dict[KeyID, KeyEntry] = {}
        self._miss_lock = threading.Lock()
        self._locks = _ObjectLocks()  # replaced by the token's own in _connect
        self._login_refused = False
        self._connected = False
        self._last_error = ""
        self._next_attempt = 0.0
        self.healthy = False
        self._token: Any = None
        self.slot_id = -1
        self._listed = threading.Event()
        self._lister: threading.Thread | None = None
        self._idle = threading.Condition()  # notified when no session is borrowed
        self._borrowed = 0
        self._closed = False  # once closed, never reconnects (and logs in) again
        try:
            self._connect(list_keys=False)
        except BaseException:
            self.close()
            raise
        # The first listing runs in the background, so the daemon serves at
        # once even with many keys: a key not listed yet is found by its ID
        # (lookup), and only listings wait for it.
        self._lister = threading.Thread(target=self._first_listing, name=f"list-{self.name}",
                                         daemon=True)
        self._lister.start()

    def _first_listing(self) -> None:
        start = time.monotonic()
        try:
            self.refresh()
            log.info("keys listed", extra={"fields": {
                "token": self.name, "keys": len(self._keys),
                "seconds": round(time.monotonic() - start, 3)}})
        except SignerdError as e:
            log.error("cannot list keys", extra={"fields": {"token": self.name, "error": str(e)}})
        finally:
            self._listed.set()

    # -- connection ---------------------------------------------------------

    def _find_token(self) -> Any:
        uri = self.config.uri
        assert self._lib is not None
        for slot in self._lib.get_slots(token_present=True):
            if uri.slot_id is not None and slot.slot_id != uri.slot_id:
                continue
            tok = slot.get_token()
            if uri.token is not None and tok.label != uri.token:
                continue
            if uri.serial is not None and tok.serial.decode().strip() != uri.serial:
                continue
            return tok
        raise Unavailable(
            f"token {self.name}: no token matches its uri in module {self.config.module}"
        )

    def _connect(self, list_keys: bool = True) -> None:
        """Open the pool, log in once, and (unless told not to) load every key."""
        if self._login_refused:
            raise Unavailable(
                f"token {self.name}: the token refused the configured PIN; "
                "fix the PIN and restart signerd"
            )
        try:
            self._token = self._find_token()
            self.slot_id = self._token.slot.slot_id
            self._locks = MODULES.object_locks(self.config.module, self.slot_id)
            first = self._token.open(rw=True)
            self._sessions.append(first)
            try:
                self.module.login(first.handle, self._pin)
            except _p11.P11Error as e:
                if e.rv in (_p11.CKR_PIN_INCORRECT, _p11.CKR_PIN_LOCKED):
                    # Never retried: SoftHSM never locks a PIN, so a retry
                    # loop would be an unlimited guessing oracle.
                    self._login_refused = True
                    raise TokenLoginError(
                        f"token {self.name}: login refused ({_p11.rv_name(e.rv)}); "
                        "check the PIN file or environment variable"
                    ) from None
                raise
            for _ in range(self.config.sessions - 1):
                self._sessions.append(self._token.open(rw=True))
            if list_keys:  # after a reconnect handles may have changed: re-list now
                with self._locks.searches.shared():
                    self._load_keys(first)
        except (pkcs11.PKCS11Error, _p11.P11Error) as e:
            self.healthy = False
            self._last_error = f"{type(e).__name__} {e}".strip()
            raise Unavailable(f"token {self.name} is unusable: {self._last_error}") from None
        self._generation += 1
        for s in self._sessions:
            self._pool.put((self._generation, s))
        self._connected = True
        self.healthy = True

    def _drop_sessions(self) -> None:
        for s in self._sessions:
            try:
                s.close()
            except (pkcs11.PKCS11Error, _p11.P11Error):
                pass  # the session is already gone; that is why we are here
        self.forget_sessions()

    @property
    def connected(self) -> bool:
        return self._connected

    def forget_sessions(self) -> None:
        """Discard sessions without closing them (the module is being finalised,
        or they were just closed)."""
        self._connected = False
        self._sessions = []
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                break

    def reconnect(self, seen_generation: int | None = None) -> None:
        """Re-open sessions and log in again, unless another thread just did.

        While the token stays unusable, attempts are spaced by
        _RETRY_EVERY so that callers fail fast instead of piling up."""
        with self._lock:
            if self._closed:
                raise Unavailable(f"token {self.name} is closed: signerd is stopping")
            if (
                seen_generation is not None
                and seen_generation != self._generation
                and self._connected
            ):
                return
            now = time.monotonic()
            if not self._connected and now < self._next_attempt:
                raise Unavailable(f"token {self.name} is unusable: {self._last_error}")
            self._next_attempt = now + _RETRY_EVERY
            log.warning(
                "token session or login lost; reconnecting", extra={"fields": {"token": self.name}}
            )
            self._connected = False
            self._drop_sessions()
            try:
                self._connect()
            except Unavailable:
                if self._login_refused or not MODULES.reinitialize(self.config.module):
                    raise
                self._connect()

    def close(self) -> None:
        if self._lister is not None:
            self._lister.join()  # its session must not close under it
        with self._lock:
            # From here on, nothing logs in again: a late health probe or
            # request would otherwise reconnect a token that is being closed.
            self._closed = True
        # Nor may a session in use: closing it, or finalising the module, under
        # a thread still inside C_Sign is undefined behaviour in the module.
        with self._idle:
            if not self._idle.wait_for(lambda: not self._borrowed, _CLOSE_WAIT):
                log.warning("closing a token with sessions still in use",
                            extra={"fields": {"token": self.name, "in_use": self._borrowed}})
        with self._lock:
            # The login belongs to the token, not to this object: another Token
            # of this process on the same token would be logged out with it.
            if self._sessions and not MODULES.shares_login(self):
                self.module.logout(self._sessions[0].handle)
            self._drop_sessions()
            self.healthy = False
            if self._lib is not None:
                MODULES.release(self.config.module, self)
                self._lib = None

    @contextmanager
    def session(self) -> Iterator[tuple[int, Any]]:
        """Borrow a pooled session: (generation, python-pkcs11 session)."""
        if not self._connected:
            self.reconnect()
        try:
            gen, s = self._pool.get(timeout=_POOL_WAIT)
        except queue.Empty:
            raise Unavailable(
                f"token {self.name}: no session free after {_POOL_WAIT:.0f}s"
            ) from None
        with self._idle:
            self._borrowed += 1
        try:
            yield gen, s
        finally:
            if gen == self._generation:
                self._pool.put((gen, s))
            with self._idle:
                self._borrowed -= 1
                if not self._borrowed:
                    self._idle.notify_all()

    def _with_retry(self, what: str, fn: Any,
                    guard: Callable[[], AbstractContextManager[None]]) -> Any:
        """Run fn(session) inside ``guard()`` (one of _ObjectLocks'), once, and
        once more after a reconnect if the session, login or device was lost."""
        for attempt in (0, 1):
            rv: int | None
            with self.session() as (gen, s), guard():
                try:
                    return fn(s)
                except _p11.P11Error as e:
                    rv = e.rv
                except pkcs11.PKCS11Error as e:
                    rv = _pkcs11_rv(e)
                    if rv is None:
                        raise Unavailable(
                            f"token {self.name}: {what} failed: {type(e).__name__}"
                        ) from None
            if rv in _p11.DATA_INVALID:
                raise InvalidArgument(f"token {self.name} rejected the data: {_p11.rv_name(rv)}")
            if rv in _p11.NOT_SUPPORTED:  # the token is fine; it cannot do this
                raise FailedPrecondition(
                    f"token {self.name} cannot do this {what}: {_p11.rv_name(rv)}"
                )
            lost = rv in _p11.SESSION_LOST | _p11.DEVICE_LOST | _p11.HANDLE_LOST
            if not lost or attempt == 1:
                self.healthy = False
                raise Unavailable(f"token {self.name}: {what} failed: {_p11.rv_name(rv)}")
            try:
                self.reconnect(gen)
            except SignerdError:
                self.healthy = False
                raise
        raise AssertionError("unreachable")

    def check(self) -> bool:
        """Health probe: a pooled session is open and logged in. Reconnects
        when it is not; a refused PIN is never retried."""
        try:
            with self.session() as (gen, s):
                logged_in = self.module.logged_in(s.handle)
            if not logged_in:
                self.reconnect(gen)
            self.healthy = True
        except _p11.P11Error:
            try:
                self.reconnect()
            except SignerdError:
                self.healthy = False
        except SignerdError:
            self.healthy = False
        return self.healthy

    # -- keys ---------------------------------------------------------------

    # DER SubjectPublicKeyInfo up to the key bits, per curve: listing builds
    # SPKIs by concatenation rather than parsing each point with
    # ``cryptography`` (0.3 s for 10,000 keys). Nothing is trusted blindly:
    # the SPKI must still hash to the key ID stored in CKA_ID, which was
    # computed from a parsed key when the key was generated.
    _SPKI_PREFIX = {
        ("secp256r1", 65): bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200"),
        ("secp384r1", 97): bytes.fromhex("3076301006072a8648ce3d020106052b81040022036200"),
        (None, 32): bytes.fromhex("302a300506032b6570032100"),  # ed25519
    }

    def _load_keys(self, s: Any) -> None:
        self._keys = self._read_keys(s)

    def _read_keys(self, s: Any, only: KeyID | None = None) -> dict[KeyID, KeyEntry]:
        """Read every signerd key on the token: one pass over the private keys
        (handles and metadata) and one over the public keys (key material).

        Through the ctypes calls of :mod:`signerd._p11`, with one
        C_GetAttributeValue per object: with SoftHSM's file store each call
        costs about 70 µs whatever it reads (it re-checks the object's file),
        and python-pkcs11's ``get_objects`` makes several calls per object. On
        a 10,000-key token this pass went from 8.9 s to about 3 s."""
        m, h = self.module, s.handle
        if not m.logged_in(h):
            # Logged out behind our back, the search would find no private
            # key and the daemon would forget every key: log in again first.
            raise _p11.P11Error("C_GetSessionInfo", _p11.CKR_USER_NOT_LOGGED_IN)
        privates: dict[bytes, tuple[int, dict[str, Any]]] = {}
        by_id = {_p11.CKA_ID: bytes.fromhex(only)} if only else {}
        read = m.attribute_reader({_p11.CKA_ID: 32, _p11.CKA_LABEL: 128}).read
        for handle in m.find_objects(
            h, {_p11.CKA_CLASS: _p11.ulong(_p11.CKO_PRIVATE_KEY), **by_id}
        ):
            attrs = read(h, handle)
            cka_id, label = attrs[_p11.CKA_ID], attrs[_p11.CKA_LABEL]
            meta = _parse_label(label.decode("utf-8", "replace")) if label else None
            if cka_id is not None and meta is not None:
                privates[cka_id] = (handle, meta)
        keys: dict[KeyID, KeyEntry] = {}
        # Ask every public key for EC and RSA material at once: the attributes
        # a key does not have come back as None, and a second call would cost
        # more than the unused attributes.
        read = m.attribute_reader({_p11.CKA_ID: 32, _p11.CKA_EC_POINT: 128,
                                   _p11.CKA_MODULUS: 512, _p11.CKA_PUBLIC_EXPONENT: 8}).read
        for handle in m.find_objects(
            h, {_p11.CKA_CLASS: _p11.ulong(_p11.CKO_PUBLIC_KEY), **by_id}
        ):
            pub = read(h, handle)
            found = privates.get(pub[_p11.CKA_ID] or b"")
            if found is None:
                continue
            private, meta = found
            alg = ALGORITHMS[meta["alg"]]
            kid = spki = None
            try:
                point = _octets(pub[_p11.CKA_EC_POINT] or b"")
                prefix = self._SPKI_PREFIX.get((alg.curve, len(point)))
                spki = prefix + point if prefix else _spki(alg, pub)  # keyed as Attribute is
                public = point if alg.keytype == "ed25519" else spki
                kid = key_id(alg.keytype, public)
            except (TypeError, ValueError):
                pass  # missing or malformed key material: not a key we can serve
            if spki is None or kid is None or bytes.fromhex(kid) != pub[_p11.CKA_ID]:
                log.warning(
                    "skipping key whose CKA_ID is not its key ID",
                    extra={"fields": {"token": self.name, "gun": meta.get("gun"),
                                      "role": meta.get("role")}},
                )
                continue
            keys[kid] = KeyEntry(
                kid,
                alg,
                str(meta["gun"]),
                str(meta["role"]),
                self.name,
                spki,
                bool(meta.get("used")),
                private,
            )
        return keys

    def keys(self) -> list[KeyEntry]:
        """Every key on the token (waits for the first listing to finish)."""
        self._listed.wait()
        return list(self._keys.values())

    def get(self, kid: KeyID) -> KeyEntry | None:
        return self._keys.get(kid)

    def generate(self, alg: Algorithm, gun: str, role: str) -> KeyEntry:
        """Generate a key pair on the token. The private key is a sensitive,
        non-extractable token object that can only sign."""
        label = _label(alg, gun, role, used=False)
        pub_tpl: dict[Any, Any] = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: False,
            Attribute.WRAP: False,
            Attribute.DERIVE: False,
            Attribute.LABEL: label,
        }
        priv_tpl: dict[Any, Any] = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
            Attribute.LABEL: label,
        }
        if alg.keytype == "rsa":
            key_type, bits, mech = KeyType.RSA, alg.bits, Mechanism.RSA_PKCS_KEY_PAIR_GEN
            pub_tpl[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
            pub_tpl[Attribute.MODULUS_BITS] = alg.bits
        elif alg.keytype == "ed25519":
            key_type, bits, mech = KeyType.EC_EDWARDS, None, Mechanism.EC_EDWARDS_KEY_PAIR_GEN
            pub_tpl[Attribute.EC_PARAMS] = _CURVE_OIDS["ed25519"]
        else:
            assert alg.curve is not None
            key_type, bits, mech = KeyType.EC, None, Mechanism.EC_KEY_PAIR_GEN
            pub_tpl[Attribute.EC_PARAMS] = _CURVE_OIDS[alg.curve]

        def gen(s: Any) -> KeyEntry:
            self._sync_index(s)
            pub, priv = s.generate_keypair(
                key_type,
                bits,
                store=True,
                mechanism=mech,
                capabilities=0,
                public_template=pub_tpl,
                private_template=priv_tpl,
            )
            try:
                spki = _spki(alg, pub)
                kid = key_id(alg.keytype, tuf_public_bytes(alg.keytype, spki))
                # The key ID depends on the public key, so it is set after generation.
                pub[Attribute.ID] = bytes.fromhex(kid)
                priv[Attribute.ID] = bytes.fromhex(kid)
            except BaseException:
                priv.destroy()
                pub.destroy()
                raise
            return KeyEntry(kid, alg, gun, role, self.name, spki, False, priv.handle)

        entry: KeyEntry = self._with_retry("key generation", gen, self._locks.searches.exclusive)
        with self._lock:
            self._keys[entry.key_id] = entry
        log.info(
            "key created",
            extra={
                "fields": {
                    "token": self.name,
                    "key_id": entry.key_id,
                    "algorithm": alg.name,
                    "gun": gun,
                    "role": role,
                }
            },
        )
        return entry

    @staticmethod
    def _sync_index(s: Any) -> None:
        """Let the module notice objects other processes made, before we write.

        SoftHSM's file store re-reads its directory only when the token's
        generation counter changed under it, and its own writes bump that
        counter past other processes' writes without re-reading. A search
        (which matches nothing) before each write keeps a second daemon's
        keys visible to this one. Other modules just answer the search.
        """
        list(s.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: "signerd-sync"}))

    def _objects(self, s: Any, kid: KeyID) -> list[Any]:
        return list(s.get_objects({Attribute.ID: bytes.fromhex(kid)}))

    def delete(self, kid: KeyID) -> None:
        if kid not in self._keys:
            raise NotFound(f"no key {kid} on token {self.name}")

        def destroy(s: Any) -> None:
            for obj in self._objects(s, kid):
                obj.destroy()

        self._with_retry("key deletion", destroy, self._locks.searches.shared)
        with self._lock:
            self._keys.pop(kid, None)

    @contextmanager
    def _relabelling(self) -> Iterator[None]:
        """A relabel searches for the key's objects, then rewrites them."""
        with self._locks.searches.shared(), self._locks.signing.exclusive():
            yield

    def mark_used(self, kid: KeyID) -> None:
        """Record on the token that the key has signed (Notary's reuse rule)."""
        entry = self._keys.get(kid)
        if entry is None or entry.used:
            return
        label = _label(entry.algorithm, entry.gun, entry.role, used=True)

        def relabel(s: Any) -> None:
            for obj in self._objects(s, kid):
                obj[Attribute.LABEL] = label

        self._with_retry("key relabel", relabel, self._relabelling)
        with self._lock:
            self._keys[kid] = replace(entry, used=True)

    def lookup(self, kid: KeyID) -> KeyEntry | None:
        """Find one key this process has not seen (made by another daemon or
        worker) with a search by its CKA_ID. Misses are searched one at a
        time per token, so unknown IDs cannot pile up token scans; signing
        with known keys never waits for them."""
        with self._miss_lock:
            entry = self._keys.get(kid)
            if entry is not None:
                return entry

            def find(s: Any) -> dict[KeyID, KeyEntry]:
                return self._read_keys(s, kid)

            found: dict[KeyID, KeyEntry] = self._with_retry("key lookup", find,
                                                            self._locks.searches.shared)
            entry = found.get(kid)
            if entry is not None:
                with self._lock:
                    self._keys[kid] = entry
            return entry

    def refresh(self) -> None:
        """Re-read the keys from the token (keys made by another daemon)."""

        def load(s: Any) -> None:
            self._load_keys(s)

        with self._lock:
            self._with_retry("key listing", load, self._locks.searches.shared)

    def sign(self, kid: KeyID, mechanism: _p11.Mechanism, data: bytes, max_len: int) -> bytes:
        """Sign ``data`` with the cached handle of key ``kid`` on a pooled session."""
        if kid not in self._keys and self.lookup(kid) is None:
            raise NotFound(f"no key {kid} on token {self.name}")

        def sign(s: Any) -> bytes:
            entry = self._keys.get(kid)
            if entry is None:
                raise NotFound(f"key {kid} is no longer on token {self.name}")
            return self.module.sign(s.handle, entry.handle, mechanism, data, max_len)

        result: bytes = self._with_retry("signing", sign, self._locks.signing.shared)
        return result


def _pkcs11_rv(e: Exception) -> int | None:
    """The CK_RV behind a python-pkcs11 exception, for the ones we act on."""
    names = {
        "SessionHandleInvalid": 0xB3,
        "SessionClosed": 0xB0,
        "UserNotLoggedIn": 0x101,
        "DeviceRemoved": 0x32,
        "DeviceError": 0x30,
        "TokenNotPresent": 0xE0,
        "ObjectHandleInvalid": 0x82,
        "KeyHandleInvalid": 0x60,
        "DeviceMemory": 0x31,
        "TokenNotRecognised": 0xE1,
    }
    return names.get(type(e).__name__)
