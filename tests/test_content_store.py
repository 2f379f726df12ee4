"""The watermark stores, SQLite and a real PostgreSQL server (tests/_postgres.py): durable
across restarts, one compare-and-set under races of threads and processes, schema
migrated at open, listing and reset, and failures that are UNAVAILABLE without secrets."""

from __future__ import annotations

import multiprocessing
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from signerd.content import (
    ContentConfig,
    ContentGuard,
    ContentStale,
    StateUnavailable,
    open_store,
    parse_state,
)
from signerd.content._postgres import PostgresStore
from signerd.content._store import SCHEMA_VERSION
from tests._postgres import Postgres, postgres  # noqa: F401 - the fixture
from tests.content_helpers import (
    GUN,
    NOW,
    Observed,
    n_snapshot,
    n_targets,
    n_timestamp,
    race_worker,
    t_snapshot,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'state.db'}"
        return
    server: Postgres = request.getfixturevalue("postgres")
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # noqa: S608 - hex name made here
    yield server.url.replace("/signerd?", f"/{name}?")


def _guard(url: str) -> ContentGuard:
    return ContentGuard(ContentConfig(), open_store(parse_state({"url": url}, Path("/"))))


def test_rollback_is_refused_after_a_restart(state_url: str) -> None:
    first = _guard(state_url)
    first.check_and_record(GUN, "timestamp", n_timestamp(5), NOW)
    first.check_and_record(GUN, "snapshot", t_snapshot(3, {"targets.json": 7}), NOW)
    first.close()
    second = _guard(state_url)  # a new store object on the same file / database
    with pytest.raises(ContentStale, match="timestamp version 4 is below version 5"):
        second.check_and_record(GUN, "timestamp", n_timestamp(4), NOW)
    with pytest.raises(ContentStale, match="targets.json version 6, below version 7"):
        second.check_and_record(GUN, "snapshot", t_snapshot(4, {"targets.json": 6}), NOW)
    assert second.check_and_record(GUN, "timestamp", n_timestamp(5, b"x"), NOW) \
        .same_version_changed
    second.close()


def test_versions_lists_and_reset_forgets_one_gun(state_url: str) -> None:
    g = _guard(state_url)
    g.check_and_record(GUN, "timestamp", n_timestamp(3), NOW)
    g.check_and_record(GUN, "snapshot", t_snapshot(2, {"targets.json": 4}), NOW)
    g.check_and_record(GUN, "targets", n_targets(1, delegations={"targets/a": ["a/"]}), NOW)
    g.check_and_record("other/gun", "timestamp", n_timestamp(8), NOW)
    shown = {s.role: s for s in g.versions(GUN)}
    assert sorted(shown) == ["snapshot", "targets", "timestamp"]
    assert shown["snapshot"].version == 2
    assert shown["snapshot"].meta_versions == (("targets.json", 4),)
    assert shown["timestamp"].signed_at == "2031-03-01T12:00:00Z"
    assert g.reset(GUN) == 5  # 3 watermarks, 1 meta mark, 1 delegation
    assert g.versions(GUN) == []
    g.check_and_record(GUN, "timestamp", n_timestamp(1), NOW)
    assert [s.version for s in g.versions("other/gun")] == [8]
    g.close()


def test_schema_is_migrated_once_and_a_newer_one_refused(state_url: str) -> None:
    _guard(state_url).close()
    _guard(state_url).close()  # a second open migrates nothing
    if state_url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(state_url.removeprefix("sqlite://")) as db:
            assert db.execute("SELECT version FROM signerd_schema").fetchall() == [
                (SCHEMA_VERSION,)]
            db.execute("UPDATE signerd_schema SET version = 99")
    else:
        with psycopg.connect(state_url, autocommit=True) as conn:
            assert conn.execute("SELECT version FROM signerd_schema").fetchall() == [
                (SCHEMA_VERSION,)]
            conn.execute("UPDATE signerd_schema SET version = 99")
    with pytest.raises(StateUnavailable, match="schema version 99, newer than"):
        _guard(state_url)


def test_notary_file_hashes_map_to_versions_across_restarts(state_url: str) -> None:
    from tests.test_content import SIG, notary_file

    g = _guard(state_url)
    for version in (4, 5):
        snap = n_snapshot(version)
        g.check_and_record(GUN, "snapshot", snap, NOW)
        g.note_signature(GUN, "snapshot", snap, "ab" * 32, "ecdsa", SIG)
    g.check_and_record(GUN, "timestamp", n_timestamp(1, notary_file(n_snapshot(5))), NOW)
    g.close()
    g = _guard(state_url)
    with pytest.raises(ContentStale, match="snapshot version 4, below version 5"):
        g.check_and_record(GUN, "timestamp", n_timestamp(2, notary_file(n_snapshot(4))), NOW)
    g.close()


def test_check_records_nothing_and_record_maps_the_signed_file(state_url: str) -> None:
    """check() only reads; record() with the signature records the version and the hash
    of the file that signature makes, in its one transaction (no note_signature)."""
    from signerd.trust.metadata import Signature
    from tests.test_content import SIG, notary_file

    g = _guard(state_url)
    snap4 = g.check(GUN, "snapshot", n_snapshot(4), NOW)
    assert snap4 is not None and g.versions(GUN) == []  # checked, nothing recorded
    g.record(snap4, Signature("ab" * 32, "ecdsa", SIG))
    snap5 = g.check(GUN, "snapshot", n_snapshot(5), NOW)
    assert snap5 is not None
    g.record(snap5, Signature("ab" * 32, "ecdsa", SIG))
    g.check_and_record(GUN, "timestamp", n_timestamp(1, notary_file(n_snapshot(5))), NOW)
    g.close()
    g = _guard(state_url)
    with pytest.raises(ContentStale, match="snapshot version 4, below version 5"):
        g.check(GUN, "timestamp", n_timestamp(2, notary_file(n_snapshot(4))), NOW)
    assert [(s.role, s.version) for s in g.versions(GUN)] == [("snapshot", 5), ("timestamp", 1)]
    g.close()


def test_a_check_overtaken_by_another_replica_is_refused_at_record(state_url: str) -> None:
    """Between check (before the token signs) and record (before the signature is
    returned) another replica records a higher version: record refuses and records
    nothing, neither the version nor the file hash of the signature that is dropped."""
    from signerd.trust.metadata import Signature
    from tests.test_content import SIG, notary_file

    a, b = _guard(state_url), _guard(state_url)
    checked = a.check(GUN, "snapshot", n_snapshot(5), NOW)
    assert checked is not None
    b.check_and_record(GUN, "snapshot", n_snapshot(6), NOW)
    with pytest.raises(ContentStale, match="snapshot version 5 is below version 6"):
        a.record(checked, Signature("ab" * 32, "ecdsa", SIG))
    assert [(s.role, s.version) for s in a.versions(GUN)] == [("snapshot", 6)]
    # The dropped signature's file is unknown: a timestamp naming it is not mapped to 5.
    out = a.check_and_record(GUN, "timestamp", n_timestamp(1, notary_file(n_snapshot(5))), NOW)
    assert out.unchecked == ("freeze:snapshot",)
    a.close()
    b.close()


def test_sqlite_commits_what_queued_meanwhile_in_one_transaction(tmp_path: Path) -> None:
    """Group commit: compare-and-sets that queue while a transaction holds the connection
    go in the next one, decided in arrival order, each seeing the ones before it; a refused
    one records nothing, the others commit once."""
    from signerd.content._sqlite import SqliteStore
    from tests.content_helpers import t_timestamp

    store = SqliteStore(tmp_path / "state.db")
    g = ContentGuard(ContentConfig(), store)
    g.check_and_record(GUN, "timestamp", t_timestamp(5, 1), NOW)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    # (version, snapshot version): 7 passes; 3 is a rollback below 7; 9 passes and raises
    # snapshot.json to 2; 10 references snapshot 1, below what 9 (same transaction) did; 6
    # is a rollback below 9.
    items = [(7, 1), (3, 50), (9, 2), (10, 1), (6, 3)]
    results: dict[int, object] = {}

    def sign(version: int, snapshot: int) -> None:
        try:
            results[version] = g.check_and_record(
                GUN, "timestamp", t_timestamp(version, snapshot), NOW).version
        except ContentStale as e:
            results[version] = e.check

    threads = []
    with store._lock:  # a transaction in progress: the others queue behind it
        for n, item in enumerate(items, start=1):
            threads.append(threading.Thread(target=sign, args=item))
            threads[-1].start()
            while len(store._queue) < n:  # queued in this order
                time.sleep(0.001)
    for t in threads:
        t.join(30)
    assert results == {7: 7, 3: "rollback", 9: 9, 10: "freeze", 6: "rollback"}
    kinds = [s.split()[0] for s in statements]
    assert kinds.count("BEGIN") == kinds.count("COMMIT") == 1
    assert kinds.count("ROLLBACK") == 3  # ROLLBACK TO the refused items' savepoints
    [state] = g.versions(GUN)
    assert (state.version, state.meta_versions) == (9, (("snapshot.json", 2),))
    g.close()


def _monotone(accepted: list[tuple[int, int]]) -> None:
    versions = [v for _, v in sorted(accepted)]
    assert versions, "nothing was accepted"
    assert all(a <= b for a, b in zip(versions, versions[1:], strict=False)), versions


def test_threads_racing_never_accept_a_lower_version(state_url: str) -> None:
    gun = f"race/{secrets.token_hex(4)}"
    results: list[list[tuple[int, int]]] = []
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            results.append(race_worker(state_url, gun, seed, 25))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    accepted = [a for r in results for a in r]
    _monotone(accepted)
    g = _guard(state_url)
    assert [s.version for s in g.versions(gun)] == [max(v for _, v in accepted)]
    g.close()


def test_processes_racing_never_accept_a_lower_version(state_url: str) -> None:
    gun = f"race/{secrets.token_hex(4)}"
    _guard(state_url).close()  # migrate first: the race is on watermarks, not on DDL
    # spawn: a forked child of a process with gRPC threads can abort (tests/_tpm.py)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(race_worker, [(state_url, gun, 100 + i, 25) for i in range(4)])
    _monotone([a for r in results for a in r])


def test_an_unreachable_postgresql_is_unavailable_and_keeps_the_password(
    tmp_path: Path,
) -> None:
    url = f"postgresql://signerd:hunter2secret@/signerd?host={tmp_path}&connect_timeout=1"
    assert parse_state({"url": url}, tmp_path).is_postgres
    with pytest.raises(StateUnavailable) as e:
        PostgresStore(url, timeout=1.0)
    assert "hunter2secret" not in str(e.value)
    assert str(e.value).startswith("state database (PostgreSQL) unavailable")


def test_an_unwritable_sqlite_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StateUnavailable, match="cannot open the state database"):
        open_store(parse_state({"url": "sqlite:///dir.db"}, tmp_path))


def test_observed_store_passes_through(tmp_path: Path) -> None:
    store = Observed(open_store(parse_state(None, tmp_path)))
    g = ContentGuard(ContentConfig(), store)
    g.check_and_record(GUN, "timestamp", n_timestamp(2), NOW)
    assert [v for _, v in store.accepted] == [2]
    g.close()
