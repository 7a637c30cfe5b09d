"""The SQLite database under the store: connections, transactions, migrations, checkpoints;
the only module that imports aiosqlite. WAL, one writer, one reader (and key lookups on the
event loop).

The writer is a plain sqlite3 connection owned here. Its transactions run on the event loop
itself when the database is free (a group commit is ~50 µs of SQL a run, and a hop to a
thread cost more: two thread switches, and the GIL fought over with the loop while it
waited). One that finds another process holding the database (a callback worker, a CLI
command) tries again there within milliseconds for ~30 ms, then, like one that would fsync
each commit (synchronous=FULL) or run long (prune, migrations, shutdown), goes to the
writer's own thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiosqlite

from tracker import clock
from tracker.errors import Unavailable
from tracker.migrations import LATEST, MIGRATIONS
from tracker.service_lock import ServiceLock

log = logging.getLogger("tracker.store")

#: seconds after a failed write before /healthz tries one of its own (``ping``): a small
#: write may go where the one that failed did not (a full disk's last free pages), so not at
#: once, while a client's retries still meet the fault
WRITE_RETEST_S = 5.0


class MalformedJSON(Unavailable):
    """A read met a stored JSON text that SQLite's JSON functions refuse and Python's json
    reads: NaN or Infinity, which older versions took in a free-form field (the API now
    refuses them). A 503 like any failed read, unless the reader has another way."""


#: how long a write waits for a lock another process holds (on the writer's thread)
BUSY_TIMEOUT_MS = 10_000
#: a write on the loop that finds another process holding the database tries again after
#: these, 31 ms in all (then waits on the writer's thread, up to BUSY_TIMEOUT_MS). A ms
#: apart at most: two callback workers commit back to back, and tries 4 and 8 ms apart kept
#: missing the moment the other let go (writes waiting 23-38 ms, 102 answers over 30 ms in
#: two loads; a ms apart, none: BENCHMARKS-HISTORY.md)
BUSY_RETRIES_S = (0.0005,) * 2 + (0.001,) * 30
#: how long closing waits for another process's lock before it skips its upkeep
CLOSE_WAIT_MS = 1_000
#: seconds between WAL checkpoints (the writer never checkpoints itself). A round's first pass
#: syncs the WAL, and commits appending to it wait: at a round a second, in a flood (~70 MB of
#: WAL a second), some took 35-60 ms, and benchmark 1's p99 went over 50 ms; at four a second,
#: none over 15 (BENCHMARKS-HISTORY.md)
CHECKPOINT_EVERY_S = 0.25
#: a checkpoint's passes beside the writes, at most, before its last one (see _checkpoint)
CHECKPOINT_PASSES = 4
#: frames (pages) the last pass may find to copy with the writes held, while the WAL is small:
#: a few ms, and only when writes come slower than the copying
FINISH_FRAMES = 256
#: ... or this share of the WAL's frames, as it grows: the longer the WAL, the longer a hold
#: worth making to start it over (steady writes' WAL stays bounded, with a hold now and then)
FINISH_SHARE = 1 / 256
#: ... past this many (512 MiB of 4 KiB pages) it holds them whatever that takes, in a flood
#: too. Writes that never let up (a backlog of callbacks applied after a restart) grew the
#: WAL by 60 MB a second, to 2-5 GB, before their allowance caught up; with this, to 0.7-1.3
#: GB (a round's passes take seconds then), each hold ~0.1 s there, a few ms in a flood
#: (_catch_up; BENCHMARKS-HISTORY.md)
WAL_MAX_FRAMES = 2**17
#: a WAL file longer than this (left so by a flood) is cut back to nothing by a held pass once
#: no flood is on and the WAL in it is short again, or writes pause (_cut_back_due). Not by
#: SQLite's journal_size_limit as the WAL starts over: that truncation runs inside the next
#: commit, on the event loop, and cutting 580 MB back took it 135 ms, every time a flood's WAL
#: reached WAL_MAX_FRAMES (BENCHMARKS-HISTORY.md)
WAL_KEEP_BYTES = 64 * 2**20
#: a WAL frame: a page of the database (SQLite's default size, which ours keep) and its header
FRAME_BYTES = 4096 + 24
#: passes beside the writes, at most, that bring a long WAL's copy up to date before its hold
CATCH_UP_PASSES = 6
#: how long that last pass waits for another process's write in progress, or an older read
CHECKPOINT_WAIT_MS = 5


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


async def _stopped(db: aiosqlite.Connection) -> None:
    """``db`` stopped, its thread waited for (a second at most): the thread's last act posts
    to this event loop, and one that finds it closed (a start cancelled as it shuts down, a
    test's end) dies with an exception instead. Stopped once only: aiosqlite stops a
    connection whose opening failed itself, without waiting, and a second stop is never run.
    aiosqlite has no public state for either: its private ``_running`` and ``_thread``."""
    if db._running:
        db.stop()
    thread = db._thread
    deadline = time.monotonic() + 1
    while thread.is_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


def create_private(path: str) -> None:
    """Create the database file ``path``, empty, readable by its owner only, unless it is
    there: it holds the callback secret and users' webhook secrets in plain text, and SQLite
    would create it world-readable (0644 under the usual umask). SQLite gives the ``-wal``
    and ``-shm`` files the database file's mode. A file already there keeps its mode."""
    if path == ":memory:":
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as e:  # its directory missing or not writable: as SQLite would say
        raise Unavailable(f"cannot open database {path}: {e.strerror or e}") from e


async def _to_its_end(work: Awaitable[Any]) -> Any:
    """Await the writer thread's ``work``; when the caller is cancelled (shutdown cancels
    retention mid-prune, the poller mid-write), still wait for its end before leaving, and
    with it the store's lock: the next write, inline on the loop, met the connection inside
    that transaction (its BEGIN failed: a write lost, the store marked unwritable) or inside
    its busy wait (the loop frozen up to the busy timeout)."""
    fut = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            try:
                await asyncio.wait([fut])
            except asyncio.CancelledError:
                continue
        if not fut.cancelled():
            fut.exception()  # the caller is gone: its failure is nobody's to raise
        raise


def _allowance(frames: int) -> int:
    """Frames a held pass may find to copy (see FINISH_FRAMES, FINISH_SHARE)."""
    return max(FINISH_FRAMES, int(frames * FINISH_SHARE))


def set_pragma(db: sqlite3.Connection, pragma: str) -> None:
    """``PRAGMA pragma``, tried again while the database is busy, up to the busy timeout. Two
    processes opening a new database at once both turn it to WAL, and SQLite refuses the
    second at once, calling no busy handler (a third of such pairs, measured): on the
    writer's thread, where waiting is allowed."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            db.execute(f"PRAGMA {pragma}")
            return
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _waiting(db: sqlite3.Connection, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(db, *args)`` on the writer's thread, where waiting for a lock is allowed."""
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    try:
        return fn(db, *args)
    finally:
        db.execute("PRAGMA busy_timeout = 0")


def _user_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """One version's script, atomic, unless another process applied it since this one read
    the schema's version: read again inside the transaction, a later version included (a
    script that can run twice, run again after a later one, set the version back)."""
    def apply(db: sqlite3.Connection) -> None:
        if _user_version(db) >= version:
            return
        for statement in _statements(MIGRATIONS[version - 1]):
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {version}")

    _in_transaction(db, apply)


def _statements(script: str) -> list[str]:
    """A script's statements (a trigger's own ";" kept inside it, as SQLite reads them)."""
    out, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending)
            pending = ""
    if pending.strip():
        raise ValueError(f"a statement without its ';' ends the script: {pending.strip()!r}")
    return out


def _close_writer(db: sqlite3.Connection, checkpoint: bool) -> None:
    # fresh planner statistics (as SQLite recommends before closing), and an empty WAL unless
    # another process checkpoints; both optional, so another process's lock is waited for
    # briefly (the service's transactions take milliseconds), not for the full busy timeout:
    # a CLI command exits at once
    db.execute(f"PRAGMA busy_timeout = {CLOSE_WAIT_MS}")
    with contextlib.suppress(sqlite3.Error):
        # not bounded by analysis_limit: its sampled statistics misled the planner
        # (a user's runs of one agent went through runs_user: 23 ms instead of 4)
        db.execute("PRAGMA optimize")
        if checkpoint:  # a worker's would hold the service's writes for up to CLOSE_WAIT_MS
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


class SQLiteDB:
    """One SQLite file: its connections and transactions (under ``SQLiteStore`` and the
    other sqlite_* classes, which have the operations)."""

    def __init__(self, path: str, synchronous: str = "NORMAL", checkpoints: bool = True) -> None:
        self.path = path
        self.synchronous = synchronous
        self.checkpoints = checkpoints  # False: another process (the service) checkpoints
        self._db: sqlite3.Connection | None = None  # the writer
        self._writer: ThreadPoolExecutor | None = None  # its thread, for slow transactions
        self._r: aiosqlite.Connection | None = None
        self._now: sqlite3.Connection | None = None  # point reads on the loop thread
        self._lock = asyncio.Lock()
        self._ck: aiosqlite.Connection | None = None
        self._checkpointer: asyncio.Task | None = None
        self._ck_frames = -1  # the WAL's frames at the last checkpoint's end
        self._file: int | None = None  # the database file, for _sync_database
        self.writable = True  # False from a failed write until the next one succeeds
        self._failed_at = 0.0  # when a write last failed (monotonic; see ping)
        self.flooding: Callable[[], bool] = lambda: False  # set by the service (Store)
        self.alone: Callable[[], bool] = lambda: False  # likewise
        self._service_lock: ServiceLock | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def _connect(self, cache_mb: int = 8) -> aiosqlite.Connection:
        db = aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db
            db.row_factory = sqlite3.Row
            for pragma in self._pragmas(cache_mb):
                await db.execute(f"PRAGMA {pragma}")
        except BaseException:
            # cancelled or failed here, nobody would close it, and its thread (not a daemon)
            # would keep the process from exiting
            await _stopped(db)
            raise
        return db

    def _pragmas(self, cache_mb: int) -> tuple[str, ...]:
        return (f"busy_timeout = {BUSY_TIMEOUT_MS}", "journal_mode = WAL",
                "journal_size_limit = -1",  # never on the loop: see WAL_KEEP_BYTES
                f"synchronous = {self.synchronous}", "foreign_keys = ON",
                f"cache_size = -{cache_mb * 1024}")

    def _connect_writer(self) -> sqlite3.Connection:
        # used from the loop and from the writer's thread, never both at once (self._lock)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        for pragma in self._pragmas(cache_mb=32):
            set_pragma(db, pragma)
        db.execute("PRAGMA busy_timeout = 0")  # on the loop it must never wait (see _waiting)
        return db

    async def open(self, migrate: bool = True) -> None:
        """Connect, and bring the schema to the latest version (creating the database if
        need be); with ``migrate`` False, an existing database as it is (the CLI's commands
        but ``db migrate``: a path mistyped, or relative to another directory, makes no new
        one)."""
        if not migrate and self.path != ":memory:" and not os.path.exists(self.path):
            raise Unavailable(f"no database at {os.path.abspath(self.path)}: `tracker db"
                              " migrate` (or `tracker serve`) creates it; check database.url"
                              " (a relative path is from the working directory)")
        if migrate:
            create_private(self.path)
        try:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
            self._db = await self._in_thread(self._connect_writer)
            if migrate:
                await self.migrate()
            if self.path == ":memory:":
                return  # one connection: reads go to the writer (see _read)
            # a second connection for reads: WAL readers never wait for the writer
            self._r = await self._connect()
            self._now = self._point_reader()
            self._db.execute("PRAGMA wal_autocheckpoint = 0")  # never inside a commit
            # a statement of a multi-statement transaction keeps the pages it changes in a
            # statement journal, to undo it alone if it fails: a run's insert changes ~15
            # (its indexes), past the 64 KiB SQLite keeps in memory before spilling to a temp
            # file, which then cost two write() calls a page, ~40% of the insert. In memory
            # it is only as large as one statement's pages (set after the migrations: their
            # index builds sort with the temp files' bound on memory)
            self._db.execute("PRAGMA temp_store = MEMORY")
            if self.checkpoints:
                await self._start_checkpoints()
        except sqlite3.Error as e:
            raise Unavailable(f"cannot open database {self.path}: {e}") from e

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def _start_checkpoints(self) -> None:
        """Checkpoint the WAL from a connection of its own, every CHECKPOINT_EVERY_S, instead
        of inside whichever commit crosses the threshold: commits stay short and even."""
        self._ck = await self._connect(cache_mb=2)
        # open until the connections are closed: closing a descriptor of the file drops all
        # of this process's POSIX locks on it, SQLite's too (another process's reader then
        # found the database malformed)
        self._file = os.open(self.path, os.O_RDONLY)
        # a FULL checkpoint waits this long for another process's write or an older read,
        # with ours held; then it copies what it can, as a PASSIVE one would
        await self._ck.execute(f"PRAGMA busy_timeout = {CHECKPOINT_WAIT_MS}")
        self._checkpointer = asyncio.create_task(self._checkpoints())

    async def _checkpoints(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY_S)
            try:
                await self._checkpoint()
            except sqlite3.Error:
                continue  # busy, or the disk: the next round tries again
            except Exception:
                # an fdatasync's OSError (a full disk, EIO) ended the task: with SQLite's own
                # checkpoints off, nothing checkpointed again and the WAL grew for good.
                # Logged once until a round succeeds (rounds come 4 a second)
                if not failing:
                    log.exception("WAL checkpoint failed; trying again every %gs",
                                  CHECKPOINT_EVERY_S)
                failing = True
                continue
            if failing:
                log.info("WAL checkpoints succeed again")
            failing = False

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database beside the writes, pass after pass while frames
        keep coming in, then the last few with the writes held (ours by the lock, the
        callback workers' by a FULL checkpoint): the next write finds the WAL all copied and
        starts it over. With one pass, under steady writes some frames always came in
        during it, and the WAL grew without end (~30 MB a second at 200 runs/s, each commit
        dearer as it grew: BENCHMARKS-HISTORY.md). Holding the writes for more than a
        few frames' copying stalled every request behind them (benchmark 1's p99 went from
        24 to 61 ms), so when writes outpace the copying the WAL waits for a later round,
        until it is long enough that a longer hold is worth it (FINISH_SHARE). While
        callbacks flood in, any hold stalls answering them (with callback workers, p99 88
        against 47 ms): then it waits until the WAL reaches WAL_MAX_FRAMES, and catches up
        before it holds them. A long WAL's file is cut back after, when writes slow down."""
        start = None
        cut_back = False
        for _ in range(CHECKPOINT_PASSES):
            [(busy, frames, _)] = await self._ck.execute_fetchall(
                "PRAGMA wal_checkpoint(PASSIVE)")
            if busy:
                return  # another connection checkpoints (a CLI command closing): next round
            if start is None and frames == self._ck_frames:
                # nothing written since the last round's last pass
                if not self._cut_back_due(0):
                    return
                # idle: what the WAL holds is all copied, and none will be
                frames, cut_back = 0, True
                break
            if frames >= WAL_MAX_FRAMES:
                # long enough: started over now, whatever the hold costs
                await self._catch_up(frames)
                break
            if start is not None and frames - start <= _allowance(frames) and not self.flooding():
                break  # few came in during the last pass: copying them is quick
            start = frames
        else:
            return
        # FULL: also holds other processes' writes (callback workers') while it copies,
        # waiting at most CHECKPOINT_WAIT_MS for one in progress (see _start_checkpoints);
        # TRUNCATE: and then cuts the WAL file back to nothing
        mode = "TRUNCATE" if cut_back or self._cut_back_due(frames) else "FULL"
        async with self._lock:
            [(_, self._ck_frames, _)] = await self._ck.execute_fetchall(
                f"PRAGMA wal_checkpoint({mode})")

    async def _catch_up(self, frames: int) -> None:
        """Before the hold at WAL_MAX_FRAMES: the database file synced, and the WAL copied
        again, beside the writes, until few frames come in during a pass. A pass syncs the
        database file only when it has copied the whole WAL, which writes that never pause
        never let it do: the hold then synced all that the passes had copied since the WAL
        started over, hundreds of MB (with the copying, 0.2-0.27 s of every write waiting, in
        benchmark 1 on a fast machine; BENCHMARKS-HISTORY.md). Writes faster than the copying (a
        backlog applied after a restart) leave as many frames to each pass: then no more."""
        came = frames
        for _ in range(CATCH_UP_PASSES):
            await self._sync_database()
            [(busy, now, _)] = await self._ck.execute_fetchall(
                "PRAGMA wal_checkpoint(PASSIVE)")
            if busy or now - frames <= _allowance(now) or now - frames > came * 3 / 4:
                return
            came, frames = now - frames, now

    async def _sync_database(self) -> None:
        """The database file's pages written so far, to the disk, on a worker thread."""
        assert self._file is not None
        await asyncio.to_thread(os.fdatasync, self._file)

    def _cut_back_due(self, frames: int) -> bool:
        """The WAL file is longer than WAL_KEEP_BYTES, but the WAL in it is not (``frames``
        since it started over, 0 when idle), and no flood is on: writes slow enough for the
        file's truncation (~0.2 s a GB) to be held once."""
        try:
            size = os.path.getsize(f"{self.path}-wal")
        except OSError:  # no WAL file (yet)
            return False
        return frames * FRAME_BYTES < WAL_KEEP_BYTES < size and not self.flooding()

    def lock_for_service(self) -> None:
        """This process's service is the only one on this database (``tracker.service_lock``):
        raises ``Conflict`` when another holds it. Released by ``close``."""
        if self.path != ":memory:" and self._service_lock is None:
            lock = ServiceLock(self.path)
            try:
                lock.acquire()
            except OSError as e:  # its directory missing or not writable: as open would say
                raise Unavailable(f"cannot open database {self.path}: its lock file"
                                  f" {lock.path}: {e.strerror or e}") from e
            self._service_lock = lock

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            await asyncio.gather(self._checkpointer, return_exceptions=True)
        if self._db is not None:
            async with self._lock:
                await self._in_thread(_close_writer, self._db, self.checkpoints)
        if self._writer is not None:
            self._writer.shutdown()
        for db in {id(c): c for c in (self._ck, self._r) if c}.values():
            await db.close()
        if self._now is not None:
            self._now.close()
        if self._file is not None:  # after the connections (see _start_checkpoints)
            os.close(self._file)
        self._db = self._writer = self._r = self._ck = self._now = self._file = None
        if self._service_lock is not None:  # last: the next service may start now
            self._service_lock.release()
            self._service_lock = None

    async def _write(self, fn: Callable[[sqlite3.Connection], Any], slow: bool = False) -> Any:
        """Run ``fn`` as one write transaction: on the loop when the database is free (see
        the module's docstring), else on the writer's thread; ``slow`` ones always there.
        Storage faults become ``Unavailable`` (503)."""
        assert self._db is not None, "store is not open"
        async with self._lock:
            try:
                done = None if slow or not self._inline_ok else await self._inline_soon(fn)
                result = done[0] if done else await _to_its_end(self._in_thread(
                    _waiting, self._db, _in_transaction, fn))
            except (sqlite3.OperationalError, sqlite3.DatabaseError) as e:
                if isinstance(e, sqlite3.IntegrityError):
                    raise
                self.writable = False
                self._failed_at = time.monotonic()
                raise Unavailable(f"database write failed: {e}") from e
            self.writable = True
            return result

    @property
    def _inline_ok(self) -> bool:
        # with synchronous=FULL every commit waits for the disk: not on the loop
        return self.synchronous.upper() != "FULL"

    async def _inline_soon(self, fn: Callable[[sqlite3.Connection], Any]) -> tuple[Any] | None:
        """``_inline``, tried again after each of ``BUSY_RETRIES_S`` while another process
        (a callback worker, a checkpoint) holds the database: its transactions take a few
        ms, and SQLite's own wait on the writer's thread sleeps 1, 2, 5, 10, 15, 20, 25 ms...
        between its tries, each sleep a stall for every request behind this write."""
        done = self._inline(fn)
        for delay in BUSY_RETRIES_S:
            if done is not None:
                break
            await asyncio.sleep(delay)
            done = self._inline(fn)
        return done

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
            if "malformed JSON" in str(e):  # SQLite's only sign of it (code SQLITE_ERROR)
                raise MalformedJSON(f"database read failed: {e}") from e
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
        """Whether the database answers reads and takes writes. Some time after a failed
        write (a full disk, a lock held past the busy timeout: ``WRITE_RETEST_S``), whether
        a write goes now: an idle service writes nothing else, so /healthz said 503 until
        traffic came, and a balancer that sends traffic only to a healthy service never
        sent it."""
        if not await self._read("SELECT 1"):
            return False
        if not self.writable and time.monotonic() - self._failed_at >= WRITE_RETEST_S:
            # one probe at a time: those coming meanwhile (no key needed) see the last answer
            # instead of queueing writes, each up to the busy timeout, ahead of real ones
            self._failed_at = time.monotonic()
            await self._write(lambda db: db.execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES ('health_write', ?)",
                (clock.iso(),)))
        return self.writable

    async def schema_version(self) -> int:
        return (await self._read("PRAGMA user_version"))[0][0]

    async def migrate(self) -> list[int]:
        """Apply pending migrations in order, each in its own transaction."""
        assert self._db is not None
        # read waiting for a lock, on the writer's thread: another process opening a new
        # database at the same moment holds it a while (its switch to WAL, its migrations),
        # and on the loop (busy_timeout 0) the read failed at once, 'database is locked'
        current = await self._in_thread(_waiting, self._db, _user_version)
        if current > LATEST:
            raise Unavailable(f"database schema v{current} is newer than this tracker (v{LATEST})")
        if current < LATEST and self._service_lock is None and self.path != ":memory:" \
                and ServiceLock(self.path).held_elsewhere():
            # a CLI command beside a running service: the service's code is on the older
            # schema, and migrating under it would break it; it migrates when started
            raise Unavailable(f"database schema v{current} is older than this tracker's"
                              f" (v{LATEST}) and a tracker service is using it: upgrade and"
                              " restart the service, which migrates it, then run this again")
        applied = []
        for version in range(current + 1, LATEST + 1):
            if current:  # some rewrite a table: minutes on a history of millions of runs
                log.info("migrating database %s to schema v%d", self.path, version)
            started = time.monotonic()
            async with self._lock:
                try:
                    await self._in_thread(_waiting, self._db, _migrate, version)
                except sqlite3.Error as e:
                    # another process opening the database at the same moment may have applied
                    # it first (each is atomic, so this attempt changed nothing): taken as done
                    if await self._in_thread(_waiting, self._db, _user_version) < version:
                        raise Unavailable(f"migration to schema v{version} failed: {e}") from e
            if current:
                log.info("database at schema v%d (%.1f s)", version, time.monotonic() - started)
            applied.append(version)
        return applied

    async def table_counts(self) -> dict[str, int]:
        # those the database has: one at an older schema lacks some (``db status`` before
        # ``db migrate``)
        have = {r[0] for r in await self._read(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables = ["runs", "run_payloads", "run_events", "users", "api_keys", "deliveries",
                  "delivery_attempts", "callback_inbox"]
        return {t: (await self._read(f"SELECT count(*) FROM {t}"))[0][0] for t in tables
                if t in have}

    async def setting(self, key: str, default: str) -> str:
        """The stored value, storing ``default`` first when there is none."""
        def write(db: sqlite3.Connection) -> str:
            db.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)", (key, default))
            return db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()[0]

        return await self._write(write)

    async def backup(self, path: str) -> int:
        """A consistent copy of the live database (SQLite's online backup API), its queued
        runs marked as maybe sent (``needs_lookup``), as a send that got no answer is:
        restored, each is looked for at Letta before it is sent. The live service goes on
        sending them after the copy is taken, and a restore sent every one of those a second
        time. Returns how many were marked."""
        assert self._r is not None
        create_private(path)
        async with aiosqlite.connect(path) as target:
            await self._r.backup(target)
            marked = await target.execute("UPDATE runs SET needs_lookup = 1"
                                          " WHERE state = 'queued' AND needs_lookup = 0")
            await target.commit()
            return marked.rowcount
