"""The SQLite store's inbox of Letta's callbacks: each filed, committed, before it is answered,
and applied in batches after."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from tracker import clock
from tracker.sqlite_batch import Batch, GroupCommit
from tracker.sqlite_queries import marks
from tracker.store import InboxItem, Verdict


@dataclass
class _Callback:
    """A callback on its way into the inbox; its verdict is known once its batch commits."""

    run_id: str
    letta_run_id: str
    body: bytes
    verified: bool
    verdict: str = ""


class CallbackInbox(GroupCommit):
    """The callback inbox (a base of ``SQLiteStore``)."""

    async def accept_callback(self, run_id: str, letta_run_id: str, body: bytes,
                              verified: bool = False) -> str:
        """Check the callback against its run and append it to the inbox, committed before
        this returns. Callbacks arriving together share one lookup, insert and commit."""
        item = _Callback(run_id, letta_run_id, body, verified)

        def op(db: sqlite3.Connection, batch: Batch) -> _Callback:
            batch.callbacks.append(item)  # filed at the batch's end, all at once
            return item

        return (await self._batched(op)).verdict

    def _file_callbacks(self, db: sqlite3.Connection, items: list[_Callback]) -> None:
        if not items:
            return
        ids = list({c.run_id for c in items})
        known = dict(db.execute(
            f"SELECT id, letta_run_id FROM runs WHERE id IN ({marks(len(ids))})", ids))
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
