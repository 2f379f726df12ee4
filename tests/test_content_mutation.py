"""Mutated metadata (hypothesis): nothing the content checks forbid is ever accepted, and
a mutation that keeps every rule is accepted. The oracle below restates the rules
independently of signerd.content's code."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signerd.content import ContentGuard, ContentInvalid, ContentStale
from tests.content_helpers import NOW, guard, n_snapshot, n_timestamp, t_snapshot, t_timestamp

PREVIOUS = 5  # the version already signed, and the meta version it referenced
BASES = {  # name → (key role, payload signed first at PREVIOUS, a valid later one)
    "notary-timestamp": ("timestamp", n_timestamp(PREVIOUS), n_timestamp(PREVIOUS + 1)),
    "notary-snapshot": ("snapshot", n_snapshot(PREVIOUS), n_snapshot(PREVIOUS + 1)),
    "tuf-timestamp": ("timestamp", t_timestamp(PREVIOUS, PREVIOUS),
                      t_timestamp(PREVIOUS + 1, PREVIOUS)),
    "tuf-snapshot": ("snapshot", t_snapshot(PREVIOUS, {"targets.json": PREVIOUS}),
                     t_snapshot(PREVIOUS + 1, {"targets.json": PREVIOUS})),
}
MAX_DAYS = {"timestamp": 31, "snapshot": 3 * 365, "root": 10 * 365}  # root keys sign root
SKEW = dt.timedelta(seconds=60)
TYPES = ["timestamp", "Timestamp", "snapshot", "Snapshot", "root", "Root", "Targets",
         "TIMESTAMP", "mirror", ""]


@pytest.fixture(scope="module")
def shared_guard(tmp_path_factory: pytest.TempPathFactory) -> ContentGuard:
    return guard(Path(tmp_path_factory.mktemp("mutation")) / "state.db")


def _expires(value: dict[str, Any], tuf: bool) -> dt.datetime | None:
    """TUF 1.0: exactly YYYY-MM-DDTHH:MM:SSZ (python-tuf); Notary: any RFC 3339 (Go)."""
    try:
        if tuf:
            return dt.datetime.strptime(value["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=dt.UTC)
        return dt.datetime.fromisoformat(value["expires"])
    except (KeyError, TypeError, ValueError):
        return None


def _allowed(base: str, role: str, value: dict[str, Any], canonical: bool) -> bool:
    """The rules, restated: canonical, _type of the key's role in the base's spelling,
    version a whole number not below PREVIOUS (for the role signed first; at least 1 for
    another), expiry in bounds, meta not going back."""
    floor = PREVIOUS if role == BASES[base][0] else 1
    tuf = base.startswith("tuf")
    typ = value.get("_type")
    if not canonical or typ != (role if tuf else role.capitalize()):
        return False
    version = value.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < floor:
        return False
    expires = _expires(value, tuf)
    if expires is None or not (
            NOW - SKEW < expires <= NOW + dt.timedelta(days=MAX_DAYS[role]) + SKEW):
        return False
    if tuf and role in ("timestamp", "snapshot"):  # only their meta is read (TUF 1.0)
        for entry in value.get("meta", {}).values():
            v = entry.get("version") if isinstance(entry, dict) else None
            if not isinstance(v, int) or isinstance(v, bool) or v < floor:
                return False
    return True


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, Any], bool, bool]:
    base = draw(st.sampled_from(sorted(BASES)))
    role, _, valid = BASES[base]
    value = json.loads(valid)
    original_type = value["_type"]
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["version", "expires", "_type", "meta", "role"]))
        if what == "version":
            value["version"] = draw(st.one_of(
                st.integers(-1, 9), st.just(True), st.just(5.0), st.just("6")))
        elif what == "expires":
            delta = dt.timedelta(seconds=draw(st.integers(-3 * 86400, 1200 * 86400)))
            value["expires"] = draw(st.sampled_from([
                (NOW + delta).strftime("%Y-%m-%dT%H:%M:%SZ"),
                (NOW + delta).isoformat(), "never"]))
        elif what == "_type":
            value["_type"] = draw(st.sampled_from(TYPES))
        elif what == "meta" and base.startswith("tuf"):
            name = next(iter(value["meta"]))
            value["meta"][name]["version"] = draw(st.integers(1, 9))
        elif what == "role":
            role = draw(st.sampled_from(["timestamp", "snapshot", "targets", "root"]))
    layout = draw(st.sampled_from(["canonical", "indented", "spaced"]))
    if layout == "canonical":
        payload = json.dumps(value, sort_keys=True, separators=(",", ":"),
                             ensure_ascii=False).encode()
        # A float or a bool-as-int still prints; canonical JSON has no floats.
        canonical = not isinstance(value.get("version"), float)
    else:
        payload = json.dumps(value, sort_keys=True, indent=1 if layout == "indented" else None
                             ).encode()
        canonical = False
    # Completeness is claimed only where the file stays what it was: same role and
    # _type, expires in the format's own spelling.
    same_format = (role == BASES[base][0] and value["_type"] == original_type
                   and str(value.get("expires")).endswith("Z"))
    return base, role, payload, value, canonical, same_format


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_nothing_forbidden_is_accepted(
    shared_guard: ContentGuard, case: tuple[str, str, bytes, dict[str, Any], bool, bool],
) -> None:
    base, role, payload, value, canonical, same_format = case
    gun = f"mutation/{secrets.token_hex(6)}"
    key_role, first, _ = BASES[base]
    shared_guard.check_and_record(gun, key_role, first, NOW)
    allowed = _allowed(base, role, value, canonical) if role in MAX_DAYS else False
    try:
        shared_guard.check_and_record(gun, role, payload, NOW)
    except (ContentInvalid, ContentStale):
        assert not (allowed and same_format), f"a valid payload was refused: {payload!r}"
    else:
        assert allowed, f"a forbidden payload was accepted for {role}: {payload!r}"
