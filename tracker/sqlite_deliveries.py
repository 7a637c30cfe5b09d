"""The SQLite store's relay outbox: deliveries of finished runs to their callback URLs, and
each attempt."""

from __future__ import annotations

import sqlite3
import uuid

from tracker import clock
from tracker.sqlite_db import SQLiteDB
from tracker.sqlite_queries import DELIVERY_COLS
from tracker.store import Delivery, RunRecord


class Deliveries(SQLiteDB):
    """The relay outbox (a base of ``SQLiteStore``)."""

    def _enqueue_delivery(self, db: sqlite3.Connection, run: RunRecord) -> None:
        db.execute(
            "INSERT INTO deliveries (id, run_id, user_id, url, next_attempt_at, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (f"msg_{uuid.uuid4().hex}", run.id, run.user_id, run.callback_url, clock.now(),
             clock.iso()),
        )

    async def due_deliveries(self, now: float, limit: int,
                             after: Delivery | None = None) -> list[Delivery]:
        """The next ``limit`` due deliveries in outbox order, from ``after`` (exclusive) if given.

        The order is (next_attempt_at, rowid), which the partial index deliveries_due holds
        as it is, so a page deep in a backlog is a seek, not a sort of the rows before it.
        """
        key, params = "", (now,)
        if after is not None:  # its rowid never changes, even if the row did since
            key = " AND (next_attempt_at, rowid) > (?, (SELECT rowid FROM deliveries WHERE id = ?))"
            params = (now, after.next_attempt_at, after.id)
        # without their bodies (up to a run's 100 messages each): a loop reads pages of rows
        # it mostly does not claim (their destination or user at its limit), and the body of
        # the one it claims is read then (``delivery_body``)
        rows = await self._read(
            f"SELECT {DELIVERY_COLS} FROM deliveries WHERE state = 'pending'"
            f" AND next_attempt_at <= ?{key} ORDER BY next_attempt_at, rowid LIMIT ?",
            (*params, limit))
        return [Delivery(**dict(r)) for r in rows]

    async def delivery_body(self, delivery_id: str) -> bytes | None:
        """What the delivery's first attempt sent (None before it: see migration V8)."""
        rows = await self._lookup("SELECT body FROM deliveries WHERE id = ?", (delivery_id,))
        return rows[0][0] if rows else None

    async def next_delivery_due(self) -> float | None:
        rows = await self._read(
            "SELECT min(next_attempt_at) FROM deliveries WHERE state = 'pending'"
        )
        return rows[0][0]

    async def record_attempt(self, delivery_id: str, attempt: dict, state: str,
                             next_attempt_at: float | None, claimed_at: float | None = None,
                             body: bytes | None = None) -> None:
        """Log an attempt and reschedule or close its delivery; nothing if that is gone.
        ``claimed_at``: the delivery's next_attempt_at when the attempt began; a redeliver
        asked for meanwhile has changed it, and wins: the delivery stays due as it set.
        ``body``: what the attempt sent, kept if it was the first (see migration V8)."""
        finished = clock.iso() if state != "pending" else None
        outcome = (attempt.get("status_code"), attempt.get("error"))

        def write(db: sqlite3.Connection) -> None:
            if not db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, state = ?, next_attempt_at = ?,"
                " last_status = ?, last_error = ?, finished_at = ?, body = coalesce(body, ?)"
                " WHERE id = ? AND (? IS NULL OR next_attempt_at = ?)",
                (state, next_attempt_at, *outcome, finished, body, delivery_id, claimed_at,
                 claimed_at),
            ).rowcount and not db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_status = ?,"
                " last_error = ?, body = coalesce(body, ?) WHERE id = ?",
                (*outcome, body, delivery_id),
            ).rowcount:
                return  # deleted with its run during the POST: an attempt row would be orphaned
            db.execute(
                "INSERT INTO delivery_attempts (delivery_id, at, status_code, latency_ms, error)"
                " VALUES (?, ?, ?, ?, ?)",
                (delivery_id, attempt["at"], attempt.get("status_code"),
                 attempt.get("latency_ms"), attempt.get("error")),
            )
            _show_on_run(db, delivery_id, attempt)

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


def _show_on_run(db: sqlite3.Connection, delivery_id: str, attempt: dict) -> None:
    """The run's callback_sent_at, callback_status_code and callback_error, set from its
    latest attempt as Letta sets its run's from its callback: the time without a zone, then
    the receiver's status or, when no answer came, why in Letta's words. Any answer (a 500, a
    redirect) is a status without an error, as at Letta; the attempt log keeps the rest."""
    row = db.execute("SELECT run_id, url FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
    if row is None:
        return
    run_id, url = row
    code, error = attempt.get("status_code"), attempt.get("error")
    text = (f"Failed to dispatch callback for run {run_id} to {url}: {error}"
            if code is None and error else None)
    db.execute("UPDATE runs SET callback_sent_at = ?, callback_status_code = ?,"
               " callback_error = ? WHERE id = ?",
               (attempt["at"].removesuffix("Z"), code, text, run_id))
