"""Content-aware signing's checks: each attack refused with the check it names, each with a
legitimate twin that passes; over a real SQLite store (tests/test_content_store.py races
the stores and runs the same on PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from signerd.content import (
    ContentConfig,
    ContentGuard,
    ContentInvalid,
    ContentStale,
    Format,
    parse_content,
    parse_state,
)
from signerd.errors import ConfigError, FailedPrecondition, InvalidArgument
from signerd.trust.metadata import Envelope, Signature
from tests.content_helpers import (
    DAY,
    GUN,
    NOW,
    guard,
    n_root,
    n_snapshot,
    n_targets,
    n_timestamp,
    t_root,
    t_snapshot,
    t_targets,
    t_timestamp,
)

SIG = b"\x01" * 64  # the signature note_signature is told of (its bytes are only hashed)


def notary_file(payload: bytes, key_id: str = "ab" * 32) -> bytes:
    """The file notary writes for ``payload`` with one signature."""
    return Envelope(json.loads(payload), [Signature(key_id, "ecdsa", SIG)]).to_bytes()


@dataclass(frozen=True)
class Case:
    """``setup`` is signed first (role, payload, note the signed file's hash); ``attack``
    must be refused by ``check`` with ``error``; ``twin`` (same setup) must pass."""

    setup: tuple[tuple[str, bytes, bool], ...]
    attack: tuple[str, bytes]
    error: type[Exception]
    check: str
    twin: tuple[str, bytes]


SNAP4, SNAP5 = n_snapshot(4), n_snapshot(5)
CASES = {
    # rollback
    "notary timestamp below one already signed": Case(
        (("timestamp", n_timestamp(5), False),), ("timestamp", n_timestamp(3)),
        ContentStale, "rollback", ("timestamp", n_timestamp(6))),
    "tuf targets below one already signed": Case(
        (("targets", t_targets(7), False),), ("targets", t_targets(6)),
        ContentStale, "rollback", ("targets", t_targets(7, targets=("new.txt",)))),
    "notary root below one already signed": Case(
        (("root", n_root(3), False),), ("root", n_root(2)),
        ContentStale, "rollback", ("root", n_root(4))),
    # role
    "Snapshot with a timestamp key": Case(
        (), ("timestamp", n_snapshot()), ContentInvalid, "role", ("timestamp", n_timestamp())),
    "Root with a timestamp key": Case(
        (), ("timestamp", n_root()), ContentInvalid, "role", ("root", n_root())),
    "tuf root with a targets key": Case(
        (), ("targets", t_root()), ContentInvalid, "role", ("root", t_root())),
    "Timestamp with a delegation key": Case(
        (), ("targets/releases", n_timestamp()), ContentInvalid, "role",
        ("targets/releases", n_targets())),
    "tuf targets with a snapshot key": Case(
        (), ("snapshot", t_targets()), ContentInvalid, "role", ("snapshot", t_snapshot())),
    # expiry
    "timestamp expiring in 10 years": Case(
        (), ("timestamp", n_timestamp(expires=3650 * DAY)), ContentInvalid, "expiry",
        ("timestamp", n_timestamp(expires=14 * DAY))),
    "already expired timestamp": Case(
        (), ("timestamp", n_timestamp(expires=-DAY)), ContentInvalid, "expiry",
        ("timestamp", n_timestamp(expires=DAY))),
    "tuf snapshot expiring in 4 years": Case(
        (), ("snapshot", t_snapshot(expires=4 * 365 * DAY)), ContentInvalid, "expiry",
        ("snapshot", t_snapshot(expires=3 * 365 * DAY))),
    "root expiring in 11 years": Case(
        (), ("root", n_root(expires=11 * 365 * DAY)), ContentInvalid, "expiry",
        ("root", n_root(expires=10 * 365 * DAY))),
    # format
    "non-JSON bytes": Case(
        (), ("timestamp", b"\x30\x82\x01\x0a not json"), ContentInvalid, "json",
        ("timestamp", n_timestamp())),
    "JSON that is not a signed object": Case(
        (), ("timestamp", b'["Timestamp"]'), ContentInvalid, "json",
        ("timestamp", n_timestamp())),
    "non-canonical JSON (indented)": Case(
        (), ("timestamp", json.dumps(json.loads(n_timestamp()), indent=1).encode()),
        ContentInvalid, "canonical", ("timestamp", n_timestamp())),
    "non-canonical JSON (duplicate key)": Case(
        (), ("timestamp", n_timestamp().replace(b'"version":1', b'"version":9,"version":1')),
        ContentInvalid, "canonical", ("timestamp", n_timestamp())),
    "float in tuf metadata": Case(
        (), ("timestamp", t_timestamp().replace(b'"version":1}', b'"version":1.0}')),
        ContentInvalid, "canonical", ("timestamp", t_timestamp())),
    "unknown _type": Case(
        (), ("timestamp", b'{"_type":"Mirrors","version":1}'), ContentInvalid, "type",
        ("timestamp", n_timestamp())),
    "tuf without spec_version": Case(
        (), ("timestamp", t_timestamp().replace(b'"spec_version":"1.0.31",', b"")),
        ContentInvalid, "structure", ("timestamp", t_timestamp())),
    "notary timestamp without snapshot meta": Case(
        (), ("timestamp", n_timestamp().replace(b'"snapshot"', b'"snapshoX"')),
        ContentInvalid, "structure", ("timestamp", n_timestamp())),
    # freeze
    "tuf timestamp pointing at an older snapshot": Case(
        (("timestamp", t_timestamp(1, snapshot_version=4), False),),
        ("timestamp", t_timestamp(2, snapshot_version=3)), ContentStale, "freeze",
        ("timestamp", t_timestamp(2, snapshot_version=4))),
    "tuf snapshot pointing at an older targets": Case(
        (("snapshot", t_snapshot(1, {"targets.json": 5, "releases.json": 2}), False),),
        ("snapshot", t_snapshot(2, {"targets.json": 5, "releases.json": 1})), ContentStale,
        "freeze", ("snapshot", t_snapshot(2, {"targets.json": 6, "releases.json": 2}))),
    "notary timestamp pointing at an older snapshot signerd signed": Case(
        (("snapshot", SNAP4, True), ("snapshot", SNAP5, True),
         ("timestamp", n_timestamp(1, notary_file(SNAP5)), False)),
        ("timestamp", n_timestamp(2, notary_file(SNAP4))), ContentStale, "freeze",
        ("timestamp", n_timestamp(2, notary_file(SNAP5)))),
    # delegation
    "notary delegation outside its paths": Case(
        (("targets", n_targets(1, delegations={"targets/releases": ["releases/"]}), False),),
        ("targets/releases", n_targets(1, ("releases/1", "nightly"))), ContentStale,
        "delegation", ("targets/releases", n_targets(1, ("releases/1", "releases/2")))),
    "tuf delegation outside its path patterns": Case(
        (("targets", t_targets(1, delegations={"releases": ["releases/*"]}), False),),
        ("targets/releases", t_targets(1, ("releases/a/b.txt",))), ContentStale,
        "delegation", ("targets/releases", t_targets(1, ("releases/b.txt",)))),
    "tuf delegation outside its hash prefixes": Case(
        (("targets", t_targets(1, hash_prefixes={"bins": ["0", "1", "2", "3"]}), False),),
        # sha256("app.txt") starts with 6, sha256("a.txt") with 1
        ("targets/bins", t_targets(1, ("app.txt",))), ContentStale, "delegation",
        ("targets/bins", t_targets(1, ("a.txt",)))),
}


def _run(path: Path, case: Case, step: tuple[str, bytes]) -> None:
    g = guard(path)
    try:
        for role, payload, note in case.setup:
            g.check_and_record(GUN, role, payload, NOW)
            if note:
                g.note_signature(GUN, role, payload, "ab" * 32, "ecdsa", SIG)
        g.check_and_record(GUN, step[0], step[1], NOW)
    finally:
        g.close()


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_attack_is_refused_and_its_twin_signs(tmp_path: Path, case: Case) -> None:
    with pytest.raises(case.error) as refused:
        _run(tmp_path / "attack.db", case, case.attack)
    assert refused.value.check == case.check  # type: ignore[attr-defined]
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 200
    _run(tmp_path / "twin.db", case, case.twin)


def test_a_file_signed_with_a_metadata_key_is_told_to_use_a_raw_key(tmp_path: Path) -> None:
    """A new user's first try: signerctl's first key is a metadata key, and a text file
    is what they sign with it."""
    case = CASES["non-JSON bytes"]
    for payload in (b"hello\n", b"\x30\x82\x01\x0a not json"):
        with pytest.raises(ContentInvalid, match="use a key of purpose raw for other bytes"):
            _run(tmp_path / "a.db", case, ("timestamp", payload))


def test_refusals_map_to_the_status_of_their_kind() -> None:
    assert issubclass(ContentStale, FailedPrecondition)
    assert issubclass(ContentInvalid, InvalidArgument)


def test_rollback_message_names_role_versions_and_gun(tmp_path: Path) -> None:
    g = guard(tmp_path / "s.db")
    g.check_and_record(GUN, "timestamp", n_timestamp(5), NOW)
    with pytest.raises(ContentStale) as e:
        g.check_and_record(GUN, "timestamp", n_timestamp(3), NOW)
    assert str(e.value) == (
        "timestamp version 3 is below version 5 already signed for docker.io/acme/app")


def test_rollback_is_refused_after_a_restart(tmp_path: Path) -> None:
    first = guard(tmp_path / "s.db")
    first.check_and_record(GUN, "timestamp", n_timestamp(5), NOW)
    first.close()
    second = guard(tmp_path / "s.db")  # a new store object on the same file
    with pytest.raises(ContentStale, match="below version 5"):
        second.check_and_record(GUN, "timestamp", n_timestamp(4), NOW)
    assert second.check_and_record(GUN, "timestamp", n_timestamp(5), NOW).version == 5


def test_equal_version_with_other_content_is_allowed_and_flagged(tmp_path: Path) -> None:
    g = guard(tmp_path / "s.db")
    first = g.check_and_record(GUN, "timestamp", n_timestamp(5, b"a"), NOW)
    assert not first.same_version_changed and first.previous_version is None
    same = g.check_and_record(GUN, "timestamp", n_timestamp(5, b"a"), NOW)
    assert not same.same_version_changed and same.previous_version == 5
    other = g.check_and_record(GUN, "timestamp", n_timestamp(5, b"b"), NOW)
    assert other.same_version_changed and other.version == 5
    assert other.format is Format.NOTARY and other.type == "timestamp"


def test_watermarks_are_per_gun_and_role(tmp_path: Path) -> None:
    g = guard(tmp_path / "s.db")
    g.check_and_record(GUN, "timestamp", n_timestamp(9), NOW)
    g.check_and_record("docker.io/other/app", "timestamp", n_timestamp(1), NOW)
    g.check_and_record(GUN, "targets", n_targets(1), NOW)
    g.check_and_record(GUN, "targets/releases", n_targets(1), NOW)
    assert [(s.role, s.version) for s in g.versions(GUN)] == [
        ("targets", 1), ("targets/releases", 1), ("timestamp", 9)]


def test_what_could_not_be_checked_is_reported(tmp_path: Path) -> None:
    g = guard(tmp_path / "s.db")
    # signerd never saw the targets or root files this snapshot references
    out = g.check_and_record(GUN, "snapshot", n_snapshot(1), NOW)
    assert set(out.unchecked) == {"freeze:root", "freeze:targets"}
    # nor the parent of this delegation
    assert g.check_and_record(GUN, "targets/x", n_targets(1), NOW).unchecked == ("delegation",)
    # TUF meta carry versions: nothing left unchecked
    assert g.check_and_record(GUN, "timestamp", t_timestamp(1), NOW).unchecked == ()


def test_python_tuf_readme_example_signs_a_30_day_repository(tmp_path: Path) -> None:
    g = guard(tmp_path / "s.db")
    expires = 30 * DAY
    for role, payload in (("root", t_root(expires=expires)),
                          ("targets", t_targets(expires=expires)),
                          ("snapshot", t_snapshot(expires=expires)),
                          ("timestamp", t_timestamp(expires=expires))):
        assert g.check_and_record(GUN, role, payload, NOW).format is Format.TUF


def test_digest_only_requests_are_refused_for_checked_guns(tmp_path: Path) -> None:
    config = parse_content({"gun": [{"pattern": "cosign/*", "enabled": False}]})
    g = guard(tmp_path / "s.db", config)
    with pytest.raises(ContentInvalid, match="digest cannot be checked") as e:
        g.refuse_digest(GUN, "targets")
    assert e.value.check == "digest"
    g.refuse_digest("cosign/app", "targets")  # not checked: digests sign as before
    assert not g.check_and_record("cosign/app", "targets", b"anything", NOW).checked


def test_per_gun_override_tightens_expiry(tmp_path: Path) -> None:
    config = parse_content({"timestamp": {"max_expiry_days": 20},
                            "gun": [{"pattern": "docker.io/strict/*",
                                     "timestamp": {"max_expiry_days": 2}}]})
    g = guard(tmp_path / "s.db", config)
    g.check_and_record(GUN, "timestamp", n_timestamp(expires=19 * DAY), NOW)
    with pytest.raises(ContentInvalid, match="more than 20 days"):
        g.check_and_record(GUN, "timestamp", n_timestamp(2, expires=21 * DAY), NOW)
    with pytest.raises(ContentInvalid, match="more than 2 days ahead"):
        g.check_and_record("docker.io/strict/app", "timestamp", n_timestamp(expires=3 * DAY),
                           NOW)
    g.check_and_record("docker.io/strict/app", "timestamp", n_timestamp(expires=DAY), NOW)


def test_clock_skew_allowance(tmp_path: Path) -> None:
    g = guard(tmp_path / "s.db")
    # 30 s past expiry: within the default 60 s skew; 14 days + 30 s ahead too
    g.check_and_record(GUN, "timestamp",
                       n_timestamp(1, expires=-dt.timedelta(seconds=30)), NOW)
    g.check_and_record(GUN, "timestamp",
                       n_timestamp(2, expires=31 * DAY + dt.timedelta(seconds=30)), NOW)
    with pytest.raises(ContentInvalid, match="expired"):
        g.check_and_record(GUN, "timestamp",
                           n_timestamp(3, expires=-dt.timedelta(seconds=61)), NOW)


@pytest.mark.parametrize(("raw", "message"), [
    ({"timestamp": {"max_expiry_days": 0}}, "max_expiry_days must be more than 0"),
    ({"timestamp": {"max_days": 3}}, "unknown keys in [content.timestamp]"),
    ({"clock_skew": -1}, "clock_skew must be 0 to 3600"),
    ({"enabled": "yes"}, "enabled must be true or false"),
    ({"gun": [{"enabled": False}]}, "pattern must be a non-empty"),
    ({"mirror": {}}, "unknown keys in [content]"),
])
def test_content_config_errors_name_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_content(raw)
    assert message in str(e.value)


def test_state_config(tmp_path: Path) -> None:
    assert parse_state(None, tmp_path).sqlite_path == tmp_path / "signerd-state.db"
    assert parse_state({"url": "sqlite:///w.db"}, tmp_path).sqlite_path == tmp_path / "w.db"
    assert parse_state({"url": "sqlite:////var/x.db"}, tmp_path).sqlite_path == Path("/var/x.db")
    pg = parse_state({"url": "postgresql://u:pw@db/signerd"}, tmp_path)
    assert pg.is_postgres
    with pytest.raises(ConfigError) as e:
        parse_state({"url": "mysql://u:hunter2@db"}, tmp_path)
    assert "hunter2" not in str(e.value)


def test_defaults_are_no_tighter_than_notary_servers() -> None:
    limits = ContentConfig().default
    assert limits.max_expiry_for("timestamp") >= 14 * DAY
    assert limits.max_expiry_for("targets/releases") == 3 * 365 * DAY
    assert limits.max_expiry_for("snapshot") == 3 * 365 * DAY
    assert limits.max_expiry_for("root") == 10 * 365 * DAY


def test_guard_opens_the_configured_sqlite_store(tmp_path: Path) -> None:
    g = ContentGuard.open(ContentConfig(), parse_state({"url": "sqlite:///st/w.db"}, tmp_path))
    g.check_and_record(GUN, "timestamp", n_timestamp(2), NOW)
    assert (tmp_path / "st" / "w.db").exists()
    assert g.reset(GUN) == 1 and g.versions(GUN) == []
    g.check_and_record(GUN, "timestamp", n_timestamp(1), NOW)  # reset: lower is fine again


# -- spellings Go reads as a checked field (attack session, finding 2) ----------------------

def _respell(payload: bytes, path: tuple[str, ...], key: str, value: object) -> bytes:
    """``payload`` (canonical JSON) with ``key: value`` added in the object at ``path``,
    re-encoded canonically in the payload's own format (Notary's or TUF's)."""
    from securesystemslib.formats import encode_canonical as olpc

    from signerd.canonicaljson import encode_canonical as notary

    doc = json.loads(payload, strict=False)
    obj = doc
    for part in path:
        obj = obj[part]
    obj[key] = value
    if doc["_type"][0].isupper():
        return notary(doc)
    text = olpc(doc)
    assert isinstance(text, str)
    return text.encode()


@pytest.mark.parametrize("make,path,key,value", [
    (n_timestamp, (), "expire\u017f", "2099-01-01T00:00:00Z"),  # 'ſ' folds to 's'
    (n_timestamp, (), "EXPIRES", "2099-01-01T00:00:00Z"),
    (n_timestamp, (), "Version", 1),
    (n_timestamp, ("meta", "snapshot"), "hashe\u017f", {"sha256": "AA=="}),
    (n_targets, (), "\u212aeys", {}),  # KELVIN SIGN folds to 'k'
    (t_timestamp, (), "VERSION", 1),
    (t_snapshot, ("meta", "targets.json"), "Version", 1),
    (t_targets, (), "Delegations", {"keys": {}, "roles": []}),
], ids=["notary-expires-long-s", "notary-EXPIRES", "notary-Version", "notary-meta-hashes",
        "notary-kelvin-keys", "tuf-VERSION", "tuf-meta-Version", "tuf-Delegations"])
def test_another_spelling_of_a_checked_field_is_refused(tmp_path: Path, make: object,
                                                        path: tuple[str, ...], key: str,
                                                        value: object) -> None:
    """Go's encoding/json (notary, go-tuf) fills a struct field from any key equal to its
    name under Unicode case folding, the last one winning; such a key beside (or instead
    of) the exact one would be checked under one reading and trusted under the other."""
    assert callable(make)
    payload = _respell(make(), path, key, value)
    with pytest.raises(InvalidArgument, match="another spelling of"):
        guard(tmp_path / "w.db").check_and_record(GUN, "timestamp" if b"imestamp" in payload
                                                  else "snapshot" if b"napshot" in payload
                                                  else "targets", payload, NOW)


def test_map_keys_keep_their_case(tmp_path: Path) -> None:
    """Target and file names are map keys, which Go matches exactly: a tag ``Version`` beside
    ``version`` is two targets, and signs."""
    g = guard(tmp_path / "w.db")
    outcome = g.check_and_record(GUN, "targets", n_targets(1, ("Version", "version", "EXPIRES")),
                                 NOW)
    assert outcome.checked
