"""Destroying superseded objects off the request path.

Why: SoftHSM 2.6.1's ``C_DestroyObject`` re-reads the token's directory
twice (``OSToken::deleteObject`` removes the object file and its lock file
through ``Directory::remove``, which lists the directory again after each),
so it costs time in proportion to the objects on the token: 180 ms with
15,000 objects (5,000 keys), about 0.4 s with 30,000, where creating an
object costs 4 ms at any size. A key's first signature writes its new
metadata ("used") and destroys the old one (:mod:`signerd.token._layout`);
only the first write must come before the signature is returned. The old
object is the key's until it is gone (a listing takes the metadata that
says "used" and counts the others among the key's objects, the sweep leaves
them alone, deletion destroys them), so it can be destroyed a moment later.

:class:`Retirer` is one background thread per token that destroys such
objects in order, once writes pause (:data:`QUIET`). What it has not
destroyed when the token closes (:data:`DRAIN`) stays on the token, as after
a crash between the two writes: still the key's, and removed with it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from signerd.errors import SignerdError
from signerd.keys import KeyID

log = logging.getLogger("signerd.token")

# A destroy holds the token's objects exclusively for its whole length (0.4 s at
# 10,000 keys on SoftHSM), so a key generation or another first signature would
# wait for it: destroys wait until no such write came for QUIET seconds, unless
# BACKLOG of them wait already. Closing gives the pending ones up to DRAIN seconds.
QUIET = 0.5
BACKLOG = 1000
DRAIN = 5.0


class Retirer:
    """Destroys objects superseded by a write, one batch at a time, in a
    background thread started at the first :meth:`retire`.

    ``destroy(kid, handles)`` destroys a batch of key ``kid``'s objects on
    the token (raises SignerdError);
    ``retired(kid, handles)`` is told afterwards, so the key index forgets
    the handles."""

    def __init__(self, name: str, destroy: Callable[[KeyID, tuple[int, ...]], None],
                 retired: Callable[[KeyID, tuple[int, ...]], None]) -> None:
        self.name = name
        self._destroy = destroy
        self._retired = retired
        self._queue: queue.SimpleQueue[tuple[KeyID, tuple[int, ...]] | None] = \
            queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._last_write = 0.0  # monotonic seconds of the last write that waits for none
        self._deadline = 0.0  # closing: no destroy starts after this (monotonic seconds)

    def wrote(self) -> None:
        """A write just happened (a key generated): destroys wait for a pause."""
        self._last_write = time.monotonic()

    def retire(self, kid: KeyID, handles: tuple[int, ...]) -> None:
        """Destroy ``handles`` (objects of key ``kid``) soon, in the background."""
        if not handles:
            return
        self.wrote()
        with self._lock:
            if self._stopping.is_set():
                return  # closing: left on the token, still the key's
            self._pending += 1
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"retire-{self.name}",
                                                daemon=True)
                self._thread.start()
        self._queue.put((kid, handles))

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending (for tests); True if so."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kid, handles = item
            while (not self._stopping.is_set() and self._pending < BACKLOG
                   and time.monotonic() - self._last_write < QUIET):
                self._stopping.wait(QUIET / 5)
            try:
                if not self._draining():
                    self._destroy(kid, handles)
                    self._retired(kid, handles)
            except SignerdError as e:  # left on the token: still the key's (see above)
                log.warning("cannot destroy a key's superseded metadata now", extra={
                    "fields": {"token": self.name, "key_id": kid, "error": str(e)}})
            finally:
                with self._lock:
                    self._pending -= 1
                    if not self._pending:
                        self._idle.set()

    def _draining(self) -> bool:
        """Whether closing has run out of time for more destroys."""
        return self._stopping.is_set() and time.monotonic() > self._deadline

    def close(self) -> None:
        """Stop: what is pending is destroyed for up to :data:`DRAIN` seconds
        more, the rest left on the token. Called before the module is released."""
        with self._lock:
            self._deadline = time.monotonic() + DRAIN
            self._stopping.set()
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join()
