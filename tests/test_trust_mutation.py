"""Issue 10 §5: hostile or malformed metadata ends in a verified repository or a TrustError.

Starts from real repositories the suite builds (root, targets, a delegation,
snapshot, timestamp) and applies seeded random mutations: byte flips,
truncations and insertions, and JSON-level edits of types, numbers, strings
and escapes, dates and key IDs. Half of the JSON edits are re-signed with the
right keys, and the snapshot and timestamp re-chained, so that the checks
behind the signatures are reached too. Any exception other than a TrustError
naming a file fails the test, with the seed and iteration to replay it.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from signerd.errors import InvalidArgument
from signerd.trust import (
    Envelope,
    FileMeta,
    SoftwareSigner,
    TrustedState,
    TrustError,
    sign_envelope,
    verify_repository,
)
from signerd.trust.metadata import META_HASHES
from tests.test_trust_flow import GUN, World, make_world

SEED = int(os.environ.get("SIGNERD_MUTATION_SEED", "20261201"))
MUTATIONS = int(os.environ.get("SIGNERD_MUTATIONS", "12000"))
NOW = datetime.now(UTC)
_NAMES_A_FILE = re.compile(r"^(?:\d+\.)?(?:root|targets(?:/[-a-z0-9_]+)*|snapshot|timestamp)"
                           r"\.json: ")

DATES = [
    "9999-12-31T23:59:59-01:00",  # the year 10000 in UTC (issue 10 §5)
    "0001-01-01T00:00:00+01:00",  # the year 0 in UTC
    "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "1970-01-01T00:00:00Z",
    "2020-02-30T00:00:00Z", "2024-02-29T24:00:00Z", "2030-01-01T00:00:60Z",
    "2030-01-01T00:00:00.123456789123Z", "2030-01-01T00:00:00+99:99", "2030-01-01 00:00:00Z",
    "2030-01-01T00:00:00", "+2030-01-01T00:00:00Z", "２０３０-01-01T00:00:00Z", "",
]
STRINGS = ["", "x", "\\", "\"", "\u0000", "\t", "\ud800", "\udfff\ud800", "é", "\U0001f600",
           "targets/../root", "../../etc/passwd", "targets/releases", "root", "\u2028<&>",
           "a" * 5000, "ecdsa", "rsa-x509", "ecdsa-x509", "ed25519", "rsapss", "eddsa", "sha256"]
NUMBERS = [0, -1, 1, 2, 3, 2**31, 2**63, -(2**63), 10**30, 10**4000]
OTHER_TYPES: list[Any] = [None, True, False, 0, 1.5, "s", [], {}, [None], {"": None}]


@dataclass
class Repo:
    world: World
    files: dict[str, bytes]
    state: TrustedState
    signers: dict[str, dict[str, SoftwareSigner]]
    key_ids: list[str]


def _build(base: Path) -> Repo:
    w = make_world(base)
    w.repo.add_target("v2", b"\x01" * 32, 7, w.targets)
    w.refresh()
    files = w.repo.files()
    state = verify_repository(GUN, files, now=NOW).state
    root_id = w.repo.root().roles["root"].keyids[0]
    signers = {"root": {root_id: w.root}, "targets": {w.targets.key_id: w.targets},
               "targets/releases": {w.ci.key_id: w.ci},
               "snapshot": {w.snapshot.key_id: w.snapshot},
               "timestamp": {w.timestamp.key_id: w.timestamp}}
    ids = [root_id, w.targets.key_id, w.ci.key_id, w.snapshot.key_id, w.timestamp.key_id]
    return Repo(w, files, state, signers, ids)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return doc


def _json_edit(rng: random.Random, doc: Any, ids: list[str]) -> tuple[Any, str]:
    paths = _paths(doc)
    path = rng.choice(paths)
    old: Any = doc
    for p in path:
        old = old[p]
    kind = rng.randrange(9)
    if kind == 0:
        return _set(doc, path, rng.choice(OTHER_TYPES)), f"type at {path}"
    if kind == 1:
        base = old if isinstance(old, int) and not isinstance(old, bool) else 0
        return _set(doc, path, rng.choice([base + 1, base - 1, -base, *NUMBERS])), f"number {path}"
    if kind == 2:
        s = old if isinstance(old, str) else ""
        cut = rng.randrange(len(s) + 1)
        new = s[:cut] + rng.choice(STRINGS) + s[cut:] if rng.random() < 0.6 else rng.choice(
            STRINGS)
        return _set(doc, path, new), f"string at {path}"
    if kind == 3:  # a date wherever one is, else anywhere
        dated = [p for p in paths if p and p[-1] == "expires"] or [path]
        where = rng.choice(dated)
        return _set(doc, where, rng.choice(DATES)), f"date at {where}"
    if kind == 4:  # key IDs: swap for another key's, random hex, upper case
        choice = rng.choice([*ids, "0" * 64, ids[0].upper(), ids[1][:-1], "g" * 64])
        if isinstance(old, dict) and old:
            key = rng.choice(list(old))
            old[choice] = old.pop(key)
            return doc, f"key id {key}→{choice} at {path}"
        return _set(doc, path, choice), f"key id at {path}"
    if kind == 5 and isinstance(old, dict) and old:
        key = rng.choice(list(old))
        del old[key]
        return doc, f"delete {key!r} at {path}"
    if kind == 6 and isinstance(old, list) and old:
        old.append(rng.choice(old) if rng.random() < 0.5 else rng.choice(OTHER_TYPES))
        return doc, f"append at {path}"
    if kind == 7 and isinstance(old, dict):
        old[rng.choice(STRINGS[:8] + ["version", "keys", "meta", "custom"])] = rng.choice(
            OTHER_TYPES)
        return doc, f"add key at {path}"
    deep: Any = rng.choice([[], {}])
    for _ in range(rng.choice([2, 50, 3000])):
        deep = [deep]
    return _set(doc, path, deep), f"nest at {path}"


def _dump(doc: Any, rng: random.Random) -> bytes:
    ensure_ascii = rng.random() < 0.5  # escapes (\\uXXXX, surrogates) or raw UTF-8
    try:
        return json.dumps(doc, ensure_ascii=ensure_ascii, separators=(",", ":")).encode(
            "utf-8", "surrogatepass")
    except (ValueError, RecursionError):
        return json.dumps(None).encode()


def _rechain(repo: Repo, files: dict[str, bytes], changed: str) -> None:
    """Record ``changed`` in snapshot (or timestamp) and re-sign them, as a server would."""
    chain = {"snapshot": ["timestamp"], "timestamp": []}.get(changed, ["snapshot", "timestamp"])
    for role in chain:
        env = Envelope.from_bytes(files[role], role)
        target = "snapshot" if role == "timestamp" else changed
        env.signed["meta"][target] = FileMeta.for_bytes(files[target], META_HASHES).to_dict()
        files[role] = sign_envelope(env.signed, repo.signers[role]).to_bytes()
        changed = role


def _mutate(rng: random.Random, repo: Repo) -> tuple[dict[str, bytes], str]:
    files = dict(repo.files)
    name = rng.choice(sorted(files))
    data = files[name]
    kind = rng.randrange(5)
    if kind == 0:
        i = rng.randrange(len(data))
        files[name] = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
        return files, f"{name}: flip byte {i}"
    if kind == 1:
        i = rng.randrange(len(data))
        files[name] = data[:i]
        return files, f"{name}: truncate at {i}"
    if kind == 2:
        i = rng.randrange(len(data))
        junk = rng.choice([b"\x00", b"\xff", b"\\u0000", b"\\ud800", b",", b"}", b"\"", b"1e999",
                           b"-0", b"\xc3", b"\t", b"[", b"00"])
        files[name] = data[:i] + junk + data[i:]
        return files, f"{name}: insert {junk!r} at {i}"
    doc = json.loads(data)
    doc, what = _json_edit(rng, doc, repo.key_ids)
    if kind == 3 or not isinstance(doc, dict) or not isinstance(doc.get("signed"), dict):
        files[name] = _dump(doc, rng)
        return files, f"{name}: {what}"
    try:  # re-sign, so that the checks behind the signature run too
        files[name] = sign_envelope(doc["signed"], repo.signers[name]).to_bytes()
        _rechain(repo, files, name)
    except (InvalidArgument, RecursionError, UnicodeEncodeError, TypeError, KeyError):
        files[name] = _dump(doc, rng)
    return files, f"{name}: {what}, re-signed"


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> list[Repo]:
    return [_build(tmp_path_factory.mktemp(f"mutation{i}")) for i in range(2)]


def test_mutated_trust_data_is_verified_or_a_trust_error_naming_a_file(repos: list[Repo]) -> None:
    rng = random.Random(SEED)
    failures: list[str] = []
    outcomes = {"verified": 0, "refused": 0}
    started = time.monotonic()
    for i in range(MUTATIONS):
        repo = repos[i % len(repos)]
        files, what = _mutate(rng, repo)
        trusted = repo.state if rng.random() < 0.5 else None
        try:
            verify_repository(GUN, files, trusted=trusted, now=NOW)
            outcomes["verified"] += 1
        except TrustError as e:
            outcomes["refused"] += 1
            if not _NAMES_A_FILE.match(str(e)) or "\n" in str(e):
                failures.append(f"#{i} {what}: message names no file: {str(e)[:200]!r}")
        except Exception as e:  # noqa: BLE001 - exactly what this test looks for
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            failures.append(f"#{i} {what}: {tb[:300]}")
        if len(failures) >= 20:
            break
    elapsed = time.monotonic() - started
    assert not failures, (f"seed {SEED}: {len(failures)} mutation(s) escaped as something "
                          "other than a TrustError naming a file:\n" + "\n".join(failures))
    assert outcomes["refused"] > MUTATIONS // 2 and outcomes["verified"] > 0, outcomes
    assert elapsed < 60, f"{MUTATIONS} mutations took {elapsed:.0f} s"


def test_the_mutation_test_can_fail(repos: list[Repo], monkeypatch: pytest.MonkeyPatch) -> None:
    """A verifier that lets a KeyError escape is caught by the same loop."""
    import signerd.trust.verify as verify

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("escaped")

    monkeypatch.setattr(verify, "verify_role", broken)
    with pytest.raises(AssertionError, match="KeyError"):
        test_mutated_trust_data_is_verified_or_a_trust_error_naming_a_file(repos)
