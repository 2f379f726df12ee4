"""Locks of the token layer: a shared/exclusive lock, and the two a token's
objects need against SoftHSM 2.6.1 (:class:`_ObjectLocks`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


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

    One per token and process (:meth:`signerd.token._modules._Modules.object_locks`);
    always taken in this order.
    """

    searches: _SharedLock = field(default_factory=_SharedLock)
    signing: _SharedLock = field(default_factory=_SharedLock)
