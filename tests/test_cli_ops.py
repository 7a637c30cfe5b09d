"""Acceptance: ``tracker prune`` and ``tracker backup`` as real processes on a real database."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

import tracker
from tests.test_retention import add_run as aged_run
from tracker.states import State
from tracker.store import open_store

A1 = "agent-11111111-1111-4111-8111-111111111111"
ROOT = Path(tracker.__file__).resolve().parent.parent


def run_cli(db: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRACKER_DATABASE__URL": f"sqlite:///{db}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "tracker", *args], env=env, cwd=db.parent,
                          capture_output=True, text=True, timeout=60)


async def add_run(store, monkeypatch, age_days: float, final: bool) -> str:
    return await aged_run(store, monkeypatch, age_days, State.DONE if final else State.QUEUED)


@pytest.fixture
async def db(tmp_path: Path, monkeypatch) -> Path:
    """A database with 2 finished runs from 40 days ago, one still queued from then, and one
    finished 5 days ago; 10 events, 3 deliveries and 3 attempts in all."""
    path = tmp_path / "t.db"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    for age, final in ((40, True), (40, True), (40, False), (5, True)):
        await add_run(store, monkeypatch, age, final)
    await store.close()
    return path


def counts(path: Path) -> dict[str, int]:
    with closing(sqlite3.connect(path)) as con:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("runs", "run_payloads", "run_events", "deliveries")}


# --- prune ---------------------------------------------------------------------------------

def test_prune_dry_run_counts_and_deletes_nothing(db: Path):
    before = counts(db)
    out = run_cli(db, "prune", "--older-than", "30d", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "dry run: would remove 2 runs finished before" in out.stdout
    assert "(more than 30d ago), and not awaiting a webhook retry:" in out.stdout
    lines = dict(line.split() for line in out.stdout.splitlines() if line.startswith("  "))
    assert lines == {"runs": "2", "run_payloads": "2", "run_events": "6", "deliveries": "2",
                     "delivery_attempts": "2"}
    assert "nothing was deleted" in out.stdout
    assert counts(db) == before


def test_prune_removes_old_finished_runs_and_says_how_many(db: Path):
    out = run_cli(db, "prune", "--older-than", "30d")
    assert out.returncode == 0, out.stderr
    assert "removed 2 runs finished before" in out.stdout
    assert "14 rows removed in all" in out.stdout
    assert counts(db) == {"runs": 2, "run_payloads": 2, "run_events": 4, "deliveries": 1}
    again = run_cli(db, "prune", "--older-than", "720h")
    assert again.returncode == 0 and "nothing to remove" in again.stdout


async def test_prune_keeps_runs_finished_lately_or_awaiting_a_webhook_retry(db: Path,
                                                                            monkeypatch):
    """Both created 40 days ago, as the two it removes: one sat queued until an hour ago; one
    finished then, but its user's endpoint is down and the relay retries it."""
    store = open_store(f"sqlite:///{db}")
    await store.open()
    late = await aged_run(store, monkeypatch, 40, State.DONE, finished_days=1 / 24)
    retrying = await aged_run(store, monkeypatch, 40, State.DONE, webhook="pending")
    await store.close()
    dry = run_cli(db, "prune", "--older-than", "30d", "--dry-run")
    assert "would remove 2 runs" in dry.stdout, dry.stdout + dry.stderr
    out = run_cli(db, "prune", "--older-than", "30d")
    assert "removed 2 runs" in out.stdout, out.stdout + out.stderr
    with closing(sqlite3.connect(db)) as con:
        kept = {r[0] for r in con.execute("SELECT id FROM runs")}
    assert len(kept) == 4 and {late, retrying} <= kept


def test_prune_help_says_which_runs_go(db: Path):
    out = run_cli(db, "prune", "--help")
    assert out.returncode == 0, out.stderr
    assert ("runs that finished more than AGE ago, and are not awaiting a webhook retry"
            in " ".join(out.stdout.split()))


def test_prune_refuses_a_bad_age(db: Path):
    out = run_cli(db, "prune", "--older-than", "30 days")
    assert out.returncode == 2
    assert "invalid age '30 days'" in out.stderr
    assert run_cli(db, "prune").returncode == 2  # --older-than is required


# --- backup --------------------------------------------------------------------------------

def test_backup_writes_a_valid_copy_with_the_same_runs(db: Path, tmp_path: Path):
    target = tmp_path / "backups" / "copy.db"
    target.parent.mkdir()
    out = run_cli(db, "backup", str(target))
    assert out.returncode == 0, out.stderr
    assert f"backup written to {target}" in out.stdout and "4 runs" in out.stdout
    assert "schema version" in out.stdout
    assert sorted(p.name for p in target.parent.iterdir()) == ["copy.db"]  # no partial left
    with closing(sqlite3.connect(target)) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert counts(target) == counts(db)


def test_backup_while_a_writer_holds_the_database(db: Path, tmp_path: Path):
    """The live service mid-transaction: the backup neither waits for it nor copies its
    uncommitted rows."""
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO runs (id, user_id, agent_id, state, created_at)"
                   " VALUES ('run-uncommitted', 'u', 'a', 'queued', 'x')")
    try:
        out = run_cli(db, "backup", str(tmp_path / "copy.db"))
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert out.returncode == 0, out.stderr
    assert counts(tmp_path / "copy.db")["runs"] == 4


def test_backup_refuses_to_overwrite_unless_forced(db: Path, tmp_path: Path):
    target = tmp_path / "copy.db"
    target.write_text("precious")
    out = run_cli(db, "backup", str(target))
    assert out.returncode == 1 and "already exists; pass --force" in out.stderr
    assert target.read_text() == "precious"
    forced = run_cli(db, "backup", str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    assert counts(target)["runs"] == 4


def test_backup_refuses_the_live_database_and_missing_directories(db: Path, tmp_path: Path):
    live = run_cli(db, "backup", str(db), "--force")
    assert live.returncode == 1 and "is the live database" in live.stderr
    missing = run_cli(db, "backup", str(tmp_path / "nowhere" / "copy.db"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert counts(db)["runs"] == 4


# --- the command line's own errors ---------------------------------------------------------

def test_config_given_before_a_nested_command_is_the_one_used(db: Path, tmp_path: Path):
    """``tracker keys --config X create``: X was overwritten by ``create``'s own default, and
    the key went to ./tracker.db instead, exit 0."""
    other = tmp_path / "other.db"
    config = tmp_path / "other.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{other}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    for argv in (["db", "migrate", "--config", str(config)],  # only it makes a database
                 ["keys", "--config", str(config), "create", "ops"],
                 ["keys", "create", "ops2", "--config", str(config)]):
        done = subprocess.run([sys.executable, "-m", "tracker", *argv], cwd=tmp_path, env={
            **env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    with closing(sqlite3.connect(other)) as con:
        assert con.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 2
    assert not (tmp_path / "tracker.db").exists()
    missing = run_cli(db, "db", "--config", str(tmp_path / "nope.toml"), "status")
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_keys_create_refuses_a_role_other_than_the_users(tmp_path: Path):
    """``keys create NAME --admin`` for an existing plain user made a plain key, exit 0,
    nothing said; a key's role is its user's, so a flag that disagrees is refused."""
    db = tmp_path / "k.db"
    assert run_cli(db, "db", "migrate").returncode == 0
    assert run_cli(db, "keys", "create", "bob").returncode == 0
    assert run_cli(db, "keys", "create", "root", "--admin").returncode == 0
    promote = run_cli(db, "keys", "create", "bob", "--admin")
    assert promote.returncode == 1 and promote.stdout == ""
    assert "'bob' exists and is not an admin" in promote.stderr
    demote = run_cli(db, "keys", "create", "root")
    assert demote.returncode == 1 and "'root' is an admin" in demote.stderr
    again = run_cli(db, "keys", "create", "root", "--admin")
    assert again.returncode == 0 and "admin 'root'" in again.stdout
    with closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT u.name, u.is_admin, count(*) FROM api_keys k JOIN users u"
                           " ON u.id = k.user_id GROUP BY u.name ORDER BY u.name").fetchall()
    assert rows == [("bob", 0, 1), ("root", 1, 2)]


def test_a_key_is_revoked_by_its_prefix_as_listed(tmp_path: Path):
    """``keys list`` shows a prefix cut with an ellipsis; pasted into ``keys revoke`` as
    shown, it matched no key. A miss, and a rotation for no such user, are errors on stderr."""
    db = tmp_path / "k.db"
    assert run_cli(db, "db", "migrate").returncode == 0
    assert run_cli(db, "keys", "create", "bob").returncode == 0
    listed = run_cli(db, "keys", "list").stdout
    [shown] = [w for w in listed.split() if w.startswith("tk_")]
    assert shown.endswith("…")
    missed = run_cli(db, "keys", "revoke", "tk_nothing")
    assert missed.returncode == 1 and missed.stdout == ""
    assert "no active key matches 'tk_nothing'" in missed.stderr
    done = run_cli(db, "keys", "revoke", shown)
    assert done.returncode == 0 and "revoked 1 key(s)" in done.stdout
    nobody = run_cli(db, "keys", "rotate-webhook-secret", "nobody")
    assert nobody.returncode == 1 and nobody.stdout == ""
    assert "no user named 'nobody'" in nobody.stderr


def test_a_database_url_that_is_not_sqlite_is_a_config_error(db: Path):
    done = run_cli(db, "db", "status")
    assert done.returncode == 0
    for url in ("postgres://x/y", "tracker.db"):
        done = subprocess.run([sys.executable, "-m", "tracker", "db", "status"], env={
            **os.environ, "TRACKER_DATABASE__URL": url, "PYTHONPATH": str(ROOT)},
            cwd=db.parent, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "database.url" in done.stderr and "sqlite:///" in done.stderr


def test_simulate_on_a_port_in_use_says_so_in_one_line(db: Path):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = run_cli(db, "simulate", "--port", str(port))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


# --- db status -----------------------------------------------------------------------------

def test_db_status_of_an_older_schema_migrates_nothing(tmp_path: Path):
    """It migrated the database it was asked about: checking before an upgrade started it."""
    from tracker.migrations import LATEST, MIGRATIONS

    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as con:
        con.executescript(f"{MIGRATIONS[0]}\nPRAGMA user_version = 1;")
    out = run_cli(path, "db", "status")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == (
        f"schema version 1 (latest {LATEST}): {LATEST - 1} migration(s) pending, run"
        " `tracker db migrate` with the service stopped")
    assert dict(line.split() for line in out.stdout.splitlines()[1:]) == {
        "runs": "0", "run_events": "0"}  # only v1's tables
    with closing(sqlite3.connect(path)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    assert run_cli(path, "db", "migrate").returncode == 0
    out = run_cli(path, "db", "status")
    assert out.stdout.splitlines()[0] == f"schema version {LATEST} (latest {LATEST})"
    assert len(out.stdout.splitlines()) == 9


def test_db_status_of_a_newer_schema_says_so(db: Path):
    from tracker.migrations import LATEST

    with closing(sqlite3.connect(db)) as con:
        con.execute(f"PRAGMA user_version = {LATEST + 1}")
    out = run_cli(db, "db", "status")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == (
        f"schema version {LATEST + 1} (latest {LATEST}): newer than this tracker")


def test_db_status_of_a_missing_database_creates_none(tmp_path: Path):
    """A path mistyped made a new empty database, reported as up to date."""
    missing = tmp_path / "typo.db"
    out = run_cli(missing, "db", "status")
    assert out.returncode == 1
    assert out.stderr.startswith(f"tracker: no database at {missing}: `tracker db migrate`")
    assert out.stdout == "" and not missing.exists()


def test_serve_on_a_port_that_cannot_be_says_so(db: Path):
    done = run_cli(db, "serve", "--port", "99999")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "must be a port number, 0-65535, not '99999'" in done.stderr


def test_output_cut_short_by_its_reader_is_no_traceback(db: Path):
    """``tracker db status | head -1``: the reader leaves after a line; no traceback."""
    env = {**os.environ, "TRACKER_DATABASE__URL": f"sqlite:///{db}", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(f"{sys.executable} -m tracker db status | head -1", shell=True,
                          env=env, cwd=db.parent, capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("schema version") and len(done.stdout.splitlines()) == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
