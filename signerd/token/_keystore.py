"""The keys of one token: the in-process key index, and every operation on
a key by its ID (lookup, listing, generation, deletion, "has signed" marks,
signing), on top of :mod:`signerd.token._layout`.

There is no other database: the index is filled from the token (in the
background at start, and on :meth:`KeyStore.refresh`), and a key another
process made is found by its ID (:meth:`KeyStore.lookup`), so a restarted
daemon, or a second daemon on the same token, sees the same keys.

No hot path searches the token (a search on SoftHSM's file store passes
over every object, about 19 µs each): signing uses the indexed handle; a
lookup right after start waits for the first listing instead of racing it,
and searches only for an ID the listing did not hold; key generation
draws an ID no other key will draw (:attr:`Profile.id_bytes`); marking a
key used and deleting it use the indexed handles of its objects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pkcs11
from pkcs11 import Attribute, ObjectClass

from signerd.errors import FailedPrecondition, NotFound, SignerdError, Unavailable
from signerd.keys import ALGORITHMS, METADATA, Algorithm, KeyID
from signerd.token import _keygen, _layout, _p11, _purpose, _sweep
from signerd.token._health import Health
from signerd.token._listing import KeyEntry, read_keys
from signerd.token._slot import Slot
from signerd.token._softhsm import GenerationWatch, token_directory
from signerd.token.profiles import ED25519_NAME

log = logging.getLogger("signerd.token")

LISTING_WAIT = 60.0  # seconds a lookup waits for the first listing before searching itself


class KeyStore:
    """One token's key index and key operations.

    ``lock`` (shared with :class:`Health`, whose reconnects re-list the
    keys) is taken by every writer of the index; readers take nothing. Every
    operation on the token runs through :meth:`Health.run`, under the
    token's :class:`_ObjectLocks`.
    """

    def __init__(self, slot: Slot, health: Health, lock: threading.RLock) -> None:
        self.name = slot.name
        self._slot = slot
        self._health = health
        self._lock = lock
        self._keys: dict[KeyID, KeyEntry] = {}
        self._miss_lock = threading.Lock()
        self._mark_lock = threading.Lock()  # one "has signed" write at a time
        self._made: dict[KeyID, float] = {}  # keys generated here -> when (monotonic s)
        self._gone: dict[KeyID, float] = {}  # keys deleted here -> when (monotonic s)
        self._listed = threading.Event()
        self._lister: threading.Thread | None = None
        self._ed25519: bytes | None = None  # the CKA_EC_PARAMS that worked, once known
        self._watch: GenerationWatch | None = None
        self._watched = False

    # -- the index -----------------------------------------------------------

    def start_listing(self) -> None:
        """Run the first listing in the background, so the daemon serves at
        once even with many keys: a key not listed yet is found by its ID
        (:meth:`lookup`), and only listings wait for it."""
        self._lister = threading.Thread(target=self._first_listing, name=f"list-{self.name}",
                                        daemon=True)
        self._lister.start()

    def join_listing(self) -> None:
        """Wait for the first listing, if started (its session must not close under it)."""
        if self._lister is not None:
            self._lister.join()

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

    # -- the sweep (objects that belong to no key) -----------------------------

    def junk(self) -> list[_sweep.Junk]:
        """Objects on the token that belong to no key (:mod:`signerd.token._sweep`).
        Raises Unavailable."""
        slot = self._slot
        watch = self._generation()

        def look(s: Any) -> list[_sweep.Junk]:
            return _sweep.find_junk(slot.module, slot.profile, self.name, s,
                                    self._health.answers,
                                    watch.empty_object_files if watch is not None else list)

        found: list[_sweep.Junk] = self._health.run("sweep", look,
                                                    slot.locks.searches.shared)
        return found

    def sweep(self, remove: bool = False, grace: float = 2.0) -> tuple[list[_sweep.Junk], int]:
        """(objects that belong to no key, how many were removed). With
        ``remove``, a second look ``grace`` seconds later removes only what
        was junk both times (a key generation under way elsewhere is not).
        Raises Unavailable."""
        found = self.junk()
        if not remove or not found:
            return found, 0
        _sweep.pause(grace)
        doomed = _sweep.still_junk(found, self.junk())

        def destroy(s: Any) -> int:
            self.before_write(s)
            try:
                return _sweep.remove(self._slot.module, s, doomed)
            finally:
                self.after_write()

        gone: int = self._health.run("sweep removal", destroy,
                                     self._slot.locks.searches.exclusive)
        log.warning("objects that belonged to no key removed", extra={"fields": {
            "token": self.name, "removed": gone}})
        return found, gone

    def report_junk(self) -> None:
        """The start-up sweep: log what belongs to no key (never removes)."""
        try:
            found = self.junk()
        except SignerdError as e:
            log.warning("start-up sweep failed", extra={"fields": {
                "token": self.name, "error": str(e)}})
            return
        if found:
            log.warning("objects on the token belong to no key; `signerd sweep --remove` "
                        "removes them", extra={"fields": {
                            "token": self.name, "count": len(found),
                            "objects": [str(j) for j in found[:20]]}})

    def _read(self, s: Any, only: KeyID | None = None) -> dict[KeyID, KeyEntry]:
        watch = self._generation()
        before = watch.moved() if watch is not None else None
        keys = read_keys(self._slot.module, self._slot.profile, self.name, s,
                         self._health.answers, only)
        if watch is not None and before is not None:
            watch.seen(before)  # the listing's searches re-indexed up to ``before``
        return keys

    def load(self, s: Any) -> None:
        """Replace the index with every key read through session ``s``
        (after a reconnect, under the reconnect's lock). Raises P11Error."""
        self._keys = self._read(s)

    def keys(self) -> list[KeyEntry]:
        """Every key on the token (waits for the first listing to finish)."""
        self._listed.wait()
        return list(self._keys.values())

    def get(self, kid: KeyID) -> KeyEntry | None:
        """The indexed key ``kid``, or None (no search on the token)."""
        return self._keys.get(kid)

    def known_keys(self) -> list[KeyEntry]:
        """The keys listed so far (does not wait for the first listing)."""
        return list(self._keys.values())

    @property
    def count(self) -> int:
        """Keys in the index now."""
        return len(self._keys)

    def lookup(self, kid: KeyID) -> KeyEntry | None:
        """Find one key this process has not seen (made by another daemon or
        worker) with a search by its ID. Misses are searched one at a time
        per token, so unknown IDs cannot pile up token scans; signing with
        known keys never waits for them. Raises Unavailable while the token
        is unusable: a key on a token that is away is not "not found".

        Right after start this waits for the first listing (which reads
        every key anyway) rather than searching beside it."""
        if not self._listed.is_set() and self._lister is not None:
            self._listed.wait(LISTING_WAIT)
        with self._miss_lock:
            entry = self._keys.get(kid)
            if entry is not None:
                return entry

            def find(s: Any) -> dict[KeyID, KeyEntry]:
                return self._read(s, kid)

            found: dict[KeyID, KeyEntry] = self._health.run("key lookup", find,
                                                            self._slot.locks.searches.shared)
            entry = found.get(kid)
            if entry is not None:
                with self._lock:
                    self._keys[kid] = entry
            return entry

    def known(self, kid: KeyID) -> KeyEntry:
        """Key ``kid``, from the index or the token. Raises NotFound, Unavailable."""
        entry = self._keys.get(kid) or self.lookup(kid)
        if entry is None:
            raise NotFound(f"no key {kid} on token {self.name}")
        return entry

    def refresh(self) -> None:
        """Re-read the keys from the token (keys made by another daemon).

        The listing runs without the index lock, which is taken only to swap
        the new index in: a listing of a large token takes seconds, and a
        thread listing in a loop would otherwise starve every other writer of
        the index (a key generation waiting to record its key hung a test).
        Keys this object made since the listing began are kept, and keys it
        deleted meanwhile stay deleted."""
        start = time.monotonic()

        def load(s: Any) -> dict[KeyID, KeyEntry]:
            return self._read(s)

        keys: dict[KeyID, KeyEntry] = self._health.run("key listing", load,
                                                       self._slot.locks.searches.shared)
        with self._lock:
            for kid, made in list(self._made.items()):
                if made < start:
                    del self._made[kid]
                elif kid in self._keys:
                    keys.setdefault(kid, self._keys[kid])
            for kid, gone in list(self._gone.items()):
                if gone >= start:
                    keys.pop(kid, None)  # deleted here while the listing ran
                else:
                    del self._gone[kid]
            for kid, entry in keys.items():  # marked used here while the listing ran
                cached = self._keys.get(kid)
                if cached is not None and cached.used and not entry.used:
                    keys[kid] = replace(entry, used=True)
            self._keys = keys

    # -- operations on keys --------------------------------------------------

    def check_algorithm(self, alg: Algorithm) -> None:
        """Raise FailedPrecondition unless the token can create ``alg`` keys."""
        if alg.name not in self._slot.algorithms:
            can = ", ".join(self._slot.algorithms) or "no algorithm signerd uses"
            raise FailedPrecondition(
                f"token {self.name} cannot create {alg.name} keys; it supports {can}"
            )

    def generate(self, alg: Algorithm, gun: str, role: str, purpose: str = METADATA) -> KeyEntry:
        """Generate a key pair on the token, in layout 2, with its metadata
        object (:func:`signerd.token._keygen.generate_pair`), which records
        ``purpose``.

        Raises FailedPrecondition (an algorithm the token cannot do),
        ResourceExhausted (the token is full), Unavailable."""
        self.check_algorithm(alg)
        slot = self._slot

        def gen(s: Any) -> KeyEntry | None:
            self.before_write(s)
            try:
                if alg.keytype == "ed25519":
                    return self._generate_ed25519(s, gun, role, purpose)
                return _keygen.generate_pair(slot.module, slot.profile, self.name, s, alg,
                                             gun, role, b"", purpose)
            finally:
                self.after_write()

        entry: KeyEntry | None = None
        for _ in range(_keygen.ID_ATTEMPTS):
            entry = self._health.run("key generation", gen, slot.locks.searches.exclusive)
            if entry is not None:
                break
        if entry is None:
            raise Unavailable(f"token {self.name}: key generation kept colliding on CKA_ID")
        with self._lock:
            self._keys[entry.key_id] = entry
            self._made[entry.key_id] = time.monotonic()
        log.info("key created", extra={"fields": {
            "token": self.name, "key_id": entry.key_id, "algorithm": alg.name,
            "gun": gun, "role": role, "purpose": purpose}})
        return entry

    def set_purpose(self, kid: KeyID, purpose: str) -> KeyEntry:
        """Record a new purpose for key ``kid`` (:mod:`signerd.token._purpose`)
        and return its entry. Raises NotFound, Unavailable."""
        entry = self.known(kid)

        def write(s: Any) -> tuple[int, set[int]]:
            self.before_write(s)
            try:
                return _purpose.write(s, self._slot.profile.private_data, entry.key_id, purpose)
            finally:
                self.after_write()

        # A new object: no search may read it half-written (see _ObjectLocks).
        made, gone = self._health.run("setting a key's purpose", write,
                                      self._slot.locks.searches.exclusive)
        with self._lock:
            entry = self._keys.get(kid, entry)
            # The purpose object is the key's: deleted (and superseded when the key
            # is marked used) by handle, like its other objects.
            marks = tuple(h for h in entry.marks if h not in gone) + (made,)
            entry = replace(entry, purpose=purpose, marks=marks)
            self._keys[kid] = entry
        return entry

    def _generate_ed25519(self, s: Any, gun: str, role: str, purpose: str) -> KeyEntry | None:
        """An Ed25519 key pair: CKA_EC_PARAMS may name the curve by its OID
        or as the PrintableString "edwards25519" (PKCS#11 v3.0 §2.3.10), and
        modules take one or the other (yubihsm_pkcs11 only the name). The
        profile's form is tried first, then the other once; if neither
        works, the token stops offering ed25519. Raises FailedPrecondition."""
        slot, alg = self._slot, ALGORITHMS["ed25519"]
        forms = [self._ed25519 or slot.profile.ed25519_params]
        forms += [f for f in (_layout.CURVE_OIDS["ed25519"], ED25519_NAME) if f not in forms]
        if self._ed25519 is not None:
            forms = forms[:1]
        failure: Exception | None = None
        for params in forms:
            try:
                entry = _keygen.generate_pair(slot.module, slot.profile, self.name, s, alg,
                                              gun, role, params, purpose)
            except (pkcs11.PKCS11Error, _p11.P11Error) as e:
                rv = _p11.failure_rv(e)
                if rv in _p11.SESSION_LOST | _p11.DEVICE_LOST | _p11.HANDLE_LOST:
                    raise
                failure = e
                continue
            self._ed25519 = params
            return entry
        if self._ed25519 is None:  # neither form: the token cannot make Ed25519 keys
            slot.algorithms = tuple(a for a in slot.algorithms if a != "ed25519")
            log.warning("token lists Ed25519 mechanisms but makes no Ed25519 key", extra={
                "fields": {"token": self.name, "error": _p11.failure_name(failure or
                                                                          Exception())}})
            raise FailedPrecondition(
                f"token {self.name} cannot create ed25519 keys "
                f"({_p11.failure_name(failure or Exception())}); it supports "
                f"{', '.join(slot.algorithms) or 'no algorithm signerd uses'}")
        assert failure is not None
        raise failure

    # -- writes: what other processes wrote must stay visible --------------------

    def _generation(self) -> GenerationWatch | None:
        """The SoftHSM generation counter of this token, when its profile
        keeps one and its directory is found (:mod:`signerd.token._softhsm`)."""
        if not self._watched and self._slot.info is not None:
            self._watched = True
            if self._slot.profile.generation_file:
                where = token_directory(self._slot.info.serial)
                self._watch = GenerationWatch(where) if where is not None else None
        return self._watch

    @staticmethod
    def _sync(s: Any) -> None:
        # A search that matches nothing: SoftHSM re-reads its directory in it.
        list(s.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: "signerd-sync"}))

    def before_write(self, s: Any) -> None:
        """Let the module notice objects other processes made, before we
        write: on SoftHSM's file store a write by this process would
        otherwise hide them from it (:mod:`signerd.token._softhsm`). Costs a
        search only when another process wrote since this one last looked
        (SoftHSM, when its generation file is found; else every time), or
        on a short-ID token (a YubiHSM lists at most 256 objects)."""
        profile = self._slot.profile
        if profile.generation_file:
            watch = self._generation()
            moved = watch.moved() if watch is not None else b""
            if moved is not None:
                self._sync(s)
                if watch is not None:
                    watch.seen(moved)
        elif profile.id_bytes <= 2:
            self._sync(s)

    def after_write(self) -> None:
        """Record the SoftHSM generation this process's own write left."""
        watch = self._generation() if self._slot.profile.generation_file else None
        if watch is not None:
            watch.seen()

    def _destroy(self, s: Any, handle: int) -> None:
        """Destroy one object by handle; one already gone (another process
        deleted it) is no error. Raises P11Error."""
        try:
            self._slot.module.destroy(s.handle, handle)
        except _p11.P11Error as e:
            if e.rv not in _p11.HANDLE_LOST:
                raise

    @staticmethod
    def _objects(s: Any, entry: KeyEntry) -> list[Any]:
        """Every object of a layout 1 key (found by its CKA_ID, the key ID)."""
        return list(s.get_objects({Attribute.ID: entry.object_id}))

    def delete(self, kid: KeyID) -> None:
        """Destroy every object of key ``kid``: first its metadata, so that
        a crash afterwards leaves a key pair without metadata, which no
        listing takes for a key and the sweep removes; then the pair and
        its certificates. Raises NotFound (not in the index), Unavailable."""
        entry = self._keys.get(kid)
        if entry is None:
            raise NotFound(f"no key {kid} on token {self.name}")
        module = self._slot.module
        certificates = {_p11.CKA_CLASS: _p11.ulong(_p11.CKO_CERTIFICATE),
                        _p11.CKA_ID: entry.object_id}

        def destroy(s: Any) -> None:
            self.before_write(s)
            try:
                if entry.layout == 1:
                    for obj in self._objects(s, entry):
                        obj.destroy()
                    return
                for handle in (entry.meta_handle, *entry.marks, entry.handle,
                               entry.public_handle):
                    if handle:
                        self._destroy(s, handle)
                for handle in module.find_objects(s.handle, certificates):
                    self._destroy(s, handle)
            finally:
                self.after_write()

        self._health.run("key deletion", destroy, self._slot.locks.searches.exclusive)
        with self._lock:
            self._keys.pop(kid, None)
            self._made.pop(kid, None)
            self._gone[kid] = time.monotonic()

    @contextmanager
    def _relabelling(self) -> Iterator[None]:
        """A relabel searches for the key's objects, then rewrites them."""
        locks = self._slot.locks
        with locks.searches.shared(), locks.signing.exclusive():
            yield

    def mark_used(self, kid: KeyID) -> None:
        """Record on the token that the key has signed (Notary's reuse rule):
        its metadata rewritten with "used" in layout 2, a rewritten label in
        layout 1. Once: a key whose indexed entry says used costs a dict
        lookup; threads signing a new key together write one object.

        Raises ResourceExhausted (no room on the token for the new metadata
        object), Unavailable: the caller must then withhold the signature."""
        entry = self._keys.get(kid)
        if entry is None or entry.used:
            return
        with self._mark_lock:
            entry = self._keys.get(kid)
            if entry is None or entry.used:
                return
            marked = self._write_used(entry)
            with self._lock:
                self._keys[kid] = marked

    def _write_used(self, entry: KeyEntry) -> KeyEntry:
        if entry.layout == 1:
            label = _layout.v1_label(entry.algorithm, entry.gun, entry.role, used=True)

            def relabel(s: Any) -> None:
                for obj in self._objects(s, entry):
                    obj[Attribute.LABEL] = label.decode()

            self._health.run("key relabel", relabel, self._relabelling)
            return replace(entry, used=True)
        # The new metadata carries the key's purpose as it is now, so the purpose
        # objects (entry.marks) it supersedes go with the old metadata.
        meta = replace(entry.meta or _layout.KeyMeta(entry.algorithm, entry.gun, entry.role,
                                                     entry.key_id, entry.object_id),
                       used=True, purpose=entry.purpose)

        def record(s: Any) -> KeyEntry:
            self.before_write(s)
            try:
                try:  # the new metadata first: a crash leaves two, never none
                    made = s.create_object({
                        Attribute.CLASS: ObjectClass.DATA,
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: self._slot.profile.private_data,
                        Attribute.LABEL: _layout.meta_label(entry.key_id).decode(),
                        Attribute.APPLICATION: _layout.APPLICATION.decode(),
                        Attribute.VALUE: _layout.meta_value(meta),
                    })
                except (pkcs11.PKCS11Error, _p11.P11Error) as e:
                    error = _keygen.full(e, self.name, "recording that a key has signed")
                    if error is not None:
                        raise error from None
                    raise
                for handle in (entry.meta_handle, *entry.marks):
                    if handle:
                        self._destroy(s, handle)
            finally:
                self.after_write()
            return replace(entry, used=True, meta_handle=made.handle, marks=(), meta=meta)

        # A new object: no search may read it half-written (see _ObjectLocks).
        marked: KeyEntry = self._health.run("recording a key's first signature", record,
                                            self._slot.locks.searches.exclusive)
        return marked

    def sign(self, kid: KeyID, mechanism: _p11.Mechanism, data: bytes, max_len: int) -> bytes:
        """Sign ``data`` with the indexed handle of key ``kid`` on a pooled
        session; ``max_len`` is the signature buffer's size in bytes. Raises
        NotFound, InvalidArgument, FailedPrecondition, Unavailable (see
        :meth:`Health.run`)."""
        if kid not in self._keys and self.lookup(kid) is None:
            raise NotFound(f"no key {kid} on token {self.name}")
        module = self._slot.module

        def sign(s: Any) -> bytes:
            entry = self._keys.get(kid)
            if entry is None:
                raise NotFound(f"key {kid} is no longer on token {self.name}")
            return module.sign(s.handle, entry.handle, mechanism, data, max_len)

        result: bytes = self._health.run("signing", sign, self._slot.locks.signing.shared)
        return result
