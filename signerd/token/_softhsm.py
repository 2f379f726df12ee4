"""SoftHSM's file store, seen from outside: where a token's directory is,
and its generation counter.

Why signerd reads a file of SoftHSM's (2.6.1, ``src/lib/object_store``):
each process keeps its own index of a token's object files, and re-reads
the directory only in ``OSToken::index()``, which ``C_FindObjectsInit``
alone calls, and only when the token's ``generation`` file changed since
this process last looked. A write (``OSToken::createObject`` and
``deleteObject`` → ``Generation::commit``) reads the counter on disk, adds
one and takes the result as what this process has seen, without
re-indexing: if another process wrote since, this process never sees that
process's new objects until a third write. So before writing, a process
must search once, but only if the counter moved since its own last look,
and a search costs a pass over every object on the token (about 19 µs an
object): reading an 8-byte file instead keeps key generation free of
searches when one process writes, and safe when several do.

The token's directory is found from ``SOFTHSM2_CONF`` (else
``/etc/softhsm/softhsm2.conf``): ``directories.tokendir``, then the
sub-directory whose ``token.object`` holds the token's serial number (it is
stored as the attribute's raw bytes). If it cannot be found, the caller
searches before every write, as before.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

DEFAULT_CONF = "/etc/softhsm/softhsm2.conf"


def token_directory(serial: str, environ: dict[str, str] | None = None) -> Path | None:
    """The file store directory of the SoftHSM token with serial number
    ``serial``, or None when there is no single one to be found."""
    env = os.environ if environ is None else environ
    try:
        text = Path(env.get("SOFTHSM2_CONF") or DEFAULT_CONF).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    base = None
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "directories.tokendir":
            base = Path(value.strip())
    if base is None or not serial:
        return None
    found = []
    try:
        for child in base.iterdir():
            try:
                if serial.encode() in (child / "token.object").read_bytes():
                    found.append(child)
            except OSError:
                continue
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


class GenerationWatch:
    """The generation counter of one SoftHSM token directory, as raw bytes
    (their meaning does not matter: only whether they changed)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._path = directory / "generation"
        self._seen: bytes | None = None

    def _read(self) -> bytes | None:
        try:
            return self._path.read_bytes()
        except OSError:
            return None

    def moved(self) -> bytes | None:
        """The counter now if another process may have written since this
        process last looked (then search, and pass it to :meth:`seen`);
        None if not. Unreadable counts as moved (``b""``)."""
        now = self._read()
        if now is None:
            return b""
        return None if now == self._seen else now

    def seen(self, value: bytes | None = None) -> None:
        """Record the counter as this process's SoftHSM has it: ``value``,
        read before the search that re-indexed (a write that came during the
        search then counts as new), or, after this process's own write, the
        file as it is now. A write by another process in the microseconds
        between that write and this read goes unnoticed (README, known
        limits)."""
        self._seen = value if value else self._read()

    def written_within(self, seconds: float) -> bool:
        """Whether some process changed the token's objects in the last
        ``seconds`` (the counter file's modification time; unreadable counts
        as yes). SoftHSM 2.6.1 writes a new object's file in steps another
        process can read half-done, and skips the object meanwhile: a miss
        right after a write may be such a reading."""
        try:
            return time.time() - self._path.stat().st_mtime < seconds
        except OSError:
            return True

    def empty_object_files(self) -> list[Path]:
        """Object files of zero bytes: what a process killed while SoftHSM
        wrote a new object leaves. SoftHSM skips them, so no PKCS#11 call
        sees or removes them; only the sweep does."""
        try:
            return sorted(p for p in self.directory.glob("*.object")
                          if p.name != "token.object" and p.stat().st_size == 0)
        except OSError:
            return []
