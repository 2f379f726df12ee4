"""The keys of one token: the in-process key index (listing, lookup by ID,
refresh) and signing, on top of :mod:`signerd.token._layout`; the writes
(:mod:`signerd.token._keywrites`) and the sweep (:mod:`signerd.token._sweep`)
are delegated, so :class:`KeyStore` is every operation on a key by its ID.

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

import gc
import logging
import threading
import time
from dataclasses import replace
from typing import Any

from signerd.errors import NotFound, SignerdError
from signerd.keys import METADATA, Algorithm, KeyID
from signerd.token import _p11
from signerd.token._health import Health
from signerd.token._keywrites import KeyWriter
from signerd.token._listing import KeyEntry, read_keys
from signerd.token._slot import Slot
from signerd.token._sweep import Junk, Sweeper

log = logging.getLogger("signerd.token")

LISTING_WAIT = 60.0  # seconds a lookup waits for the first listing before searching itself
# Pauses (seconds) before searching again for a key a search missed while another process
# was writing the token's objects (SoftHSM 2.6.1 skips an object whose file another process
# is rewriting, e.g. a key's metadata as it is marked used): a real miss costs one search
# when nobody writes, and two more after these pauses when somebody does. The pauses are
# taken outside the miss lock, so they delay no other caller's lookup.
MISS_RETRIES = (0.05, 0.2)
WRITE_WINDOW = 1.0  # seconds after another process's write during which a miss is doubted
COLLECT_AFTER = 1000  # keys: a listing of this many runs Python's full collection itself


class KeyStore:
    """One token's key index and key operations.

    ``lock`` (shared with :class:`Health`, whose reconnects re-list the
    keys) is taken by every writer of the index; readers take nothing. Every
    operation on the token runs through :meth:`Health.run`, under the
    token's :class:`_ObjectLocks`. Writes are its :class:`KeyWriter`'s, the
    sweep its :class:`Sweeper`'s; both are reached through the methods here.
    """

    def __init__(self, slot: Slot, health: Health, lock: threading.RLock) -> None:
        self.name = slot.name
        self._slot = slot
        self._health = health
        self._lock = lock
        self._keys: dict[KeyID, KeyEntry] = {}
        self._miss_lock = threading.Lock()
        self._made: dict[KeyID, float] = {}  # keys generated here -> when (monotonic s)
        self._gone: dict[KeyID, float] = {}  # keys deleted here -> when (monotonic s)
        self._listed = threading.Event()
        self._listed_ok = False  # the first listing read the token (see listed)
        self._lister: threading.Thread | None = None
        self._writer = KeyWriter(slot, health, self, lock)
        self._sweeper = Sweeper(slot, health, self._writer)

    # -- the index -----------------------------------------------------------

    def start_listing(self) -> None:
        """Run the first listing in the background, so the daemon serves at
        once even with many keys: a key not listed yet is found by its ID
        (:meth:`lookup`), and only listings wait for it."""
        self._lister = threading.Thread(target=self._first_listing, name=f"list-{self.name}",
                                        daemon=True)
        self._lister.start()

    def join_listing(self) -> None:
        """Wait for the first listing, if started (its session must not close
        under it), and stop destroying superseded objects in the background
        (:class:`~signerd.token._retire.Retirer`; what is left stays the key's)."""
        if self._lister is not None:
            self._lister.join()
        self._writer.retirer.close()

    def wait_retired(self, timeout: float = 10.0) -> bool:
        """Wait until superseded objects are destroyed (for tests and bench/)."""
        return self._writer.retirer.wait_idle(timeout)

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
        watch = self._writer.generation()
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

    @property
    def listed(self) -> bool:
        """Whether the index holds a whole listing of the token: the first
        listing, or a refresh since, read it (False while the first listing
        runs, and after it failed: the token was away)."""
        return self._listed_ok

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

    def lookup(self, kid: KeyID, wait_listing: bool = True) -> KeyEntry | None:
        """Find one key this process has not seen (made by another daemon or
        worker) with a search by its ID. Misses are searched one at a time
        per token, so unknown IDs cannot pile up token scans; signing with
        known keys never waits for them. Raises Unavailable while the token
        is unusable: a key on a token that is away is not "not found".

        Right after start this waits for the first listing (which reads
        every key anyway) rather than searching beside it, unless
        ``wait_listing`` is False: one key needed before serving (the audit
        checkpoint key) costs one search, not the whole listing."""
        if wait_listing and not self._listed.is_set() and self._lister is not None:
            self._listed.wait(LISTING_WAIT)

        def find(s: Any) -> dict[KeyID, KeyEntry]:
            return self._read(s, kid)

        for pause in (*MISS_RETRIES, None):
            with self._miss_lock:
                entry = self._keys.get(kid)
                if entry is not None:
                    return entry
                found: dict[KeyID, KeyEntry] = self._health.run(
                    "key lookup", find, self._slot.locks.searches.shared)
                entry = found.get(kid)
                if entry is not None:
                    with self._lock:
                        self._keys[kid] = entry
                    return entry
            if pause is None or not self._others_writing():
                return None
            time.sleep(pause)  # another process's write may have hidden the key
        return None

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
        self._listed_ok = True
        doubtful = self._others_writing()
        with self._lock:
            if doubtful:  # keep what this listing missed while another process wrote
                for kid, entry in self._keys.items():  # (the next listing confirms it)
                    keys.setdefault(kid, entry)
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
        if len(keys) >= COLLECT_AFTER:
            # A listing of many keys leaves tens of thousands of objects that lived
            # through it (the new index, and the old one's and the reads' garbage):
            # enough for Python's next full collection, which stops every thread for
            # 10-25 ms at 10,000 keys, at whatever signature comes next (issue 24:
            # the first signatures after a start, p99 12-18 ms). It runs here instead,
            # on the listing's thread, at the one moment such a pause is expected.
            gc.collect()

    def _others_writing(self) -> bool:
        """Whether another process wrote this token's objects just now (SoftHSM's
        generation file; False for tokens without one)."""
        watch = self._writer.generation()
        return watch is not None and watch.written_within(WRITE_WINDOW)

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

    # -- the index, as the writer records its writes ---------------------------

    def made(self, entry: KeyEntry) -> None:
        """Index a key generated here (a refresh that began before keeps it)."""
        with self._lock:
            self._keys[entry.key_id] = entry
            self._made[entry.key_id] = time.monotonic()

    def put(self, kid: KeyID, entry: KeyEntry) -> None:
        """Index ``entry`` as key ``kid`` now is (its purpose, its marks)."""
        with self._lock:
            self._keys[kid] = entry

    def retired(self, kid: KeyID, handles: tuple[int, ...]) -> None:
        """Forget the handles of key ``kid``'s objects destroyed in the background."""
        with self._lock:
            entry = self._keys.get(kid)
            if entry is not None and set(handles) & set(entry.marks):
                self._keys[kid] = replace(entry, marks=tuple(
                    h for h in entry.marks if h not in handles))

    def dropped(self, kid: KeyID) -> None:
        """Forget a key deleted here (a refresh that began before does not
        bring it back)."""
        with self._lock:
            self._keys.pop(kid, None)
            self._made.pop(kid, None)
            self._gone[kid] = time.monotonic()

    # -- writes and the sweep (delegated) ----------------------------------------

    def check_algorithm(self, alg: Algorithm) -> None:
        """Raise FailedPrecondition unless the token can create ``alg`` keys."""
        self._writer.check_algorithm(alg)

    def generate(self, alg: Algorithm, gun: str, role: str, purpose: str = METADATA) -> KeyEntry:
        """Generate a key pair (:meth:`KeyWriter.generate`)."""
        return self._writer.generate(alg, gun, role, purpose)

    def set_purpose(self, kid: KeyID, purpose: str) -> KeyEntry:
        """Record key ``kid``'s new purpose (:meth:`KeyWriter.set_purpose`)."""
        return self._writer.set_purpose(kid, purpose)

    def delete(self, kid: KeyID) -> None:
        """Destroy key ``kid``'s objects (:meth:`KeyWriter.delete`)."""
        self._writer.delete(kid)

    def mark_used(self, kid: KeyID) -> None:
        """Record that key ``kid`` has signed (:meth:`KeyWriter.mark_used`)."""
        self._writer.mark_used(kid)

    def before_write(self, s: Any) -> None:
        """Let the module see other processes' objects before a write
        through session ``s`` (:meth:`KeyWriter.before_write`)."""
        self._writer.before_write(s)

    def after_write(self) -> None:
        """Record the SoftHSM generation a write left (:meth:`KeyWriter.after_write`)."""
        self._writer.after_write()

    def junk(self) -> list[Junk]:
        """Objects that belong to no key (:meth:`Sweeper.junk`). Raises Unavailable."""
        return self._sweeper.junk()

    def sweep(self, remove: bool = False, grace: float = 2.0) -> tuple[list[Junk], int]:
        """Find, and with ``remove`` remove, what belongs to no key
        (:meth:`Sweeper.sweep`). Raises Unavailable."""
        return self._sweeper.sweep(remove, grace)

    def report_junk(self) -> None:
        """The start-up sweep: log what belongs to no key (:meth:`Sweeper.report_junk`),
        after the first listing, whose keys it starts from."""
        self._listed.wait()
        self._sweeper.report_junk(dict(self._keys))
