"""The files of a local trust directory for one GUN, and what was last published.

Layout mirrors what Notary serves: ``<base>/<gun>/root.json``,
``targets.json``, ``targets/NAME.json``, ``snapshot.json``,
``timestamp.json``. ``.published.json`` records the SHA-256 of each file as
last published or pulled, so that only changed files are uploaded (the
server refuses a version it already has).

:class:`TrustFiles` reads and writes these files but signs nothing; the
operations that change metadata are in :mod:`signerd.trust._edits` and
:mod:`signerd.trust.repo`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from signerd.errors import InvalidArgument, NotFound
from signerd.keys import validate_gun, validate_role
from signerd.trust.errors import DamagedState
from signerd.trust.metadata import Envelope, Root, Targets

_PUBLISHED = ".published.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TrustFiles:
    """The metadata files of one GUN in a local directory, and their publish bookkeeping."""

    def __init__(self, base: str | os.PathLike[str], gun: str) -> None:
        self.gun = validate_gun(gun)
        self.path = Path(base) / gun

    # --- files -------------------------------------------------------------

    def _file(self, role: str) -> Path:
        # Role names are validated, so no name can climb out of the directory.
        return self.path / f"{validate_role(role)}.json"

    def read(self, role: str) -> bytes | None:
        """The bytes of ``role``'s file, or None if there is none."""
        try:
            return self._file(role).read_bytes()
        except FileNotFoundError:
            return None

    def _envelope(self, role: str) -> Envelope:
        data = self.read(role)
        if data is None:
            raise NotFound(f"{self.gun} has no {role}.json in {self.path}")
        return Envelope.from_bytes(data, role)

    def root(self) -> Root:
        """The current root.json, parsed (not verified)."""
        return Root.from_dict(self._envelope("root").signed)

    def targets(self, role: str = "targets") -> Targets:
        """A targets or delegation file, parsed (not verified)."""
        return Targets.from_dict(self._envelope(role).signed, role)

    def roles(self) -> list[str]:
        """Names of every metadata file present, delegations included."""
        if not self.path.is_dir():
            return []
        found = []
        for p in self.path.rglob("*.json"):
            name = p.relative_to(self.path).as_posix()[: -len(".json")]
            try:
                found.append(validate_role(name))
            except InvalidArgument:
                continue  # not a metadata file (N.root.json, or a name Notary refuses)
        return sorted(found)

    def files(self) -> dict[str, bytes]:
        """Role name → file bytes for every metadata file present (for verification)."""
        out = {}
        for role in self.roles():
            data = self.read(role)
            if data is not None:
                out[role] = data
        return out

    def write(self, role: str, data: bytes) -> None:
        """Write a metadata file atomically (a reader never sees half a file)."""
        write_atomic(self._file(role), data)

    # --- publish bookkeeping -------------------------------------------------

    def _published(self) -> dict[str, str]:
        path = self.path / _PUBLISHED
        try:
            doc = json.loads(path.read_bytes())
            return {str(k): str(v) for k, v in doc.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError, RecursionError) as e:
            raise DamagedState(
                f"{path} is damaged ({type(e).__name__}): fetch the server's trust data "
                f"again with 'signerctl trust pull {self.gun} --force'"
            ) from None

    def published(self) -> dict[str, str]:
        """Role → hex SHA-256 of each file as last published or pulled (empty if never)."""
        return self._published()

    def pending(self) -> dict[str, bytes]:
        """Files changed since the last publish or pull: what ``publish`` must upload.

        The timestamp is never uploaded: notary-server always makes its own.
        """
        seen = self._published()
        return {
            role: data
            for role, data in self.files().items()
            if role != "timestamp" and seen.get(role) != hashlib.sha256(data).hexdigest()
        }

    def mark_published(self, files: Mapping[str, bytes]) -> None:
        """Record ``files`` as what the server now has."""
        seen = self._published()
        seen.update({role: hashlib.sha256(data).hexdigest() for role, data in files.items()})
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / _PUBLISHED).write_text(json.dumps(seen, sort_keys=True, indent=1))

    def store_pulled(self, files: Mapping[str, bytes]) -> None:
        """Replace local metadata with ``files`` fetched from a server (verify them first).

        Intermediate roots (``N.root``) are only needed to verify, so they are not kept.
        """
        current = {role: data for role, data in files.items() if not role.endswith(".root")}
        for role in self.roles():
            if role not in current:
                self._file(role).unlink()
        for role, data in current.items():
            self.write(role, data)
        (self.path / _PUBLISHED).unlink(missing_ok=True)
        self.mark_published(current)
