"""KeyCatalog: finding and listing keys across every configured token (no
gRPC here). :class:`signerd.service.KeyService` delegates its lookups by ID,
its listings and paging, and the rate-limited re-reading of the tokens' key
listings here; it keeps creating, deleting and signing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from signerd.errors import InvalidArgument, NoSuchKey, NotFound, Unavailable, quoted
from signerd.keys import METADATA, Algorithm, KeyID, validate_key_id
from signerd.service._checkpointkey import CHECKPOINT_ROLE
from signerd.token import KeyEntry, Token

# The key service's logger: these are its messages, and log lines name it.
log = logging.getLogger("signerd.service")
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
_REFRESH_EVERY = 2.0  # seconds: re-reading a token's keys is a C_FindObjects pass


class KeyCatalog:
    """The keys on ``tokens`` (by name; the key service's own mapping, never
    copied): lookups by key ID, by token name or role, and listings. The
    audit checkpoint key (:mod:`signerd.service._checkpointkey`) is in no
    lookup by ID and no listing."""

    def __init__(self, tokens: Mapping[str, Token]) -> None:
        self.tokens = tokens
        # Each token has just started its first listing.
        self._refreshed: dict[str, float] = {name: time.monotonic() for name in self.tokens}
        self._refresh_lock = threading.Lock()

    def refresh(self, force: bool = False) -> None:
        """Pick up keys that another daemon created or deleted, at most every
        _REFRESH_EVERY seconds per token, so unknown key IDs cannot turn into
        a stream of C_FindObjects passes."""
        now = time.monotonic()
        with self._refresh_lock:
            due = [
                t
                for t in self.tokens.values()
                if force or now - self._refreshed.get(t.name, 0.0) >= _REFRESH_EVERY
            ]
            for t in due:
                self._refreshed[t.name] = now
        for t in due:
            try:
                t.refresh()
                # Counted from the end: a listing of 10,000 keys takes longer than
                # _REFRESH_EVERY, and the next call would otherwise list again at once.
                with self._refresh_lock:
                    self._refreshed[t.name] = time.monotonic()
            except Unavailable as e:
                log.warning(
                    "cannot refresh keys", extra={"fields": {"token": t.name, "error": str(e)}}
                )

    def lookup(self, kid: KeyID) -> KeyEntry | None:
        """Key ``kid`` as some token last listed it, asking no token; None if
        none did. Includes the checkpoint key (callers check its role)."""
        for t in self.tokens.values():
            entry = t.get(kid)
            if entry is not None:
                return entry
        return None

    def get_key(self, key_id: str, may_search: Callable[[], bool] | None = None) -> KeyEntry:
        """Key ``key_id`` (hex), asking the tokens if none listed it yet,
        unless ``may_search`` (asked only then) says no: for a caller who may
        use no key, a miss must not cost a token search. Raises
        InvalidArgument, NoSuchKey, Unavailable (a token is down and the key
        is on no other)."""
        kid = validate_key_id(key_id)
        entry = self.lookup(kid)
        down: Unavailable | None = None
        if entry is None and may_search is not None and not may_search():
            raise NoSuchKey(kid)
        for t in self.tokens.values():
            if entry is not None:
                break
            try:  # made by another daemon or worker since we listed the token
                entry = t.lookup(kid)
            except Unavailable as e:
                down = e
        if entry is None:
            # Not on any usable token; if one is down, the key may be there.
            raise down or NoSuchKey(kid)
        if entry.role == CHECKPOINT_ROLE:  # the audit log's own: no caller may use it
            raise NoSuchKey(kid)
        return entry

    def token(self, name: str) -> Token:
        """The token named ``name``. Raises NotFound."""
        try:
            return self.tokens[name]
        except KeyError:
            raise NotFound(
                f"no token named {quoted(name)}; configured: {', '.join(self.tokens)}"
            ) from None

    def token_for_role(self, role: str) -> Token:
        """The first token configured to hold ``role``, else the first token."""
        for t in self.tokens.values():
            if t.config.holds_role(role):
                return t
        return next(iter(self.tokens.values()))

    def list_keys(
        self,
        gun: str = "",
        role: str = "",
        token: str = "",
        page_size: int = 0,
        page_token: str = "",
        readable: Callable[[KeyEntry], bool] = lambda k: True,
    ) -> tuple[list[KeyEntry], str]:
        """One page of keys, sorted by key ID, and the next page's token
        ("" on the last page): those of ``gun``, ``role`` and ``token`` (""
        for any) for which ``readable`` is true. Pages hold ``page_size``
        keys (0: DEFAULT_PAGE_SIZE, at most MAX_PAGE_SIZE); a page token is
        the last key ID of the page before, so only a readable key's ID is
        ever one. Only the first page re-reads the tokens (:meth:`refresh`).

        Raises InvalidArgument (page size, page token), NotFound (token)."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be between 0 and {MAX_PAGE_SIZE}, got {page_size}"
            )
        if page_token:
            validate_key_id(page_token)  # page tokens are the last key ID of the previous page
        if token:
            self.token(token)
        if not page_token:
            # The first page re-reads the tokens; the pages after it walk the index
            # as it is (a listing of 10,000 keys takes seconds: once per page, ten
            # pages of 1,000 took 55 s).
            self.refresh()
        size = page_size or DEFAULT_PAGE_SIZE
        keys = sorted(
            (
                k
                for t in self.tokens.values()
                if not token or t.name == token
                for k in t.keys()
                if (not gun or k.gun == gun)
                and (not role or k.role == role)
                and k.key_id > page_token
                and k.role != CHECKPOINT_ROLE
                and readable(k)
            ),
            key=lambda k: k.key_id,
        )
        page = keys[:size]
        return page, (page[-1].key_id if len(keys) > size else "")

    def find_unused(self, gun: str, role: str, algorithm: Algorithm,
                    purpose: str = METADATA) -> KeyEntry | None:
        """A ``purpose`` key for (gun, role, algorithm) that has never signed,
        through either API (Notary's rule: CreateKey reuses only such a key)."""
        self.refresh()
        for t in self.tokens.values():
            for k in sorted(t.keys(), key=lambda k: k.key_id):
                if (k.gun == gun and k.role == role and k.algorithm == algorithm
                        and not k.used and k.purpose == purpose):
                    return k
        return None
