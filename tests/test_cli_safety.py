"""Acceptance: the real ``tracker`` command, in a subprocess, where a mistake costs data or
leaks it: a database that is not there, one at an older schema, the files' modes, the port
handed to Letta, a URL that is not a tracker's, data printed as markup."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import aiohttp
import pytest
from rich.console import Console

import tracker
from tests.conftest import eventually
from tracker import cli_render
from tracker.migrations import LATEST, MIGRATIONS
from tracker.store import open_store

ROOT = Path(tracker.__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def run_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``tracker ARGS`` in ``cwd``, with the usual umask (022: files 0644 unless asked)."""
    return subprocess.run([sys.executable, "-m", "tracker", *args], cwd=cwd,
                          env=clean_env(**env), capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: os.umask(0o022))


def old_database(path: Path) -> Path:
    """A database at schema v1, as an older tracker left it."""
    with closing(sqlite3.connect(path)) as con:
        con.executescript(f"{MIGRATIONS[0]}\nPRAGMA user_version = 1;")
    return path


def user_version(path: Path) -> int:
    with closing(sqlite3.connect(path)) as con:
        return con.execute("PRAGMA user_version").fetchone()[0]


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- a database that is not there ------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["backup", "copy.db"], ["prune", "--older-than", "30d"],
    ["prune", "--older-than", "30d", "--dry-run"], ["keys", "create", "ops"],
    ["keys", "list"], ["keys", "revoke", "tk_abc"], ["keys", "rotate-webhook-secret", "ops"],
    ["db", "status"],
])
def test_commands_on_a_missing_database_make_none(tmp_path: Path, argv: list[str]):
    """Run from another directory (the default database.url is relative), ``backup`` made
    a new empty database, backed it up and exited 0; ``keys create`` made a key the service
    never saw."""
    done = run_cli(tmp_path, *argv)
    assert done.returncode == 1, done.stdout
    assert done.stderr == (f"tracker: no database at {tmp_path / 'tracker.db'}: `tracker db"
                           " migrate` (or `tracker serve`) creates it; check database.url (a"
                           " relative path is from the working directory)\n")
    assert done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_db_migrate_creates_the_database_then_keys_can_be_made(tmp_path: Path):
    """The way to make keys before the first ``serve``, as the README says."""
    assert run_cli(tmp_path, "keys", "create", "ops").returncode == 1
    made = run_cli(tmp_path, "db", "migrate")
    assert made.returncode == 0, made.stderr
    assert made.stdout == (f"created the database {tmp_path / 'tracker.db'}\n"
                           f"schema is at version {LATEST} (latest {LATEST})\n")
    again = run_cli(tmp_path, "db", "migrate")  # a no-op now, and says so
    assert again.stdout == f"schema is at version {LATEST} (latest {LATEST})\n"
    key = run_cli(tmp_path, "keys", "create", "ops")
    assert key.returncode == 0, key.stderr
    assert key.stdout.strip().splitlines()[-1].startswith("tk_")


# --- a database at an older schema -----------------------------------------------------------

def test_backup_of_an_older_schema_copies_it_as_it_is(tmp_path: Path):
    """The README asks for a backup before an upgrade: the backup migrated the database
    first (and the copy again, to check it)."""
    db = old_database(tmp_path / "old.db")
    done = run_cli(tmp_path, "backup", "copy.db", TRACKER_DATABASE__URL=f"sqlite:///{db}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("0 runs, schema version 1\n"), done.stdout
    assert user_version(db) == 1 and user_version(tmp_path / "copy.db") == 1


@pytest.mark.parametrize("argv", [
    ["prune", "--older-than", "30d", "--dry-run"], ["prune", "--older-than", "30d"],
    ["keys", "create", "ops"], ["keys", "list"], ["keys", "revoke", "tk_abc"],
])
def test_other_commands_on_an_older_schema_ask_for_db_migrate(tmp_path: Path,
                                                              argv: list[str]):
    """They migrated it on the way, minutes on a long history, unasked."""
    db = old_database(tmp_path / "old.db")
    done = run_cli(tmp_path, *argv, TRACKER_DATABASE__URL=f"sqlite:///{db}")
    assert done.returncode == 1
    assert done.stderr == (f"tracker: database {db} is at schema v1, this tracker's is"
                           f" v{LATEST}: run `tracker db migrate` first (with the service"
                           " stopped)\n")
    assert user_version(db) == 1


def test_commands_on_a_newer_schema_refuse(tmp_path: Path):
    db = tmp_path / "new.db"
    assert run_cli(tmp_path, "db", "migrate", TRACKER_DATABASE__URL=f"sqlite:///{db}"
                   ).returncode == 0
    with closing(sqlite3.connect(db)) as con:
        con.execute(f"PRAGMA user_version = {LATEST + 1}")
    done = run_cli(tmp_path, "keys", "list", TRACKER_DATABASE__URL=f"sqlite:///{db}")
    assert done.returncode == 1 and "newer than this tracker's" in done.stderr


# --- file modes ------------------------------------------------------------------------------

async def test_database_and_its_wal_files_are_private(tmp_path: Path):
    """They hold the callback secret and webhook secrets in plain text, and were 0644."""
    old = os.umask(0o022)
    try:
        store = open_store(f"sqlite:///{tmp_path / 't.db'}")
        await store.open()
        try:
            await store.setting("probe", "x")  # a write: the WAL has frames
            for name in ("t.db", "t.db-wal", "t.db-shm"):
                assert mode(tmp_path / name) == 0o600, name
        finally:
            await store.close()
    finally:
        os.umask(old)


def test_backup_file_is_private(tmp_path: Path):
    assert run_cli(tmp_path, "db", "migrate").returncode == 0
    done = run_cli(tmp_path, "backup", "copy.db")
    assert done.returncode == 0, done.stderr
    assert mode(tmp_path / "tracker.db") == mode(tmp_path / "copy.db") == 0o600


def test_an_existing_database_keeps_its_mode(tmp_path: Path):
    """Only a new file is made private: an operator's chosen mode stays."""
    db = tmp_path / "tracker.db"
    assert run_cli(tmp_path, "db", "migrate").returncode == 0
    db.chmod(0o640)
    assert run_cli(tmp_path, "keys", "create", "ops").returncode == 0
    assert mode(db) == 0o640


# --- serve --port 0 --------------------------------------------------------------------------

async def test_serve_on_port_zero_hands_letta_the_port_it_got(tmp_path: Path, sim, agent):
    """``--port 0`` (any free one) kept port 0 in the config: callback URLs were
    ``http://127.0.0.1:0/...`` and the start-up line said ``:0``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker", "serve", "--port", "0", cwd=tmp_path,
        env=clean_env(TRACKER_LETTA__BASE_URL=sim.url, TRACKER_POLLING__GRACE_S="60"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        key, port = await _key_and_port(proc)
        assert port != 0
        run = await _submit(port, key, agent)
        assert sim.received[0].body["callback_url"].startswith(
            f"http://127.0.0.1:{port}/callbacks/letta/")
        # learnt by Letta's callback, not by a poll (grace_s is 60 s)
        done = await eventually(lambda: _done(port, key, run["id"]), timeout=15)
        assert done["tracker"]["completed_via"] == "callback"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 20)


def test_serve_on_port_zero_with_callback_workers_needs_their_port(tmp_path: Path):
    """The workers' default port is the API's plus one: 1, with port 0. Refused, before
    anything is made."""
    done = run_cli(tmp_path, "serve", "--port", "0", TRACKER_CALLBACKS__WORKERS="2")
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("tracker: invalid config (command line): callbacks.port is needed"
                           " with callbacks.workers when server.port is 0 (any free port)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_start_that_fails_after_making_the_admin_key_still_shows_it(tmp_path: Path,
                                                                      unused_tcp_port: int):
    """The key is made (and committed) as the database opens; shown only once start-up was
    over, a later step failing (the workers' port taken) lost it: the next start makes none."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", unused_tcp_port))
        taken.listen()
        done = run_cli(tmp_path, "serve", "--port", "0", TRACKER_CALLBACKS__WORKERS="1",
                       TRACKER_CALLBACKS__PORT=str(unused_tcp_port))
    assert done.returncode != 0, done.stdout
    [line] = [x for x in done.stdout.splitlines() if "created admin API key" in x]
    key = line.split()[-1]
    with closing(sqlite3.connect(tmp_path / "tracker.db")) as con:
        assert con.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 1
    assert key.startswith("tk_")


async def _key_and_port(proc: asyncio.subprocess.Process) -> tuple[str, int]:
    """The first start's admin key and the port of the ``listening on`` line."""
    key = None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line, "tracker serve ended before it listened"
        if "created admin API key" in line:
            key = line.split()[-1]
        if found := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
            assert key
            return key, int(found[1])


async def _submit(port: int, key: str, agent: str) -> dict:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s, \
            s.post(f"http://127.0.0.1:{port}/v1/agents/{agent}/messages/async",
                   json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _done(port: int, key: str, run_id: str) -> dict | None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s, \
            s.get(f"http://127.0.0.1:{port}/v1/runs/{run_id}") as r:
        run = await r.json()
    return run if run["tracker"]["state"] == "done" else None


# --- a URL that is not a tracker's -----------------------------------------------------------

async def cli(*args: str, **env: str) -> tuple[int, str, str]:
    """``tracker ARGS`` without blocking the loop that serves the simulator."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tracker", *args, env=clean_env(**env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_cli_pointed_at_letta_says_so_in_one_line(sim, agent):
    """``--url`` naming Letta instead of the tracker ended in a KeyError's traceback; and
    the submit, sent before its answer was read, reached the agent untracked."""
    said = (f"tracker: {sim.url} answered, but does not look like a tracker (its runs have no"
            ' "tracker" object): is this Letta\'s URL?\n')
    code, out, err = await cli("submit", agent, "hi", "--url", sim.url, "--key", "tk_any")
    assert (code, out, err) == (1, "", said)
    assert sim.received == []  # nothing sent
    async with aiohttp.ClientSession() as s:
        body = {"messages": [{"role": "user", "content": "straight to Letta"}]}
        async with s.post(f"{sim.url}/v1/agents/{agent}/messages/async", json=body) as r:
            letta_run = await r.json()
    for argv in (["runs", "list"], ["runs", "show", letta_run["id"]]):
        assert await cli(*argv, TRACKER_URL=sim.url) == (1, "", said)


# --- data printed as markup ------------------------------------------------------------------

async def test_runs_show_prints_brackets_in_a_callback_url(start_tracker, agent):
    """``[/x]`` in a user's callback_url (stored as given) made ``runs show`` crash with
    rich's MarkupError."""
    t = await start_tracker()
    hook = "http://127.0.0.1:9/hook?tag=[/x]&[bold]b=1"
    run = await t.submit(agent, callback_url=hook)
    url = str(t.client.make_url("")).rstrip("/")
    code, out, err = await cli("runs", "show", run["id"], "--url", url, "--key", t.key,
                               COLUMNS="300")
    assert code == 0, err
    assert hook in out


def rendered(*renderables) -> str:
    with open(os.devnull, "w") as nowhere:
        out = Console(record=True, width=300, file=nowhere)
        for r in renderables:
            out.print(r)
    return out.export_text()


FAILED = {"id": "run-1", "agent_id": "agent-[red]x", "status": "failed", "created_at": None,
          "tracker": {"state": "done", "completed_via": "poll",
                      "error": "1 validation error [type=missing, input_value={}]"}}


def test_error_texts_with_brackets_are_printed_whole():
    """A Letta error's ``[type=missing, ...]`` was read as a markup tag, and vanished."""
    text = rendered(cli_render.run_fields(FAILED), cli_render.runs_table([FAILED]))
    assert "1 validation error [type=missing, input_value={}]" in text
    assert text.count("agent-[red]x") == 2
    queued = {**FAILED, "tracker": {"state": "queued"}}  # no outcome yet: no empty row for it
    assert "learnt via" not in rendered(cli_render.run_fields(queued))


def test_event_details_and_outcome_with_brackets_are_printed_whole(capsys):
    event = {"at": "2024-01-01T00:00:00Z", "source": "poll", "kind": "failed",
             "detail": {"error": "[/bold] [type=missing]"}}
    assert '{"error":"[/bold] [type=missing]"}' in rendered(cli_render.events_table([event]))
    cli_render.print_outcome(FAILED, [])
    assert "did not complete: 1 validation error [type=missing, input_value={}]" in \
        capsys.readouterr().out.replace("\n", "")
