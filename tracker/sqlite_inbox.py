"""The SQLite store's inbox of Letta's callbacks: each filed, committed, before it is answered,
and applied in batches after."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from tracker import clock
from tracker.errors import Unavailable
from tracker.sqlite_batch import Batch, GroupCommit
from tracker.sqlite_queries import live_runs, marks
from tracker.states import FINAL, LANE_BUSY
from tracker.store import InboxItem, RunRecord, Verdict

#: live runs whose Letta run id is kept in memory at most (~70 bytes each: ~21 MB, what
#: 100,000 as strings took); the callbacks of any others are checked against the database,
#: as all are after a restart until the load of ``warm_up``
LETTA_IDS_MAX = 300_000
#: rows of the start-up load of those read and hashed at a time
LOAD_CHUNK = 20_000


def _pair(run_id: str, letta_run_id: str) -> int:
    """A run and its Letta run as one 64-bit number: Python's string hash is keyed afresh in
    each process, so a callback cannot be made to match a pair it is not."""
    return hash((run_id, letta_run_id))


@dataclass
class _Callback:
    """A callback on its way into the inbox; its verdict is known once its batch commits."""

    run_id: str
    letta_run_id: str
    body: bytes
    verified: bool
    verdict: str = ""


class CallbackInbox(GroupCommit):
    """The callback inbox (a base of ``SQLiteStore``).

    Filing a callback checks the Letta run it names against its run's. The pairs of live
    runs and their Letta runs are kept in memory for that, hashed (a run's Letta run, once
    set, never changes): a lookup of ~15 µs a callback, on random pages of the runs table,
    that Letta's answer no longer waits for. A callback matching no pair (another Letta run,
    a finished or unknown run, one past the bound) is checked against the runs table."""

    def __init__(self, path: str, synchronous: str = "NORMAL", checkpoints: bool = True) -> None:
        super().__init__(path, synchronous, checkpoints)
        self._letta_pairs: set[int] = set()  # of _pair
        self._loaded: asyncio.Task | None = None

    async def close(self) -> None:
        if self._loaded is not None:  # a load still running would read a closed database
            self._loaded.cancel()
            await asyncio.gather(self._loaded, return_exceptions=True)
        await super().close()

    async def warm_up(self) -> None:
        """Load the live runs' Letta ids, once: the service and its callback workers start
        this at start-up (not ``open``, which every CLI command pays: ~150 ms for 60,000 live
        runs); a load at the first callback held p99 at ~170 ms."""
        if self._loaded is None:
            self._loaded = asyncio.create_task(self._load_letta_ids())
        if not self._loaded.done():  # once it is, no shield and no await
            await asyncio.shield(self._loaded)  # a cancelled caller leaves the load be

    async def _load_letta_ids(self) -> None:
        live, states = live_runs(LANE_BUSY)  # the runs Letta may call back about
        sql = f"SELECT id, letta_run_id FROM {live} AND letta_run_id IS NOT NULL LIMIT ?"
        params = (*states, LETTA_IDS_MAX)
        # a run that finished meanwhile may come back: its pair is still its pair (a late
        # duplicate is accepted, as the applier expects), and the bound holds the rest
        try:
            if self._r is None:  # an in-memory database: its one connection
                self._note_pairs(await self._read(sql, params))
                return
            # in slices: 250,000 rows at once took ~90 MB for a moment and held the loop
            # ~0.3 s as they were hashed. On a connection of its own: a statement not yet
            # done holds its connection's snapshot, which the reader's other reads would see
            db = await self._connect()
            try:
                async with db.execute(sql, params) as rows:
                    while chunk := await rows.fetchmany(LOAD_CHUNK):
                        self._note_pairs(chunk)
            finally:
                await db.close()
        except (Unavailable, sqlite3.DatabaseError):
            return  # every callback is then looked up, as the ones of unknown runs are

    def _note_pairs(self, rows: Sequence[tuple[str, str]]) -> None:
        """Keep the (run id, Letta run id) rows' pairs, as many as the bound leaves room for."""
        room = max(0, LETTA_IDS_MAX - len(self._letta_pairs))
        self._letta_pairs.update(_pair(*row) for row in rows[:room])

    def _remember(self, run: RunRecord) -> None:
        """Note a run's Letta run id as committed; a finished run's is dropped (a callback
        about it is a late duplicate, checked against the database)."""
        if not run.letta_run_id:
            return
        if run.state in FINAL:
            self._letta_pairs.discard(_pair(run.id, run.letta_run_id))
        elif len(self._letta_pairs) < LETTA_IDS_MAX:
            self._letta_pairs.add(_pair(run.id, run.letta_run_id))

    async def accept_callback(self, run_id: str, letta_run_id: str, body: bytes,
                              verified: bool = False) -> str:
        """Check the callback against its run and append it to the inbox, committed before
        this returns. Callbacks arriving together share one lookup, insert and commit.
        Filing never waits for the start-up load of the Letta ids (``warm_up``): until it is
        done, it looks them up (with 250,000 runs in flight, waiting for the load held the
        first callbacks for a second)."""
        item = _Callback(run_id, letta_run_id, body, verified)

        def op(db: sqlite3.Connection, batch: Batch) -> _Callback:
            batch.callbacks.append(item)  # filed at the batch's end, all at once
            return item

        return (await self._batched(op)).verdict

    def _file_callbacks(self, db: sqlite3.Connection, items: list[_Callback]) -> None:
        if not items:
            return
        known = {c.run_id: c.letta_run_id for c in items
                 if _pair(c.run_id, c.letta_run_id) in self._letta_pairs}
        if missed := list({c.run_id for c in items} - known.keys()):
            # another Letta run's, unknown, finished, not sent yet, or past the bound
            known.update(db.execute(
                f"SELECT id, letta_run_id FROM runs WHERE id IN ({marks(len(missed))})",
                missed))
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

        def op(db: sqlite3.Connection, batch: Batch) -> None:
            db.execute(f"DELETE FROM callback_inbox WHERE id IN ({marks(len(ids))})",
                       list(ids))

        await self._batched(op)
