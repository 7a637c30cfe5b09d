"""The group commit: writes made at the same moment share one SQLite transaction."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from tracker.sqlite_db import SQLiteDB

#: most transitions committed together
BATCH_MAX = 256
#: most turns of the event loop a commit waits for more writes to join it, and how many
#: writes are enough not to wait (more share a commit's cost little further, and waiting
#: delays them all)
GATHER_TURNS = 3
GATHER_ENOUGH = 32


#: SQLite's primary result codes that are the database's state, whatever the write, and met
#: after the busy timeout's wait: BUSY, LOCKED. Not FULL: a batch's many pages may not fit
#: where each of its writes alone would (a large callback's among small ones)
_DATABASE_FAULTS = frozenset({5, 6})


def _the_databases(e: BaseException) -> bool:
    """Whether a batch's failure is the database's (any write would have failed alike)."""
    cause = e.__cause__ if isinstance(e.__cause__, sqlite3.Error) else e
    code = getattr(cause, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _DATABASE_FAULTS


@dataclass
class Batch:
    """What the operations of one group commit leave to be written at its end."""

    events: list[tuple] = field(default_factory=list)
    callbacks: list = field(default_factory=list)  # of sqlite_inbox's _Callback


class GroupCommit(SQLiteDB):
    """``_batched`` operations, committed together (a base of ``SQLiteStore``)."""

    def __init__(self, path: str, synchronous: str = "NORMAL", checkpoints: bool = True) -> None:
        super().__init__(path, synchronous, checkpoints)
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None
        #: the last drain committed one write: nobody joined it (see _alone_now)
        self._quiet = True
        #: a write committed alone in this turn of the loop (see _alone_now)
        self._alone_this_turn = False

    async def close(self) -> None:
        if self._drainer is not None:  # the writes already queued go in first
            await asyncio.gather(self._drainer, return_exceptions=True)
        await super().close()

    async def _batched(self, op: Any) -> Any:
        """Group commit: concurrent writers share one transaction, each still committed
        before its caller returns. Under load this turns N commits into one. A lone write
        commits at once (``_alone_now``)."""
        if self._alone_now():
            self._alone_this_turn = True
            asyncio.get_running_loop().call_soon(self._next_turn)
            [result] = await self._commit_batch([op])
            return result
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((op, fut))
        if not self._draining:
            self._drainer = asyncio.create_task(self._drain())
        return await fut

    @property
    def _draining(self) -> bool:
        return self._drainer is not None and not self._drainer.done()

    def _alone_now(self) -> bool:
        """Whether this write commits at once instead of through the drain, whose turns of
        the loop (its task's start, its gathering, the caller's wake-up) cost a lone submit
        ~4% of the loop's CPU (BENCHMARKS-HISTORY.md, fortieth session). Only for the code
        serving the only request in flight (``alone``: the poller's and the applier's writes
        made together still share commits), with nothing queued or draining, and while
        writes are quiet: the last drain had one write, and none committed alone yet in this
        turn of the loop. A request counts from when its handler runs, and the handlers of a
        flood of callbacks (each waiting for nothing but its commit) run one after the
        other, each alone by that count: without the last two conditions each committed
        alone, and benchmark 1 fell from 0.56 of its ceiling to 0.29."""
        return (self._quiet and not self._alone_this_turn and not self._queue
                and not self._draining and self.alone())

    def _next_turn(self) -> None:
        self._alone_this_turn = False

    async def _drain(self) -> None:
        await self._gather()
        while self._queue:
            batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
            try:
                results = await self._commit_batch([op for op, _ in batch])
            except asyncio.CancelledError:
                # committed or not, the batch ended on the writer's thread (see _write): run
                # again, its writes could be made twice
                for _, fut in batch:
                    fut.cancel()
                raise
            except BaseException as e:
                if _the_databases(e):
                    # the database's fault, not one write's (locked past the busy timeout):
                    # each alone waited its own busy timeout, the k-th caller
                    # answered after k+1 of them, and writes whose callers had given up
                    # were committed (their submits sent) once the lock went
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                # nothing of the batch was committed: run each alone, so only a bad one fails
                for op, fut in batch:
                    await self._commit_alone(op, fut)
                continue
            self._quiet = len(batch) == 1
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def _gather(self) -> None:
        """Let the writes of requests a turn of the loop behind join this commit, for as long
        as more keep coming (a few turns at most, and not past GATHER_ENOUGH): under load,
        fewer and larger commits, whose cost grows with the pages they write and many of
        which the runs share; alone, a turn or two of the loop before committing (none for
        the only request in flight: ``_batched``)."""
        for _ in range(GATHER_TURNS):
            waiting = len(self._queue)
            if waiting >= GATHER_ENOUGH:
                return
            await asyncio.sleep(0)
            if len(self._queue) == waiting:
                return

    async def _commit_batch(self, ops: list) -> list:
        def write(db: sqlite3.Connection) -> list:
            batch = Batch()
            results = [op(db, batch) for op in ops]
            self._end_batch(db, batch)
            return results

        return await self._write(write)

    async def _commit_alone(self, op: Any, fut: asyncio.Future) -> None:
        try:
            [result] = await self._commit_batch([op])
        except BaseException as e:  # the caller gets the error, the drain goes on
            if not fut.done():
                fut.set_exception(e)
            return
        if not fut.done():
            fut.set_result(result)

    def _end_batch(self, db: sqlite3.Connection, batch: Batch) -> None:
        """Write what the batch's operations left for its end (``SQLiteStore`` does)."""
        raise NotImplementedError
