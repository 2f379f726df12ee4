"""``[audit]`` settings of the transparency log (see Transparency in
:mod:`signerd.audit`): parsed here so that :mod:`signerd.config` only hands
the table over.

    [audit]
    file = "audit.log"
    checkpoints = true           # default: true when a file is set
    checkpoint_interval = 1.0    # seconds from a new line to its checkpoint
    origin = "signer.example/audit"   # default: "<hostname>/signerd/<file name>"
    checkpoint_key = "<key id>"  # default: made once, on checkpoint_token
    checkpoint_token = "hsm"     # default: the first token that can make the key
    checkpoint_algorithm = "ecdsa-p256"   # or "ed25519"; default: Ed25519 where a
                                          # token can make it, else ECDSA P-256
    reset = "<sha256 hex>"       # abandon the tree whose checkpoint hashes to this

    [[audit.witnesses]]
    name = "witness.example"
    url = "https://witness.example/"
    vkey = "witness.example+abcd1234+BASE64"
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from signerd.errors import ConfigError
from signerd.tlog.note import COSIGNATURE_V1, NoteError, Verifier


@dataclass(frozen=True)
class WitnessConfig:
    """One ``[[audit.witnesses]]`` table: a c2sp.org/tlog-witness endpoint
    (``url`` ends in ``/``; ``add-checkpoint`` is appended) and its
    cosignature key (type 0x04)."""

    name: str
    url: str
    verifier: Verifier


@dataclass(frozen=True)
class TlogConfig:
    """The transparency-log half of ``[audit]``."""

    enabled: bool = True
    interval: float = 1.0  # seconds
    origin: str | None = None
    key_id: str | None = None
    token: str | None = None
    reset: str | None = None  # sha256 hex of the checkpoint (or tree.json) to abandon
    witnesses: tuple[WitnessConfig, ...] = ()
    explicit: bool = False  # ``checkpoints`` or ``checkpoint_algorithm`` set, not defaulted
    # ``checkpoint_algorithm``: "ed25519" (signed-note type 0x01) or "ecdsa-p256"
    # (type 0x02); None: Ed25519 where a token can make it, else ECDSA P-256.
    algorithm: str | None = None


CHECKPOINT_ALGORITHMS = ("ed25519", "ecdsa-p256")


def _witness(raw: Any, i: int) -> WitnessConfig:
    where = f"audit.witnesses[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table with name, url and vkey")
    raw = dict(raw)
    name, url, vkey = raw.pop("name", None), raw.pop("url", None), raw.pop("vkey", None)
    if raw:
        raise ConfigError(f"unknown keys in {where}: {sorted(raw)}")
    if not all(isinstance(v, str) and v for v in (name, url, vkey)):
        raise ConfigError(f"{where} needs name, url and vkey, each a non-empty string")
    assert isinstance(name, str) and isinstance(url, str) and isinstance(vkey, str)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url must be an http:// or https:// URL, got {url[:60]!r}")
    try:
        verifier = Verifier.from_vkey(vkey)
    except NoteError as e:
        raise ConfigError(f"{where}.vkey: {e}") from None
    if verifier.sig_type != COSIGNATURE_V1 or verifier.name != name:
        raise ConfigError(f"{where}.vkey must be a cosignature (type 0x04) key named {name!r}")
    return WitnessConfig(name, url if url.endswith("/") else url + "/", verifier)


def parse_tlog(audit: dict[str, Any]) -> TlogConfig:
    """Take the transparency-log keys out of the ``[audit]`` table ``audit``
    (the caller checks what is left). Raises ConfigError."""
    # Asked for, not defaulted: ``checkpoints`` set, or the key's algorithm named
    # (a daemon told which key to make does not go on quietly without one).
    explicit = "checkpoints" in audit or "checkpoint_algorithm" in audit
    enabled = audit.pop("checkpoints", True)
    interval = audit.pop("checkpoint_interval", 1.0)
    origin = audit.pop("origin", None)
    key_id = audit.pop("checkpoint_key", None)
    token = audit.pop("checkpoint_token", None)
    algorithm = audit.pop("checkpoint_algorithm", None)
    reset = audit.pop("reset", None)
    witnesses = audit.pop("witnesses", [])
    if not isinstance(enabled, bool):
        raise ConfigError("audit.checkpoints must be true or false")
    if (isinstance(interval, bool) or not isinstance(interval, int | float)
            or not math.isfinite(interval) or not 0.05 <= interval <= 3600):
        raise ConfigError("audit.checkpoint_interval must be a number of seconds from "
                          "0.05 to 3600")
    if origin is not None and (not isinstance(origin, str) or not origin
                               or any(c.isspace() or c == "+" for c in origin)):
        raise ConfigError("audit.origin must be a non-empty string without spaces or '+' "
                          "(a schema-less URL, c2sp.org/tlog-checkpoint)")
    for key, value in (("checkpoint_key", key_id), ("checkpoint_token", token)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"audit.{key} must be a non-empty string")
    if key_id is not None and (len(key_id) != 64 or
                               set(key_id) - set("0123456789abcdef")):
        raise ConfigError("audit.checkpoint_key must be a key ID: 64 lowercase hex digits")
    if algorithm is not None and algorithm not in CHECKPOINT_ALGORITHMS:
        raise ConfigError(f"audit.checkpoint_algorithm must be one of "
                          f"{', '.join(CHECKPOINT_ALGORITHMS)} (unset: ed25519 where a token "
                          "can make it, else ecdsa-p256)")
    if reset is not None and (not isinstance(reset, str) or len(reset) != 64
                              or set(reset) - set("0123456789abcdef")):
        raise ConfigError("audit.reset must be the 64 hex digits a refused start printed")
    if not isinstance(witnesses, list):
        raise ConfigError("audit.witnesses must be [[audit.witnesses]] tables")
    parsed = tuple(_witness(w, i) for i, w in enumerate(witnesses))
    names = [w.name for w in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"audit.witnesses names must be unique, got {names}")
    return TlogConfig(enabled, float(interval), origin, key_id, token, reset, parsed, explicit,
                      algorithm)
