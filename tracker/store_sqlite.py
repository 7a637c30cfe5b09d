"""The SQLite store: the only module that imports aiosqlite. WAL, one writer, one reader (and
key lookups on the event loop).

The writer is a plain sqlite3 connection owned here. Its transactions run on the event loop
itself when the database is free (a group commit is ~50 µs of SQL a run, and a hop to a
thread cost more: two thread switches, and the GIL fought over with the loop while it
waited); a transaction that would wait for a lock, fsync each commit (synchronous=FULL) or
run long (prune, migrations, shutdown) goes to the writer's own thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import aiosqlite

from tracker import clock
from tracker.errors import Conflict, Unavailable
from tracker.migrations import LATEST, LIVE_STATES_SQL, MIGRATIONS
from tracker.sqlite_queries import (
    DELIVERY_COLS,
    FULL_COLS,
    PAYLOAD_COLS,
    SUMMARY_COLS,
    WITH_PAYLOAD,
    list_query,
    stats_queries,
)
from tracker.states import FINAL, LANE_BUSY, State
from tracker.store import (
    Add,
    ApiKey,
    Delivery,
    Event,
    InboxItem,
    NewRun,
    RunFilter,
    RunRecord,
    User,
    Verdict,
)

log = logging.getLogger("tracker.store")

LIVE = frozenset({*LANE_BUSY, State.QUEUED, State.PAUSED})
JSON_COLS = frozenset({"request", "request_config", "metadata", "messages", "usage"})


def _encode(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value


def _run(row: sqlite3.Row) -> RunRecord:
    return _runs([row])[0]


def _runs(rows: Sequence[sqlite3.Row]) -> list[RunRecord]:
    """Records from rows of run columns. Built by position, the column names read once per
    result: ``row["name"]`` scans the names, which cost a page of 100 runs 3 ms."""
    if not rows:
        return []
    keys = rows[0].keys()
    json_cols = [k for k in keys if k in JSON_COLS]
    return [_record(dict(zip(keys, row, strict=True)), json_cols) for row in rows]


def _record(data: dict[str, Any], json_cols: list[str]) -> RunRecord:
    for k in json_cols:
        if data[k] is not None:
            data[k] = json.loads(data[k])
    data["state"] = State(data["state"])
    data["needs_lookup"] = bool(data.get("needs_lookup"))
    if data.get("background") is not None:
        data["background"] = bool(data["background"])
    # the dataclass __init__ with ~40 keywords costs ~10 µs a run, most of a history page's
    # time; the row has every field without a default, the class holds the other defaults
    run = object.__new__(RunRecord)
    run.__dict__.update(data)
    return run


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _live(states: Iterable[State], join: str = "") -> tuple[str, tuple[str, ...]]:
    """``FROM ... WHERE`` for runs in some live states, through the runs_live partial index:
    its own WHERE term must appear verbatim for SQLite to use it."""
    states = tuple(states)
    assert set(states) <= LIVE, states
    return (f"runs INDEXED BY runs_live{join} WHERE {LIVE_STATES_SQL}"
            f" AND state IN ({_marks(len(states))})", states)


#: most transitions committed together
BATCH_MAX = 256
#: how long a write waits for a lock another process holds (on the writer's thread)
BUSY_TIMEOUT_MS = 10_000
#: seconds between WAL checkpoints (the writer never checkpoints itself)
CHECKPOINT_EVERY_S = 1.0
EVENT_SQL = ("INSERT INTO run_events (run_id, at, source, kind, state, status, detail)"
             " VALUES (?, ?, ?, ?, ?, ?, ?)")


@dataclass
class _Callback:
    """A callback on its way into the inbox; its verdict is known once its batch commits."""

    run_id: str
    letta_run_id: str
    body: bytes
    verified: bool
    verdict: str = ""


@dataclass
class _Batch:
    """What the operations of one group commit leave to be written at its end."""

    events: list[tuple] = field(default_factory=list)
    callbacks: list[_Callback] = field(default_factory=list)


def _event_row(run_id: str, event: Event, state: str, status: str) -> tuple:
    return (run_id, event.at or clock.iso(), event.source, event.kind, event.state or state,
            event.status or status, json.dumps(event.detail) if event.detail else None)


def _insert_events(db: sqlite3.Connection, rows: list[tuple]) -> None:
    if rows:
        db.executemany(EVENT_SQL, rows)


def _in_transaction(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """``fn`` inside BEGIN IMMEDIATE ... COMMIT, all of it on the connection's own thread."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result


def _waiting(db: sqlite3.Connection, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(db, *args)`` on the writer's thread, where waiting for a lock is allowed."""
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    try:
        return fn(db, *args)
    finally:
        with contextlib.suppress(sqlite3.ProgrammingError):  # closed by _close_writer
            db.execute("PRAGMA busy_timeout = 0")


def _migrate(db: sqlite3.Connection, version: int) -> None:
    # one script per version, atomic: triggers hold ";" so it is not split
    try:
        db.executescript(f"BEGIN IMMEDIATE;\n{MIGRATIONS[version - 1]}\n"
                         f"PRAGMA user_version = {version};\nCOMMIT;")
    except sqlite3.Error:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _close_writer(db: sqlite3.Connection) -> None:
    # fresh planner statistics (as SQLite recommends before closing), and an empty WAL
    with contextlib.suppress(sqlite3.Error):
        # not bounded by analysis_limit: its sampled statistics misled the planner
        # (a user's runs of one agent went through runs_user: 23 ms instead of 4)
        db.execute("PRAGMA optimize")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


class SQLiteStore:
    """Store backed by one SQLite file (see ``tracker.store.Store`` for the operations)."""

    def __init__(self, path: str, synchronous: str = "NORMAL") -> None:
        self.path = path
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None  # the writer
        self._writer: ThreadPoolExecutor | None = None  # its thread, for slow transactions
        self._r: aiosqlite.Connection | None = None
        self._now: sqlite3.Connection | None = None  # point reads on the loop thread
        self._lock = asyncio.Lock()
        self._ck: aiosqlite.Connection | None = None
        self._checkpointer: asyncio.Task | None = None
        self.writable = True  # False from a failed write until the next one succeeds
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def _connect(self, cache_mb: int = 8) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        db.row_factory = sqlite3.Row
        for pragma in self._pragmas(cache_mb):
            await db.execute(f"PRAGMA {pragma}")
        return db

    def _pragmas(self, cache_mb: int) -> tuple[str, ...]:
        return (f"busy_timeout = {BUSY_TIMEOUT_MS}", "journal_mode = WAL",
                f"synchronous = {self.synchronous}", "foreign_keys = ON",
                f"cache_size = -{cache_mb * 1024}")

    def _connect_writer(self) -> sqlite3.Connection:
        # used from the loop and from the writer's thread, never both at once (self._lock)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        for pragma in self._pragmas(cache_mb=32):
            db.execute(f"PRAGMA {pragma}")
        db.execute("PRAGMA busy_timeout = 0")  # on the loop it must never wait (see _waiting)
        return db

    async def open(self) -> None:
        """Connect, and bring the schema to the latest version."""
        try:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
            self._db = await self._in_thread(self._connect_writer)
            await self.migrate()
            if self.path == ":memory:":
                return  # one connection: reads go to the writer (see _read)
            # a second connection for reads: WAL readers never wait for the writer
            self._r = await self._connect()
            self._now = self._point_reader()
            await self._start_checkpoints()
        except sqlite3.Error as e:
            raise Unavailable(f"cannot open database {self.path}: {e}") from e

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def _start_checkpoints(self) -> None:
        """Checkpoint the WAL from a connection of its own, every second, instead of inside
        whichever commit crosses the threshold: commits stay short and even."""
        assert self._db is not None
        self._db.execute("PRAGMA wal_autocheckpoint = 0")
        self._ck = await self._connect(cache_mb=2)
        self._checkpointer = asyncio.create_task(self._checkpoints())

    async def _checkpoints(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY_S)
            with contextlib.suppress(sqlite3.Error):
                await self._ck.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")

    async def close(self) -> None:
        if self._drainer is not None:
            await asyncio.gather(self._drainer, return_exceptions=True)
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            await asyncio.gather(self._checkpointer, return_exceptions=True)
        if self._db is not None:
            async with self._lock:
                await self._in_thread(_waiting, self._db, _close_writer)
        if self._writer is not None:
            self._writer.shutdown()
        for db in {id(c): c for c in (self._ck, self._r) if c}.values():
            await db.close()
        if self._now is not None:
            self._now.close()
        self._db = self._writer = self._r = self._ck = self._now = None

    async def _write(self, fn: Callable[[sqlite3.Connection], Any], slow: bool = False) -> Any:
        """Run ``fn`` as one write transaction: on the loop when the database is free (see
        the module's docstring), else on the writer's thread; ``slow`` ones always there.
        Storage faults become ``Unavailable`` (503)."""
        assert self._db is not None, "store is not open"
        async with self._lock:
            try:
                done = None if slow or not self._inline_ok else self._inline(fn)
                result = done[0] if done else await self._in_thread(
                    _waiting, self._db, _in_transaction, fn)
            except (sqlite3.OperationalError, sqlite3.DatabaseError) as e:
                if isinstance(e, sqlite3.IntegrityError):
                    raise
                self.writable = False
                raise Unavailable(f"database write failed: {e}") from e
            self.writable = True
            return result

    @property
    def _inline_ok(self) -> bool:
        # with synchronous=FULL every commit waits for the disk: not on the loop
        return self.synchronous.upper() != "FULL"

    def _inline(self, fn: Callable[[sqlite3.Connection], Any]) -> tuple[Any] | None:
        """``(result,)`` of ``fn``'s transaction run here, never waiting for a lock (the
        writer's busy timeout is 0 outside ``_waiting``); None when another connection holds
        the database: nothing was written."""
        assert self._db is not None
        try:
            return (_in_transaction(self._db, fn),)
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                raise
            return None  # rolled back: the writer's thread runs it again, and waits

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        if self._r is None:  # an in-memory database has one connection
            assert self._db is not None, "store is not open"
            return self._db.execute(sql, params).fetchall()
        try:
            # execute_fetchall: one trip to the connection's thread instead of three
            return list(await self._r.execute_fetchall(sql, params))
        except sqlite3.DatabaseError as e:
            raise Unavailable(f"database read failed: {e}") from e

    def _point_reader(self) -> sqlite3.Connection:
        """A read-only connection used from the event loop itself, for lookups by a unique
        key (a few µs of SQL): a round trip to a connection's thread costs ~0.2 ms here,
        paid by every request for its API key. It never waits for a lock (busy_timeout 0):
        when busy, the lookup goes to the threaded reader instead."""
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        for pragma in ("query_only = 1", "busy_timeout = 0", "cache_size = -2048"):
            db.execute(f"PRAGMA {pragma}")
        return db

    async def _lookup(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """A read that an index answers at once (see ``_point_reader``)."""
        if self._now is not None:
            try:
                return self._now.execute(sql, params).fetchall()
            except sqlite3.OperationalError:
                pass  # busy (a checkpoint resetting the WAL): the threaded reader waits
            except sqlite3.DatabaseError as e:
                raise Unavailable(f"database read failed: {e}") from e
        return await self._read(sql, params)

    async def ping(self) -> bool:
        return bool(await self._read("SELECT 1"))

    async def schema_version(self) -> int:
        return (await self._read("PRAGMA user_version"))[0][0]

    async def migrate(self) -> list[int]:
        """Apply pending migrations in order, each in its own transaction."""
        assert self._db is not None
        current = self._db.execute("PRAGMA user_version").fetchone()[0]
        if current > LATEST:
            raise Unavailable(f"database schema v{current} is newer than this tracker (v{LATEST})")
        applied = []
        for version in range(current + 1, LATEST + 1):
            if current:  # some rewrite a table: minutes on a history of millions of runs
                log.info("migrating database %s to schema v%d", self.path, version)
            started = time.monotonic()
            async with self._lock:
                try:
                    await self._in_thread(_waiting, self._db, _migrate, version)
                except sqlite3.Error as e:
                    raise Unavailable(f"migration to schema v{version} failed: {e}") from e
            if current:
                log.info("database at schema v%d (%.1f s)", version, time.monotonic() - started)
            applied.append(version)
        return applied

    async def table_counts(self) -> dict[str, int]:
        tables = ["runs", "run_payloads", "run_events", "users", "api_keys", "deliveries",
                  "delivery_attempts", "callback_inbox"]
        return {t: (await self._read(f"SELECT count(*) FROM {t}"))[0][0] for t in tables}

    async def setting(self, key: str, default: str) -> str:
        """The stored value, storing ``default`` first when there is none."""
        def write(db: sqlite3.Connection) -> str:
            db.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)", (key, default))
            return db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()[0]

        return await self._write(write)

    # --- runs ------------------------------------------------------------------------------

    async def submit(self, new: NewRun, event: Event,
                     claim: bool | None = None) -> tuple[RunRecord, bool]:
        """Insert a queued run; with an idempotency key already used, return the first run.
        ``claim`` (True: parallel lanes, False: serial) also claims it in the same
        transaction when its lane is free, so the submit can send it at once."""
        now = clock.iso()
        row = (new.id, new.user_id, new.agent_id, new.kind, json.dumps(new.request_config),
               new.callback_url, now, new.idempotency_key, new.request_hash)
        request = json.dumps(new.request)

        def op(db: sqlite3.Connection, batch: _Batch) -> RunRecord:
            # claimed as it is inserted (one row write, not an insert and an update)
            go = claim is not None and self._lane_free(db, new, parallel=claim)
            rows = db.execute(
                "INSERT INTO runs (id, user_id, agent_id, kind, state, request_config,"
                " callback_url, created_at, next_check_at, idempotency_key, request_hash,"
                f" attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?) RETURNING {SUMMARY_COLS}",
                (*row[:4], State.SUBMITTING if go else State.QUEUED, *row[4:], int(go))
            ).fetchall()
            run = _run(rows[0])
            db.execute("INSERT INTO run_payloads (seq, request) VALUES (?, ?)", (run.seq, request))
            run.request = new.request
            self._add_event(db, new.id, event, State.QUEUED, "created", now)
            if go and new.kind == "answer":
                self._answer_pause(db, new.agent_id, new.id)
            return run

        try:
            # group-committed with whatever else is being written: under load one commit
            # (and one set of dirtied index pages) serves many submits
            run = await self._batched(op)
        except sqlite3.IntegrityError:
            if not new.idempotency_key:
                raise
            rows = await self._read(
                f"SELECT {FULL_COLS} FROM {WITH_PAYLOAD}"
                " WHERE user_id = ? AND idempotency_key = ?",
                (new.user_id, new.idempotency_key),
            )
            return _run(rows[0]), False
        # built inside the transaction: nothing awaits between its commit and the caller's
        # send, so a claimed run is never seen `submitting` with no send of ours behind it
        return run, True

    async def get_run(self, run_id: str, user_id: str | None = None,
                      full: bool = False) -> RunRecord | None:
        """A run by tracker id or Letta run id, optionally only if it is ``user_id``'s."""
        rows = await self._find(f"{FULL_COLS} FROM {WITH_PAYLOAD}" if full
                                else f"{SUMMARY_COLS} FROM runs", run_id, user_id)
        return _run(rows[0]) if rows else None

    async def runs_by_id(self, run_ids: Sequence[str]) -> dict[str, RunRecord]:
        """Several runs by tracker id in one read (unknown ids are left out)."""
        ids = list(dict.fromkeys(run_ids))
        if not ids:
            return {}
        rows = await self._read(
            f"SELECT {SUMMARY_COLS} FROM runs WHERE id IN ({_marks(len(ids))})", ids)
        return {run.id: run for run in _runs(rows)}

    async def _find(self, cols_from: str, run_id: str, user_id: str | None
                    ) -> list[sqlite3.Row]:
        """``SELECT {cols_from}`` the run with that tracker or Letta id (and user)."""
        # two indexed lookups: with `id = ? OR letta_run_id = ?` the planner may scan the table
        scope, arg = (" AND user_id = ?", (user_id,)) if user_id else ("", ())
        for column in ("id", "letta_run_id"):
            rows = await self._lookup(
                f"SELECT {cols_from} WHERE {column} = ?{scope} LIMIT 1", (run_id, *arg))
            if rows:
                return rows
        return []

    async def claim(self, serial: bool, now: float, agent_id: str | None = None,
                    limit: int = 100) -> list[RunRecord]:
        """Move the next sendable queued runs to ``submitting`` and return them."""
        # most wake-ups find nothing queued: a read says so without taking the write lock
        if not await self._read("SELECT 1 FROM runs INDEXED BY runs_queue WHERE state = 'queued'"
                                " AND next_check_at <= ? LIMIT 1", (now,)):
            return []

        def write(db: sqlite3.Connection) -> list[RunRecord]:
            ids = (self._lane_heads(db, now, agent_id) if serial
                   else self._due_queued(db, now, agent_id, limit))
            claimed = [self._claim_one(db, run_id) for run_id in ids[:limit]]
            return [run for run in claimed if run is not None]

        return await self._write(write)

    def _claim_one(self, db: sqlite3.Connection, run_id: str) -> RunRecord | None:
        rows = db.execute(
            "UPDATE runs SET state = 'submitting', attempts = attempts + 1 "
            "WHERE id = ? AND state = 'queued' RETURNING seq, kind, agent_id", (run_id,)
        ).fetchall()
        if not rows:
            return None
        seq, kind, agent_id = rows[0]
        if kind == "answer":
            self._answer_pause(db, agent_id, run_id)
        # read back whole, request included (the dispatcher sends it): RETURNING cannot join
        return _run(db.execute(f"SELECT {FULL_COLS} FROM {WITH_PAYLOAD} WHERE seq = ?",
                               (seq,)).fetchone())

    def _lane_free(self, db: sqlite3.Connection, new: NewRun, parallel: bool) -> bool:
        """Whether a run about to be inserted may go at once: parallel lanes always; a serial
        lane when nothing of its agent is in flight or queued (a pause lets only answers by)."""
        if parallel:
            return True
        live, states = _live((*LANE_BUSY, State.PAUSED))
        held = {r[0] for r in db.execute(
            f"SELECT state FROM {live} AND agent_id = ?", (*states, new.agent_id))}
        if held - {State.PAUSED} or (held and new.kind != "answer"):
            return False
        ahead = "AND kind = 'answer'" if held else ""
        earlier = db.execute(
            f"SELECT 1 FROM runs WHERE state = 'queued' AND agent_id = ? {ahead} LIMIT 1",
            (new.agent_id,)).fetchall()
        return not earlier

    def _answer_pause(self, db: sqlite3.Connection, agent_id: str, by: str) -> None:
        """The approval or tool return goes out: the run that paused for it is done."""
        rows = db.execute(
            "UPDATE runs SET state = 'done' WHERE agent_id = ? AND state = 'paused'"
            " RETURNING id, status", (agent_id,)).fetchall()
        for run_id, status in rows:
            self._add_event(db, run_id, Event("dispatch", "answered", {"by": by}),
                            State.DONE, status, clock.iso())

    def _due_queued(self, db: sqlite3.Connection, now: float, agent_id: str | None,
                    limit: int) -> list[str]:
        sql = ("SELECT id FROM runs INDEXED BY runs_queue"
               " WHERE state = 'queued' AND next_check_at <= ?")
        params: list[Any] = [now]
        if agent_id:
            sql += " AND agent_id = ?"
            params.append(agent_id)
        rows = db.execute(sql + " ORDER BY seq LIMIT ?", (*params, limit)).fetchall()
        return [r[0] for r in rows]

    def _lane_heads(self, db: sqlite3.Connection, now: float,
                    agent_id: str | None) -> list[str]:
        """Per agent with a free lane, the run to send next: its oldest queued, or, when the
        agent is paused for an approval, the oldest queued answer (which goes ahead)."""
        busy_states = (*LANE_BUSY, State.PAUSED)
        agent_sql = " AND agent_id = ?" if agent_id else ""
        agent_arg = (agent_id,) if agent_id else ()
        lanes: dict[str, set[str]] = {}
        heads = dict(db.execute(
            "SELECT agent_id, min(seq) FROM runs WHERE state = 'queued'" + agent_sql
            + " GROUP BY agent_id", agent_arg))
        if not heads:
            return []
        live, states = _live(busy_states)
        for a, st in db.execute(
            f"SELECT agent_id, state FROM {live}" + agent_sql, (*states, *agent_arg)
        ):
            lanes.setdefault(a, set()).add(st)
        ids = []
        for agent, seq in heads.items():
            held = lanes.get(agent, set())
            if held - {State.PAUSED}:
                continue
            where = "agent_id = ? AND state = 'queued'"
            where += " AND kind = 'answer'" if held else " AND seq = ?"
            args = (agent,) if held else (agent, seq)
            rows = db.execute(
                f"SELECT id, next_check_at FROM runs WHERE {where} ORDER BY seq LIMIT 1",
                args).fetchall()
            if rows and rows[0][1] <= now:
                ids.append(rows[0][0])
        return ids

    async def transition(self, run_id: str, to: State | None, expect: Iterable[State],
                         fields: dict[str, Any], event: Event | None,
                         relay: bool = False) -> RunRecord | None:
        """Compare-and-set: update the run only if its state is in ``expect``; append the
        event, and the relay's outbox row when ``relay``, in the same transaction."""
        expect = tuple(expect)
        sets = dict(fields, **({"state": to} if to else {}))
        payload = {k: _encode(sets.pop(k)) for k in PAYLOAD_COLS if k in sets}
        assign = ", ".join(f"{k} = {k} + ?" if isinstance(v, Add) else f"{k} = ?"
                           for k, v in sets.items())
        values = [v.n if isinstance(v, Add) else _encode(v) for v in sets.values()]
        sql = (f"UPDATE runs SET {assign} WHERE id = ? AND state IN ({_marks(len(expect))}) "
               f"RETURNING {SUMMARY_COLS}")  # no request or result: nobody reads them here
        payload_sql = (f"UPDATE run_payloads SET {', '.join(f'{k} = ?' for k in payload)}"
                       " WHERE seq = ?")

        def op(db: sqlite3.Connection, batch: _Batch) -> RunRecord | None:
            try:
                rows = db.execute(sql, (*values, run_id, *expect)).fetchall()
            except sqlite3.IntegrityError:
                raise Conflict("that Letta run belongs to another tracker run") from None
            if not rows:
                return None
            run = _run(rows[0])
            if payload:
                db.execute(payload_sql, (*payload.values(), run.seq))
            if event:
                batch.events.append(_event_row(run_id, event, run.state, run.status))
            if relay and run.callback_url:
                self._enqueue_delivery(db, run)
            return run

        return await self._batched(op)

    async def _batched(self, op: Any) -> Any:
        """Group commit: concurrent writers share one transaction, each still committed
        before its caller returns. Under load this turns N commits into one."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((op, fut))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
            try:
                results = await self._commit_batch([op for op, _ in batch])
            except BaseException:
                # nothing of the batch was committed: run each alone, so only a bad one fails
                for op, fut in batch:
                    await self._commit_alone(op, fut)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def _commit_batch(self, ops: list) -> list:
        def write(db: sqlite3.Connection) -> list:
            batch = _Batch()
            results = [op(db, batch) for op in ops]
            _insert_events(db, batch.events)
            self._file_callbacks(db, batch.callbacks)
            return results

        return await self._write(write)

    # --- Letta's callbacks: the inbox --------------------------------------------------------

    async def accept_callback(self, run_id: str, letta_run_id: str, body: bytes,
                              verified: bool = False) -> str:
        """Check the callback against its run and append it to the inbox, committed before
        this returns. Callbacks arriving together share one lookup, insert and commit."""
        item = _Callback(run_id, letta_run_id, body, verified)

        def op(db: sqlite3.Connection, batch: _Batch) -> _Callback:
            batch.callbacks.append(item)  # filed at the batch's end, all at once
            return item

        return (await self._batched(op)).verdict

    def _file_callbacks(self, db: sqlite3.Connection, items: list[_Callback]) -> None:
        if not items:
            return
        ids = list({c.run_id for c in items})
        known = dict(db.execute(
            f"SELECT id, letta_run_id FROM runs WHERE id IN ({_marks(len(ids))})", ids))
        for c in items:
            ours = known.get(c.run_id)
            c.verdict = (Verdict.NO_RUN if c.run_id not in known
                         else Verdict.ACCEPTED if c.verified or ours == c.letta_run_id
                         else Verdict.UNVERIFIED if ours is None else Verdict.OTHER_RUN)
        now = clock.now()
        db.executemany(
            "INSERT INTO callback_inbox (run_id, received_at, body) VALUES (?, ?, ?)",
            [(c.run_id, now, c.body) for c in items if c.verdict == Verdict.ACCEPTED])

    async def inbox(self, limit: int) -> list[InboxItem]:
        rows = await self._read("SELECT id, run_id, received_at, body FROM callback_inbox"
                                " ORDER BY id LIMIT ?", (limit,))
        return [InboxItem(*r) for r in rows]

    async def inbox_depth(self) -> int:
        return (await self._read("SELECT count(*) FROM callback_inbox"))[0][0]

    async def forget_callbacks(self, ids: Sequence[int]) -> None:
        """Drop applied callbacks from the inbox."""
        if not ids:
            return

        def op(db: sqlite3.Connection, batch: _Batch) -> None:
            db.execute(f"DELETE FROM callback_inbox WHERE id IN ({_marks(len(ids))})",
                       list(ids))

        await self._batched(op)

    async def _commit_alone(self, op: Any, fut: asyncio.Future) -> None:
        try:
            [result] = await self._commit_batch([op])
        except BaseException as e:  # the caller gets the error, the drain goes on
            if not fut.done():
                fut.set_exception(e)
            return
        if not fut.done():
            fut.set_result(result)

    def _add_event(self, db: sqlite3.Connection, run_id: str, event: Event,
                   state: str, status: str, at: str) -> None:
        event.at = event.at or at
        db.execute(EVENT_SQL, _event_row(run_id, event, state, status))

    def _enqueue_delivery(self, db: sqlite3.Connection, run: RunRecord) -> None:
        db.execute(
            "INSERT INTO deliveries (id, run_id, user_id, url, next_attempt_at, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (f"msg_{uuid.uuid4().hex}", run.id, run.user_id, run.callback_url, clock.now(),
             clock.iso()),
        )

    async def add_event(self, run_id: str, event: Event) -> None:
        """Append an observation that changes nothing on the run."""
        await self._write(lambda db: self._add_event(
            db, run_id, event, event.state or "", event.status or "", clock.iso()))

    async def reschedule(self, checks: Sequence[tuple[str, float, int]]) -> None:
        """Set (next_check_at, poll_count) for many watched runs at once."""
        if checks:
            await self._write(lambda db: db.executemany(
                "UPDATE runs SET next_check_at = ?, poll_count = ? WHERE id = ?",
                [(at, count, run_id) for run_id, at, count in checks]))

    async def check_now(self, states: Iterable[State], now: float) -> int:
        """Make every run in ``states`` due for a check at ``now``; returns how many."""
        live, states = _live(states)
        return await self._write(lambda db: db.execute(  # every live run: not on the loop
            f"UPDATE runs SET next_check_at = ? WHERE id IN (SELECT id FROM {live})",
            (now, *states)).rowcount, slow=True)

    async def due(self, states: Iterable[State], now: float, limit: int) -> list[RunRecord]:
        live, states = _live(states)
        rows = await self._read(
            f"SELECT {SUMMARY_COLS} FROM {live}"
            " AND next_check_at <= ? ORDER BY next_check_at LIMIT ?", (*states, now, limit)
        )
        return _runs(rows)

    async def in_states(self, states: Iterable[State], limit: int = 10_000) -> list[RunRecord]:
        live, states = _live(states, join=" LEFT JOIN run_payloads USING (seq)")
        rows = await self._read(
            f"SELECT {FULL_COLS} FROM {live} ORDER BY seq LIMIT ?", (*states, limit))
        return _runs(rows)

    async def next_due(self, states: Iterable[State]) -> float | None:
        states = tuple(states)
        if states == (State.QUEUED,):
            # the dispatcher asks after every wake-up: the queue's own small index answers it
            rows = await self._read("SELECT min(next_check_at) FROM runs INDEXED BY runs_queue"
                                    " WHERE state = 'queued'")
            return rows[0][0]
        live, states = _live(states)
        rows = await self._read(f"SELECT min(next_check_at) FROM {live}", states)
        return rows[0][0]

    async def count_by_state(self, states: Iterable[State]) -> dict[str, int]:
        """Runs in each of ``states`` (an index range: no table scan)."""
        live, states = _live(states)
        rows = await self._read(f"SELECT state, count(*) FROM {live} GROUP BY state", states)
        return {r[0]: r[1] for r in rows}

    async def queued_by_agent(self, limit: int) -> dict[str, int]:
        """Queued runs per agent, the ``limit`` deepest lanes (reads only queued rows)."""
        rows = await self._read(
            "SELECT agent_id, count(*) AS n FROM runs WHERE state = 'queued'"
            " GROUP BY agent_id ORDER BY n DESC, agent_id LIMIT ?", (limit,))
        return {r[0]: r[1] for r in rows}

    async def list_runs(self, flt: RunFilter) -> list[RunRecord]:
        cursor = None
        ref = flt.after or flt.before
        if ref:
            # scoped like the listing: another user's run is no cursor (it would tell where
            # that run sits), it is ignored like an unknown id
            rows = await self._find("created_at, seq FROM runs", ref, flt.user_id)
            # Letta ignores a cursor naming no run
            cursor = tuple(rows[0]) if rows else None
            flt = flt if rows else replace(flt, before=None, after=None)
        sql, params = list_query(flt, cursor)
        return _runs(await self._read(sql, params))

    async def explain(self, flt: RunFilter) -> list[str]:
        """The query plan of a history query (tests assert it uses an index)."""
        sql, params = list_query(flt, ("2026-01-01", 1) if flt.before or flt.after else None)
        return [r[3] for r in await self._read("EXPLAIN QUERY PLAN " + sql, params)]

    async def events(self, run_id: str) -> list[Event]:
        rows = await self._read(
            "SELECT id, run_id, at, source, kind, state, status, detail FROM run_events"
            " WHERE run_id = ? ORDER BY id", (run_id,)
        )
        return [Event(id=r["id"], run_id=r["run_id"], at=r["at"], source=r["source"],
                      kind=r["kind"], state=r["state"], status=r["status"],
                      detail=json.loads(r["detail"]) if r["detail"] else None) for r in rows]

    async def stats(self, user_id: str | None) -> dict[str, Any]:
        """Raw figures for /v1/stats: counts (kept by triggers) and recent durations."""
        counts_sql, durations_sql, params = stats_queries(user_id)
        counts = [dict(r) for r in await self._read(counts_sql, params)]
        durations = [tuple(r) for r in await self._read(durations_sql, params)]
        return {"counts": counts, "durations": durations}

    # --- users and keys --------------------------------------------------------------------

    async def create_user(self, name: str, is_admin: bool, webhook_secret: str) -> User:
        user = User(id=f"user-{uuid.uuid4()}", name=name, is_admin=is_admin,
                    created_at=clock.iso(), webhook_secret=webhook_secret)
        await self._write(lambda db: db.execute(
            "INSERT INTO users (id, name, is_admin, created_at, webhook_secret)"
            " VALUES (?, ?, ?, ?, ?)", (user.id, name, int(is_admin), user.created_at,
                                        webhook_secret)))
        return user

    async def _user(self, where: str, arg: str) -> User | None:
        rows = await self._lookup(
            "SELECT u.id, u.name, u.is_admin, u.created_at, u.webhook_secret,"
            f" u.webhook_secret_old FROM users u {where}", (arg,)
        )
        if not rows:
            return None
        r = rows[0]
        return User(id=r[0], name=r[1], is_admin=bool(r[2]), created_at=r[3],
                    webhook_secret=r[4], webhook_secret_old=r[5])

    async def get_user(self, user_id: str) -> User | None:
        return await self._user("WHERE u.id = ?", user_id)

    async def user_by_name(self, name: str) -> User | None:
        return await self._user("WHERE u.name = ?", name)

    async def user_for_key(self, key_hash: str) -> User | None:
        return await self._user(
            "JOIN api_keys k ON k.user_id = u.id WHERE k.key_hash = ? AND k.revoked_at IS NULL",
            key_hash,
        )

    async def add_key(self, user_id: str, key_id: str, key_hash: str, prefix: str) -> None:
        await self._write(lambda db: db.execute(
            "INSERT INTO api_keys (id, user_id, key_hash, prefix, created_at)"
            " VALUES (?, ?, ?, ?, ?)", (key_id, user_id, key_hash, prefix, clock.iso())))

    async def list_keys(self) -> list[ApiKey]:
        rows = await self._read(
            "SELECT k.id, k.user_id, u.name, k.prefix, k.created_at, k.revoked_at, u.is_admin"
            " FROM api_keys k JOIN users u ON u.id = k.user_id ORDER BY k.created_at"
        )
        return [ApiKey(*r[:6], is_admin=bool(r[6])) for r in rows]

    async def revoke_key(self, key_id_or_prefix: str) -> int:
        return await self._write(lambda db: db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE (id = ? OR prefix = ?)"
            " AND revoked_at IS NULL", (clock.iso(), key_id_or_prefix, key_id_or_prefix)
        ).rowcount)

    async def count_keys(self) -> int:
        return (await self._read("SELECT count(*) FROM api_keys"))[0][0]

    async def rotate_webhook_secret(self, user_id: str, new_secret: str) -> None:
        await self._write(lambda db: db.execute(
            "UPDATE users SET webhook_secret_old = webhook_secret, webhook_secret = ?"
            " WHERE id = ?", (new_secret, user_id)))

    # --- relay outbox ----------------------------------------------------------------------

    async def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        rows = await self._read(
            f"SELECT {DELIVERY_COLS} FROM deliveries WHERE state = 'pending'"
            " AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?", (now, limit)
        )
        return [Delivery(**dict(r)) for r in rows]

    async def next_delivery_due(self) -> float | None:
        rows = await self._read(
            "SELECT min(next_attempt_at) FROM deliveries WHERE state = 'pending'"
        )
        return rows[0][0]

    async def record_attempt(self, delivery_id: str, attempt: dict, state: str,
                             next_attempt_at: float | None) -> None:
        finished = clock.iso() if state != "pending" else None

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO delivery_attempts (delivery_id, at, status_code, latency_ms, error)"
                " VALUES (?, ?, ?, ?, ?)",
                (delivery_id, attempt["at"], attempt.get("status_code"),
                 attempt.get("latency_ms"), attempt.get("error")),
            )
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, state = ?, next_attempt_at = ?,"
                " last_status = ?, last_error = ?, finished_at = ? WHERE id = ?",
                (state, next_attempt_at, attempt.get("status_code"), attempt.get("error"),
                 finished, delivery_id),
            )

        await self._write(write)

    async def deliveries(self, run_id: str) -> list[Delivery]:
        rows = await self._read(
            f"SELECT {DELIVERY_COLS} FROM deliveries WHERE run_id = ? ORDER BY created_at",
            (run_id,),
        )
        out = [Delivery(**dict(r)) for r in rows]
        for d in out:
            d.attempt_log = [dict(a) for a in await self._read(
                "SELECT at, status_code, latency_ms, error FROM delivery_attempts"
                " WHERE delivery_id = ? ORDER BY id", (d.id,))]
        return out

    async def delivery_state(self, run_id: str) -> str | None:
        """State of the run's latest delivery (one indexed row, no attempt log)."""
        rows = await self._read("SELECT state FROM deliveries WHERE run_id = ?"
                                " ORDER BY created_at DESC LIMIT 1", (run_id,))
        return rows[0][0] if rows else None

    async def redeliver(self, run_id: str, now: float) -> Delivery | None:
        """Send the run's latest delivery again (same webhook id, so receivers can dedupe)."""
        await self._write(lambda db: db.execute(
            "UPDATE deliveries SET state = 'pending', next_attempt_at = ?, finished_at = NULL"
            " WHERE id = (SELECT id FROM deliveries WHERE run_id = ?"
            " ORDER BY created_at DESC LIMIT 1)", (now, run_id)))
        found = await self.deliveries(run_id)
        return found[-1] if found else None

    # --- operations ------------------------------------------------------------------------

    async def prune(self, before: str, batch: int, dry_run: bool = False) -> dict[str, int]:
        """Delete finished runs created before ``before`` with their events and deliveries,
        ``batch`` runs per transaction so that requests are never held up for long."""
        final = tuple(FINAL)
        where = f"state IN ({_marks(len(final))}) AND created_at < ?"
        totals = {"runs": 0, "run_events": 0, "deliveries": 0, "delivery_attempts": 0}
        if dry_run:
            return await self._prune_counts(where, (*final, before))

        def write(db: sqlite3.Connection) -> dict[str, int]:
            ids = [r[0] for r in db.execute(f"SELECT id FROM runs WHERE {where} LIMIT ?",
                                            (*final, before, batch))]
            return self._delete_runs(db, ids) if ids else {}

        while deleted := await self._write(write, slow=True):
            for table, n in deleted.items():
                totals[table] += n
            await asyncio.sleep(0)  # let requests in between batches
        return totals

    async def _prune_counts(self, where: str, params: tuple) -> dict[str, int]:
        sub = f"SELECT id FROM runs WHERE {where}"
        q = {
            "runs": f"SELECT count(*) FROM runs WHERE {where}",
            "run_events": f"SELECT count(*) FROM run_events WHERE run_id IN ({sub})",
            "deliveries": f"SELECT count(*) FROM deliveries WHERE run_id IN ({sub})",
            "delivery_attempts": "SELECT count(*) FROM delivery_attempts WHERE delivery_id IN"
                                 f" (SELECT id FROM deliveries WHERE run_id IN ({sub}))",
        }
        return {t: (await self._read(sql, params))[0][0] for t, sql in q.items()}

    def _delete_runs(self, db: sqlite3.Connection, ids: list[str]) -> dict[str, int]:
        m = _marks(len(ids))
        deleted = {}
        for table, sql in (
            ("delivery_attempts", "DELETE FROM delivery_attempts WHERE delivery_id IN"
                                  f" (SELECT id FROM deliveries WHERE run_id IN ({m}))"),
            ("deliveries", f"DELETE FROM deliveries WHERE run_id IN ({m})"),
            ("run_events", f"DELETE FROM run_events WHERE run_id IN ({m})"),
            ("runs", f"DELETE FROM runs WHERE id IN ({m})"),
        ):
            deleted[table] = db.execute(sql, ids).rowcount
        return deleted

    async def backup(self, path: str) -> None:
        """A consistent copy of the live database (SQLite's online backup API)."""
        assert self._r is not None
        async with aiosqlite.connect(path) as target:
            await self._r.backup(target)
