"""What a trust directory remembers besides the metadata, and how a change is undone.

``.signerctl.json`` holds the :class:`Settings` that ``init`` (or the first
``pull``) recorded: the Notary server, its CA file, and which of snapshot and
timestamp this directory signs. ``.trusted.json`` holds the
:class:`~signerd.trust.verify.TrustedState` of the last successful
verification (root and versions), so that later verifications refuse
rollbacks and roots the trusted root's keys did not sign.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from signerd.errors import InvalidArgument, NotFound
from signerd.trust.errors import DamagedState
from signerd.trust.repo import TrustRepo, write_atomic
from signerd.trust.verify import TrustedState

SETTINGS_FILE = ".signerctl.json"
STATE_FILE = ".trusted.json"


@dataclass(frozen=True)
class Settings:
    """What ``init`` recorded about a repository (absent in a pulled trust dir).

    ``server`` and ``ca`` are the Notary server's URL and CA file, so that
    later commands need no ``--server``. ``local_roles`` lists which of
    snapshot and timestamp this directory signs; None means unknown, and then
    notary's client rule applies to the snapshot.
    """

    server: str | None = None
    local_roles: tuple[str, ...] | None = None
    ca: str | None = None


def load_settings(repo: TrustRepo) -> Settings:
    """The repository's settings; empty ones if none were recorded.

    Raises DamagedState if the file is not what :func:`save_settings` writes.
    """
    try:
        doc = json.loads((repo.path / SETTINGS_FILE).read_bytes())
        local = doc.get("local_roles")
        return Settings(
            doc.get("server"), tuple(local) if local is not None else None, doc.get("ca")
        )
    except FileNotFoundError:
        return Settings()
    except (ValueError, AttributeError, TypeError) as e:
        raise DamagedState(
            f"{repo.path / SETTINGS_FILE} is damaged ({e}): remove it and give --server "
            "(and --ca) again"
        ) from None


def save_settings(repo: TrustRepo, settings: Settings) -> None:
    """Record ``settings`` (atomically)."""
    local = list(settings.local_roles) if settings.local_roles is not None else None
    doc = {"server": settings.server, "local_roles": local, "ca": settings.ca}
    write_atomic(repo.path / SETTINGS_FILE, json.dumps(doc, indent=1, sort_keys=True).encode())


def load_state(repo: TrustRepo, *, reset_trust: bool = False) -> TrustedState | None:
    """What the last verification trusted, or None before the first one.

    A damaged file raises DamagedState, which says how to re-trust; with
    ``reset_trust`` (the state is being replaced) it reads as None.
    """
    try:
        return TrustedState.from_json((repo.path / STATE_FILE).read_bytes())
    except FileNotFoundError:
        return None  # first use: trust on first use, as a notary client does
    except InvalidArgument as e:
        if reset_trust:
            return None  # being replaced anyway
        raise DamagedState(
            f"{repo.path / STATE_FILE} is damaged ({e}): re-trust the repository with "
            f"'signerctl trust pull {repo.gun} --reset-trust' (or, without a Notary server, "
            f"'signerctl trust inspect {repo.gun} --reset-trust')"
        ) from None


def save_state(repo: TrustRepo, state: TrustedState) -> None:
    """Remember ``state`` as what this directory trusts (atomically)."""
    write_atomic(repo.path / STATE_FILE, state.to_json())


def open_repo(base: Path, gun: str) -> TrustRepo:
    """The trust data of ``gun`` under ``base``; NotFound if it has none yet."""
    repo = TrustRepo(base, gun)
    if repo.read("root") is None:
        raise NotFound(
            f"no trust data for {gun} in {base}: "
            "run 'signerctl trust init' or 'signerctl trust pull' first"
        )
    return repo


@contextmanager
def changes(repo: TrustRepo) -> Iterator[list[str]]:
    """Undo every file change if the block fails; afterwards, list the files it changed.

    A command signs several files in turn (a role, then snapshot and
    timestamp); a refusal half-way must not leave a mix of old and new.
    The list is filled in when the block ends, sorted by role name.
    """
    before = repo.files()
    changed: list[str] = []
    try:
        yield changed
    except BaseException:
        for role in repo.roles():
            if role not in before:
                (repo.path / f"{role}.json").unlink(missing_ok=True)
        for role, data in before.items():
            repo.write(role, data)
        raise
    after = repo.files()
    changed += sorted(r for r in before.keys() | after.keys() if before.get(r) != after.get(r))
