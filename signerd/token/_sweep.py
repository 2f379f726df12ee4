"""Objects on a token that belong to no key: what a process killed in the
middle of a write leaves (issue 22 §4), found and, on request, removed.

Every write of signerd's is ordered so that what a crash leaves is
recognisable (:mod:`signerd.token._keygen`, :meth:`KeyWriter.delete`,
:meth:`KeyWriter.mark_used`, :meth:`Certificates.store`):

- a private or public key labelled ``signerd:<algorithm>`` that no listed
  key owns: a key pair whose metadata was never written (CreateKey killed),
  or was destroyed first (DeleteKey killed), or half a pair;
- a metadata object (``signerd:`` + key ID) or an old "has signed" object
  (``signerd-used:``) whose key pair is gone;
- a certificate labelled ``signerd-cert:`` whose CKA_ID is no key's;
- on SoftHSM, an empty object file: SoftHSM creates the file, then fills
  it, and skips an empty one, so no PKCS#11 call can see or remove it.

A second metadata object of a live key (marking it used was killed between
its two writes) is the key's: listing reads it, and marking or deleting
the key removes it. So is a second certificate: the reader takes the newest.

Another process may be generating a key right now: its pair exists a few
milliseconds before its metadata. So removal lists twice, ``grace`` seconds
apart, and removes only what was junk both times.

:class:`Sweeper` does this on one token; the functions below are its steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signerd.errors import SignerdError
from signerd.keys import KeyID
from signerd.token import _p11
from signerd.token._health import Health
from signerd.token._keywrites import KeyWriter
from signerd.token._listing import KeyEntry, read_keys
from signerd.token._slot import Slot

log = logging.getLogger("signerd.token")

_PREFIXES = (b"signerd:", b"signerd-used:", b"signerd-cert:", b"signerd-purpose:")
_CLASSES = {
    _p11.CKO_PRIVATE_KEY: "private key",
    _p11.CKO_PUBLIC_KEY: "public key",
    _p11.CKO_DATA: "data object",
    _p11.CKO_CERTIFICATE: "certificate",
}


@dataclass(frozen=True)
class Junk:
    """One object that belongs to no key: its handle in this process (0
    for a file), what it is, its label and CKA_ID, and for a file its path."""

    handle: int
    kind: str
    label: str
    object_id: bytes = b""
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.kind} {self.path}"
        where = f" (CKA_ID {self.object_id.hex()})" if self.object_id else ""
        return f"{self.kind} {self.label!r}{where}"


CHUNK = 256  # objects judged per hold of the token's search lock (see Sweeper.junk)


def judge(module: _p11.Module, s: Any, cls: int, handles: list[int], owned: set[int],
          ids: set[bytes]) -> list[Junk]:
    """The objects among ``handles`` (of class ``cls``, found by a search
    through any session) that are signerd's by their label and belong to no
    key: not one of the ``owned`` handles, and for a certificate, not of a
    key's CKA_ID in ``ids``. An object destroyed since the search is skipped.
    ``s`` is the session to read through. Raises P11Error."""
    read = module.attribute_reader({_p11.CKA_ID: 32, _p11.CKA_LABEL: 64}).read
    junk: list[Junk] = []
    for handle in handles:
        if handle in owned:
            continue
        try:
            attrs = read(s.handle, handle)
        except _p11.P11Error as e:
            if e.rv in _p11.HANDLE_LOST:
                continue  # destroyed since the search (a key deleted, a mark retired)
            raise
        label = attrs[_p11.CKA_LABEL] or b""
        if not label.startswith(_PREFIXES):
            continue
        object_id = attrs[_p11.CKA_ID] or b""
        if cls == _p11.CKO_CERTIFICATE:
            if object_id in ids:
                continue
            kind_of = "certificate of no key"
        elif cls == _p11.CKO_DATA:
            kind_of = ("\"has signed\" object of no key"
                       if label.startswith(b"signerd-used:") else
                       "purpose object of no key" if label.startswith(b"signerd-purpose:")
                       else "metadata of no key")
        else:
            kind_of = f"{_CLASSES[cls]} of no key"
        junk.append(Junk(handle, kind_of, label.decode("ascii", "replace"), object_id))
    return junk


def remove(module: _p11.Module, s: Any, junk: list[Junk]) -> int:
    """Destroy each object of ``junk`` (and delete each empty file with its
    lock file); returns how many went. Raises P11Error."""
    gone = 0
    for j in junk:
        if j.path is not None:
            for p in (j.path, j.path.with_suffix(".lock")):
                p.unlink(missing_ok=True)
            gone += 1
            continue
        try:
            module.destroy(s.handle, j.handle)
            gone += 1
        except _p11.P11Error as e:
            if e.rv not in _p11.HANDLE_LOST:
                raise
    return gone


_remove = remove  # for Sweeper.sweep, whose parameter ``remove`` hides the function


def still_junk(first: list[Junk], second: list[Junk]) -> list[Junk]:
    """What was junk in both of two looks ``grace`` seconds apart."""
    earlier = {(j.handle, j.kind, j.label, j.path) for j in first}
    return [j for j in second if (j.handle, j.kind, j.label, j.path) in earlier]


def pause(grace: float) -> None:
    """Wait between the two looks (a key generation elsewhere finishes)."""
    time.sleep(grace)


class Sweeper:
    """The sweep of one token: finds, reports and, on request, removes the
    objects that belong to no key. A removal is a write (``writer``'s
    :meth:`KeyWriter.before_write` and :meth:`KeyWriter.after_write`
    around it); finding empty object files needs its SoftHSM directory
    (:meth:`KeyWriter.generation`)."""

    def __init__(self, slot: Slot, health: Health, writer: KeyWriter) -> None:
        self.name = slot.name
        self._slot = slot
        self._health = health
        self._writer = writer

    def junk(self, keys: dict[KeyID, KeyEntry] | None = None) -> list[Junk]:
        """Objects on the token that belong to no key: every object of each
        class of :data:`_CLASSES` (a search per class) that is signerd's by
        its label and is no key's (:func:`judge`). ``keys``: the keys as
        listed, else they are listed again here.

        The search lock is held per search and per :data:`CHUNK` objects, not
        for the whole look: a look at 10,000 keys takes seconds, and a key
        generation (which holds the lock alone) waited for all of it (5.7 s
        for a CreateKey right after a start). What is written between two
        holds can look like junk once; a report or a removal believes only
        what a second look agrees on. A result is believed only if the
        token still answers at the end (a token that went away answers
        searches with nothing). Raises Unavailable."""
        slot, module = self._slot, self._slot.module
        shared = slot.locks.searches.shared
        health = self._health
        if keys is None:
            keys = health.run("sweep", lambda s: read_keys(
                module, slot.profile, self.name, s, health.answers), shared)
        owned: set[int] = set()
        ids: set[bytes] = set()
        for e in keys.values():
            owned.update((e.handle, e.public_handle, e.meta_handle, *e.marks))
            ids.add(e.object_id)
        found: list[Junk] = []
        for cls in _CLASSES:
            handles: list[int] = health.run("sweep", lambda s, c=cls: module.find_objects(
                s.handle, {_p11.CKA_CLASS: _p11.ulong(c)}), shared)
            for i in range(0, len(handles), CHUNK):
                part = handles[i:i + CHUNK]
                found += health.run("sweep", lambda s, c=cls, p=part: judge(
                    module, s, c, p, owned, ids), shared)
        watch = self._writer.generation()

        def last(s: Any) -> list[Path]:
            if not health.answers(s):
                raise _p11.P11Error("C_GetTokenInfo", _p11.CKR_DEVICE_REMOVED)
            return watch.empty_object_files() if watch is not None else []

        files: list[Path] = health.run("sweep", last, shared)
        return found + [Junk(0, "empty SoftHSM object file", p.name, path=p) for p in files]

    def _still_junk(self, found: list[Junk], grace: float) -> list[Junk]:
        """What of ``found`` is still junk at a second look ``grace`` seconds
        later (a key generation under way elsewhere is not). Raises Unavailable."""
        pause(grace)
        return still_junk(found, self.junk())

    def sweep(self, remove: bool = False, grace: float = 2.0) -> tuple[list[Junk], int]:
        """(objects that belong to no key, how many were removed). With
        ``remove``, a second look ``grace`` seconds later removes only what
        was junk both times (a key generation under way elsewhere is not).
        Raises Unavailable."""
        found = self.junk()
        if not remove or not found:
            return found, 0
        doomed = self._still_junk(found, grace)
        writer = self._writer

        def destroy(s: Any) -> int:
            writer.before_write(s)
            try:
                return _remove(self._slot.module, s, doomed)
            finally:
                writer.after_write()

        gone: int = self._health.run("sweep removal", destroy,
                                     self._slot.locks.searches.exclusive)
        log.warning("objects that belonged to no key removed", extra={"fields": {
            "token": self.name, "removed": gone}})
        return found, gone

    def report_junk(self, listed: dict[KeyID, KeyEntry], grace: float = 2.0) -> None:
        """The start-up sweep: log what belongs to no key (never removes), as
        seen by two looks ``grace`` seconds apart: another process's key
        generation or used mark under way is not reported. The first look
        takes the owners from ``listed``, the keys the first listing found
        (listing them again cost seconds at 10,000 keys, beside the first
        signatures: issue 24); only the second, if the first found anything,
        lists them again."""
        try:
            found = self.junk(listed)
            if found:
                found = self._still_junk(found, grace)
        except SignerdError as e:
            log.warning("start-up sweep failed", extra={"fields": {
                "token": self.name, "error": str(e)}})
            return
        if found:
            log.warning("objects on the token belong to no key; `signerd sweep --remove` "
                        "removes them", extra={"fields": {
                            "token": self.name, "count": len(found),
                            "objects": [str(j) for j in found[:20]]}})
