"""The keys of one token: the in-process key index, and every operation on
a key by its ID (lookup, listing, generation, deletion, "has signed" marks,
signing), on top of :mod:`signerd.token._layout`.

There is no other database: the index is filled from the token (in the
background at start, and on :meth:`KeyStore.refresh`), and a key another
process made is found by its ID (:meth:`KeyStore.lookup`), so a restarted
daemon, or a second daemon on the same token, sees the same keys.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from pkcs11 import Attribute, ObjectClass

from signerd.errors import FailedPrecondition, NotFound, SignerdError, Unavailable
from signerd.keys import METADATA, Algorithm, KeyID
from signerd.token import _keygen, _layout, _p11, _purpose
from signerd.token._health import Health
from signerd.token._listing import KeyEntry, read_keys
from signerd.token._slot import Slot

log = logging.getLogger("signerd.token")


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

    def _read(self, s: Any, only: KeyID | None = None) -> dict[KeyID, KeyEntry]:
        return read_keys(self._slot.module, self._slot.profile, self.name, s,
                         self._health.answers, only)

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
        is unusable: a key on a token that is away is not "not found"."""
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
        Unavailable."""
        self.check_algorithm(alg)
        slot = self._slot

        def gen(s: Any) -> KeyEntry | None:
            return _keygen.generate_pair(slot.module, slot.profile, self.name, s, alg, gun, role,
                                         purpose)

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

        def write(s: Any) -> None:
            self.sync_index(s)
            _purpose.write(s, self._slot.profile.private_data, entry.key_id, purpose)

        # A new object: no search may read it half-written (see _ObjectLocks).
        self._health.run("setting a key's purpose", write, self._slot.locks.searches.exclusive)
        with self._lock:
            entry = replace(self._keys.get(kid, entry), purpose=purpose)
            self._keys[kid] = entry
        return entry

    @staticmethod
    def sync_index(s: Any) -> None:
        """Let the module notice objects other processes made, before we write.

        SoftHSM's file store re-reads its directory only when the token's
        generation counter changed under it, and its own writes bump that
        counter past other processes' writes without re-reading. A search
        (which matches nothing) before each write keeps a second daemon's
        keys visible to this one. Other modules just answer the search.
        """
        list(s.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: "signerd-sync"}))

    @staticmethod
    def _objects(s: Any, entry: KeyEntry) -> list[Any]:
        """Every object of a key: the pair, its metadata and "has signed" objects."""
        found = list(s.get_objects({Attribute.ID: entry.object_id}))
        if entry.layout == 2:
            for label in (_layout.meta_label(entry.key_id), _layout.used_label(entry.key_id),
                          _layout.purpose_label(entry.key_id)):
                found += list(s.get_objects({Attribute.CLASS: ObjectClass.DATA,
                                             Attribute.LABEL: label.decode()}))
        return found

    def delete(self, kid: KeyID) -> None:
        """Destroy every object of key ``kid``. Raises NotFound (not in the
        index), Unavailable."""
        entry = self._keys.get(kid)
        if entry is None:
            raise NotFound(f"no key {kid} on token {self.name}")

        def destroy(s: Any) -> None:
            for obj in self._objects(s, entry):
                obj.destroy()

        self._health.run("key deletion", destroy, self._slot.locks.searches.shared)
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
        a new "has signed" object in layout 2, a rewritten label in layout 1.
        Once: a key whose indexed entry says used costs a dict lookup; threads
        signing a new key together write one object, and a "has signed"
        object another process wrote is not written again."""
        entry = self._keys.get(kid)
        if entry is None or entry.used:
            return
        with self._mark_lock:
            entry = self._keys.get(kid)
            if entry is None or entry.used:
                return
            self._write_used(entry)
            with self._lock:
                self._keys[kid] = replace(entry, used=True)

    def _write_used(self, entry: KeyEntry) -> None:
        kid = entry.key_id
        if entry.layout == 1:
            label = _layout.v1_label(entry.algorithm, entry.gun, entry.role, used=True)

            def relabel(s: Any) -> None:
                for obj in self._objects(s, entry):
                    obj[Attribute.LABEL] = label.decode()

            self._health.run("key relabel", relabel, self._relabelling)
        else:
            def record(s: Any) -> None:
                self.sync_index(s)
                if list(s.get_objects({Attribute.CLASS: ObjectClass.DATA,
                                       Attribute.LABEL: _layout.used_label(kid).decode()})):
                    return  # another process recorded it
                s.create_object({
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: self._slot.profile.private_data,
                    Attribute.LABEL: _layout.used_label(kid).decode(),
                    Attribute.APPLICATION: _layout.APPLICATION.decode(),
                    Attribute.VALUE: b"1",
                })

            # A new object: no search may read it half-written (see _ObjectLocks).
            self._health.run("recording a key's first signature", record,
                             self._slot.locks.searches.exclusive)

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
