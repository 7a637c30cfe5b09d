"""Benchmark 2's storing peers: the bare forwarder plus a submit's two durable writes.

    .venv/bin/python benchmarks/bare_store_proxy.py PORT LETTA_URL DB [SHAPE] [asyncio|uvloop]

``bare_proxy.py``'s forwarder, on the same route and client, doing only what no tracker can
leave out of a submit:
- the body parsed, and a callback URL of the run's own put in it;
- the run written and committed before Letta is called (SQLite, WAL, ``synchronous =
  NORMAL``, as the tracker's default);
- Letta's answer parsed for its run id, and that written and committed before answering.

The writes of requests in flight share commits, as the tracker's group commit does (one turn
of the loop's gathering); run ids are the tracker's own (time-ordered). No key, no checks, no
log, no metrics, no ordering. What the two writes are, by ``SHAPE``:
- ``floor`` (the default): one table, its primary key the only index. About the most a
  tracker built on aiohttp and SQLite could reach (benchmark 2's peer).
- ``schema``: the rows the tracker writes, on its own schema (created by its migrations: the
  run with the history's indexes and the counts' triggers, its payload, its two events), by
  plain statements: what the tracker's schema costs a submit, without its store or its
  request path.
- ``journal``: the floor's two writes, to a narrow journal in a file of its own; a thread
  folds the journal into the tracker's schema every ``FOLD_EVERY_S``, in one transaction of
  set-based statements (SQLite runs them without the GIL). What the schema's work would cost
  off the request path, in bulk. ``GET /_fold`` tells how far the fold has come.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path

from aiohttp import web
from bare_proxy import LETTA, SESSION, client
from bare_server import serve
from harness import fresh_db, no_db

from tracker import clock
from tracker.manager import new_run_id
from tracker.store_sqlite import EVENT_SQL

DB = web.AppKey("db", "Writes")
#: how often the journal shape's thread folds the journal into the schema
FOLD_EVERY_S = 0.02

FLOOR_TABLE = ("CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, agent_id TEXT, state TEXT,"
               " request TEXT, letta_run_id TEXT, created_at TEXT, submitted_at TEXT)")
JOURNAL_TABLE = ("CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, kind INTEGER,"
                 " run_id TEXT, agent_id TEXT, at TEXT, request TEXT, letta_run_id TEXT,"
                 " t REAL)")


def journal_path(path: str) -> str:
    """The journal shape's file, beside the database at ``path``."""
    return f"{path}.journal.db"


def connect(path: str) -> sqlite3.Connection:
    """A connection set up as the tracker's writer is (``SQLiteDB._connect_writer``): among
    the rest, statement journals in memory, which a trigger's writes need (in a file, the
    counts' trigger alone cost ~30 µs a run)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "foreign_keys = ON",
                   "cache_size = -32768", "temp_store = MEMORY"):
        db.execute(f"PRAGMA {pragma}")
    return db


class Writes:
    """One connection on the loop's thread; the statements of concurrent writes share a
    commit. Each shape says what a submit's two writes are."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.queue: list[tuple[list[tuple[str, tuple]], asyncio.Future]] = []

    async def write(self, statements: list[tuple[str, tuple]]) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((statements, fut))
        if len(self.queue) == 1:
            asyncio.get_running_loop().call_soon(self.commit)
        await fut

    def commit(self) -> None:
        batch, self.queue = self.queue, []
        try:
            self.db.execute("BEGIN")
            for statements, _ in batch:
                for sql, params in statements:
                    self.db.execute(sql, params)
            self.db.execute("COMMIT")
        except sqlite3.Error as e:  # a benchmark's peer: each request fails, none hangs
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            for _, fut in batch:
                fut.set_exception(e)
            return
        for _, fut in batch:
            fut.set_result(None)

    async def queued(self, run_id: str, agent_id: str, request: str) -> None:
        await self.write([("INSERT INTO runs VALUES (?, ?, 'submitting', ?, NULL, ?, NULL)",
                           (run_id, agent_id, request, clock.iso()))])

    async def submitted(self, run_id: str, agent_id: str, letta_run_id: str) -> None:
        await self.write([("UPDATE runs SET state = 'submitted', letta_run_id = ?,"
                           " submitted_at = ? WHERE id = ?", (letta_run_id, clock.iso(), run_id))])


class SchemaWrites(Writes):
    """The tracker's rows on the tracker's schema (see ``store_sqlite.submit`` and
    ``transition``): the run claimed as it is inserted, its payload and event; then Letta's
    answer as a compare-and-set, and its event."""

    async def queued(self, run_id: str, agent_id: str, request: str) -> None:
        now = clock.iso()
        await self.write([
            ("INSERT INTO runs (id, user_id, agent_id, kind, state, request_config, created_at,"
             " next_check_at, attempts) VALUES (?, 'bench', ?, 'message', 'submitting', '{}',"
             " ?, 0, 1)", (run_id, agent_id, now)),
            ("INSERT INTO run_payloads (seq, request) VALUES (last_insert_rowid(), ?)",
             (request,)),
            (EVENT_SQL, (run_id, now, "api", "submit", "queued", "created", None))])

    async def submitted(self, run_id: str, agent_id: str, letta_run_id: str) -> None:
        now = clock.now()
        await self.write([
            ("UPDATE runs SET state = 'submitted', letta_run_id = ?, submitted_at = ?,"
             " next_check_at = ?, deadline_at = ? WHERE id = ? AND state IN ('submitting')",
             (letta_run_id, clock.iso(now), now + 3600, now + 7200, run_id)),
            (EVENT_SQL, (run_id, clock.iso(now), "dispatch", "submitted", "submitted",
                         "created", json.dumps({"letta_run_id": letta_run_id})))])


class JournalWrites(Writes):
    """Both writes to the journal; ``fold`` on a thread of its own moves them to the schema."""

    def __init__(self, db: sqlite3.Connection, main: str) -> None:
        super().__init__(db)
        db.execute(JOURNAL_TABLE)
        self.main = main
        self.folded = {"folds": 0, "rows": 0, "cpu_s": 0.0, "behind": 0}
        threading.Thread(target=self.fold, daemon=True).start()

    async def queued(self, run_id: str, agent_id: str, request: str) -> None:
        await self.write([("INSERT INTO journal (kind, run_id, agent_id, at, request)"
                           " VALUES (1, ?, ?, ?, ?)", (run_id, agent_id, clock.iso(), request))])

    async def submitted(self, run_id: str, agent_id: str, letta_run_id: str) -> None:
        now = clock.now()
        await self.write([("INSERT INTO journal (kind, run_id, agent_id, at, letta_run_id, t)"
                           " VALUES (2, ?, ?, ?, ?, ?)",
                           (run_id, agent_id, clock.iso(now), letta_run_id, now))])

    def fold(self) -> None:
        db = connect(self.main)
        db.execute(f"ATTACH '{journal_path(self.main)}' AS j")
        # the journal's rows folded so far, committed with what they made: a fold is atomic
        # in the main database whatever happens to the journal's file
        db.execute("CREATE TABLE folded (seq INTEGER)")
        db.execute("INSERT INTO folded VALUES (0)")
        while True:
            time.sleep(FOLD_EVERY_S)
            cpu = time.thread_time()
            db.execute("BEGIN IMMEDIATE")
            [(done,)] = db.execute("SELECT seq FROM folded").fetchall()
            [(top,)] = db.execute("SELECT coalesce(max(seq), 0) FROM j.journal").fetchall()
            if top == done:
                db.execute("ROLLBACK")
                continue
            for sql in FOLD:
                db.execute(sql, {"done": done, "top": top})
            db.execute("UPDATE folded SET seq = ?", (top,))
            db.execute("COMMIT")
            self.folded["folds"] += 1
            self.folded["rows"] += top - done
            self.folded["cpu_s"] += time.thread_time() - cpu
            [(self.folded["behind"],)] = db.execute(
                "SELECT count(*) FROM j.journal WHERE seq > ?", (top,)).fetchall()


_NEW = "FROM j.journal WHERE seq > :done AND seq <= :top"
#: one fold: the journal's new rows as the schema shape's statements would have made them
FOLD = [
    "INSERT INTO runs (id, user_id, agent_id, kind, state, request_config, created_at,"
    f" next_check_at, attempts) SELECT run_id, 'bench', agent_id, 'message', 'submitting', '{{}}',"
    f" at, 0, 1 {_NEW} AND kind = 1 ORDER BY seq",
    "INSERT INTO run_payloads (seq, request) SELECT runs.seq, jr.request FROM (SELECT run_id,"
    f" request {_NEW} AND kind = 1) AS jr JOIN runs ON runs.id = jr.run_id",
    "INSERT INTO run_events (run_id, at, source, kind, state, status, detail) SELECT run_id, at,"
    " iif(kind = 1, 'api', 'dispatch'), iif(kind = 1, 'submit', 'submitted'),"
    " iif(kind = 1, 'queued', 'submitted'), 'created',"
    f" iif(kind = 2, json_object('letta_run_id', letta_run_id), NULL) {_NEW} ORDER BY seq",
    "UPDATE runs SET state = 'submitted', letta_run_id = js.letta_run_id, submitted_at = js.at,"
    " next_check_at = js.t + 3600, deadline_at = js.t + 7200 FROM (SELECT run_id, letta_run_id,"
    f" at, t {_NEW} AND kind = 2) AS js WHERE runs.id = js.run_id AND runs.state = 'submitting'",
]


def open_writes(path: str, shape: str) -> Writes:
    if shape == "floor":
        db = connect(path)
        db.execute(FLOOR_TABLE)
        return Writes(db)
    fresh_db(Path(path))  # the tracker's latest schema, made by the tracker itself
    if shape == "schema":
        return SchemaWrites(connect(path))
    if shape == "journal":  # its journal starts empty, as the database does
        return JournalWrites(connect(str(no_db(Path(journal_path(path))))), path)
    raise SystemExit(f"unknown shape {shape!r}: floor, schema or journal")


async def submit(request: web.Request) -> web.Response:
    agent_id = request.match_info["agent_id"]
    body = json.loads(await request.read())
    run_id = new_run_id()
    body["callback_url"] = f"http://127.0.0.1:1/callbacks/letta/{run_id}"
    data = json.dumps(body)
    writes = request.app[DB]
    await writes.queued(run_id, agent_id, data)
    url = f"{request.app[LETTA]}/v1/agents/{agent_id}/messages/async"
    async with request.app[SESSION].post(url, data=data, headers={
            "Content-Type": "application/json"}) as resp:
        answer = await resp.read()
    await writes.submitted(run_id, agent_id, json.loads(answer)["id"])
    return web.Response(body=answer, status=resp.status, content_type="application/json")


async def fold_state(request: web.Request) -> web.Response:
    writes = request.app[DB]
    return web.json_response(writes.folded if isinstance(writes, JournalWrites) else {})


def main() -> None:
    app = web.Application(client_max_size=1_048_576)
    app[LETTA] = sys.argv[2].rstrip("/")
    app[DB] = open_writes(sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "floor")
    app.cleanup_ctx.append(client)
    app.router.add_post("/v1/agents/{agent_id}/messages/async", submit)
    app.router.add_get("/_fold", fold_state)
    serve(app, int(sys.argv[1]), sys.argv[5] if len(sys.argv) > 5 else "uvloop")


if __name__ == "__main__":
    main()
