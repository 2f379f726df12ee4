"""Writes to one token's keys: generation (Ed25519's parameter forms in
:mod:`signerd.token._ed25519`), a new purpose, deletion, the "has signed"
mark, and what every write does before and after so that objects other
processes made stay visible (SoftHSM's generation counter, :mod:`signerd.token._softhsm`).

The in-process key index is :class:`~signerd.token._keystore.KeyStore`'s:
a write changes the token first, then records what it did in the index
(:meth:`KeyStore.made`, :meth:`KeyStore.put`, :meth:`KeyStore.dropped`).
No write searches the token on a hot path: key generation draws an ID no
other key will draw (:attr:`Profile.id_bytes`); marking a key used and
deleting it use the indexed handles of its objects. A key's superseded
metadata is destroyed in the background (:mod:`signerd.token._retire`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pkcs11
from pkcs11 import Attribute, ObjectClass

from signerd.errors import FailedPrecondition, NotFound, Unavailable
from signerd.keys import METADATA, Algorithm, KeyID
from signerd.token import _keygen, _layout, _p11, _purpose
from signerd.token._ed25519 import Ed25519Forms
from signerd.token._health import Health
from signerd.token._listing import KeyEntry
from signerd.token._retire import Retirer
from signerd.token._slot import Slot
from signerd.token._softhsm import GenerationWatch, token_directory

if TYPE_CHECKING:  # annotations only: KeyStore makes its KeyWriter
    from signerd.token._keystore import KeyStore

log = logging.getLogger("signerd.token")


class KeyWriter:
    """The writes to one token's keys, recorded in ``index``.

    ``lock`` is the index's (shared with :class:`Health`): taken to read
    and update an indexed entry in one step. Every operation on the token
    runs through :meth:`Health.run`, under the token's :class:`_ObjectLocks`.
    """

    def __init__(self, slot: Slot, health: Health, index: KeyStore,
                 lock: threading.RLock) -> None:
        self.name = slot.name
        self._slot = slot
        self._health = health
        self._index = index
        self._lock = lock
        self._mark_lock = threading.Lock()  # one "has signed" write at a time
        self._ed25519 = Ed25519Forms()  # the CKA_EC_PARAMS form the token takes
        self._watch: GenerationWatch | None = None
        self._watched = False
        self.retirer = Retirer(self.name, self._retire, index.retired)

    # -- new keys and purposes -------------------------------------------------

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
                    return self._ed25519.generate(slot, s, gun, role, purpose,
                                                  self._health.answers)
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
        self._index.made(entry)
        self.retirer.wrote()
        log.info("key created", extra={"fields": {
            "token": self.name, "key_id": entry.key_id, "algorithm": alg.name,
            "gun": gun, "role": role, "purpose": purpose}})
        return entry

    def set_purpose(self, kid: KeyID, purpose: str) -> KeyEntry:
        """Record a new purpose for key ``kid`` (:mod:`signerd.token._purpose`)
        and return its entry. Raises NotFound, Unavailable."""
        entry = self._index.known(kid)

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
            indexed = self._index.get(kid)
            entry = indexed if indexed is not None else entry
            # The purpose object is the key's: deleted (and superseded when the key
            # is marked used) by handle, like its other objects.
            marks = tuple(h for h in entry.marks if h not in gone) + (made,)
            entry = replace(entry, purpose=purpose, marks=marks)
            self._index.put(kid, entry)
        return entry

    # -- what other processes wrote must stay visible --------------------------

    def generation(self) -> GenerationWatch | None:
        """The SoftHSM generation counter of this token, when its profile
        keeps one and its directory is found (:mod:`signerd.token._softhsm`);
        looked for once, at the first call after the first connection."""
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
            watch = self.generation()
            moved = watch.moved() if watch is not None else b""
            if moved is not None:
                self._sync(s)
                if watch is not None:
                    watch.seen(moved)
        elif profile.id_bytes <= 2:
            self._sync(s)

    def after_write(self) -> None:
        """Record the SoftHSM generation this process's own write left."""
        watch = self.generation() if self._slot.profile.generation_file else None
        if watch is not None:
            watch.seen()

    # -- deletion ----------------------------------------------------------------

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
        entry = self._index.get(kid)
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
        self._index.dropped(kid)

    # -- the "has signed" mark ---------------------------------------------------

    @contextmanager
    def _relabelling(self) -> Iterator[None]:
        """A relabel searches for the key's objects, then rewrites them."""
        locks = self._slot.locks
        with locks.searches.shared(), locks.signing.exclusive():
            yield

    def mark_used(self, kid: KeyID) -> None:
        """Record on the token that the key has signed (Notary's reuse rule):
        a new metadata object with "used" in layout 2 (the old one destroyed
        in the background: :mod:`signerd.token._retire`), a rewritten label
        in layout 1. Once: a key whose indexed entry says used costs a dict
        lookup; threads signing a new key together write one object.

        Raises ResourceExhausted (no room on the token for the new metadata
        object), Unavailable: the caller must then withhold the signature."""
        entry = self._index.get(kid)
        if entry is None or entry.used:
            return
        with self._mark_lock:
            entry = self._index.get(kid)
            if entry is None or entry.used:
                return
            self._index.put(kid, self._write_used(entry))

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
            finally:
                self.after_write()
            # The old metadata (and what it superseded) stays the key's until the
            # background destroys it: on SoftHSM a destroy costs time in proportion
            # to the token's objects (signerd.token._retire).
            old = tuple(h for h in (entry.meta_handle, *entry.marks) if h)
            return replace(entry, used=True, meta_handle=made.handle, marks=old, meta=meta)

        # A new object: no search may read it half-written (see _ObjectLocks).
        marked: KeyEntry = self._health.run("recording a key's first signature", record,
                                            self._slot.locks.searches.exclusive)
        self.retirer.retire(marked.key_id, marked.marks)
        return marked

    def _retire(self, kid: KeyID, handles: tuple[int, ...]) -> None:
        """Destroy key ``kid``'s superseded objects (the :class:`Retirer`'s
        work), each only if its label still names the key: a handle kept
        across a module re-initialisation may name another object by then.
        Raises Unavailable."""
        module = self._slot.module
        mine = kid[:_layout.PURPOSE_KID_HEX].encode()  # in every label of a key's objects

        def destroy(s: Any) -> None:
            self.before_write(s)
            try:
                for handle in handles:
                    try:
                        label = module.get_attributes(s.handle, handle, {_p11.CKA_LABEL: 64})
                    except _p11.P11Error as e:
                        if e.rv in _p11.HANDLE_LOST:
                            continue  # gone already (another process, or the sweep)
                        raise
                    if mine in (label.get(_p11.CKA_LABEL) or b""):
                        self._destroy(s, handle)
            finally:
                self.after_write()

        self._health.run("destroying superseded key metadata", destroy,
                         self._slot.locks.searches.exclusive)
