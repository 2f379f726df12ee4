"""What each workflow of :mod:`signerd.trust.workflows` returns.

Frozen, plain data: key IDs are canonical TUF key IDs (hex) unless named
otherwise, ``files`` lists the metadata files a workflow changed, by role
name and sorted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from signerd.trust.verify import SignedTag, VerifiedRepository


@dataclass(frozen=True)
class Retrust:
    """A re-trusted root: the root key IDs as the old and the new root.json list them."""

    old_root_key_ids: tuple[str, ...]
    new_root_key_ids: tuple[str, ...]


@dataclass(frozen=True)
class InitResult:
    """A new repository. ``root_certificate_key_id`` is the root key's ID as root.json
    lists it (the certificate's x509 ID); ``signed_locally`` names which of snapshot
    and timestamp this directory signs; ``server`` is the Notary server's URL."""

    gun: str
    path: Path
    root_key_id: str
    root_certificate_key_id: str
    targets_key_id: str
    snapshot_key_id: str
    timestamp_key_id: str
    signed_locally: tuple[str, ...]
    server: str | None
    files: tuple[str, ...]


@dataclass(frozen=True)
class SignResult:
    """A tag signed: ``digest`` is the manifest's raw SHA-256, ``size`` its bytes."""

    gun: str
    tag: str
    digest: bytes
    size: int
    role: str
    key_id: str
    files: tuple[str, ...]
    stale: str = ""  # why snapshot.json was not re-signed here, for the caller to say


@dataclass(frozen=True)
class UnsignResult:
    """A tag removed from ``role``, which ``key_id`` re-signed."""

    gun: str
    tag: str
    role: str
    key_id: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class DelegationAddResult:
    """``role`` delegated to ``key_ids`` (as the parent lists them) for ``paths``."""

    gun: str
    role: str
    key_ids: tuple[str, ...]
    paths: tuple[str, ...]
    files: tuple[str, ...]


@dataclass(frozen=True)
class DelegationRemoveResult:
    """Delegation ``role`` removed."""

    gun: str
    role: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class RotateResult:
    """A role's keys replaced by ``new_key_id``. ``published`` is what a snapshot or
    timestamp rotation uploaded to the Notary server (None for other roles)."""

    gun: str
    role: str
    old_key_ids: tuple[str, ...]
    new_key_id: str
    files: tuple[str, ...]
    published: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PublishResult:
    """The files uploaded, and the versions then verified (None if nothing was changed)."""

    gun: str
    published: tuple[str, ...]
    versions: dict[str, int] | None


@dataclass(frozen=True)
class PullResult:
    """The verified repository as pulled; ``retrust`` with ``reset_trust``."""

    gun: str
    verified: VerifiedRepository
    retrust: Retrust | None


@dataclass(frozen=True)
class InspectResult:
    """The signed tags as a Content Trust client sees them, the verified versions, and
    for each targets role the canonical IDs of the keys trusted to sign it."""

    gun: str
    tags: tuple[SignedTag, ...]
    versions: dict[str, int]
    signers: dict[str, list[str]]
    retrust: Retrust | None
